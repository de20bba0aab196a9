#!/usr/bin/env bash
# Builds the CUDA binary the GPU scripts carry (dist/zimage.xz), from a clean checkout, on a machine
# with no GPU and no CUDA toolkit (our 2-core build machines):
#   - CUDA 13.0 from NVIDIA's PyPI wheels (scripts/gpu/setup-cuda-toolkit.sh, into /opt/cuda-pip);
#   - FlashAttention-2 and -3 cut down to the kernels Z-Image runs (bf16, head dim 128), from the
#     patches in scripts/gpu/patches applied to copies of the stock crates and used through cargo's
#     `--config patch...` (Cargo.toml keeps the stock crates; the stock FA2 crate compiles 53 kernel
#     files, 4-5 hours on 2 cores);
#   - cuDNN's libcudnn.so.9 (from the wheel) to link the `cudnn` feature.
# A user with a full CUDA toolkit needs none of this: see the README's GPU section.
#
# Usage: scripts/gpu/build.sh                     features flash-attn,flash-attn-v3,cudnn, sm_90
#        FEATURES=cuda,cudnn scripts/gpu/build.sh  other features
#        OUT_NAME=zimage-x scripts/gpu/build.sh     writes dist/zimage-x.xz
# Env: CUDA_COMPUTE_CAP (90), CUDA_PIP_PREFIX (/opt/cuda-pip), CUDAFORGE_THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
FEATURES=${FEATURES:-flash-attn,flash-attn-v3,cudnn}
OUT_NAME=${OUT_NAME:-zimage}
PREFIX=${CUDA_PIP_PREFIX:-/opt/cuda-pip}
CAP=${CUDA_COMPUTE_CAP:-90}

scripts/gpu/setup-cuda-toolkit.sh "$PREFIX" >/dev/null
eval "$(scripts/gpu/setup-cuda-toolkit.sh --env "$PREFIX" 2>/dev/null)"
export CUDA_COMPUTE_CAP=$CAP
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
export CARGO_INCREMENTAL=0

# Patched copies of the flash-attention crates (recreated when a patch changes).
cargo fetch --locked -q
BUILD=$ROOT/target/gpu-build
mkdir -p "$BUILD/crates"
patch_args=()
for spec in candle-flash-attn:0.11.1 candle-flash-attn-v3:0.11.1; do
  name=${spec%%:*}; ver=${spec##*:}
  patch_file=$ROOT/scripts/gpu/patches/$name-$ver-hdim128-bf16.patch
  src=$(cargo metadata --format-version 1 --locked --all-features 2>/dev/null | python3 -c "
import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p['manifest_path']) for p in m['packages'] if p['name'] == '$name' and p['version'] == '$ver'))")
  dst=$BUILD/crates/$name-$ver
  stamp=$(sha256sum "$patch_file" | cut -c1-16)
  if [ "$(cat "$dst/.zimage-patch" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$dst"; cp -r "$src" "$dst"
    (cd "$dst" && patch -s -p1 < "$patch_file")
    echo "$stamp" > "$dst/.zimage-patch"
  fi
  patch_args+=(--config "patch.crates-io.$name.path=\"$dst\"")
done

# The [patch] rewrites Cargo.lock's source lines for the two crates: keep the committed lock file.
cp Cargo.lock "$BUILD/Cargo.lock.orig"
trap 'cp "$BUILD/Cargo.lock.orig" "$ROOT/Cargo.lock"' EXIT
start=$(date +%s)
cargo build --release -p server --features "$FEATURES" "${patch_args[@]}"
echo "cargo build (features $FEATURES, sm_$CAP): $(( $(date +%s) - start )) s"

mkdir -p dist
strip -o "dist/$OUT_NAME" target/release/zimage
xz -T0 -6 -f "dist/$OUT_NAME"
ls -l "dist/$OUT_NAME.xz"
