# pgpar — build, test, demo, and the patched PostgreSQL 17 the tests run against.
#
#   make demo        install what is needed, build, back up a throwaway cluster, verify, restore, query
#   make test        install what is needed, then fmt check, clippy -D warnings, unit + integration tests
#   make postgres    build PostgreSQL 17 with pg-patches/17 applied (cached outside the repository)
#   make -s pg-bindir  print the bin directory of that build
#   make bench       side-by-side benchmark against pg_basebackup

SHELL := /bin/bash
CARGO ?= cargo
# Where the patched PostgreSQL 17 build is cached, keyed inside by source version and patch hash.
PGPAR_CACHE ?= $(HOME)/.cache/pgpar
export PGPAR_CACHE
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

test: deps postgres lint
	PGPAR_PG15_BINDIR=$(PG15_BINDIR) PGPAR_PG17_BINDIR="$$(bash pg-patches/build.sh bindir)" \
	  $(CARGO) test --all-targets -- --test-threads=$${PGPAR_TEST_THREADS:-4}

demo: deps build
	@PG15_BINDIR=$(PG15_BINDIR) bash tests/scripts/demo.sh

bench: deps postgres build
	@PG15_BINDIR=$(PG15_BINDIR) PG17_BINDIR="$$(bash pg-patches/build.sh bindir)" bash bench/run.sh

clean:
	$(CARGO) clean
