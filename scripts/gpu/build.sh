#!/usr/bin/env bash
# Builds the CUDA binary the GPU scripts carry (dist/zimage.xz) on a machine with no GPU and no
# CUDA toolkit (our 2-core build machines), by the same build logic as scripts/studio.sh
# (scripts/build-zimage.sh: CUDA 13.0 from PyPI, the flash-attention build aid, cuDNN, an rpath to
# the toolkit's libraries), for a compute capability given instead of read from a GPU.
#
# Usage: scripts/gpu/build.sh                     features flash-attn,flash-attn-v3,flash-attn-v3-fp8,cudnn, sm_90
#        FEATURES=cuda,cudnn scripts/gpu/build.sh  other features
#        OUT_NAME=zimage-x scripts/gpu/build.sh     writes dist/zimage-x.xz
# Env: CUDA_COMPUTE_CAP (90), CUDA_PIP_PREFIX (/opt/cuda-pip), CUDAFORGE_THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_NAME=${OUT_NAME:-zimage}
BIN=$(scripts/build-zimage.sh --cuda-cap "${CUDA_COMPUTE_CAP:-90}" --features "${FEATURES:-flash-attn,flash-attn-v3,flash-attn-v3-fp8,cudnn}" | tail -1)
mkdir -p dist
strip -o "dist/$OUT_NAME" "$BIN"
xz -T0 -6 -f "dist/$OUT_NAME"
ls -l "dist/$OUT_NAME.xz"
