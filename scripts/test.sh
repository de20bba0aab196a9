#!/usr/bin/env bash
# Runs every test: the Rust workspace (engine parity against the diffusers fixtures, CLI, server,
# app), then the browser tests against a real server on the tiny model when the web app is present.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test --workspace"
cargo test --workspace --locked
if [ -f end2end/package.json ] && [ -x scripts/e2e.sh ]; then
  echo "== end2end (Playwright + Chromium)"
  scripts/e2e.sh
fi
