# pgpar — build, test, demo, and the patched PostgreSQL 17 the tests run against.
#
#   make demo        install what is needed, build, back up a throwaway cluster, verify, restore, query
#   make test        install what is needed, then fmt check, clippy -D warnings, unit + integration tests
#   make postgres    build PostgreSQL 17 with pg-patches/17 applied (cached outside the repository)
#   make -s pg-bindir  print the bin directory of that build
#   make bench       side-by-side benchmark against pg_basebackup

SHELL := /bin/bash
CARGO ?= cargo
# The patched PostgreSQL 17 build is cached in $PGPAR_CACHE, keyed inside by source version and
# patch hash; pg-patches/build.sh alone decides the default (/var/cache/pgpar as root).
PG15_BINDIR ?= /usr/lib/postgresql/15/bin

.PHONY: all build deps postgres pg-bindir test demo bench lint unit clean

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

# server-access.sh: one clear line, before the suite, when the servers' OS user cannot run the
# binaries or enter the scratch directories the tests give it.
test: deps postgres lint
	bash tests/scripts/server-access.sh "$$(bash pg-patches/build.sh bindir)/initdb" \
	  $(PG15_BINDIR)/initdb "$${TMPDIR:-/tmp}"
	PGPAR_PG15_BINDIR=$(PG15_BINDIR) PGPAR_PG17_BINDIR="$$(bash pg-patches/build.sh bindir)" \
	  $(CARGO) test --all-targets -- --test-threads=$${PGPAR_TEST_THREADS:-4}

demo: deps build
	@bash tests/scripts/server-access.sh $(PG15_BINDIR)/initdb /tmp
	@PG15_BINDIR=$(PG15_BINDIR) bash tests/scripts/demo.sh

bench: deps postgres build
	@bash tests/scripts/server-access.sh "$$(bash pg-patches/build.sh bindir)/initdb" $(PG15_BINDIR)/initdb
	@PG15_BINDIR=$(PG15_BINDIR) PG17_BINDIR="$$(bash pg-patches/build.sh bindir)" bash bench/run.sh

clean:
	$(CARGO) clean
