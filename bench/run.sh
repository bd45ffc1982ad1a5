#!/usr/bin/env bash
# Side-by-side benchmark of pg_basebackup -X stream against pgpar, on the same cluster, in the
# same run, interleaved, cold cache before every backup where the kernel lets us. Prints the
# median seconds of each and its ratio to pg_basebackup's (above 1 = faster).
#
# Two clusters, one after the other (each stopped and removed before the next starts):
#   17  the patched PostgreSQL 17: pg_basebackup, pgpar at each of JOBS (automatic choice: the
#       parallel method), and pgpar --method sql at each of SQL_JOBS;
#   15  stock PostgreSQL 15: its pg_basebackup, and pgpar --method sql at each of SQL_JOBS.
# Then the issue-10 targets, each from one cluster's medians: sql -j4 within 1.3x of the
# parallel method's time on 17, and at most 0.75x pg_basebackup's time on 15.
#
# Environment (all optional):
#   PG17_BINDIR  patched PostgreSQL 17 bin dir (the server, pg_basebackup, pgbench); `make bench` sets it
#   PG15_BINDIR  stock PostgreSQL 15 bin dir (default /usr/lib/postgresql/15/bin); `make bench` sets it
#   CLUSTERS     which clusters, in order (default "17 15")
#   PGPAR_BIN    pgpar to test (default target/release/pgpar)
#   SCALE        pgbench scale of each cluster (default 100, about 1.5 GB)
#   RUNS         rounds; the median is reported (default 3)
#   JOBS         pgpar --jobs values for the automatic method on 17 (default "1 2 4 8")
#   SQL_JOBS     pgpar --jobs values for --method sql (default "4", left out if pgpar lacks
#                the method; "" for none)
#   SYNC         1 to let both tools fsync their output (default 0: --no-sync for both)
#   BENCH_DIR    where the clusters and backups go (default a temp dir under /var/tmp)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
pgpar=${PGPAR_BIN:-$here/target/release/pgpar}
clusters=${CLUSTERS:-"17 15"}
scale=${SCALE:-100}
runs=${RUNS:-3}
jobs=${JOBS:-"1 2 4 8"}
sql_jobs=${SQL_JOBS-4}
sync=${SYNC:-0}
[ -x "$pgpar" ] || { echo "bench: $pgpar not found: run 'cargo build --release'" >&2; exit 1; }
for c in $clusters; do
  case $c in
    17) : "${PG17_BINDIR:?PG17_BINDIR must name the patched PostgreSQL 17 bin directory (make bench sets it)}" ;;
    15) PG15_BINDIR=${PG15_BINDIR:-/usr/lib/postgresql/15/bin}
        [ -x "$PG15_BINDIR/postgres" ] || { echo "bench: no PostgreSQL 15 server in $PG15_BINDIR: set PG15_BINDIR, or CLUSTERS=17" >&2; exit 1; } ;;
    *) echo "bench: CLUSTERS takes 17 and 15, not \"$c\"" >&2; exit 1 ;;
  esac
done
# Say so once, up front, instead of failing in the middle of the first round: asked for, the
# sql rows are required; by default, they are left out of a build without the method.
if [ -n "$sql_jobs" ] && ! "$pgpar" backup --help 2>/dev/null | grep -qw sql; then
  if [ -n "${SQL_JOBS+set}" ]; then
    echo "bench: $pgpar has no --method sql: set SQL_JOBS= to leave those rows out" >&2
    exit 1
  fi
  echo "== $pgpar has no --method sql: its rows are left out"
  sql_jobs=
fi

# One benchmark at a time per machine: two at once share the cores and the disk, and each
# one's cache drop empties the other's cache, so neither measures anything.
lock=/var/tmp/pgpar-bench.lock
[ -e "$lock" ] || (umask 0; : >> "$lock")
exec 9<"$lock"
if ! flock -n 9; then
  echo "== another benchmark is running on this machine; waiting for it to finish"
  flock 9
fi

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
sock=$work
bindir=
data=
stop_server() {
  [ -n "$data" ] || return 0
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$data" "$work/out"
  data=
}
cleanup() {
  stop_server
  [ -n "${BENCH_DIR:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

drop_caches() {
  sync
  if [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
    cold=cold
  else
    cold=warm
  fi
}

median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

nosync=()
if [ "$sync" != 1 ]; then nosync=(--no-sync); fi

# Medians of every cluster, as medians[<cluster>:<tool>], for the targets at the end.
declare -A medians

# bench_cluster NAME BINDIR TOOL...: a pgbench cluster on BINDIR's server, RUNS rounds of
# every TOOL (pg_basebackup, pgpar-j<N>, pgpar-sql-j<N>), then its table of medians.
bench_cluster() {
  local name=$1 r t s m out start end size= port
  local -a tools=("${@:3}")
  bindir=$2
  data=$work/data-$name
  port=$(( 20000 + RANDOM % 20000 ))
  echo "== cluster $name: pgbench scale $scale, PostgreSQL $("$bindir/postgres" --version | awk '{print $3}'), $(nproc) cores"
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
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$data" -l "$work/server-$name.log" -w start >/dev/null
  "${as_pg[@]}" "$bindir/pgbench" -i -q -s "$scale" -h "$sock" -p "$port" -U postgres postgres >/dev/null 2>&1
  "${as_pg[@]}" "$bindir/psql" -X -q -h "$sock" -p "$port" -U postgres -c "CHECKPOINT" postgres
  echo "== data directory: $(du -sm --exclude=pg_wal "$data" | awk '{print $1}') MB without pg_wal; $runs rounds; sync=$sync"

  local -A times=()
  for r in $(seq 1 "$runs"); do
    for t in "${tools[@]}"; do
      out=$work/out
      rm -rf "$out"
      drop_caches
      start=$(date +%s.%N)
      case $t in
        pg_basebackup)
          "$bindir/pg_basebackup" -D "$out" -X stream -c fast -h "$sock" -p "$port" -U postgres "${nosync[@]}" ;;
        pgpar-sql-j*)
          "$pgpar" backup -D "$out" -c fast --method sql -j "${t#pgpar-sql-j}" -h "$sock" -p "$port" -U postgres "${nosync[@]}" ;;
        pgpar-j*)
          "$pgpar" backup -D "$out" -c fast -j "${t#pgpar-j}" -h "$sock" -p "$port" -U postgres "${nosync[@]}" ;;
      esac
      end=$(date +%s.%N)
      s=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')
      times[$t]="${times[$t]:-} $s"
      printf '   round %d  %-14s %7.2f s (%s cache)\n' "$r" "$t" "$s" "$cold"
      # MB/s is computed on what a backup holds (without the streamed WAL).
      [ -n "$size" ] || size=$(du -sm --exclude=pg_wal "$out" | awk '{print $1}')
    done
  done
  stop_server

  local base
  base=$(median "${times[pg_basebackup]}")
  echo
  echo "== cluster $name: medians of $runs rounds (${size} MB, $cold cache, $(nproc) cores)"
  printf '%-14s %9s %9s %12s\n' tool seconds MB/s "vs pg_bb"
  for t in "${tools[@]}"; do
    m=$(median "${times[$t]}")
    medians[$name:$t]=$m
    awk -v t="$t" -v m="$m" -v size="$size" -v base="$base" \
      'BEGIN {printf "%-14s %9.2f %9.1f %11.2fx\n", t, m, size / m, base / m}'
  done
  echo
}

for c in $clusters; do
  tools=(pg_basebackup)
  if [ "$c" = 17 ]; then
    for j in $jobs; do tools+=("pgpar-j$j"); done
    for j in $sql_jobs; do tools+=("pgpar-sql-j$j"); done
    bench_cluster 17 "$PG17_BINDIR" "${tools[@]}"
  elif [ -z "$sql_jobs" ]; then
    echo "== cluster 15 left out: SQL_JOBS is empty, and pgpar backs up stock PostgreSQL 15 only with --method sql"
  else
    for j in $sql_jobs; do tools+=("pgpar-sql-j$j"); done
    bench_cluster 15 "$PG15_BINDIR" "${tools[@]}"
  fi
done

# target NAME TOOL REFERENCE LIMIT: TOOL's median time over REFERENCE's, on cluster NAME.
target() {
  local a=${medians[$1:$2]:-} b=${medians[$1:$3]:-}
  [ -n "$a" ] && [ -n "$b" ] || return 0
  awk -v c="$1" -v t="$2" -v r="$3" -v a="$a" -v b="$b" -v lim="$4" \
    'BEGIN {x = a / b; printf "%-4s %-14s / %-14s %6.2f s / %6.2f s = %5.2fx (target <= %.2fx: %s)\n",
            c, t, r, a, b, x, lim, (x <= lim ? "met" : "NOT met")}'
}
if [ -n "$sql_jobs" ]; then
  echo "== targets (time ratios, lower is faster)"
  target 17 pgpar-sql-j4 pgpar-j4 1.30
  target 15 pgpar-sql-j4 pg_basebackup 0.75
fi
