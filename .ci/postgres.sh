#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the registry tests and print its SQLAlchemy URL on stdout;
# `.ci/postgres.sh stop DIR` stops it.
# Installs Debian's postgresql package where the server binaries are missing. Runs the server as the `postgres`
# user when called as root (PostgreSQL refuses to run as root). Data and socket live under $1 (a fresh directory).
set -euo pipefail
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
as_owner=()
[ "$(id -u)" = 0 ] && as_owner=(runuser -u postgres --)
if [ "$1" = stop ]; then
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$2/data" stop -m fast >&2
    exit 0
fi
root="$1"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    export DEBIAN_FRONTEND=noninteractive
    (apt-get update -qq && apt-get install -y -qq postgresql) >&2
    bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
mkdir -p "$root"
[ "$(id -u)" = 0 ] && chown postgres "$root"
"${as_owner[@]}" "$bindir/initdb" -D "$root/data" -A trust -U lorax --no-sync >&2
"${as_owner[@]}" "$bindir/pg_ctl" -D "$root/data" -l "$root/server.log" -w \
    -o "-p $port -k $root -c listen_addresses=127.0.0.1 -c fsync=off" start >&2
echo "postgresql+psycopg://lorax@127.0.0.1:$port/postgres"
