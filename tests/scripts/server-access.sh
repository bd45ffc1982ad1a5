#!/usr/bin/env bash
# Fail early, in one line, when the OS user that runs the test and demo servers cannot reach a
# path it needs: a bin directory's `initdb`, a scratch directory, the build cache.
#
#   bash tests/scripts/server-access.sh PATH...
#
# As root the servers run as the `postgres` OS user (initdb and postgres refuse root); as anyone
# else they run as that user. Every directory on the way to PATH must be searchable by the
# servers' user, and PATH itself executable (a program) or searchable (a directory). A home
# directory of mode 0700 (Debian's /root) on the way is the usual culprit when root runs `make`.
#
# Used by `make test` (before the suite), `make demo`, `make bench`, pg-patches/build.sh (before
# and after a build) and the test fixture (tests/it/cluster.rs), so that they all say the same.
set -euo pipefail

die() { echo "pgpar: error: $*" >&2; exit 1; }

if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 \
        || die "running as root, the servers run as the 'postgres' OS user, and there is none (install postgresql-15: bash tests/scripts/deps.sh)"
    server_user=postgres
    as_server() { runuser -u postgres -- "$@"; }
    hint="keep what the servers use outside it (PGPAR_CACHE for the PostgreSQL 17 build, TMPDIR for scratch directories), or run make as a user other than root"
else
    server_user=$(id -un)
    as_server() { "$@"; }
    hint="keep what the servers use outside it (PGPAR_CACHE for the PostgreSQL 17 build, TMPDIR for scratch directories)"
fi

describe() { # the mode and owner of one path, as a person reads them
    stat -c 'mode %a, owner %U' "$1" 2>/dev/null || echo "mode unknown"
}

check() {
    local path=$1 p part
    [[ $path == /* ]] || path=$PWD/$path
    as_server test -x "$path" && return 0
    # Find the first directory on the way that the servers' user cannot search: that is what to
    # fix, and what a plain "Permission denied" from runuser would not say.
    p=/
    IFS=/ read -ra parts <<<"${path#/}"
    for part in "${parts[@]}"; do
        [[ -n $part ]] || continue
        if as_server test -d "$p" && ! as_server test -x "$p"; then
            die "the servers' OS user ($server_user) cannot reach $path: $p is not searchable by it ($(describe "$p")); $hint"
        fi
        p=${p%/}/$part
    done
    [[ -e $path ]] || die "$path does not exist"
    die "the servers' OS user ($server_user) cannot execute or enter $path ($(describe "$path"))"
}

(($# > 0)) || die "usage: $0 PATH..."
for path in "$@"; do
    check "$path"
done
