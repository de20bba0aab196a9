#!/usr/bin/env bash
# Starts the studio: builds the site (wasm front end, CSS) and the `zimage` binary for this machine
# (scripts/build-zimage.sh: on a machine with an NVIDIA GPU the CUDA build with the features its
# card runs, else the CPU build), then serves.
# Model: with a GPU, Tongyi-MAI/Z-Image-Turbo (downloaded into the Hugging Face cache on the first
# start, with progress in the terminal and on the page); on a CPU machine the real model when the
# cache holds it, else the built-in tiny model (random weights; the page says so).
#
#   scripts/studio.sh [--cpu] [--dry-run] [serve flags: --model, --addr, --data-dir, ...]
#   --cpu      the CPU build even where a GPU is
#   --dry-run  print what would be built and run, build and run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
build_args=() serve_args=() dry=0
for a in "$@"; do
  case "$a" in
    --cpu) build_args+=(--cpu) ;;
    --dry-run) build_args+=(--dry-run); dry=1 ;;
    *) serve_args+=("$a") ;;
  esac
done
if [ "$dry" = 1 ]; then
  BIN=$(scripts/build-zimage.sh ${build_args[@]+"${build_args[@]}"} | tail -1)
  case "$BIN" in
    */cuda-sm*) echo "[studio] model: the binary's default on a GPU, Tongyi-MAI/Z-Image-Turbo (about 33 GB, downloaded into the Hugging Face cache on the first start)" ;;
    *) echo "[studio] model: the binary's default on the CPU, the real model if the Hugging Face cache holds it, else tiny" ;;
  esac
  echo "[studio] would build the site (scripts/build-site.sh --site-only) and run:"
  echo "[studio] $BIN serve --site-root target/site ${serve_args[*]+${serve_args[*]}}"
  exit 0
fi
if ! command -v wasm-bindgen >/dev/null || ! command -v wasm-opt >/dev/null \
   || ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  SKIP_BROWSER=1 scripts/ci-web-setup.sh
fi
scripts/build-site.sh --site-only
BIN=$(scripts/build-zimage.sh ${build_args[@]+"${build_args[@]}"} | tail -1)
exec "$BIN" serve --site-root target/site ${serve_args[@]+"${serve_args[@]}"}
