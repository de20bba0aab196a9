#!/usr/bin/env bash
# Runs every test: the Rust workspace (engine parity against the diffusers fixtures, CLI, server,
# app), then the browser tests against a real server on the tiny model. Installs what it needs
# first, each step skipped when already there (system libraries, wasm toolchain, Chromium,
# Playwright), so a fresh machine needs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s libssl-dev pkg-config >/dev/null 2>&1; then
  echo "== installing libssl-dev and pkg-config"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y libssl-dev pkg-config
fi
if [ -f end2end/package.json ] && [ -x scripts/e2e.sh ]; then
  scripts/ci-web-setup.sh
fi
echo "== cargo test --workspace"
cargo test --workspace --locked
if [ -f end2end/package.json ] && [ -x scripts/e2e.sh ]; then
  echo "== end2end (Playwright + Chromium)"
  scripts/e2e.sh
fi
echo "== Redis queue: two front ends, two workers, a worker killed, a front end restarted"
scripts/redis-cluster-test.sh
echo "== script APIs with their own clients (openai, webuiapi)"
scripts/api-clients.sh
echo "== load and abuse harness, CI size (scripts/load/run.sh --quick)"
scripts/load/run.sh --quick
