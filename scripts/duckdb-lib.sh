#!/usr/bin/env bash
# Fetch the prebuilt libduckdb.so once into a cache outside the repo and link
# it at <repo>/.duckdb, where .cargo/config.toml points DUCKDB_LIB_DIR.
# Building DuckDB's C++ from source takes ~30 minutes on 2 cores; the npm
# package of DuckDB's node bindings ships the same library prebuilt.
# Idempotent: a second run does nothing. Opt out with `--features bundled`.
set -euo pipefail
DUCKDB_VERSION="1.5.6"
NPM_PKG="@duckdb/node-bindings-linux-x64@${DUCKDB_VERSION}-r.1"
repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${IDEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/idem}/duckdb-${DUCKDB_VERSION}"

if [ ! -f "$cache/libduckdb.so" ]; then
  if ! command -v npm >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "duckdb-lib: installing npm (Debian) to fetch $NPM_PKG" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
    else
      echo "duckdb-lib: npm is needed to fetch libduckdb ($NPM_PKG); install it with: sudo apt-get install -y npm" >&2
      exit 1
    fi
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "duckdb-lib: fetching $NPM_PKG into $cache" >&2
  (cd "$tmp" && npm pack --silent "$NPM_PKG" >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$cache"
  # Headers are not needed: libduckdb-sys ships pre-generated bindings.
  mv "$tmp/package/libduckdb.so" "$cache/libduckdb.so.part"
  mv "$cache/libduckdb.so.part" "$cache/libduckdb.so"
fi

ln -sfn "$cache" "$repo/.duckdb"
echo "duckdb-lib: libduckdb $DUCKDB_VERSION at $repo/.duckdb -> $cache" >&2
