#!/usr/bin/env bash
# Side-by-side benchmark: pg_basebackup -X stream against pgpar at several --jobs, on the same
# cluster, in the same run, interleaved, cold cache before every backup where the kernel lets
# us. Prints the median seconds of each and its ratio to pg_basebackup's (above 1 = faster).
#
# Environment (all optional):
#   PG17_BINDIR  patched PostgreSQL 17 bin dir (the server, pg_basebackup, pgbench); `make bench` sets it
#   PGPAR_BIN    pgpar to test (default target/release/pgpar)
#   SCALE        pgbench scale of the test cluster (default 100, about 1.5 GB)
#   RUNS         rounds; the median is reported (default 3)
#   JOBS         pgpar --jobs values (default "1 2 4 8")
#   SYNC         1 to let both tools fsync their output (default 0: --no-sync for both)
#   BENCH_DIR    where the cluster and backups go (default a temp dir under /var/tmp)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bindir=${PG17_BINDIR:?PG17_BINDIR must name the patched PostgreSQL 17 bin directory (make bench sets it)}
pgpar=${PGPAR_BIN:-$here/target/release/pgpar}
scale=${SCALE:-100}
runs=${RUNS:-3}
jobs=${JOBS:-"1 2 4 8"}
sync=${SYNC:-0}
[ -x "$pgpar" ] || { echo "bench: $pgpar not found: run 'cargo build --release'" >&2; exit 1; }

work=${BENCH_DIR:-$(mktemp -d /var/tmp/pgpar-bench.XXXXXX)}
mkdir -p "$work"
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  chown postgres "$work"
  # From /: our working directory may be one postgres cannot enter (a clone under /root), and
  # PostgreSQL's tools then warn "could not change directory" on every call.
  as_pg=(runuser -u postgres -- env --chdir=/)
fi
# A BENCH_DIR under a 0700 home would fail at initdb: say so in one line instead.
bash "$(dirname "$0")/../tests/scripts/server-access.sh" "$work"
port=$(( 20000 + RANDOM % 20000 ))
data=$work/data
sock=$work
cleanup() {
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  [ -n "${BENCH_DIR:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

echo "== cluster: pgbench scale $scale, PostgreSQL $("$bindir/postgres" --version | awk '{print $3}'), $(nproc) cores"
"${as_pg[@]}" "$bindir/initdb" -D "$data" -A trust --data-checksums -U postgres >/dev/null
cat >> "$data/postgresql.conf" <<CONF
port = $port
unix_socket_directories = '$sock'
listen_addresses = ''
wal_level = replica
max_wal_senders = 40
max_replication_slots = 10
shared_buffers = 256MB
checkpoint_timeout = 30min
max_wal_size = 8GB
CONF
"${as_pg[@]}" "$bindir/pg_ctl" -D "$data" -l "$work/server.log" -w start >/dev/null
"${as_pg[@]}" "$bindir/pgbench" -i -q -s "$scale" -h "$sock" -p "$port" -U postgres postgres >/dev/null 2>&1
"${as_pg[@]}" "$bindir/psql" -X -q -h "$sock" -p "$port" -U postgres -c "CHECKPOINT" postgres
echo "== data directory: $(du -sm --exclude=pg_wal "$data" | awk '{print $1}') MB without pg_wal; $runs rounds; sync=$sync"

drop_caches() {
  sync
  if [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
    cold=cold
  else
    cold=warm
  fi
}

nosync_bb=(); nosync_pp=()
if [ "$sync" != 1 ]; then nosync_bb=(--no-sync); nosync_pp=(--no-sync); fi

declare -A times
tools=("pg_basebackup")
for j in $jobs; do tools+=("pgpar-j$j"); done

for r in $(seq 1 "$runs"); do
  for t in "${tools[@]}"; do
    out=$work/out
    rm -rf "$out"
    drop_caches
    start=$(date +%s.%N)
    if [ "$t" = pg_basebackup ]; then
      "$bindir/pg_basebackup" -D "$out" -X stream -c fast -h "$sock" -p "$port" -U postgres "${nosync_bb[@]}"
    else
      "$pgpar" backup -D "$out" -c fast -j "${t#pgpar-j}" -h "$sock" -p "$port" -U postgres "${nosync_pp[@]}"
    fi
    end=$(date +%s.%N)
    s=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')
    times[$t]="${times[$t]:-} $s"
    printf '   round %d  %-14s %7.2f s (%s cache)\n' "$r" "$t" "$s" "$cold"
    # MB/s is computed on what a backup holds (without the streamed WAL).
    [ -n "${size:-}" ] || size=$(du -sm --exclude=pg_wal "$out" | awk '{print $1}')
  done
done
rm -rf "$work/out"

median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
base=$(median "${times[pg_basebackup]}")
echo
echo "== medians of $runs rounds (${size} MB, $cold cache, $(nproc) cores)"
printf '%-14s %9s %9s %12s\n' tool seconds MB/s "vs pg_bb"
for t in "${tools[@]}"; do
  m=$(median "${times[$t]}")
  awk -v t="$t" -v m="$m" -v size="$size" -v base="$base" \
    'BEGIN {printf "%-14s %9.2f %9.1f %11.2fx\n", t, m, size / m, base / m}'
done
