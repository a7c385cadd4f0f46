#!/usr/bin/env bash
# Runs the whole redtx test suite on a fresh machine: installs redis-server, PostgreSQL (initdb and
# postgres, for the tests of database-backed participants) and openssl (which the TLS test uses to
# make its certificates) when missing; the tests start their own private servers on free ports
# and never use one on 6379 or 5432. Then runs every workspace test. Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
updated=""

# pkg_install <what> <apt package> <dnf package> <apk package> <brew package>
pkg_install() {
  if command -v apt-get >/dev/null 2>&1; then
    [ -n "$updated" ] || { $sudo apt-get update -qq; updated=1; }
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
  elif command -v dnf >/dev/null 2>&1; then
    $sudo dnf install -y -q "$3"
  elif command -v apk >/dev/null 2>&1; then
    $sudo apk add -q "$4"
  elif command -v brew >/dev/null 2>&1; then
    brew install "$5"
  else
    echo "error: please install $1 and run again" >&2
    exit 1
  fi
}

# install <command> <apt package> <dnf/apk/brew package>
install() {
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "$1 not found: installing it" >&2
  pkg_install "$1" "$2" "$3" "$3" "$3"
}

if [ -z "${REDTX_REDIS_SERVER:-}" ]; then
  install redis-server redis-server redis
fi
# The tests look for initdb in $REDTX_PG_BIN, then on PATH, then in /usr/lib/postgresql/*/bin,
# where Debian and Ubuntu install it, off PATH: `install` only looks on PATH.
if [ -z "${REDTX_PG_BIN:-}" ] && ! command -v initdb >/dev/null 2>&1 \
  && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  echo "initdb not found: installing PostgreSQL" >&2
  pkg_install PostgreSQL postgresql postgresql-server postgresql postgresql
fi
install openssl openssl openssl
echo "using $(${REDTX_REDIS_SERVER:-redis-server} --version)" >&2

# The Python producer example (examples/python) runs in the tests: it needs redis-py and msgpack.
if ! python3 -c 'import redis, msgpack' >/dev/null 2>&1; then
  echo "python3 cannot import redis and msgpack: installing them with pip" >&2
  # A distribution's own Python refuses pip (externally managed environment) unless told.
  python3 -m pip install --quiet redis msgpack 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages redis msgpack \
    || echo "warning: could not install redis and msgpack for python3; the Python example's test will fail" >&2
fi

exec cargo test --workspace --locked "$@"
