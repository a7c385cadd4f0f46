#!/usr/bin/env bash
# Runs the whole redtx test suite on a fresh machine: installs redis-server when it is missing
# (the tests start their own private servers on free ports; they never use one on 6379), then
# runs every workspace test. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v "${REDTX_REDIS_SERVER:-redis-server}" >/dev/null 2>&1; then
  echo "redis-server not found: installing it" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  elif command -v dnf >/dev/null 2>&1; then
    $sudo dnf install -y -q redis
  elif command -v apk >/dev/null 2>&1; then
    $sudo apk add -q redis
  elif command -v brew >/dev/null 2>&1; then
    brew install redis
  else
    echo "error: please install redis-server (Redis 7 or newer) and run again" >&2
    exit 1
  fi
fi
echo "using $(${REDTX_REDIS_SERVER:-redis-server} --version)" >&2

exec cargo test --workspace --locked "$@"
