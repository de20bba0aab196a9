#!/usr/bin/env bash
# The build scripts/studio.sh picks for a machine, without a GPU: a fake `nvidia-smi` (and for one
# case a fake `nvcc`) first on PATH reports a card, a driver or an error, and
# `scripts/studio.sh --dry-run` must print the build that card gets. Runs in a second or two.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fails=0

# fake_smi DIR NAME CAP DRIVER CUDA  |  fake_smi DIR --fail MESSAGE
fake_smi() {
  local dir=$1; shift
  mkdir -p "$dir"
  if [ "$1" = --fail ]; then
    printf '#!/bin/sh\necho "%s"\nexit 9\n' "$2" > "$dir/nvidia-smi"
  else
    cat > "$dir/nvidia-smi" <<SMI
#!/bin/sh
case "\$*" in
  *--query-gpu*) echo "$1, $2, $3" ;;
  *) echo "| NVIDIA-SMI $3     Driver Version: $3     CUDA Version: $4     |" ;;
esac
SMI
  fi
  chmod +x "$dir/nvidia-smi"
}

# expect NAME DIR PATTERN... : every pattern (grep -E) is in the dry run's output
expect() {
  local name=$1 dir=$2; shift 2
  local out
  # PATH: the fake first; no real nvcc from the machine
  out=$(PATH="$dir:/usr/bin:/bin:$HOME/.cargo/bin" CUDA_HOME= scripts/studio.sh --dry-run $EXTRA 2>&1) || { echo "FAIL $name: exit $?"; echo "$out"; fails=$((fails+1)); return; }
  for p in "$@"; do
    if ! grep -qE -- "$p" <<<"$out"; then
      echo "FAIL $name: no /$p/ in:"; echo "$out" | sed 's/^/    /'; fails=$((fails+1)); return
    fi
  done
  echo "ok   $name"
}

EXTRA=""
fake_smi "$WORK/h200" "NVIDIA H200" 9.0 580.159.04 13.0
expect "compute capability 9.0 (H200, driver 580)" "$WORK/h200" \
  'build: CUDA for sm_90, features flash-attn,flash-attn-v3,flash-attn-v3-fp8,cudnn' 'FP8 transformer' \
  'toolkit: CUDA 13.0 from NVIDIA.s PyPI wheels' 'cargo rustc --release -p server --bin zimage --features flash-attn,flash-attn-v3,flash-attn-v3-fp8,cudnn' \
  'rpath,[^ ]*/nvidia/cu13/lib:[^ ]*/nvidia/cudnn/lib' 'target/cuda-sm90/release/zimage serve'

fake_smi "$WORK/a10" "NVIDIA GeForce RTX 3090" 8.6 580.82.07 13.0
expect "compute capability 8.6 (RTX 3090)" "$WORK/a10" \
  'build: CUDA for sm_86, features flash-attn,cudnn' 'FlashAttention-2' 'bf16 transformer \(FP8 needs compute capability 8.9\+\)' \
  'target/cuda-sm86/release/zimage serve'

fake_smi "$WORK/t4" "Tesla T4" 7.5 580.82.07 13.0
expect "compute capability 7.5 (T4)" "$WORK/t4" \
  'Tesla T4 has compute capability 7.5' 'from compute capability 8.0' 'build: CPU' 'target/release/zimage serve'

fake_smi "$WORK/broken" --fail "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
expect "nvidia-smi fails" "$WORK/broken" \
  "nvidia-smi failed, so the driver cannot use the GPU: NVIDIA-SMI has failed because it couldn't communicate" 'build: CPU'

fake_smi "$WORK/old" "NVIDIA A100-SXM4-80GB" 8.0 535.104.05 12.2
expect "driver too old for the toolkit (535, CUDA 12.2)" "$WORK/old" \
  'driver 535.104.05 runs CUDA up to 12.2, older than the CUDA 13.0 toolkit' 'Update the NVIDIA driver' 'build: CPU'

# the same old driver with a CUDA 12.2 toolkit on PATH: that toolkit is used, without cuDNN
mkdir -p "$WORK/tk/bin"; cp "$WORK/old/nvidia-smi" "$WORK/tk/bin/"
printf '#!/bin/sh\necho "Cuda compilation tools, release 12.2, V12.2.140"\n' > "$WORK/tk/bin/nvcc"; chmod +x "$WORK/tk/bin/nvcc"
expect "old driver with nvcc 12.2 on PATH" "$WORK/tk/bin" \
  'toolkit: CUDA 12.2 at .*/tk \(nvcc on PATH\)' 'build: CUDA for sm_80, features flash-attn:' 'cuDNN 9 was not found'

fake_smi "$WORK/h200b" "NVIDIA H200" 9.0 580.159.04 13.0
EXTRA=--cpu
expect "--cpu on a GPU machine" "$WORK/h200b" 'build: CPU' 'target/release/zimage serve'
EXTRA=""

if [ "$fails" -gt 0 ]; then echo "$fails build-plan case(s) failed"; exit 1; fi
echo "build plans: all cases passed"
