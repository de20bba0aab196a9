#!/usr/bin/env bash
# Builds what the studio needs (wasm front end, CSS, release server) and starts it.
# Model: the real Z-Image-Turbo when the Hugging Face cache holds it, else the built-in tiny model
# (random weights; the page says so). Extra arguments go to `zimage serve` (e.g. --addr, --model).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wasm-bindgen >/dev/null || ! command -v wasm-opt >/dev/null \
   || ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  SKIP_BROWSER=1 scripts/ci-web-setup.sh
fi
scripts/build-site.sh
exec target/release/zimage serve --site-root target/site "$@"
