#!/usr/bin/env bash
# Idempotent setup of the web toolchain (wasm target, wasm-bindgen-cli, wasm-opt, Chromium, Playwright).
# Each step is skipped when what it installs is already there. Safe to run on every CI job.
set -euo pipefail
cd "$(dirname "$0")/.."
WB_VERSION=0.2.130          # must equal the `wasm-bindgen = "=..."` pin in frontend/Cargo.toml
BINARYEN_VERSION=132.0.0

log() { echo "[ci-web-setup] $*"; }

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  log "adding rust target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

if ! command -v wasm-bindgen >/dev/null || [ "$(wasm-bindgen --version | awk '{print $2}')" != "$WB_VERSION" ]; then
  log "installing wasm-bindgen-cli $WB_VERSION (~4.5 min on 2 cores)"
  # NOT --locked: its lock file pins a crate version the index lacks.
  cargo install wasm-bindgen-cli --version "$WB_VERSION"
fi

if ! command -v wasm-opt >/dev/null; then
  log "installing binaryen $BINARYEN_VERSION (wasm-opt) from npm"
  npm install -g "binaryen@$BINARYEN_VERSION"
fi

if [ "${SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null; then
  log "installing Debian chromium"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium chromium-driver
fi

# The npm packages of the browser tests, again whenever package-lock.json changes (a stamp of its
# hash), so that a machine with an older node_modules gets a newly added package too.
if [ "${SKIP_BROWSER:-0}" != 1 ] && [ -f end2end/package-lock.json ]; then
  want=$(sha256sum end2end/package-lock.json | cut -d' ' -f1)
  if [ "$(cat end2end/node_modules/.lock-sha256 2>/dev/null)" != "$want" ]; then
    log "installing the browser tests' npm packages (Playwright, axe-core; no browser download)"
    (cd end2end && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci && echo "$want" > node_modules/.lock-sha256)
  fi
fi
log "done"
