#!/usr/bin/env bash
# `make demo`: back up a throwaway stock PostgreSQL 15 cluster with pgpar over 4 sessions at
# once (the sql method, as a least-privilege role), verify the backup, start it as a second
# server, and compare what both servers return. Everything lives under one temporary
# directory that is removed (servers stopped) on exit, whatever happens.
#
# make has already installed the dependencies (tests/scripts/deps.sh) and built
# target/release/pgpar. Servers run as the `postgres` OS user when we are root, as the test
# fixture (tests/it/cluster.rs) does.
set -euo pipefail
cd "$(dirname "$0")/../.."

BINDIR=${PG15_BINDIR:-/usr/lib/postgresql/15/bin}
PGPAR=${PGPAR:-target/release/pgpar}
[[ -x $BINDIR/initdb ]] || { echo "demo: no PostgreSQL 15 in $BINDIR (run tests/scripts/deps.sh)" >&2; exit 1; }
[[ -x $PGPAR ]] || { echo "demo: $PGPAR is not built (make build)" >&2; exit 1; }

step=0
heading() { step=$((step + 1)); printf '\n\033[1m== %d. %s\033[0m\n' "$step" "$*"; }
# As postgres, from /: our working directory is the repository, which postgres may not be able to
# enter (a clone under /root), and PostgreSQL 15's tools then warn "could not change directory".
as_pg() { if [[ $(id -u) -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

WORK=$(mktemp -d /tmp/pgpar-demo.XXXXXX)
chmod 755 "$WORK"
SRC=$WORK/source BACKUP=$WORK/backup SOCK=$WORK/sock
cleanup() {
    for d in "$BACKUP" "$SRC"; do
        [[ -f $d/postmaster.pid ]] && as_pg "$BINDIR/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir "$SOCK"
[[ $(id -u) -ne 0 ]] || chown postgres: "$WORK" "$SOCK"

server_conf() { # port
    cat <<CONF
listen_addresses = '127.0.0.1'
port = $1
unix_socket_directories = '$SOCK'
wal_level = replica
max_wal_senders = 10
fsync = off
CONF
}

heading "Starting a throwaway PostgreSQL 15 server"
SRC_PORT=$(free_port)
as_pg "$BINDIR/initdb" -D "$SRC" --data-checksums -A trust -U postgres -E UTF8 --locale=C --no-sync >/dev/null
server_conf "$SRC_PORT" | as_pg tee -a "$SRC/postgresql.auto.conf" >/dev/null
as_pg "$BINDIR/pg_ctl" -D "$SRC" -l "$WORK/source.log" -w start >/dev/null
echo "source: $SRC, port $SRC_PORT, socket in $SOCK"

psql_on() { # port sql
    "$BINDIR/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$SOCK" -p "$1" -U postgres -d postgres -c "$2"
}

heading "Loading sample data (pgbench scale 5 and 2000 transactions, plus a table with an index and TOAST-ed values)"
"$BINDIR/pgbench" -i -q -s 5 -h "$SOCK" -p "$SRC_PORT" -U postgres postgres 2>&1 | tail -n 1
# A few thousand transactions, so that balances and history are not all zero.
"$BINDIR/pgbench" -n -c 2 -t 1000 -h "$SOCK" -p "$SRC_PORT" -U postgres postgres 2>&1 | grep -E '^(number of transactions actually|tps)'
psql_on "$SRC_PORT" "
    CREATE TABLE notes (id int PRIMARY KEY, body text);
    INSERT INTO notes SELECT i, repeat(md5(i::text), 100) FROM generate_series(1, 5000) i;
    CREATE INDEX notes_body ON notes (left(body, 8));"
echo "source size: $(psql_on "$SRC_PORT" "SELECT pg_size_pretty(pg_database_size('postgres'))")"

heading "A least-privilege backup role (README: the sql method, and a least-privilege role)"
ROLE_SQL="CREATE ROLE pgpar_backup LOGIN REPLICATION;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_backup_start(text, boolean) TO pgpar_backup;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_backup_stop(boolean) TO pgpar_backup;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO pgpar_backup;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO pgpar_backup;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO pgpar_backup;"
echo "$ROLE_SQL"
psql_on "$SRC_PORT" "$ROLE_SQL"
CONN="host=$SOCK port=$SRC_PORT user=pgpar_backup"
echo "\$ $PGPAR check -d '$CONN'"
"$PGPAR" check -d "$CONN"

heading "Backing up with pgpar: 4 SQL sessions in parallel (the sql method)"
echo "\$ $PGPAR backup -D $BACKUP -d '$CONN' -c fast --method sql -j 4 -P"
"$PGPAR" backup -D "$BACKUP" -d "$CONN" -c fast --method sql -j 4 -P

heading "Verifying the backup with pg_verifybackup"
"$BINDIR/pg_verifybackup" "$BACKUP"

heading "Starting the backup as a second server"
COPY_PORT=$(free_port)
[[ $(id -u) -ne 0 ]] || chown -R postgres: "$BACKUP"
chmod -R go-rwx "$BACKUP"
server_conf "$COPY_PORT" | as_pg tee -a "$BACKUP/postgresql.auto.conf" >/dev/null
as_pg "$BINDIR/pg_ctl" -D "$BACKUP" -l "$WORK/copy.log" -w start >/dev/null
echo "copy: $BACKUP, port $COPY_PORT"

heading "Comparing source and copy"
QUERY="
SELECT 'pgbench_accounts rows=' || count(*) || ' sum(abalance)=' || sum(abalance) FROM pgbench_accounts
UNION ALL SELECT 'pgbench_branches rows=' || count(*) || ' sum(bbalance)=' || sum(bbalance) FROM pgbench_branches
UNION ALL SELECT 'pgbench_tellers  rows=' || count(*) || ' sum(tbalance)=' || sum(tbalance) FROM pgbench_tellers
UNION ALL SELECT 'pgbench_history  rows=' || count(*) || ' sum(delta)=' || sum(delta) FROM pgbench_history
UNION ALL SELECT 'notes            rows=' || count(*) || ' md5=' || md5(string_agg(body, ',' ORDER BY id)) FROM notes"
psql_on "$SRC_PORT" "$QUERY" > "$WORK/source.out"
psql_on "$COPY_PORT" "$QUERY" > "$WORK/copy.out"
printf '%-8s %s\n' source: "" && sed 's/^/  /' "$WORK/source.out"
printf '%-8s %s\n' copy: "" && sed 's/^/  /' "$WORK/copy.out"
if cmp -s "$WORK/source.out" "$WORK/copy.out"; then
    printf '\n\033[1mOK: the restored copy returns exactly what the source does.\033[0m\n'
else
    echo "MISMATCH between source and copy:" >&2
    diff "$WORK/source.out" "$WORK/copy.out" >&2 || true
    exit 1
fi
