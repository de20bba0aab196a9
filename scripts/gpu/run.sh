#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, with dist/zimage.xz and .whl/ carried:
#   scripts/gpu/run.sh parity   # random full-size weights -> diffusers reference -> zimage parity -> errors
#                               # then zimage bench on those weights from local disk (load time included)
#   scripts/gpu/run.sh baseline # diffusers eager / compile / compile+FP8 and zimage bench --model random
#   scripts/gpu/run.sh engine   # zimage only: kernel checks + FP8 quality, bf16 and FP8 benches, op profile
set -euo pipefail
MODE=${1:?parity or baseline}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
# cuDNN (for a binary built with the `cudnn` feature) comes with torch's nvidia-cudnn wheel.
CUDNN_DIR=$(dirname "$(find "$NV" -name 'libcudnn.so.9' 2>/dev/null | head -1)" 2>/dev/null || true)
export LD_LIBRARY_PATH=$NV/cu13/lib${CUDNN_DIR:+:$CUDNN_DIR}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
xz -dc dist/zimage.xz > /tmp/zimage && chmod +x /tmp/zimage
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
mem_watch() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$1" & echo $!; }
peak() { sort -n "$1" | tail -1; }

case "$MODE" in
engine)
  /tmp/zimage bench --check --model random --device cuda --sizes "${CHECK_SIZES:-1024x1024}" --steps 8 \
      --out "$OUT/zimage_check.json" 2>&1 | grep -v '^ ' | tee "$OUT/zimage_check.log"
  for variant in bf16 fp8; do
    flag=""; [ "$variant" = fp8 ] && flag="--fp8"
    W=$(mem_watch "$OUT/mem_$variant.log")
    /tmp/zimage bench --model random --device cuda $flag --sizes "${BENCH_SIZES:-1024x1024,2048x2048}" --steps 8 --runs 3 \
        --out "$OUT/zimage_bench_$variant.json" 2>&1 | grep -v '^ ' | tee "$OUT/zimage_bench_$variant.log"
    kill "$W"; echo "zimage $variant peak GPU memory (MiB, nvidia-smi): $(peak "$OUT/mem_$variant.log")" | tee -a "$OUT/zimage_bench_$variant.log"
  done
  /tmp/zimage bench --ops --device cuda 2>&1 | grep -v '^ ' | tee "$OUT/zimage_ops.log" | head -40
  ;;
parity)
  python3 scripts/gpu/full_size.py make-model --model-dir /tmp/zfull --ref /tmp/ref.safetensors 2>&1 | grep -v "it/s]" | tee "$OUT/make.log"
  /tmp/zimage parity --model /tmp/zfull --inputs /tmp/ref.safetensors --prompt "$(cat /tmp/ref.safetensors.prompt.txt)" \
      --out /tmp/ours.safetensors --device cuda 2>&1 | tee "$OUT/parity_run.log"
  python3 scripts/gpu/full_size.py compare --ref /tmp/ref.safetensors --ours /tmp/ours.safetensors --json "$OUT/parity.json"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  W=$(mem_watch "$OUT/mem_zimage.log")
  /tmp/zimage bench --model /tmp/zfull --device cuda --sizes "${BENCH_SIZES:-1024x1024,2048x2048}" --steps 8 --runs 3 \
      --out "$OUT/zimage_bench_disk.json" 2>&1 | grep -v '^ ' | tee "$OUT/zimage_bench_disk.log"
  kill "$W"; echo "zimage peak GPU memory (MiB, nvidia-smi): $(peak "$OUT/mem_zimage.log")" | tee -a "$OUT/zimage_bench_disk.log"
  ;;
baseline)
  W=$(mem_watch "$OUT/mem_zimage.log")
  /tmp/zimage bench --model random --device cuda --sizes 1024x1024,2048x2048 --steps 8 --runs 3 \
      --out "$OUT/zimage_bench_random.json" 2>&1 | grep -v '^ ' | tee "$OUT/zimage_bench_random.log"
  kill "$W"; echo "zimage peak GPU memory (MiB): $(peak "$OUT/mem_zimage.log")" | tee -a "$OUT/zimage_bench_random.log"
  python3 scripts/gpu/full_size.py bench --modes "${MODES:-eager_bf16,compile_bf16,compile_fp8}" --sizes "${SIZES:-1024}" \
      --json "$OUT/diffusers_bench.json" 2>&1 | grep -v "it/s]" | tail -40
  ;;
esac
