#!/usr/bin/env bash
# Install what `make test` and `make demo` need on Debian 12, and nothing when it is all there.
#
# Idempotent: the fast path is one dpkg-query call (well under a second) and touches nothing.
# Otherwise, as root and non-interactively: `apt-get update` once, then `apt-get install -y`.
# Debian's postgresql-15 would create and start a system cluster "15/main" on install; we
# configure postgresql-common with `create_main_cluster = false` first, so the only servers on
# the machine are the throwaway ones the tests and the demo start themselves.
set -euo pipefail

# Packages, and why:
#   postgresql-15, postgresql-client-15  stock server and its tools (initdb, pg_ctl, psql, pgbench,
#                                        pg_verifybackup, pg_controldata) for the integration tests
#   openssl                              self-signed server certificate for the TLS tests
#   procps                               ps/pgrep, to look at the test servers when debugging
#   make                                 `make test` / `make demo` themselves
#   python3                              demo.sh picks free ports with it
#   bzip2, xz-utils                      tar needs them to unpack the PostgreSQL 17 source package
#                                        (pg-patches/build.sh); minimal images lack them
#   ca-certificates                      apt over https mirrors on minimal images
#   libipc-run-perl                      PostgreSQL's TAP tests (configure --enable-tap-tests,
#                                        and `build.sh tap`, the series' own test)
PACKAGES=(postgresql-15 postgresql-client-15 openssl procps make python3 bzip2 xz-utils ca-certificates libipc-run-perl)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # "ii": installed and configured; anything else (unknown, half-installed, removed) is missing.
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null) == ii* ]] || missing+=("$pkg")
done

# A Rust toolchain is not a Debian package here: say so plainly rather than let make fail with
# "cargo: command not found" (a user other than root cannot use root's ~/.cargo, mode 0700).
if ! command -v cargo >/dev/null; then
    echo "deps: no cargo in PATH for $(id -un): install a Rust toolchain for this user (rustup), or put its bin directory in PATH" >&2
    exit 1
fi

# `make test` runs cargo fmt and clippy: add the components if the toolchain lacks them.
for component in rustfmt clippy; do
    sub=${component/rustfmt/fmt}
    if ! cargo "$sub" --version >/dev/null 2>&1 && command -v rustup >/dev/null; then
        echo "deps: adding Rust component $component" >&2
        rustup component add "$component"
    fi
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    # Nothing else here needs root: as another user, make test and make demo run the servers as
    # that user, once the packages are there.
    echo "deps: missing packages: ${missing[*]}; installing them needs root (apt-get install ${missing[*]}), then run make again as $(id -un)" >&2
    exit 1
fi
echo "deps: installing ${missing[*]}" >&2

export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"; }

apt_get update

# No system cluster: postgresql-common's createcluster.conf reads createcluster.d/, and
# postgresql-15's postinst asks it (pg_conftool ... show create_main_cluster) before creating
# "15/main". Install postgresql-common on its own first so the setting is in place, and verified,
# before the server package is configured.
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/00-pgpar.conf
apt_get install --no-install-recommends postgresql-common
if [[ $(pg_conftool /etc/postgresql-common/createcluster.conf show -bs create_main_cluster 2>/dev/null || true) != off ]]; then
    # An older or hand-edited createcluster.conf without the include_dir: set it there.
    if grep -qE '^\s*#?\s*create_main_cluster' /etc/postgresql-common/createcluster.conf; then
        sed -ri 's/^\s*#?\s*(create_main_cluster)\s*=.*$/\1 = false/' /etc/postgresql-common/createcluster.conf
    else
        echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf
    fi
fi

apt_get install --no-install-recommends "${missing[@]}"
echo "deps: done" >&2
