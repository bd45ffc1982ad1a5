#!/usr/bin/env bash
# Fail early, in one line, when the OS user that runs the test and demo servers cannot reach a
# path it needs: a bin directory's `initdb`, a scratch directory.
#
#   bash tests/scripts/server-access.sh PATH...
#
# As root the servers run as the `postgres` OS user (initdb and postgres refuse root), so every
# directory on the way to PATH must be searchable by `postgres`, and PATH itself executable (a
# program) or searchable (a directory). A home directory of mode 0700 (Debian's /root) on the
# way is the usual culprit. As any other user the servers run as that user, who can reach
# whatever it can see: nothing to check beyond existence.
set -euo pipefail

die() { echo "pgpar: error: $*" >&2; exit 1; }

as_server() { runuser -u postgres -- "$@"; }

describe() { # the mode and owner of one path, as a person reads them
    stat -c 'mode %a, owner %U' "$1"
}

check() {
    local path=$1 p
    [[ -e $path ]] || die "$path does not exist"
    [[ $(id -u) -eq 0 ]] || return 0
    id postgres >/dev/null 2>&1 || die "there is no 'postgres' OS user to run the servers as (install postgresql-15: tests/scripts/deps.sh)"
    as_server test -x "$path" && return 0
    # Find the first component on the way that postgres cannot search: that is what to fix.
    p=/
    local part
    IFS=/ read -ra parts <<<"${path#/}"
    for part in "${parts[@]}"; do
        [[ -n $part ]] || continue
        if [[ -d $p ]] && ! as_server test -x "$p"; then
            die "the postgres OS user cannot reach $path: $p is not searchable by it ($(describe "$p")); keep server files outside it (PGPAR_CACHE for the PostgreSQL 17 build, TMPDIR for scratch directories)"
        fi
        p=${p%/}/$part
    done
    die "the postgres OS user cannot execute or enter $path ($(describe "$path"))"
}

(($# > 0)) || die "usage: $0 PATH..."
for path in "$@"; do
    check "$path"
done
