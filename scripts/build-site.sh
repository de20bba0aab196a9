#!/usr/bin/env bash
# Release build of the studio WITHOUT cargo-leptos: the same cargo / wasm-bindgen / wasm-opt steps
# cargo-leptos 0.3.x runs (adapted from ../shared/web/build-site-without-cargo-leptos.sh).
# Needs (scripts/ci-web-setup.sh installs them): rustup target wasm32-unknown-unknown,
# wasm-bindgen-cli 0.2.130 (= the wasm-bindgen pin) and wasm-opt on PATH.
#
# Output: target/site (pkg/zimage.{js,wasm,css} + public/) and target/release/zimage.
# Usage: scripts/build-site.sh [--site-only]   (--site-only skips the server build)
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${LEPTOS_OUTPUT_NAME:-zimage}   # = name in [[workspace.metadata.leptos]] = app::OUTPUT_NAME
SITE=target/site
export LEPTOS_OUTPUT_NAME=$NAME LEPTOS_SITE_ROOT=$SITE LEPTOS_SITE_PKG_DIR=pkg \
       LEPTOS_SITE_ADDR=127.0.0.1:3000 LEPTOS_RELOAD_PORT=3001 LEPTOS_LIB_DIR=frontend \
       LEPTOS_BIN_DIR=server LEPTOS_JS_MINIFY=true LEPTOS_HASH_FILES=false

for tool in wasm-bindgen wasm-opt; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/ci-web-setup.sh" >&2; exit 1; }
done
want=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p' | head -1)
have=$(wasm-bindgen --version | awk '{print $2}')
if [ -n "$want" ] && [ "$want" != "$have" ]; then
  echo "wasm-bindgen-cli $have does not match wasm-bindgen $want in Cargo.lock" >&2; exit 1
fi

echo "== wasm (frontend)"
cargo build --package=frontend --lib --target-dir=target/front --target=wasm32-unknown-unknown \
      --profile=wasm-release
# Nothing changed since the last site (same wasm, CSS, public files, tools): keep it (a second
# start of the studio skips wasm-bindgen and wasm-opt).
STAMP=$( { sha256sum target/front/wasm32-unknown-unknown/wasm-release/frontend.wasm style/main.css;
           find public -type f -print0 | sort -z | xargs -0 sha256sum; wasm-bindgen --version; wasm-opt --version; } | sha256sum | cut -c1-32)
if [ -f "$SITE.stamp" ] && [ "$(cat "$SITE.stamp")" = "$STAMP" ] && [ -f "$SITE/pkg/$NAME.wasm" ]; then
  echo "site unchanged: $SITE"
  SKIP_SITE=1
fi
if [ "${SKIP_SITE:-0}" != 1 ]; then
STAGE=$(mktemp -d target/site.tmp.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/pkg" && cp -r public/. "$STAGE/"
wasm-bindgen --target=web --out-name="$NAME" --out-dir="$STAGE/pkg" --no-typescript \
      target/front/wasm32-unknown-unknown/wasm-release/frontend.wasm
mv "$STAGE/pkg/${NAME}_bg.wasm" "$STAGE/pkg/$NAME.wasm"     # HydrationScripts loads <name>.wasm
wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
      "$STAGE/pkg/$NAME.wasm" -o "$STAGE/pkg/$NAME.wasm"
cp style/main.css "$STAGE/pkg/$NAME.css"                   # plain CSS, no sass step
# precompressed copies: the static file handler serves *.gz to browsers that accept gzip
# (others get on-the-fly compression from the server's compression layer)
gzip -9 -k -f "$STAGE/pkg/$NAME.wasm" "$STAGE/pkg/$NAME.js" "$STAGE/pkg/$NAME.css"
# swap in the new site in one step (a running server keeps serving the old files until then)

rm -rf "$SITE" && mv "$STAGE" "$SITE" && trap - EXIT && echo "$STAMP" > "$SITE.stamp"
ls -l "$SITE/pkg"
fi

if [ "${1:-}" != "--site-only" ]; then
  echo "== server (zimage)"
  cargo build --package=server --bin=zimage --release
fi
echo "site: $SITE   server: target/release/zimage serve --site-root $SITE"
