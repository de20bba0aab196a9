#!/usr/bin/env bash
# Lighthouse on the studio page: npm `lighthouse` (pinned in scripts/lighthouse/package.json),
# headless Debian Chromium (CHROME_PATH), mobile and desktop runs. Prints the category scores and
# the performance metrics (the table in docs/ACCESSIBILITY.md); the reports go to target/lighthouse/.
# Not part of scripts/test.sh (a minute or two, and the timings depend on the machine); the
# accessibility rules themselves are checked there by the axe-core browser tests.
#
# Usage: scripts/lighthouse.sh [URL]
#   without URL it serves the built site (scripts/build-site.sh) with a debug server on the tiny
#   model: ZIMAGE_BIN (default target/debug/zimage) on 127.0.0.1:${LIGHTHOUSE_PORT:-3200}.
set -euo pipefail
cd "$(dirname "$0")/.."
export CHROME_PATH=${CHROME_PATH:-/usr/bin/chromium}
[ -x "$CHROME_PATH" ] || { echo "no Chromium at CHROME_PATH=$CHROME_PATH (scripts/ci-web-setup.sh installs it)" >&2; exit 1; }
[ -d scripts/lighthouse/node_modules/lighthouse ] || (cd scripts/lighthouse && npm ci --no-audit --no-fund)
OUT=target/lighthouse
mkdir -p "$OUT"

URL=${1:-}
if [ -z "$URL" ]; then
  BIN=${ZIMAGE_BIN:-target/debug/zimage}
  PORT=${LIGHTHOUSE_PORT:-3200}
  [ -x "$BIN" ] || { echo "no server binary $BIN: cargo build -p server --bin zimage" >&2; exit 1; }
  [ -f target/site/pkg/zimage.wasm ] || { echo "no site: run scripts/build-site.sh --site-only" >&2; exit 1; }
  DATA=$(mktemp -d)
  "$BIN" serve --model tiny --addr "127.0.0.1:$PORT" --data-dir "$DATA" --site-root target/site >"$OUT/server.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
  for _ in $(seq 180); do
    curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
    sleep 1
  done
  URL="http://127.0.0.1:$PORT/"
fi

LH=scripts/lighthouse/node_modules/.bin/lighthouse
for form in mobile desktop; do
  preset=()
  [ "$form" = desktop ] && preset=(--preset=desktop)
  "$LH" "$URL" "${preset[@]}" --quiet \
    --chrome-flags="--headless=new --no-sandbox --disable-gpu --no-first-run" \
    --only-categories=performance,accessibility,best-practices,seo \
    --output=json --output=html --output-path="$OUT/studio-$form"
done

node - "$OUT" <<'JS'
const fs = require("fs");
const out = process.argv[2];
const row = (cells) => `| ${cells.join(" | ")} |`;
console.log(`Lighthouse ${JSON.parse(fs.readFileSync(`${out}/studio-mobile.report.json`)).lighthouseVersion}, ${new Date().toISOString().slice(0, 10)}`);
console.log(row(["run", "Performance", "Accessibility", "Best Practices", "SEO", "FCP", "LCP", "TBT", "CLS", "Speed Index"]));
console.log(row(Array(10).fill("---")));
let failed = [];
for (const form of ["mobile", "desktop"]) {
  const r = JSON.parse(fs.readFileSync(`${out}/studio-${form}.report.json`));
  const c = r.categories, a = r.audits;
  const score = (k) => Math.round(c[k].score * 100);
  console.log(row([form, score("performance"), score("accessibility"), score("best-practices"), score("seo"),
    a["first-contentful-paint"].displayValue, a["largest-contentful-paint"].displayValue,
    a["total-blocking-time"].displayValue, a["cumulative-layout-shift"].displayValue, a["speed-index"].displayValue]));
  for (const k of ["accessibility", "best-practices"]) {
    if (score(k) < 100) {
      for (const ref of c[k].auditRefs) {
        const au = a[ref.id];
        if (ref.weight > 0 && au.score !== null && au.score < 1) failed.push(`${form} ${k}: ${ref.id} — ${au.title}`);
      }
    }
  }
}
if (failed.length) {
  console.log("\nBelow 100:\n" + failed.join("\n"));
  process.exitCode = 1;
}
JS
