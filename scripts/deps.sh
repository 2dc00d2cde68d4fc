#!/usr/bin/env bash
# Make sure the build tools exist: a C linker (cc), npm (to fetch the
# prebuilt libduckdb), make, OpenSSL and zlib headers (librdkafka), rustfmt
# and clippy. Idempotent; installs from Debian
# only what is missing, and only as root.
set -euo pipefail

missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v npm >/dev/null || missing+=(npm)
command -v pkg-config >/dev/null || missing+=(pkg-config)
# librdkafka (the Kafka source) is built from source: make, OpenSSL, zlib.
command -v make >/dev/null || missing+=(make)
command -v perl >/dev/null || missing+=(perl)
{ command -v pkg-config >/dev/null && pkg-config --exists openssl; } || missing+=(libssl-dev)
{ command -v pkg-config >/dev/null && pkg-config --exists zlib; } || missing+=(zlib1g-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "deps: installing ${missing[*]} (Debian)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "deps: missing ${missing[*]}; install them (e.g. sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component" >/dev/null 2>&1 || {
      echo "deps: cargo $component is missing and 'rustup component add $component' failed" >&2
      exit 1
    }
  fi
done
