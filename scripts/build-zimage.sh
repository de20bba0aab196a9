#!/usr/bin/env bash
# Builds the `zimage` binary for this machine: the one build logic behind scripts/studio.sh (what
# a user runs) and scripts/gpu/build.sh (the binary the GPU scripts carry).
#
#   scripts/build-zimage.sh                 detect the GPU (nvidia-smi) and build for it, else the CPU
#   scripts/build-zimage.sh --cpu           the CPU build, whatever the machine has
#   scripts/build-zimage.sh --cuda-cap 90   a CUDA build for that compute capability without asking
#                                           the driver (cross-build on a machine with no GPU)
#   scripts/build-zimage.sh --dry-run ...   print what would be built and why, build nothing
#   --features LIST                         CUDA features instead of the ones picked for the card
#
# Prints the binary's path as the last line on stdout (everything else goes to stderr), so that
# `BIN=$(scripts/build-zimage.sh)` works.
#
# The CUDA build: nvcc from PATH (or $CUDA_HOME/bin) when there is one and the driver can run what
# it compiles, otherwise CUDA 13.0 from NVIDIA's PyPI wheels (scripts/gpu/setup-cuda-toolkit.sh,
# runtime libraries included). The flash-attention crates are cut to the kernels Z-Image runs by
# the patches in scripts/gpu/patches (minutes instead of hours; Cargo.toml keeps the stock crates).
# The binary carries an rpath to the toolkit's libraries (cudart, cuBLAS, cuRAND, cuDNN), so it
# runs on a machine with only the NVIDIA driver; `ldd` checks that after the build.
# Env: CUDA_PIP_PREFIX (default /opt/cuda-pip, or ~/.cache/zimage/cuda-pip when /opt is not
# writable), CUDAFORGE_THREADS (parallel nvcc jobs: all cores), NVIDIA_SMI (the nvidia-smi to ask).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE=auto DRY=0 CAP="" FEATURES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --dry-run) DRY=1 ;;
    --cuda-cap) MODE=cross; CAP=${2:?--cuda-cap needs a value such as 90}; shift ;;
    --cuda-cap=*) MODE=cross; CAP=${1#*=} ;;
    --features) FEATURES=${2:?--features needs a list}; shift ;;
    --features=*) FEATURES=${1#*=} ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) echo "build-zimage.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "[build] $*" >&2; }
# ver_ge A B: version A >= version B (dotted numbers)
ver_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$2" ]; }

# Measured: a clean CUDA build (FA2 + FA3 + cuDNN, the build aid) took 19 min on 2 cores, most of
# it nvcc; nvcc jobs run in parallel, so it shrinks with the cores.
CORES=$(nproc 2>/dev/null || echo 2)
expected_minutes() { local m=$(( 19 * 2 / CORES )); [ "$m" -lt 4 ] && m=4; echo "$m"; }

# ---- what the machine has -------------------------------------------------------------------
GPU_LINE="" CPU_REASON=""
WHEEL_CUDA=13.0                        # the toolkit scripts/gpu/setup-cuda-toolkit.sh installs
driver_cuda_of() {                     # the newest CUDA a driver runs (when nvidia-smi hides it)
  local major=${1%%.*}
  if   [ "$major" -ge 580 ]; then echo 13.0; elif [ "$major" -ge 575 ]; then echo 12.9
  elif [ "$major" -ge 570 ]; then echo 12.8; elif [ "$major" -ge 560 ]; then echo 12.6
  elif [ "$major" -ge 555 ]; then echo 12.5; elif [ "$major" -ge 550 ]; then echo 12.4
  elif [ "$major" -ge 545 ]; then echo 12.3; elif [ "$major" -ge 535 ]; then echo 12.2
  elif [ "$major" -ge 530 ]; then echo 12.1; elif [ "$major" -ge 525 ]; then echo 12.0
  else echo 11.x; fi
}
if [ "$MODE" = auto ]; then
  SMI=${NVIDIA_SMI:-nvidia-smi}
  if ! command -v "$SMI" >/dev/null 2>&1; then
    MODE=cpu CPU_REASON="no NVIDIA driver here (nvidia-smi is not on PATH)"
  elif ! out=$("$SMI" --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>&1); then
    MODE=cpu CPU_REASON="nvidia-smi failed, so the driver cannot use the GPU: $(echo "$out" | head -1)"
  elif [ -z "$(echo "$out" | tr -d '[:space:]')" ]; then
    MODE=cpu CPU_REASON="nvidia-smi lists no GPU"
  else
    # several GPUs: build for the oldest (a binary for sm_80 does not run on sm_75, and the
    # other way round the PTX is JIT-compiled)
    GPU_LINE=$(echo "$out" | awk -F', *' 'NF>=3 {print $2 "|" $1 "|" $3}' | sort -t'|' -k1,1V | head -1)
    CAP_DOT=${GPU_LINE%%|*}; rest=${GPU_LINE#*|}; GPU_NAME=${rest%%|*}; DRIVER=${rest#*|}
    NGPU=$(echo "$out" | grep -c .)
    if ! [[ "$CAP_DOT" =~ ^[0-9]+\.[0-9]+$ ]]; then
      MODE=cpu CPU_REASON="nvidia-smi did not report a compute capability (\"$out\"): the driver is too old to ask, or the GPU is not usable"
    else
      CAP=${CAP_DOT/./}
      DRIVER_CUDA=$("$SMI" 2>/dev/null | grep -o 'CUDA Version: *[0-9.]*' | grep -o '[0-9.]*$' | head -1 || true)
      [ -n "$DRIVER_CUDA" ] || DRIVER_CUDA=$(driver_cuda_of "$DRIVER")
      several=""; [ "$NGPU" -gt 1 ] && several=", $NGPU GPUs, built for the oldest"
      say "GPU: $GPU_NAME (compute capability $CAP_DOT$several), driver $DRIVER (CUDA $DRIVER_CUDA)"
      if [ "$CAP" -lt 80 ]; then
        MODE=cpu CPU_REASON="$GPU_NAME has compute capability $CAP_DOT; the engine's GPU path computes in bf16, which candle's CUDA kernels and FlashAttention only have from compute capability 8.0 (Ampere) on"
      else
        MODE=cuda
      fi
    fi
  fi
fi

# ---- the CUDA toolkit and what it can build ------------------------------------------------
TOOLKIT="" NVCC="" CUDNN_LIB="" RPATH=""
if [ "$MODE" = cuda ] || [ "$MODE" = cross ]; then
  NVCC=$(command -v nvcc 2>/dev/null || true)
  [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && NVCC=$CUDA_HOME/bin/nvcc
  NVCC_VER=""
  [ -n "$NVCC" ] && NVCC_VER=$("$NVCC" --version 2>/dev/null | grep -o 'release [0-9.]*' | grep -o '[0-9.]*$' || true)
  if [ -n "$NVCC_VER" ] && { [ "$MODE" = cross ] || ver_ge "$DRIVER_CUDA" "$NVCC_VER"; }; then
    TOOLKIT=system
  elif [ "$MODE" = cross ] || ver_ge "$DRIVER_CUDA" "$WHEEL_CUDA"; then
    TOOLKIT=wheels
    [ -n "$NVCC_VER" ] && say "nvcc $NVCC_VER at $NVCC is newer than what driver $DRIVER runs (CUDA $DRIVER_CUDA): the toolkit from PyPI is used instead"
  else
    MODE=cpu
    if [ -n "$NVCC_VER" ]; then
      CPU_REASON="driver $DRIVER runs CUDA up to $DRIVER_CUDA, older than the nvcc $NVCC_VER on PATH and the CUDA $WHEEL_CUDA toolkit this script installs (driver 580 or newer). Update the NVIDIA driver, or put a CUDA toolkit <= $DRIVER_CUDA first on PATH"
    else
      CPU_REASON="driver $DRIVER runs CUDA up to $DRIVER_CUDA, older than the CUDA $WHEEL_CUDA toolkit this script installs from PyPI (it needs driver 580 or newer). Update the NVIDIA driver, or install a CUDA toolkit <= $DRIVER_CUDA (nvcc on PATH) and run again"
    fi
  fi
fi

if [ "$MODE" != cpu ]; then
  if [ "$TOOLKIT" = wheels ]; then
    PREFIX=${CUDA_PIP_PREFIX:-}
    if [ -z "$PREFIX" ]; then
      if { [ -d /opt/cuda-pip ] && [ -w /opt/cuda-pip ]; } || { [ ! -e /opt/cuda-pip ] && [ -w /opt ]; }; then PREFIX=/opt/cuda-pip
      else PREFIX=${XDG_CACHE_HOME:-$HOME/.cache}/zimage/cuda-pip; fi
    fi
    TOOLKIT_LINE="CUDA $WHEEL_CUDA from NVIDIA's PyPI wheels in $PREFIX (runtime libraries included)"
    CUDNN=1
  else
    TK_ROOT=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
    TOOLKIT_LINE="CUDA $NVCC_VER at $TK_ROOT (nvcc on PATH)"
    # cuDNN 9 where the loader finds it: the toolkit's lib64, CUDNN_PATH, or ld.so's cache
    CUDNN=0
    for d in "${CUDNN_PATH:+$CUDNN_PATH/lib}" "$TK_ROOT/lib64" "$TK_ROOT/lib" /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
      if [ -n "$d" ] && [ -e "$d/libcudnn.so.9" ]; then CUDNN=1 CUDNN_LIB=$d; break; fi
    done
    if [ "$CUDNN" = 0 ] && ldconfig -p 2>/dev/null | grep -q 'libcudnn.so.9 '; then CUDNN=1; fi
  fi
  if [ -z "$FEATURES" ]; then
    major=$(( CAP / 10 ))
    if [ "$major" -eq 9 ] && { [ "$TOOLKIT" = wheels ] || ver_ge "$NVCC_VER" 12.3; }; then
      FEATURES=flash-attn,flash-attn-v3,flash-attn-v3-fp8
      NOTE="FlashAttention-3 (Hopper, its FP8 forward too) and -2"
    elif [ "$major" -ge 8 ]; then
      FEATURES=flash-attn
      NOTE="FlashAttention-2"
      if [ "$major" -eq 9 ]; then NOTE="$NOTE (FlashAttention-3 needs nvcc 12.3 or newer)"; fi
      if [ "$major" -ge 10 ]; then NOTE="$NOTE (FlashAttention-3 is for Hopper only; compute capability $CAP is untested)"; fi
    else
      FEATURES=cuda
      NOTE="no FlashAttention (it needs compute capability 8.0 or newer)"
    fi
    if [ "$CUDNN" = 1 ]; then
      FEATURES=$FEATURES,cudnn; NOTE="$NOTE, cuDNN convolutions for the VAE"
    else
      NOTE="$NOTE; cuDNN 9 was not found, so the VAE runs candle's own convolutions (slower decode: install cuDNN 9 for CUDA ${NVCC_VER%%.*} and run again to get it)"
    fi
    if [ "$CAP" -ge 89 ]; then NOTE="$NOTE; FP8 transformer by default"; else NOTE="$NOTE; bf16 transformer (FP8 needs compute capability 8.9+)"; fi
  else
    NOTE="features as asked"
  fi
fi

# ---- the plan ---------------------------------------------------------------------------------
if [ "$MODE" = cpu ]; then
  TARGET_DIR=$ROOT/target
  BIN=$TARGET_DIR/release/zimage
  [ -n "$CPU_REASON" ] && say "$CPU_REASON."
  say "build: CPU (release), no CUDA features${CPU_REASON:+; the studio serves the tiny model unless --model names another}"
  CMD=(cargo build --release --locked -p server --bin zimage)
else
  TARGET_DIR=$ROOT/target/cuda-sm$CAP
  BIN=$TARGET_DIR/release/zimage
  say "build: CUDA for sm_$CAP, features $FEATURES: $NOTE"
  say "toolkit: $TOOLKIT_LINE"
  if [ "$TOOLKIT" = wheels ]; then
    LIB_DIRS="$PREFIX/nvidia/cu13/lib:$PREFIX/nvidia/cudnn/lib"
  else
    LIB_DIRS="$TK_ROOT/lib64${CUDNN_LIB:+:$CUDNN_LIB}"
  fi
  # DT_RPATH (not RUNPATH): it also applies to the libraries those libraries load (cuBLAS ->
  # cuBLASLt, cuDNN -> its engine libraries), and it comes before LD_LIBRARY_PATH.
  RPATH="-Wl,--disable-new-dtags,-rpath,$LIB_DIRS"
  CMD=(cargo rustc --release -p server --bin zimage --features "$FEATURES" --target-dir "$TARGET_DIR")
  say "flash-attention build aid: the crates cut to the head-dim-128 kernels Z-Image runs (scripts/gpu/patches)"
  say "expected time of a first build: about $(expected_minutes) min on $CORES cores (19 min measured on 2); a second run reuses it"
fi
say "binary: $BIN"
if [ "$DRY" = 1 ]; then
  say "dry run: ${CMD[*]}${RPATH:+ -- -C link-arg=$RPATH}"
  echo "$BIN"
  exit 0
fi

if [ "$MODE" = cpu ]; then
  "${CMD[@]}" >&2
  echo "$BIN"
  exit 0
fi

# ---- CUDA build ---------------------------------------------------------------------------------
if [ "$TOOLKIT" = wheels ]; then
  scripts/gpu/setup-cuda-toolkit.sh "$PREFIX" >/dev/null
  eval "$(scripts/gpu/setup-cuda-toolkit.sh --env "$PREFIX" 2>/dev/null)"
fi
export CUDA_COMPUTE_CAP=$CAP
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$CORES}

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
# a line a minute, so that the long nvcc stretches (cargo prints nothing then) show progress
( while sleep 60; do say "still building: $(( ($(date +%s) - start) / 60 )) min so far (expected about $(expected_minutes))"; done ) &
ticker=$!
# its `sleep` holds our stderr open: stop both, or a caller's pipe waits up to a minute
stop_ticker() { pkill -P "$ticker" 2>/dev/null || true; kill "$ticker" 2>/dev/null || true; }
trap 'stop_ticker; cp "$BUILD/Cargo.lock.orig" "$ROOT/Cargo.lock"' EXIT
CARGO_INCREMENTAL=0 "${CMD[@]}" "${patch_args[@]}" -- -C "link-arg=$RPATH" >&2
stop_ticker
say "cargo build (features $FEATURES, sm_$CAP): $(( $(date +%s) - start )) s"

# Every CUDA library must resolve through the rpath; only the driver's own libcuda.so.1 may be
# missing, and only where no driver is installed (a cross-build).
missing=$(ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}' | sort -u)
unexpected=$(echo "$missing" | grep -v -e '^libcuda\.so\.1$' -e '^$' || true)
if [ -n "$unexpected" ]; then
  say "ldd $BIN cannot find: $(echo $unexpected) (rpath $LIB_DIRS)"; exit 1
fi
if echo "$missing" | grep -q libcuda; then
  if [ "$MODE" = cuda ]; then say "ldd: libcuda.so.1 (the driver's library) is not found although nvidia-smi works"; exit 1; fi
  say "ldd: every library resolves but the driver's libcuda.so.1 (no driver on this machine)"
else
  say "ldd: every library resolves"
fi
echo "$BIN"
