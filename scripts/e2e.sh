#!/usr/bin/env bash
# Browser tests: builds the site and the release server, then runs Playwright (end2end/) with
# Debian's Chromium against a real `zimage serve --model tiny` (started by playwright.config.ts)
# and a second origin that frames /embed. Screenshots land in end2end/screenshots/.
# Needs scripts/ci-web-setup.sh (wasm target, wasm-bindgen-cli, wasm-opt, chromium, npm deps).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-site.sh
cd end2end
[ -d node_modules/@playwright/test ] || PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci
CI=${CI:-1} npx playwright test "$@"
