#!/usr/bin/env bash
# The walvault story on a throw-away PostgreSQL 15 cluster, in under a minute once built: a
# cluster archiving its WAL, a base backup, rows written, a bad DELETE at a noted time, more
# writes, then `walvault recover --target-time` (just before the DELETE) into a new directory,
# started beside the damaged cluster, and the deleted rows shown back.
# Everything lives in a temp directory that is removed at the end. Run from anywhere:
#   integration/demo.sh
# As root it installs PostgreSQL 15 (Debian packages, no default cluster) when missing, and runs
# PostgreSQL and walvault as the `postgres` user.
set -euo pipefail
cd "$(dirname "$0")/.."

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
if [ ! -x "$PGBIN/initdb" ] && [ "$(id -u)" = 0 ]; then
  echo "== installing PostgreSQL 15 (apt: postgresql-15, no default cluster)"
  mkdir -p /etc/postgresql-common/createcluster.d
  echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/walvault-demo.conf
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15
fi
[ -x "$PGBIN/initdb" ] || { echo "PostgreSQL 15 not found at $PGBIN (apt-get install postgresql-15)"; exit 1; }

if [ -x target/release/walvault ]; then
  echo "== building walvault (release; up to date or a quick rebuild)"
else
  echo "== building walvault (release): the first build compiles about 300 crates, several minutes"
  echo "   (about 10 on 2 cores); later runs start at once"
fi
cargo build --release --bin walvault

started=$(date +%s)
work=$(mktemp -d /tmp/walvault-demo.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for d in "$work/pitr" "$work/data"; do
    [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1
  done
  rm -rf "$work"
}
trap cleanup EXIT

install -m 0755 target/release/walvault "$work/walvault"
mkdir -p "$work/repo"
printf 'repo = "file://%s/repo"\n' "$work" > "$work/walvault.toml"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$work"
walvault() { as_pg "$work/walvault" --config "$work/walvault.toml" "$@"; }
# A port nothing listens on (TCP or a socket in $work).
free_port() {
  local p
  while :; do
    p=$(( 20000 + RANDOM % 20000 ))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}
port=$(free_port)
psql_at() { as_pg "$PGBIN/psql" -X -A -t -q -h "$work" -p "$1" -d postgres -c "$2"; }
psql() { psql_at "$port" "$1"; }

echo
echo "== 1. a PostgreSQL 15 cluster archiving its WAL: archive_command = 'walvault wal-push %p'"
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
echo "   data directory $work/data, repository $work/repo"

echo
echo "== 2. walvault backup-push: a base backup, taken online"
PGHOST=$work PGPORT=$port PGDATA=$work/data walvault backup-push 2>&1 | sed 's/^/   /'

echo
echo "== 3. rows written: 1000 orders"
psql "CREATE TABLE orders (id int PRIMARY KEY, customer text, amount numeric);
      INSERT INTO orders SELECT g, 'customer ' || g % 37, g % 500 + 0.99 FROM generate_series(1, 1000) g"
# recover trusts backup times only a second after the backup's (whole-second) stop time.
sleep 1.1

echo
echo "== 4. the mistake: a DELETE without the right WHERE"
before=$(psql "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')")
deleted=$(psql "WITH d AS (DELETE FROM orders WHERE amount > 100 RETURNING 1) SELECT count(*) FROM d")
echo "   $before UTC: DELETE FROM orders WHERE amount > 100   ($deleted rows gone)"

echo
echo "== 5. life goes on: 200 more orders"
psql "INSERT INTO orders SELECT g, 'customer ' || g % 37, g % 500 + 0.99 FROM generate_series(1001, 1200) g"
# The newest WAL reaches the archive when its segment is full or archive_timeout fires; force it.
last=$(psql "SELECT pg_walfile_name(pg_current_wal_lsn())")
psql "SELECT pg_switch_wal()" >/dev/null
for _ in $(seq 1 300); do
  done_wal=$(psql "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
  [[ "$done_wal" > "$last" || "$done_wal" == "$last" ]] && break
  sleep 0.1
done
psql "SELECT '   pg_stat_archiver: ' || archived_count || ' WAL files archived, ' || failed_count || ' failures' FROM pg_stat_archiver"

echo
echo "== 6. walvault backup-list: the backups and the window recovery can reach"
walvault backup-list 2>&1 | sed 's/^/   /'

echo
echo "== 7. walvault recover --target-time '${before}Z' (just before the DELETE), into a new"
echo "      directory, started beside the damaged cluster"
port2=$(free_port)
while [ "$port2" = "$port" ]; do port2=$(free_port); done
walvault recover --pgdata "$work/pitr" --target-time "${before}Z" \
  --start --pg-bin "$PGBIN" --port "$port2" --socket-dir "$work" 2>&1 | sed 's/^/   /'

echo
echo "== 8. the deleted rows are back"
count() { psql_at "$1" "SELECT count(*) || ' orders, ' || count(*) FILTER (WHERE amount > 100) || ' over 100' FROM orders"; }
printf '   %-28s %s\n' "damaged cluster (now):" "$(count "$port")"
printf '   %-28s %s\n' "recovered to before DELETE:" "$(count "$port2")"
echo "   (copy them back with pg_dump -p $port2 -t orders, or run the recovered cluster instead)"

echo
echo "== 9. walvault verify: every object in the repository re-read and checked"
walvault verify 2>&1 | sed 's/^/   /'
echo
echo "done in $(( $(date +%s) - started )) s after the build; the temp directory is removed now"
