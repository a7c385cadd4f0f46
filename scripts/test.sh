#!/usr/bin/env bash
# Runs the whole redtx test suite on a fresh machine: installs redis-server (and openssl, which
# the TLS test uses to make its certificates) when missing; the tests start their own private
# servers on free ports and never use one on 6379. Then runs every workspace test. Extra
# arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
updated=""

# install <command> <apt package> <dnf/apk/brew package>
install() {
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "$1 not found: installing it" >&2
  if command -v apt-get >/dev/null 2>&1; then
    [ -n "$updated" ] || { $sudo apt-get update -qq; updated=1; }
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
  elif command -v dnf >/dev/null 2>&1; then
    $sudo dnf install -y -q "$3"
  elif command -v apk >/dev/null 2>&1; then
    $sudo apk add -q "$3"
  elif command -v brew >/dev/null 2>&1; then
    brew install "$3"
  else
    echo "error: please install $1 and run again" >&2
    exit 1
  fi
}

if [ -z "${REDTX_REDIS_SERVER:-}" ]; then
  install redis-server redis-server redis
fi
install openssl openssl openssl
echo "using $(${REDTX_REDIS_SERVER:-redis-server} --version)" >&2

exec cargo test --workspace --locked "$@"
