#!/usr/bin/env bash
# Install a CUDA 13.0 toolchain (nvcc, headers, the libraries to link and to run
# with) from NVIDIA's PyPI wheels into a fixed prefix, for building candle with
# `--features cuda` (and flash-attn, flash-attn-v3, cudnn) on a machine that has
# no CUDA toolkit, with or without a GPU. scripts/build-zimage.sh calls it; the
# binary it builds finds cudart, cuBLAS, cuRAND and cuDNN here by its rpath.
#
# Usage:  scripts/gpu/setup-cuda-toolkit.sh [PREFIX]      (default /opt/cuda-pip)
#         eval "$(scripts/gpu/setup-cuda-toolkit.sh --env [PREFIX])"
#
# Idempotent: a second run with the same versions only prints the environment.
# Needs: python3 with pip (PyPI reachable), unzip, gcc, git.
#
# Versions are pinned to CUDA 13.0.x on purpose: the GPU machines run driver
# 580 (CUDA 13.0). candle loads its kernels as PTX and the driver JIT-compiles
# them. PTX from a newer nvcc carries a newer PTX ISA version, which an older
# driver refuses (CUDA_ERROR_UNSUPPORTED_PTX_VERSION); 13.1+ was not tried.
# nvcc 13.0.88 writes PTX ISA 9.0, which ran on driver 580.159.04.
set -euo pipefail

ENV_ONLY=0
if [ "${1:-}" = "--env" ]; then ENV_ONLY=1; shift; fi
PREFIX="${1:-${CUDA_PIP_PREFIX:-/opt/cuda-pip}}"
ROOT="$PREFIX/nvidia/cu13"          # the wheels unpack to nvidia/cu13/{bin,include,lib,nvvm}

PKGS=(
  nvidia-cuda-nvcc==13.0.88     # nvcc, ptxas, fatbinary, nvlink, cudafe++
  nvidia-cuda-crt==13.0.88      # include/crt (host_defines etc.)
  nvidia-nvvm==13.0.88          # cicc + libdevice
  nvidia-cuda-cccl==13.0.85     # include/cccl (cub, thrust, libcu++)
  nvidia-cuda-runtime==13.0.96  # cuda.h, cuda_runtime.h, libcudart.so.13
  nvidia-cuda-nvrtc==13.0.88    # libnvrtc.so.13 (link time)
  nvidia-cublas==13.0.2.14      # libcublas.so.13, libcublasLt.so.13 (link time)
  nvidia-curand==10.4.0.35      # libcurand.so.10 (link time)
  nvidia-cutlass==3.5.0.0       # CUTLASS v3.5.0 headers, for candle-flash-attn (FA2) and -v3 (FA3)
  nvidia-cudnn-cu13==9.13.0.50  # libcudnn.so.9 and its engine libraries (link and run time)
)
# candle-flash-attn 0.11.1 (through cudaforge) git-clones CUTLASS commit 7d49e6c7 (= tag
# v3.5.0) from GitHub. We pre-seed cudaforge's cache with the identical headers from the
# nvidia-cutlass 3.5.0.0 wheel instead (include/ and tools/util/include/ were checked to be
# byte-identical to that commit).
CUTLASS_COMMIT=7d49e6c7e2f8896c47f586706e67e1fb215529dc
# candle-flash-attn-v3 0.11.1 pins CUTLASS 4c42f73f (described as v3.5.1-43-g4c42f73); no wheel has
# that commit. Its copy_paged_sm90_tma_cutlass35.hpp calls the TMA copies without the cache-hint
# argument that v3.5.1's headers add, and v3.6.0 lacks its paged-copy traits; v3.5.0's headers
# compile it, so its cache entry is seeded from the v3.5.0 wheel.
CUTLASS_FA3_COMMIT=4c42f73fdab5787e3bb57717f35a8cb1b3c0dc6d
CUDAFORGE_HOME_DIR="$PREFIX/cudaforge"
# LAYOUT names how the wheels are unpacked; a change of it (or of a version) reinstalls.
LAYOUT=2-cudnn-runtime
STAMP="$PREFIX/.installed-$(printf '%s\n' "$LAYOUT" "${PKGS[@]}" | sha256sum | cut -c1-16)"

print_env() {
  cat <<ENV
export CUDA_ROOT=$ROOT
export CUDA_HOME=$ROOT
export CUDA_PATH=$ROOT
export PATH=$ROOT/bin:\$PATH
export LIBRARY_PATH=$ROOT/lib:$ROOT/lib/stubs:$PREFIX/nvidia/cudnn/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CUDAFORGE_HOME=$CUDAFORGE_HOME_DIR
ENV
}

if [ "$ENV_ONLY" = 1 ]; then print_env; exit 0; fi

if [ ! -f "$STAMP" ]; then
  mkdir -p "$PREFIX/wheels"
  # One download per package: two versions of one package in one pip call conflict.
  for p in "${PKGS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
      --python-version 3.12 --implementation cp \
      -d "$PREFIX/wheels" "$p" >&2
  done
  for p in "${PKGS[@]}"; do
    name="${p%%==*}"; ver="${p##*==}"
    whl=$(ls "$PREFIX/wheels/${name//-/_}-${ver}-"*.whl | head -1)
    mkdir -p "$ROOT/lib"
    case "$name" in
      nvidia-cutlass) ;;
      nvidia-cudnn-cu13)
        # The dispatcher (to link) and the engine libraries it loads from its own folder (to run).
        unzip -q -o "$whl" 'nvidia/cudnn/lib/*' -d "$PREFIX"
        rm -f "$ROOT/lib/libcudnn.so.9" "$ROOT/lib/libcudnn.so"   # layout 1 kept a copy here
        ln -sf libcudnn.so.9 "$PREFIX/nvidia/cudnn/lib/libcudnn.so"
        ;;
      *) unzip -q -o "$whl" 'nvidia/*' -d "$PREFIX" ;;
    esac
  done
  chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true

  # Unversioned names for the linker (-lcudart, -lnvrtc, ...): the wheels ship only .so.N.
  cd "$ROOT/lib"
  for l in libcudart.so.13 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
    ln -sf "$l" "${l%.so.*}.so"
  done
  # Toolkit-style lib64 (cudaforge / cudarc search $CUDA_ROOT/lib64 and lib64/stubs).
  ln -sfn lib "$ROOT/lib64"

  # libcuda.so is part of the driver, which no wheel contains. Build a link-time stub
  # (soname libcuda.so.1) that defines every cu* function declared in the 13.0 cuda.h;
  # at run time the GPU machine's real libcuda.so.1 is loaded instead.
  mkdir -p "$ROOT/lib/stubs"
  tmp=$(mktemp -d)
  echo '#include <cuda.h>' > "$tmp/h.c"
  gcc -E -I"$ROOT/include" "$tmp/h.c" \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$tmp/stub.c"
  gcc -shared -fPIC -o "$ROOT/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$tmp/stub.c"
  echo "libcuda stub: $(wc -l < "$tmp/stub.c") symbols" >&2
  rm -rf "$tmp"

  # CUTLASS headers where cudaforge looks for its cached checkout:
  # $CUDAFORGE_HOME/git/checkouts/cutlass-<first 16 hex of commit>/ with include/ present and
  # `git rev-parse HEAD` printing the full commit (a detached HEAD file is enough for that).
  seed_cutlass() {  # seed_cutlass COMMIT WHEEL_VERSION
    local commit=$1 ver=$2 cdir tmp
    cdir="$CUDAFORGE_HOME_DIR/git/checkouts/cutlass-${commit:0:16}"
    rm -rf "$cdir"; mkdir -p "$cdir"
    tmp=$(mktemp -d)
    unzip -q -o "$(ls "$PREFIX"/wheels/nvidia_cutlass-"$ver"-*.whl | head -1)" 'cutlass_library/source/include/*' 'cutlass_library/source/tools/util/include/*' -d "$tmp"
    mv "$tmp/cutlass_library/source/include" "$cdir/include"
    mkdir -p "$cdir/tools/util"; mv "$tmp/cutlass_library/source/tools/util/include" "$cdir/tools/util/include"
    rm -rf "$tmp"
    git init -q "$cdir"
    echo "$commit" > "$cdir/.git/HEAD"
    [ "$(git -C "$cdir" rev-parse HEAD)" = "$commit" ] || { echo "cutlass cache seeding failed" >&2; exit 1; }
  }
  seed_cutlass "$CUTLASS_COMMIT" 3.5.0.0
  seed_cutlass "$CUTLASS_FA3_COMMIT" 3.5.0.0

  "$ROOT/bin/nvcc" --version >&2
  touch "$STAMP"
fi

echo "# CUDA 13.0 toolchain from PyPI is at $ROOT. Export:" >&2
print_env
