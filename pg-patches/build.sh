#!/usr/bin/env bash
# Build PostgreSQL 17 (Debian trixie's postgresql-17 source package) with the
# patch series in pg-patches/17/ applied, into a cache outside the repository.
#
#   bash pg-patches/build.sh build    build (idempotent; instant when cached)
#   bash pg-patches/build.sh bindir   print the bin directory of the build for
#                                     the current patch series (offline)
#   bash pg-patches/build.sh srcdir   print the patched build tree (for make check)
#   bash pg-patches/build.sh tap      run the series' own TAP test (t/050_parallel.pl)
#                                     against the build, as the servers' OS user
#   bash pg-patches/build.sh hash     print the patch series hash
#
# Layout under $PGPAR_CACHE (default: /var/cache/pgpar as root, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/pgpar; see default_cache below):
#   apt-trixie/                 private apt configuration and lists (system apt untouched)
#   pg17/src/<version>/         downloaded source package + pristine upstream tree
#   pg17/<version>-<hash>/      build tree (build/) and installation (install/)
#   pg17/by-patch/<hash>        pointer: the install prefix built for that patch hash
#
# The cache key is the source version plus the sha256 of the patch files (and
# of the configure flags), so a changed patch or a new Debian minor gives a new
# build directory, and an unchanged one is found without the network.
#
# --with-openssl is there because the test fixture runs every server with
# ssl = on (the TLS authentication tests need it). --enable-tap-tests lets the
# build tree run PostgreSQL's TAP suites (it needs IPC::Run: libipc-run-perl).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCHDIR="$here/17"
# As root the servers run as the `postgres` OS user, which must reach the binaries: a cache in
# root's home (mode 0700 on Debian) would not do, so root's default is /var/cache/pgpar. Any
# other user runs the servers as itself, so its own cache directory is fine whatever its mode.
default_cache() {
    if [ "$(id -u)" = 0 ]; then
        echo /var/cache/pgpar
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/pgpar"
    fi
}
CACHE="${PGPAR_CACHE:-$(default_cache)}"
PGROOT="$CACHE/pg17"
APTDIR="$CACHE/apt-trixie"
JOBS="${PGPAR_MAKE_JOBS:-3}"
# Part of the cache key: a change here gives a new build directory.
CONFIGURE_FLAGS="--without-icu --with-lz4 --with-zstd --with-openssl --enable-tap-tests"
BUILD_DEPS="bison flex liblz4-dev libzstd-dev libreadline-dev zlib1g-dev libssl-dev make gcc patch pkg-config libipc-run-perl"

# PostgreSQL's makefiles generate headers (utils/errcodes.h …) only in a
# top-level make: when called from another make, build as if we were one.
unset MAKELEVEL MAKEFLAGS MFLAGS

log() { echo "pg-patches/build.sh: $*" >&2; }
die() { echo "pg-patches/build.sh: error: $*" >&2; exit 1; }

patch_files() {
    # stable order: the series order given by the file names
    find "$PATCHDIR" -maxdepth 1 -name '*.patch' -type f | LC_ALL=C sort
}

patch_hash() {
    local f
    {
        printf 'configure: %s\n' "$CONFIGURE_FLAGS"
        while IFS= read -r f; do
            printf '%s\n' "$(basename "$f")"
            sha256sum < "$f" | cut -d' ' -f1
        done < <(patch_files)
    } | sha256sum | cut -c1-16
}

pointer_prefix() {
    # prints the install prefix recorded for this patch hash, if it is complete
    local h p
    h=$(patch_hash)
    [ -f "$PGROOT/by-patch/$h" ] || return 1
    p=$(cat "$PGROOT/by-patch/$h")
    [ -f "$p/.complete" ] && [ -x "$p/bin/postgres" ] || return 1
    printf '%s\n' "$p"
}

install_deps() {
    local missing=() p
    for p in $BUILD_DEPS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing build dependencies: ${missing[*]}"
    [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]} and not root; install them first"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
}

apt_opts() {
    echo "-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$APTDIR -o Dir::State::Lists=$APTDIR/lists -o Dir::Cache=$APTDIR/cache -o Debug::NoLocking=1"
}

# The release the series is made and verified against. Its upstream tarball is fetched by
# name from the pool of the system's own mirror and checked against this SHA-256 (from the
# signed .dsc of that Debian version), so a build does not depend on which version a mirror's
# index names today: an index may already name a newer minor whose files the mirror does
# not serve yet (seen: trixie's index at 17.12-0+deb13u1, its pool still at 17.11), and a
# newer minor may not take the series without fuzz. Only when the pinned tarball cannot be
# had is the newest version in trixie's index tried (with `--fuzz=3`, as always).
PINNED_VERSION="17.11-0+deb13u1"
PINNED_ORIG="postgresql-17_17.11.orig.tar.bz2"
PINNED_SHA256="dd27f2b3c59e73ed14aa3324901242bf69a032a6347805f274e6260322d42979"

# The system's mirror: the URIs of the first stanza of its deb822 sources.
mirror_uri() {
    local srcfile="/etc/apt/sources.list.d/debian.sources" uri=""
    if [ -f "$srcfile" ]; then
        uri=$(awk 'BEGIN{RS=""} NR==1' "$srcfile" | awk '/^URIs:/{print $2; exit}')
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# Unpack the .orig tarball in $1 and mark the directory complete.
unpack_source() {
    local d="$1" orig
    orig=$(ls "$d"/postgresql-17_*.orig.tar.* 2>/dev/null | head -1)
    [ -n "$orig" ] || die "no .orig tarball in $d"
    (cd "$d" && tar xf "$orig") || die "cannot unpack $orig"
    touch "$d/.complete"
}

# The pinned release, by name and checksum. Succeeds when it is (or now is) in the cache.
fetch_pinned() {
    local d="$PGROOT/src/$PINNED_VERSION"
    [ -f "$d/.complete" ] && return 0
    local url
    url="$(mirror_uri)/pool/main/p/postgresql-17/$PINNED_ORIG"
    log "downloading postgresql-17 $PINNED_VERSION source ($PINNED_ORIG)"
    rm -rf "$d"; mkdir -p "$d"
    if ! timeout 600 /usr/lib/apt/apt-helper download-file "$url" "$d/$PINNED_ORIG" \
            "SHA256:$PINNED_SHA256" >&2; then
        log "could not download $url with the expected SHA-256"
        rm -rf "$d"
        return 1
    fi
    unpack_source "$d"
}

# Resolve the source version to build. Prints the version; the source lands in
# $PGROOT/src/<version>/ with the pristine tree in .../postgresql-<upstream>.
fetch_source() {
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$PGROOT/src"
    if fetch_pinned; then
        printf '%s\n' "$PINNED_VERSION"
        return
    fi
    log "falling back to the newest postgresql-17 in trixie's index"
    local srcfile="/etc/apt/sources.list.d/debian.sources"
    local ver=""
    if [ -f "$srcfile" ]; then
        # the system's own mirror (first stanza), turned into trixie source packages
        awk 'BEGIN{RS=""} NR==1' "$srcfile" \
            | sed -e 's/^Types: .*/Types: deb-src/' -e 's/^Suites: .*/Suites: trixie/' \
            > "$APTDIR/trixie.sources"
        # shellcheck disable=SC2046
        if timeout 120 apt-get $(apt_opts) update -qq >&2 2>"$APTDIR/update.log"; then
            ver=$(apt-cache $(apt_opts) showsrc postgresql-17 2>/dev/null \
                | awk '/^Version:/{print $2}' | sort -V | tail -1)
        else
            log "could not update the private apt lists (see $APTDIR/update.log)"
        fi
    fi
    if [ -z "$ver" ]; then
        # offline: fall back to the newest source already cached
        ver=$(find "$PGROOT/src" -mindepth 2 -maxdepth 2 -name .complete -printf '%h\n' 2>/dev/null \
            | xargs -r -n1 basename | sort -V | tail -1)
        [ -n "$ver" ] || die "cannot resolve postgresql-17 in trixie and nothing is cached"
        log "using cached source $ver"
    fi
    local d="$PGROOT/src/$ver"
    if [ ! -f "$d/.complete" ]; then
        log "downloading postgresql-17 $ver source"
        rm -rf "$d"; mkdir -p "$d"
        # shellcheck disable=SC2046
        (cd "$d" && apt-get $(apt_opts) source --download-only "postgresql-17=$ver" >&2) \
            || die "download of postgresql-17 $ver failed (and of the pinned $PINNED_VERSION before it)"
        unpack_source "$d"
    fi
    printf '%s\n' "$ver"
}

pristine_tree() {
    local d="$PGROOT/src/$1" t
    t=$(find "$d" -mindepth 1 -maxdepth 1 -type d -name 'postgresql-17*' | head -1)
    [ -n "$t" ] || die "no pristine tree in $d"
    printf '%s\n' "$t"
}

apply_series() {
    local tree=$1 p out
    while IFS= read -r p; do
        log "applying $(basename "$p")"
        if ! out=$(cd "$tree" && patch -p1 --fuzz=3 --forward --batch --no-backup-if-mismatch -r - < "$p" 2>&1); then
            echo "$out" >&2
            die "patch $(basename "$p") does not apply to $(basename "$tree"): rejected hunk(s) above"
        fi
        if grep -qiE 'FAILED|rejects|Reversed|ignored' <<<"$out"; then
            echo "$out" >&2
            die "patch $(basename "$p") did not apply cleanly"
        fi
        grep -E 'fuzz|offset' <<<"$out" >&2 || true
    done < <(patch_files)
}

cmd_build() {
    local prefix
    if prefix=$(pointer_prefix); then
        log "up to date: $prefix (patch hash $(patch_hash))"
        return 0
    fi
    [ -n "$(patch_files)" ] || die "no patches in $PATCHDIR"
    # One build at a time per cache: a second caller waits, then finds it done.
    mkdir -p "$PGROOT"
    [ -w "$PGROOT" ] || die "$PGROOT is not writable by $(id -un): build as its owner, or set PGPAR_CACHE to a directory of your own"
    # Before minutes of building: the servers' OS user (postgres, when we are root) must be able
    # to reach the cache, or the build would be of no use to the tests.
    chmod go+rx "$CACHE" "$PGROOT"
    bash "$here/../tests/scripts/server-access.sh" "$PGROOT"
    exec 9>"$PGROOT/.build.lock"
    if ! flock -n 9; then
        log "waiting for another build in $PGROOT"
        flock 9
    fi
    if prefix=$(pointer_prefix); then
        log "up to date: $prefix (patch hash $(patch_hash))"
        return 0
    fi
    install_deps
    local ver hash key work tree
    ver=$(fetch_source)
    hash=$(patch_hash)
    key="$ver-$hash"
    work="$PGROOT/$key"
    prefix="$work/install"
    if [ ! -f "$prefix/.complete" ]; then
        local t0=$SECONDS
        rm -rf "$work"; mkdir -p "$work"
        tree=$(pristine_tree "$ver")
        cp -a "$tree" "$work/build"
        apply_series "$work/build"
        log "configuring $key"
        (cd "$work/build" && ./configure --prefix="$prefix" $CONFIGURE_FLAGS \
            >"$work/configure.log" 2>&1) || { tail -30 "$work/configure.log" >&2; die "configure failed (log: $work/configure.log)"; }
        log "building with make -j$JOBS"
        (cd "$work/build" && make -j"$JOBS" -s >"$work/make.log" 2>&1) \
            || { grep -E 'error|Error' "$work/make.log" | head -30 >&2; die "build failed (log: $work/make.log)"; }
        (cd "$work/build" && make -s install >>"$work/make.log" 2>&1 \
            && make -s -C contrib/amcheck install >>"$work/make.log" 2>&1) \
            || { tail -30 "$work/make.log" >&2; die "install failed (log: $work/make.log)"; }
        # Whatever the umask, the servers' OS user must read and execute the installation.
        chmod -R go+rX "$prefix"
        touch "$prefix/.complete"
        log "built $key in $((SECONDS - t0)) s"
    fi
    mkdir -p "$PGROOT/by-patch"
    # The directories on the way to the installation must be searchable by the servers' user.
    chmod go+rx "$CACHE" "$PGROOT" "$work"
    bash "$here/../tests/scripts/server-access.sh" "$prefix/bin/initdb"
    printf '%s\n' "$prefix" > "$PGROOT/by-patch/$hash.tmp"
    mv "$PGROOT/by-patch/$hash.tmp" "$PGROOT/by-patch/$hash"
    log "installed in $prefix"
}

cmd_bindir() {
    local prefix
    prefix=$(pointer_prefix) || die "PostgreSQL 17 with the current pg-patches/17 (hash $(patch_hash)) is not built; run 'make postgres'"
    printf '%s\n' "$prefix/bin"
}

cmd_srcdir() {
    local prefix
    prefix=$(pointer_prefix) || die "not built; run 'make postgres'"
    printf '%s\n' "$(dirname "$prefix")/build"
}

# The series' TAP test, run with prove against the installed build (no temporary installation
# in the build tree): the servers start as the `postgres` OS user when we are root (initdb
# refuses root), in a scratch directory of their own under TMPDIR, removed when it passes.
cmd_tap() {
    local prefix build scratch rc=0
    prefix=$(pointer_prefix) || die "not built; run 'make postgres'"
    build="$(dirname "$prefix")/build"
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/pgpar-tap.XXXXXX")
    local run=()
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$scratch"
        run=(runuser -u postgres --)
    fi
    (cd "$build/src/bin/pg_basebackup" && "${run[@]}" env PATH="$prefix/bin:$PATH" \
        TESTDATADIR="$scratch/data" TESTLOGDIR="$scratch/log" PG_TEST_PORT_DIR="$scratch" \
        PG_REGRESS="$build/src/test/regress/pg_regress" top_builddir="$build" \
        prove -I "$build/src/test/perl" -I . t/050_parallel.pl) || rc=$?
    if [ "$rc" = 0 ]; then
        rm -rf "$scratch"
    else
        log "TAP test failed; logs in $scratch/log"
    fi
    return "$rc"
}

case "${1:-}" in
    build) cmd_build ;;
    bindir) cmd_bindir ;;
    srcdir) cmd_srcdir ;;
    tap) cmd_tap ;;
    hash) patch_hash ;;
    fetch) install_deps; v=$(fetch_source); pristine_tree "$v" ;;
    *) echo "usage: $0 build|bindir|srcdir|tap|hash|fetch" >&2; exit 2 ;;
esac
