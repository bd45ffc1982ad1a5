# pgpar — build, test, demo, and the patched PostgreSQL 17 the tests run against.
#
#   make demo        install what is needed, build, back up a throwaway cluster, verify, restore, query
#   make test        install what is needed, then fmt check, clippy -D warnings, the server patch's
#                    own TAP test (pg-patches/build.sh tap), unit + integration tests; writes
#                    docs/faults.md (the faults the suite provokes) when they passed
#   make postgres    build PostgreSQL 17 with pg-patches/17 applied (cached outside the repository)
#   make -s pg-bindir  print the bin directory of that build
#   make bench       side-by-side benchmark against pg_basebackup
#
# The PostgreSQL 17 build is cached in $PGPAR_CACHE, else /var/cache/pgpar as root, else
# ${XDG_CACHE_HOME:-~/.cache}/pgpar (about 450 MB); pg-patches/build.sh alone decides, keyed
# inside by source version and patch hash. As root the servers run as the `postgres` OS user;
# as anyone else, as that user (no root needed once the packages are installed).
# tests/scripts/server-access.sh stops a target, in one line, when that user cannot reach the
# binaries or the scratch directories (a cache or TMPDIR under a 0700 home, for instance).

SHELL := /bin/bash
CARGO ?= cargo
PG15_BINDIR ?= /usr/lib/postgresql/15/bin

.PHONY: all build deps postgres pg-bindir test-access tap test demo bench lint unit clean

all: build

build:
	$(CARGO) build --release

deps:
	@bash tests/scripts/deps.sh

# PostgreSQL's own makefiles generate headers only when MAKELEVEL is 0: run its build as a
# top-level make, or a parallel build fails at random on a missing utils/errcodes.h.
postgres: deps
	@env -u MAKELEVEL -u MAKEFLAGS -u MFLAGS bash pg-patches/build.sh build

pg-bindir:
	@bash pg-patches/build.sh bindir

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# One clear line, before lint and the suite, when the servers' OS user cannot run the binaries
# or enter the scratch directories the tests give it (the fixture makes them in TMPDIR).
test-access: postgres
	@bash tests/scripts/server-access.sh "$$(bash pg-patches/build.sh bindir)/initdb" \
	  $(PG15_BINDIR)/initdb "$${TMPDIR:-/tmp}"

# The server patch's own TAP test (src/bin/pg_basebackup/t/050_parallel.pl in the patched tree).
tap: postgres test-access
	@bash pg-patches/build.sh tap

# The suite registers the faults it provokes in target/faults; once it passed, they become
# docs/faults.md (fault -> what pgpar did -> test).
test: deps postgres test-access lint tap
	rm -rf target/faults
	PGPAR_PG15_BINDIR=$(PG15_BINDIR) PGPAR_PG17_BINDIR="$$(bash pg-patches/build.sh bindir)" \
	  PGPAR_FAULTS_DIR="$(CURDIR)/target/faults" \
	  $(CARGO) test --all-targets -- --test-threads=$${PGPAR_TEST_THREADS:-4}
	bash tests/scripts/faults.sh target/faults > docs/faults.md.new && mv docs/faults.md.new docs/faults.md

demo: deps build
	@bash tests/scripts/server-access.sh $(PG15_BINDIR)/initdb /tmp
	@PG15_BINDIR=$(PG15_BINDIR) bash tests/scripts/demo.sh

bench: deps postgres build
	@bash tests/scripts/server-access.sh "$$(bash pg-patches/build.sh bindir)/initdb" $(PG15_BINDIR)/initdb
	@PG15_BINDIR=$(PG15_BINDIR) PG17_BINDIR="$$(bash pg-patches/build.sh bindir)" bash bench/run.sh

clean:
	$(CARGO) clean
