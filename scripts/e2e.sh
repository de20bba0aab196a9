#!/usr/bin/env bash
# Browser tests: builds the site and the release server (or only the site when ZIMAGE_BIN names
# a server binary, as scripts/test.sh does with its test build), then runs Playwright (end2end/)
# with Debian's Chromium against a real `zimage serve --model tiny` (started by
# playwright.config.ts) and a second origin that frames /embed. Screenshots land in
# end2end/screenshots/.
# Needs scripts/ci-web-setup.sh (wasm target, wasm-bindgen-cli, wasm-opt, chromium, npm deps).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${ZIMAGE_BIN:-}" ]; then
  [ -x "$ZIMAGE_BIN" ] || { echo "ZIMAGE_BIN=$ZIMAGE_BIN is not an executable" >&2; exit 1; }
  scripts/build-site.sh --site-only
else
  scripts/build-site.sh
fi
SKIP_BROWSER=${SKIP_BROWSER:-0} scripts/ci-web-setup.sh >/dev/null   # npm packages as the lock file says
cd end2end
CI=${CI:-1} npx playwright test "$@"
