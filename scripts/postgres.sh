#!/usr/bin/env bash
# PostgreSQL for the tests, on 127.0.0.1:5432. Reuses a server that already
# answers there; otherwise installs Debian's `postgresql` (when missing),
# starts its cluster, and creates the `idem` role and `idem_test` database
# the tests use (password `idem`); sets `wal_level = logical` for the change
# data capture tests. Idempotent; needs root on a fresh machine.
set -euo pipefail
HOST=127.0.0.1
PORT=5432

ready() { pg_isready -q -h "$HOST" -p "$PORT" 2>/dev/null; }

if ! command -v pg_isready >/dev/null || ! ready; then
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { echo "postgres.sh: PostgreSQL is not installed; run as root or: sudo apt-get install postgresql" >&2; exit 1; }
    echo "postgres.sh: installing postgresql (Debian)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  if [ -z "$version" ]; then
    echo "postgres.sh: no PostgreSQL cluster in /etc/postgresql" >&2
    exit 1
  fi
  # The package's own install may have started it already.
  for _ in $(seq 1 5); do ready && break; sleep 1; done
  if ! ready; then
    echo "postgres.sh: starting cluster $version/main" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
      pg_ctlcluster "$version" main start ||
      echo "postgres.sh: pg_ctlcluster start failed; waiting in case it is coming up" >&2
  fi
  for _ in $(seq 1 30); do ready && break; sleep 1; done
  ready || { echo "postgres.sh: PostgreSQL did not come up on $HOST:$PORT" >&2; exit 1; }
fi

# The test role and database, made through the local socket as the
# `postgres` superuser (peer auth on a fresh install, trust here).
as_postgres() {
  if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
    runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qAt "$@"
  else
    psql -h "$HOST" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"
  fi
}
if [ "$(as_postgres -c "SELECT 1 FROM pg_roles WHERE rolname = 'idem'")" != 1 ]; then
  as_postgres -c "CREATE ROLE idem LOGIN PASSWORD 'idem' CREATEDB"
fi
if [ "$(as_postgres -c "SELECT 1 FROM pg_database WHERE datname = 'idem_test'")" != 1 ]; then
  as_postgres -c "CREATE DATABASE idem_test OWNER idem"
fi
# Logical decoding, for the change data capture tests (Debezium reads the
# write-ahead log through pgoutput as `idem`): set once, which restarts the
# cluster once.
if [ "$(as_postgres -c "SHOW wal_level")" != logical ]; then
  echo "postgres.sh: setting wal_level = logical (restarts the cluster once)" >&2
  as_postgres -c "ALTER SYSTEM SET wal_level = logical"
  major="$(( $(as_postgres -c "SHOW server_version_num") / 10000 ))"
  pg_ctlcluster --skip-systemctl-redirect "$major" main restart ||
    pg_ctlcluster "$major" main restart || {
    echo "postgres.sh: could not restart cluster $major/main; restart PostgreSQL by hand for wal_level = logical" >&2
    exit 1
  }
  for _ in $(seq 1 30); do ready && break; sleep 1; done
  ready || { echo "postgres.sh: PostgreSQL did not come back on $HOST:$PORT" >&2; exit 1; }
fi
if [ "$(as_postgres -c "SELECT rolreplication FROM pg_roles WHERE rolname = 'idem'")" != t ]; then
  as_postgres -c "ALTER ROLE idem REPLICATION"
fi
echo "postgres.sh: ready: postgres://idem:idem@$HOST:$PORT/idem_test" >&2
