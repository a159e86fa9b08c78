#!/usr/bin/env bash
# Builds walvault and shows it archiving and restoring WAL on a throw-away PostgreSQL 15 cluster.
# Everything lives in a temp directory that is removed at the end. Run from anywhere:
#   integration/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
if [ ! -x "$PGBIN/initdb" ] && [ "$(id -u)" = 0 ]; then
  echo "== installing PostgreSQL 15 (Debian packages, no default cluster)"
  mkdir -p /etc/postgresql-common/createcluster.d
  echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/walvault-demo.conf
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15
fi
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL 15 not found at $PGBIN (apt-get install postgresql-15)"; exit 1; }

echo "== building walvault (release)"
cargo build --release --quiet --bin walvault

work=$(mktemp -d /tmp/walvault-demo.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() { as_pg "$PGBIN/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

install -m 0755 target/release/walvault "$work/walvault"
mkdir -p "$work/repo"
printf 'repo = "file://%s/repo"\n' "$work" > "$work/walvault.toml"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$work"
port=$(( 20000 + RANDOM % 20000 ))

echo "== initdb and start a cluster with archive_command = walvault wal-push %p"
as_pg "$PGBIN/initdb" -D "$work/data" -A trust --no-sync >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$work'
wal_level = replica
archive_mode = on
archive_command = '$work/walvault --config $work/walvault.toml wal-push %p'
CONF
as_pg "$PGBIN/pg_ctl" -D "$work/data" -l "$work/postgres.log" -w start >/dev/null
psql() { as_pg "$PGBIN/psql" -X -A -t -h "$work" -p "$port" -d postgres -c "$1"; }

echo "== writing data (pgbench -i -s 5) and switching WAL"
as_pg "$PGBIN/pgbench" -h "$work" -p "$port" -i -s 5 -q postgres >/dev/null 2>&1
last=$(psql "SELECT pg_walfile_name(pg_current_wal_lsn())")
psql "SELECT pg_switch_wal()" >/dev/null
for _ in $(seq 1 300); do
  done_wal=$(psql "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
  [[ "$done_wal" > "$last" || "$done_wal" == "$last" ]] && break
  sleep 0.1
done
psql "SELECT 'archived ' || archived_count || ' files, ' || failed_count || ' failures, last ' || last_archived_wal FROM pg_stat_archiver"

echo "== what archive_command logged"
grep 'walvault wal-push' "$work/postgres.log" | tail -n 5

echo "== walvault verify"
as_pg "$work/walvault" --config "$work/walvault.toml" verify

echo "== wal-fetch $last back and compare with pg_wal"
as_pg "$work/walvault" --config "$work/walvault.toml" wal-fetch "$last" "$work/fetched" --prefetch 0
cmp "$work/fetched" "$work/data/pg_wal/$last" && echo "identical"
