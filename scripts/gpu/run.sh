#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, with dist/zimage.xz and .whl/ carried:
#   scripts/gpu/run.sh parity   # random full-size weights -> diffusers reference -> zimage parity -> errors
#                               # then zimage bench on those weights from local disk (load time, memory)
#   scripts/gpu/run.sh baseline # zimage bench --model random (FP8, bf16) then diffusers eager / compile, same call
#   scripts/gpu/run.sh engine   # zimage only: kernel checks + FP8 quality, bf16 and FP8 benches, op profile
#   scripts/gpu/run.sh attention # FlashAttention-2 build (dist/zimage.xz) against FlashAttention-3 build
#                               # (dist/zimage-fa3.xz), same call: checks, op profiles, FP8 benches
# BIN=dist/other.xz picks another binary for the single-binary modes.
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
xz -dc "${BIN:-dist/zimage.xz}" > /tmp/zimage && chmod +x /tmp/zimage
# Few files come back from the device: per-run JSON, and one summary.txt (card, peak memory).
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
mem_watch() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$1" & echo $!; }
peak() { sort -n "$1" | tail -1; }

# bench_mem NAME ARGS...: zimage bench with nvidia-smi sampling, JSON to $OUT/zimage_NAME.json
bench_mem() {
  local name=$1; shift
  local w; w=$(mem_watch "/tmp/mem_$name.log")
  /tmp/zimage bench --device cuda --steps 8 --runs 3 "$@" --out "$OUT/zimage_$name.json" 2>&1 | grep -v '^ '
  kill "$w"; echo "zimage $name peak GPU memory (MiB, nvidia-smi, whole process): $(peak "/tmp/mem_$name.log")" | tee -a "$OUT/summary.txt"
}

case "$MODE" in
engine)
  /tmp/zimage bench --check --model random --device cuda --sizes "${CHECK_SIZES:-1024x1024}" --steps 8 \
      --out "$OUT/zimage_check.json" 2>&1 | grep -v '^ ' 
  bench_mem random_bf16 --model random --sizes 1024x1024,2048x2048
  bench_mem random_fp8 --model random --fp8 --sizes 1024x1024,2048x2048
  /tmp/zimage bench --ops --device cuda 2>&1 | grep -v '^ ' | head -60
  ;;
parity)
  python3 scripts/gpu/full_size.py make-model --model-dir /tmp/zfull --ref /tmp/ref.safetensors 2>&1 | grep -v "it/s]" | tail -20
  /tmp/zimage parity --model /tmp/zfull --inputs /tmp/ref.safetensors --prompt "$(cat /tmp/ref.safetensors.prompt.txt)" \
      --out /tmp/ours.safetensors --device cuda 2>&1 | tee "$OUT/parity_run.log"
  python3 scripts/gpu/full_size.py compare --ref /tmp/ref.safetensors --ours /tmp/ours.safetensors --json "$OUT/parity.json"
  python3 scripts/gpu/full_size.py sensitivity --model-dir /tmp/zfull --ref /tmp/ref.safetensors \
      --json "$OUT/sensitivity.json" 2>&1 | tail -3
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  bench_mem disk_fp8_1024 --model /tmp/zfull --fp8 --sizes 1024x1024
  bench_mem disk_fp8_free_te_1024 --model /tmp/zfull --fp8 --free-text-encoder --sizes 1024x1024
  bench_mem disk_fp8_2048 --model /tmp/zfull --fp8 --sizes 2048x2048
  bench_mem disk_bf16_2048 --model /tmp/zfull --sizes 2048x2048
  ;;
memory)
  # FP8 from a diffusers folder on local disk at 1024x1024: load time, memory after load, peak;
  # then diffusers compile + torchao FP8 under a time limit (its compilation is long).
  python3 scripts/gpu/full_size.py make-model --model-dir /tmp/zfull --ref /tmp/ref.safetensors 2>&1 | grep -v "it/s]" | tail -3
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  bench_mem disk_fp8_1024 --model /tmp/zfull --fp8 --sizes 1024x1024
  timeout "${FP8_LIMIT:-300}" python3 scripts/gpu/full_size.py bench --modes compile_fp8 --sizes 1024 \
      --json "$OUT/diffusers_compile_fp8.json" 2>&1 | grep -v "it/s]" | tail -12 || echo "compile_fp8: stopped after ${FP8_LIMIT:-300} s"
  ;;
attention)
  xz -dc dist/zimage-fa3.xz > /tmp/zimage-fa3 && chmod +x /tmp/zimage-fa3
  for b in zimage zimage-fa3; do
    echo "== $b checks"; /tmp/$b bench --check --model random --device cuda --sizes 1024x1024 --steps 8 \
        --out "$OUT/${b}_check.json" 2>&1 | grep -v '^ ' || echo "$b: checks failed"
  done
  for b in zimage zimage-fa3; do
    echo "== $b op profile"; /tmp/$b bench --ops --device cuda 2>&1 | grep -v '^ ' | grep -v '^vae\|^candle conv\|^\[\|^\]' | head -40 || echo "$b: op profile failed"
  done
  for b in zimage zimage-fa3; do
    w=$(mem_watch "/tmp/mem_$b.log")
    /tmp/$b bench --device cuda --steps 8 --runs 3 --model random --fp8 --sizes 1024x1024,2048x2048 \
        --out "$OUT/${b}_random_fp8.json" 2>&1 | grep -v '^ ' || echo "$b: bench failed"
    kill "$w"; echo "$b FP8 peak GPU memory (MiB, nvidia-smi, whole process): $(peak "/tmp/mem_$b.log")" | tee -a "$OUT/summary.txt"
  done
  ;;
baseline)
  bench_mem random_fp8_1024 --model random --fp8 --sizes 1024x1024
  bench_mem random_bf16_1024 --model random --sizes 1024x1024
  python3 scripts/gpu/full_size.py bench --modes "${MODES:-eager_bf16,compile_bf16}" --sizes "${SIZES:-1024}" \
      --json "$OUT/diffusers_bench.json" 2>&1 | grep -v "it/s]" | tail -40
  ;;
*)
  echo "unknown mode $MODE (engine, attention, parity, memory or baseline)"; exit 2
  ;;
esac
