#!/usr/bin/env bash
# The Redis queue on real processes (server/tests/redis_cluster.rs): a redis-server on a free port
# with no persistence, two `zimage serve --queue` front ends, two `zimage worker`s on the tiny
# model; a worker killed mid-job, a front end restarted, a cancel across processes. Installs
# Debian's redis-server when missing. The test is ignored by a plain `cargo test` (it needs the
# server binary), so it runs here; it reuses the debug build `cargo test --workspace` made.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y redis-server
fi
# the package starts a system service on 6379; the test starts its own on a free port
# --workspace (not -p server): the same feature set as scripts/test.sh's `cargo test --workspace`,
# so its build is reused instead of engine and server being compiled again
cargo test --workspace --locked --test redis_cluster -- --ignored --nocapture
