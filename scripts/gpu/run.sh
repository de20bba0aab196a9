#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, with dist/zimage.xz and .whl/ carried:
#   scripts/gpu/run.sh parity   # random full-size weights -> diffusers reference -> zimage parity -> errors
#                               # then zimage bench on those weights from local disk (load time, memory)
#   scripts/gpu/run.sh baseline # zimage bench --model random (FP8, bf16) then diffusers eager / compile, same call
#   scripts/gpu/run.sh engine   # zimage only: kernel checks + FP8 quality, bf16 and FP8 benches, op profile
#   scripts/gpu/run.sh attention # FlashAttention-2 build (dist/zimage.xz) against FlashAttention-3 build
#                               # (dist/zimage-fa3.xz), same call: checks, op profiles, FP8 benches
#   scripts/gpu/run.sh engine2  # one binary with FA2+FA3 (scripts/gpu/build.sh): kernel/graph checks,
#                               # FP8 FA3 vs FA2 vs no CUDA graphs, bf16, 2048, an ncu kernel trace,
#                               # then `zimage serve --model random` under 1/4/16 HTTP clients + ws
#                               # (COMPARE=0: without the FA2 and no-graph runs)
#   scripts/gpu/run.sh profile  # FP8 1024 bench, then one request's kernels under ncu (summary by region),
#                               # the VAE's stage times (bench --ops)
#   scripts/gpu/run.sh final    # diffusers eager/compile/compile+FP8 and ours in one call
#   scripts/gpu/run.sh int8     # INT8 (issue 20): kernel checks + FP8/INT8 image PSNR against bf16 (same
#                               # weights and seed, 1024 and 2048), INT8/FP8/bf16 benches at 1024 and
#                               # 2048 with peak memory, --free-text-encoder peaks, the op profile's GEMMs
#   scripts/gpu/run.sh lora     # LoRA (issue 18): apply + revert of a rank-32 all-module LoRA at full size
#                               # (FP8 with dense weights kept, bf16) and step time with and without it;
#                               # the enhancer's tokens/s and first token (issue 19); then `startup`
#   scripts/gpu/run.sh memory_lm  # the enhancer with one CUDA graph per decode step (tokens/s, first token,
#                               # replays vs eager token for token); --free-text-encoder peaks with the
#                               # streamed encoder (FP8, INT8) beside the resident one; FP8 LoRA apply with
#                               # the dense weights kept on the GPU, steps with and without it
#   scripts/gpu/run.sh memory_disk  # the enhancer bench, then --free-text-encoder (streamed) against the
#                               # resident encoder with weights from a full-size folder on local disk
#   scripts/gpu/run.sh round3   # issue 21: FP8 row vs tensor activation scaling (checks, PSNR, 1024/2048
#                               # benches), op profile, serving 1/4/16 clients, memory by loading stage
#   scripts/gpu/run.sh round3b  # issue 21, second call: checks, FP8/bf16 1024, FP8 2048 VAE whole/tiled,
#                               # op profile, serving 1/4/16 clients (limits off), memory by loading stage
#   scripts/gpu/run.sh round3c  # issue 21, third call: FP8 row scales applied by the next kernel vs per
#                               # tensor (checks, PSNR, 1024 and 2048 benches)
#   scripts/gpu/run.sh round3d  # issue 21, fourth call: autotuning in rounds (op profile), FP8 1024, checks
#   scripts/gpu/run.sh autotune # FP8 1024 with cuBLASLt autotuning and with the heuristic's pick, same call
#   scripts/gpu/run.sh fp8attn  # FlashAttention-3's FP8 forward: checks against the E4M3 reference, image
#                               # PSNR against bf16 attention, op profile, 1024/2048 with each attention
#   scripts/gpu/run.sh round5   # the defaults against BEFORE (and the NCHW VAE, no CTA pairs): memory split,
#                               # images, benches, checks
#   scripts/gpu/run.sh rows     # the per-row E4M3 and q/k E4M3 kernels with loads issued together, against PREV
#   scripts/gpu/run.sh load     # serving under 1/4/16 clients (images/s, p50/p95)
#   scripts/gpu/run.sh parity_only  # full-size parity against diffusers (bf16 and the f32 truth), no benches
#   scripts/gpu/run.sh startup_parity # `startup` then full-size parity on the same folder (one make-model)
#   scripts/gpu/run.sh startup  # `serve` start-up from a full-size folder on local disk (cold and warm
#                               # page cache, phase by phase), then /api/generate and submit_job + /ws
#                               # (carry target/site for the page)
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
# Stop at once (not after minutes of failing runs) when the binary cannot use the GPU.
if ! /tmp/zimage bench --device cuda --model tiny --sizes 64x64 --steps 1 --runs 0 >/tmp/smoke.log 2>&1; then
  echo "the binary does not run on this GPU:"; tail -5 /tmp/smoke.log; exit 3
fi
# Few files come back from the device: per-run JSON, and one summary.txt (card, peak memory).
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
mem_watch() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$1" & echo $!; }
peak() { sort -n "$1" | tail -1; }

# bench_mem NAME ARGS...: zimage bench with nvidia-smi sampling, JSON to $OUT/zimage_NAME.json
bench_mem() {
  local name=$1; shift
  local w; w=$(mem_watch "/tmp/mem_$name.log")
  "${BENCH_BIN:-/tmp/zimage}" bench --device cuda --steps 8 --runs "${RUNS:-3}" "$@" --out "$OUT/zimage_$name.json" 2>&1 | grep -v '^ '
  kill "$w"; echo "zimage $name peak GPU memory (MiB, nvidia-smi, whole process): $(peak "/tmp/mem_$name.log")" | tee -a "$OUT/summary.txt"
}

# engine2/final: results go to /tmp/res and come back as one archive (the device returns 8 files).
pack() { (cd /tmp/res && tar -czf "$OUT/results.tgz" .) ; cp /tmp/res/summary.txt "$OUT/" 2>/dev/null || true; }
summarize() {
  python3 - "$@" <<'PY'
import json, sys, glob, os
for f in sorted(glob.glob("/tmp/res/zimage_*.json")):
    r = json.load(open(f))
    for s in r["sizes"]:
        runs = s["runs"]; png = sorted(x["png_encode_ms"] for x in runs)[len(runs)//2]
        print(f"{os.path.basename(f)[7:-5]:28} {s['width']}x{s['height']} {r['attention'][:22]:22} graphs={r['cuda_graphs']!s:5} fp8={r['fp8']!s:5} "
              f"total {s['median_total_ms']:7.1f} ms  step {s['median_step_ms']:6.1f}  text {s['median_text_encoding_ms']:5.1f}  "
              f"vae {s['median_vae_decode_ms']:6.1f}  png {png:5.1f}  load {r['load_ms']/1e3:5.1f} s")
PY
}

# startup_measure: make-model, serve start-up (cold and warm page cache), then one request by
# the page's path (submit_job + /ws) and by /api/generate.
startup_measure() {
  python3 scripts/gpu/full_size.py make-model --model-dir /tmp/zfull --ref /tmp/ref.safetensors 2>&1 | grep -v "it/s]" | tail -3
  mkdir -p /tmp/data
  SERVE=(serve --model /tmp/zfull --devices cuda:0 --addr 127.0.0.1:3000 --data-dir /tmp/data --site-root target/site)
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo "page cache dropped" | tee -a "$OUT/summary.txt"
  python3 scripts/gpu/startup_time.py --bin /tmp/zimage --json "$OUT/startup_cold.json" -- "${SERVE[@]}" | tee -a "$OUT/summary.txt"
  python3 scripts/gpu/startup_time.py --bin /tmp/zimage --json "$OUT/startup_warm.json" -- "${SERVE[@]}" | tee -a "$OUT/summary.txt"
  python3 scripts/gpu/startup_time.py --bin /tmp/zimage --keep --json "$OUT/startup_warm2.json" -- "${SERVE[@]}" | tee -a "$OUT/summary.txt"
  grep "loaded\|compiled\|warmed\|ready" /tmp/startup_serve.log | tee -a "$OUT/summary.txt"
  timeout 300 python3 scripts/gpu/serve_load.py --url http://127.0.0.1:3000 --concurrency 1 --requests-per-client 5 \
      --ws-runs 5 --json "$OUT/serve_load.json" 2>&1 | tee -a "$OUT/summary.txt"
  pkill -f "zimage serve" || true
}

# check NAME: zimage bench --check at 1024 (kernels, graphs, FP8/INT8 PSNR) into $OUT/NAME.json
check() {
  timeout "${CHECK_LIMIT:-150}" /tmp/zimage bench --check --model random --device cuda --sizes 1024x1024 --steps 8 \
      --out "$OUT/$1.json" 2>&1 | grep -v '^ \|^\[\|^\]\|^{\|^}' | tee -a "$OUT/summary.txt" || echo "check failed" | tee -a "$OUT/summary.txt"
}

# Same-call comparisons between builds (round5, rows).
# unpack_binary XZ DEST: a second binary beside /tmp/zimage
unpack_binary() { xz -dc "$1" > "$2" && chmod +x "$2"; }
# gen_image BIN OUT: one 1024x1024 image of the random model, fixed prompt and seed
gen_image() {
  timeout 60 "$1" generate --model random --device cuda --prompt "a lighthouse at dusk" --seed 7 --out "$2" > /dev/null 2>&1 \
      || echo "FAILED: generate $2" | tee -a "$OUT/summary.txt"
}
# compare_images REF "LABEL=PATH"...: max abs difference and PSNR of each image against REF
compare_images() {
  python3 - "$@" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import sys
import numpy as np
from PIL import Image
def load(p): return np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
a = load(sys.argv[1])
for arg in sys.argv[2:]:
    name, p = arg.split("=", 1)
    try:
        b = load(p)
    except Exception as e:
        print(f"image 1024 vs {name}: {e}"); continue
    mse = ((a - b) ** 2).mean()
    print(f"image 1024 vs {name}: max abs diff {np.abs(a - b).max():.0f}, PSNR " + ("inf (identical)" if mse == 0 else f"{10 * np.log10(255 ** 2 / mse):.2f} dB"))
PY
}
# memory_split NAME...: where device memory went in $OUT/zimage_NAME.json (loading stages, then the
# last run's steps and decode, with the peak the split implies)
memory_split() {
  python3 - "$OUT" "$@" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, os, sys
for f in sys.argv[2:]:
    r = json.load(open(os.path.join(sys.argv[1], f"zimage_{f}.json")))
    for n, b in r.get("load_memory_detail", []):
        print(f"{f} load {n}: used {b['used_mib']:.0f} = pool {b['pool_reserved_mib']:.0f} (live {b['pool_used_mib']:.0f}) + weight pool {b.get('weight_pool_reserved_mib', 0):.0f} (live {b.get('weight_pool_used_mib', 0):.0f}) + graphs {b['graph_reserved_mib']:.0f} + other {b['other_mib']:.0f} MiB")
    d = r["sizes"][0]["runs"][-1].get("memory_detail") or {}
    for phase in ("steps", "vae_decode"):
        b = d.get(phase)
        if b:
            wp = b.get("weight_pool_reserved_mib", 0)
            graphs = b["graph_reserved_high_mib"] if phase == "steps" else 0
            print(f"{f} last run {phase}: used {b['used_mib']:.0f}, pool reserved {b['pool_reserved_mib']:.0f} (high {b['pool_reserved_high_mib']:.0f}, live high {b['pool_used_high_mib']:.0f}), weight pool {wp:.0f}, graphs {b['graph_reserved_mib']:.0f} (high {b['graph_reserved_high_mib']:.0f}), other {b['other_mib']:.0f}; peak implied {b['other_mib'] + wp + b['pool_reserved_high_mib'] + graphs:.0f} MiB")
PY
}

# serve_load: `zimage serve --model random` with the per-client limits off (one host sends every
# request), /api/generate under 1/4/16 clients and the websocket path, then the server stopped.
serve_load() {
  mkdir -p /tmp/data
  /tmp/zimage serve --model random --devices cuda:0 --addr 127.0.0.1:3000 --data-dir /tmp/data \
      --submissions-per-minute 0 --max-queued-per-client 0 > "$OUT/serve.log" 2>&1 &
  local srv=$!
  for i in $(seq 1 360); do curl -sf http://127.0.0.1:3000/readyz >/dev/null && break; sleep 0.5; done
  timeout 200 python3 scripts/gpu/serve_load.py --url http://127.0.0.1:3000 --json "$OUT/serve_load.json" 2>&1 | tee -a "$OUT/summary.txt"
  kill $srv; wait $srv 2>/dev/null || true
}

# disk_memory: a full-size folder on local disk, FP8 1024 from it, device memory by loading stage
disk_memory() {
  python3 scripts/gpu/full_size.py make-model --model-dir /tmp/zfull --ref /tmp/ref.safetensors 2>&1 | grep -v "it/s]" | tail -3
  RUNS=2 bench_mem disk_fp8_1024 --model /tmp/zfull --precision fp8 --sizes 1024x1024 || echo "FAILED: disk fp8" | tee -a "$OUT/summary.txt"
  python3 -c "
import json; r = json.load(open('/tmp/res/zimage_disk_fp8_1024.json'))
print('load', round(r['load_ms']), 'ms; stages (MiB in use):', ', '.join(f'{n} {m:.0f}' for n, m in r['load_memory_mib']), '| at steps', r['sizes'][0]['runs'][-1]['memory_at_steps_mib'])
" | tee -a "$OUT/summary.txt" || true
}

# serve_and_disk_memory: what round3/round3b end with; the results so far are packed before each
# part (a stop past the time limit keeps them).
serve_and_disk_memory() {
  (OUT=$OUT_FINAL; pack)
  serve_load
  (OUT=$OUT_FINAL; pack)
  disk_memory
}

case "$MODE" in
engine2)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  /tmp/zimage bench --check --model random --device cuda --sizes 1024x1024 --steps 8 --out "$OUT/check.json" 2>&1 \
      | grep -v '^ \|^\[\|^\]\|^{\|^}' | tee -a "$OUT/summary.txt" || echo "check failed" | tee -a "$OUT/summary.txt"
  export RUNS=5
  bench_mem fp8_fa3_graphs --model random --sizes 1024x1024 || echo "FAILED: bench_mem fp8_fa3_graphs --model random --sizes 1024x1024" | tee -a "$OUT/summary.txt"
  if [ "${COMPARE:-1}" = 1 ]; then  # COMPARE=0 skips the FA2 and no-graph comparisons
    ZIMAGE_ATTENTION=fa2 bench_mem fp8_fa2_graphs --model random --sizes 1024x1024 || echo "FAILED: ZIMAGE_ATTENTION=fa2 bench_mem fp8_fa2_graphs --model random --sizes 1024x1024" | tee -a "$OUT/summary.txt"
    bench_mem fp8_fa3_launches --model random --sizes 1024x1024 --no-cuda-graphs || echo "FAILED: bench_mem fp8_fa3_launches --model random --sizes 1024x1024 --no-cuda-graphs" | tee -a "$OUT/summary.txt"
  fi
  bench_mem bf16_fa3_graphs --model random --precision bf16 --sizes 1024x1024 || echo "FAILED: bench_mem bf16_fa3_graphs --model random --precision bf16 --sizes 1024x1024" | tee -a "$OUT/summary.txt"
  RUNS=2 bench_mem fp8_fa3_graphs_2048 --model random --sizes 2048x2048 || echo "FAILED: RUNS=2 bench_mem fp8_fa3_graphs_2048 --model random --sizes 2048x2048" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    ZIMAGE_CUDA_GRAPHS=0 timeout 200 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
        /tmp/zimage bench --device cuda --model random --sizes 1024x1024 --steps 8 --runs 0 > "$OUT/ncu_fp8_1024.csv" 2>"$OUT/ncu.log" \
        || echo "ncu: failed or timed out" | tee -a "$OUT/summary.txt"
    python3 scripts/gpu/ncu_summary.py "$OUT/ncu_fp8_1024.csv" > "$OUT/ncu_summary.txt" 2>&1 || true
    head -40 "$OUT/ncu_summary.txt"
  fi
  w=$(mem_watch /tmp/mem_serve.log)
  serve_load
  kill "$w"; echo "serve peak GPU memory (MiB): $(peak /tmp/mem_serve.log)" | tee -a "$OUT/summary.txt"
  grep "loaded\|compiled\|warmed\|listening" "$OUT/serve.log" | tee -a "$OUT/summary.txt"
  ;;
profile)
  # FP8 1024 bench (memory), then every kernel of one request under ncu (launched, not replayed:
  # the kernels are the same; graphs only close the gaps between them).
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  export RUNS=3
  bench_mem fp8_1024_trim --model random --sizes 1024x1024 || echo "FAILED: fp8 bench" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  ZIMAGE_CUDA_GRAPHS=0 timeout 200 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
      /tmp/zimage bench --device cuda --model random --sizes 1024x1024 --steps 8 --runs 0 > "$OUT/ncu_fp8_1024.csv" 2>"$OUT/ncu.log" \
      || echo "ncu: failed or timed out" | tee -a "$OUT/summary.txt"
  python3 scripts/gpu/ncu_summary.py "$OUT/ncu_fp8_1024.csv" > "$OUT/ncu_summary.txt" 2>&1 || true
  head -70 "$OUT/ncu_summary.txt"
  timeout 120 /tmp/zimage bench --ops --device cuda 2>&1 | grep -i "vae" | tee -a "$OUT/summary.txt" || true
  ;;
final)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  export RUNS=5
  bench_mem fp8_1024 --model random --sizes 1024x1024 || echo "FAILED: bench_mem fp8_1024 --model random --sizes 1024x1024" | tee -a "$OUT/summary.txt"
  bench_mem bf16_1024 --model random --precision bf16 --sizes 1024x1024 || echo "FAILED: bench_mem bf16_1024 --model random --precision bf16 --sizes 1024x1024" | tee -a "$OUT/summary.txt"
  RUNS=2 bench_mem fp8_2048 --model random --sizes 2048x2048 || echo "FAILED: RUNS=2 bench_mem fp8_2048 --model random --sizes 2048x2048" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  timeout "${DIFFUSERS_LIMIT:-420}" python3 scripts/gpu/full_size.py bench --modes "${MODES:-eager_bf16,compile_bf16,compile_fp8}" \
      --sizes "${SIZES:-1024,2048}" --runs 3 --json "$OUT/diffusers_bench.json" 2>&1 | grep -v "it/s]" | grep "ms$\|Error\|error" | tee -a "$OUT/summary.txt" \
      || echo "diffusers bench stopped (limit ${DIFFUSERS_LIMIT:-420} s)" | tee -a "$OUT/summary.txt"
  ;;
engine)
  /tmp/zimage bench --check --model random --device cuda --sizes "${CHECK_SIZES:-1024x1024}" --steps 8 \
      --out "$OUT/zimage_check.json" 2>&1 | grep -v '^ ' 
  bench_mem random_bf16 --model random --sizes 1024x1024,2048x2048
  bench_mem random_fp8 --model random --fp8 --sizes 1024x1024,2048x2048
  /tmp/zimage bench --ops --device cuda 2>&1 | grep -v '^ ' | head -60
  ;;
startup)
  startup_measure
  ;;
memory_lm)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  timeout 240 /tmp/zimage bench --enhance --model random --device cuda --runs 3 --out "$OUT/enhance.json" 2>&1 | grep -v '^ ' | tail -8 | tee -a "$OUT/summary.txt" || echo "FAILED: enhance" | tee -a "$OUT/summary.txt"
  export RUNS=2
  for p in fp8 int8; do
    bench_mem ${p}_free_te_1024 --model random --precision $p --free-text-encoder --sizes 1024x1024 || echo "FAILED: $p free-te" | tee -a "$OUT/summary.txt"
  done
  bench_mem fp8_resident_te_1024 --model random --precision fp8 --sizes 1024x1024 || echo "FAILED: fp8" | tee -a "$OUT/summary.txt"
  /tmp/zimage lora --make-random /tmp/l32.safetensors --rank 32 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
  RUNS=3 bench_mem fp8_lora_1024 --model random --precision fp8 --sizes 1024x1024 --lora /tmp/l32.safetensors || echo "FAILED: fp8 lora" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  python3 - <<'PY' | tee -a "$OUT/summary.txt"
import json, glob, os
for f in sorted(glob.glob("/tmp/res/zimage_*lora*.json")):
    r = json.load(open(f)); l = r.get("lora") or {}
    print(f"{os.path.basename(f)}: apply {l.get('apply_ms')} ms, revert {l.get('revert_ms')} ms, layers {l.get('layers_patched')}, memory with it applied {l.get('memory_applied_mib')} MiB")
PY
  ;;
memory_disk)
  # the streamed text encoder from a full-size diffusers folder on local disk (what users run)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  timeout 240 /tmp/zimage bench --enhance --model random --device cuda --runs 3 --out "$OUT/enhance.json" 2>&1 | grep -v '^ ' | tail -8 | tee -a "$OUT/summary.txt" || echo "FAILED: enhance" | tee -a "$OUT/summary.txt"
  python3 scripts/gpu/full_size.py make-model --model-dir /tmp/zfull --ref /tmp/ref.safetensors 2>&1 | grep -v "it/s]" | tail -3
  export RUNS=3
  bench_mem disk_fp8_free_te_1024 --model /tmp/zfull --precision fp8 --free-text-encoder --sizes 1024x1024 || echo "FAILED: disk free-te" | tee -a "$OUT/summary.txt"
  bench_mem disk_fp8_1024 --model /tmp/zfull --precision fp8 --sizes 1024x1024 || echo "FAILED: disk fp8" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  [ -n "${STARTUP:-}" ] && startup_measure
  ;;
lora_fp8)
  # FP8 apply/revert with the dense weights kept on the GPU, and steps with and without the LoRA
  /tmp/zimage lora --make-random /tmp/l32.safetensors --rank 32 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
  export RUNS=${RUNS:-3}
  bench_mem fp8_1024 --model random --precision fp8 --sizes 1024x1024
  bench_mem fp8_lora_1024 --model random --precision fp8 --sizes 1024x1024 --lora /tmp/l32.safetensors
  ;;
lora)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  /tmp/zimage lora --make-random /tmp/l32.safetensors --rank 32 2>&1 | tail -2 | tee -a "$OUT/summary.txt"
  export RUNS=3
  bench_mem fp8_1024 --model random --precision fp8 --sizes 1024x1024 || echo "FAILED: fp8" | tee -a "$OUT/summary.txt"
  bench_mem fp8_lora_1024 --model random --precision fp8 --sizes 1024x1024 --lora /tmp/l32.safetensors || echo "FAILED: fp8 lora" | tee -a "$OUT/summary.txt"
  bench_mem bf16_lora_1024 --model random --precision bf16 --sizes 1024x1024 --lora /tmp/l32.safetensors || echo "FAILED: bf16 lora" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  python3 - <<'PY' | tee -a "$OUT/summary.txt"
import json, glob, os
for f in sorted(glob.glob("/tmp/res/zimage_*lora*.json")):
    r = json.load(open(f)); l = r.get("lora") or {}
    print(f"{os.path.basename(f)}: apply {l.get('apply_ms')} ms, revert {l.get('revert_ms')} ms, layers {l.get('layers_patched')}, memory with it applied {l.get('memory_applied_mib')} MiB")
PY
  timeout 240 /tmp/zimage bench --enhance --model random --device cuda --runs 3 --out "$OUT/enhance.json" 2>&1 | grep -v '^ ' | tail -8 | tee -a "$OUT/summary.txt" || echo "FAILED: enhance" | tee -a "$OUT/summary.txt"
  (OUT=$OUT_FINAL; pack)   # what is measured so far comes back even if the start-up runs out of time
  startup_measure
  ;;
int8)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  timeout 240 /tmp/zimage bench --check --model random --device cuda --sizes "${CHECK_SIZES:-1024x1024,2048x2048}" --steps 8 \
      --out "$OUT/check.json" 2>&1 | grep -v '^ \|^\[\|^\]\|^{\|^}' | tee -a "$OUT/summary.txt" || echo "check failed" | tee -a "$OUT/summary.txt"
  export RUNS=3
  for p in int8 fp8 bf16; do
    bench_mem ${p}_1024 --model random --precision $p --sizes 1024x1024 || echo "FAILED: $p 1024" | tee -a "$OUT/summary.txt"
  done
  for p in int8 fp8 bf16; do
    RUNS=2 bench_mem ${p}_2048 --model random --precision $p --sizes 2048x2048 || echo "FAILED: $p 2048" | tee -a "$OUT/summary.txt"
  done
  for p in int8 fp8; do
    RUNS=2 bench_mem ${p}_free_te_1024 --model random --precision $p --free-text-encoder --sizes 1024x1024 || echo "FAILED: $p free-te" | tee -a "$OUT/summary.txt"
  done
  summarize | tee -a "$OUT/summary.txt"
  timeout 120 /tmp/zimage bench --ops --device cuda 2>&1 | grep "matmul\|quantize\|swiglu\|rms" | tee -a "$OUT/summary.txt" || true
  ;;
round3)
  # issue 21: FP8 activations scaled per row (RMSNorm/SwiGLU + amax + E4M3 in one kernel) against
  # per tensor, same call: kernel checks and FP8-vs-bf16 PSNR for each, benches at 1024 and 2048,
  # the op profile's FP8 rows, serving under 1/4/16 clients, then memory by loading stage from a
  # full-size folder on local disk (resident text encoder).
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  for sc in row tensor; do
    ZIMAGE_FP8_SCALING=$sc timeout 150 /tmp/zimage bench --check --model random --device cuda --sizes 1024x1024 --steps 8 \
        --out "$OUT/check_$sc.json" 2>&1 | grep -v '^ \|^\[\|^\]\|^{\|^}' | sed "s/^/[$sc] /" | tee -a "$OUT/summary.txt" || echo "check $sc failed" | tee -a "$OUT/summary.txt"
  done
  export RUNS=5
  for sc in row tensor; do
    ZIMAGE_FP8_SCALING=$sc bench_mem fp8_${sc}_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 $sc 1024" | tee -a "$OUT/summary.txt"
  done
  for sc in row tensor; do
    ZIMAGE_FP8_SCALING=$sc RUNS=2 bench_mem fp8_${sc}_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 $sc 2048" | tee -a "$OUT/summary.txt"
  done
  RUNS=2 bench_mem fp8_row_2048_vae_tiled --model random --sizes 2048x2048 --vae-tiled || echo "FAILED: fp8 2048 tiled" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  timeout 120 /tmp/zimage bench --ops --device cuda 2>&1 | grep "fp8\|vae\|attention" | tee -a "$OUT/summary.txt" || true
  serve_and_disk_memory
  ;;
round3b)
  # issue 21, second call: checks (new kernels, FP8-vs-bf16 PSNR), FP8/bf16 at 1024, FP8 at 2048
  # with the VAE in one piece and tiled, row- vs tensor-scaled FP8 where cuBLASLt has row scales,
  # the op profile, serving under 1/4/16 clients (per-client limits off: one host sends them all),
  # then memory by loading stage and load time from a full-size folder on local disk.
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  check check
  export RUNS=5
  bench_mem fp8_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 1024" | tee -a "$OUT/summary.txt"
  if grep -q "row-scaled products available" "$OUT/summary.txt"; then
    ZIMAGE_FP8_SCALING=tensor bench_mem fp8_tensor_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 tensor 1024" | tee -a "$OUT/summary.txt"
  fi
  RUNS=3 bench_mem bf16_1024 --model random --precision bf16 --sizes 1024x1024 || echo "FAILED: bf16 1024" | tee -a "$OUT/summary.txt"
  RUNS=2 bench_mem fp8_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 2048" | tee -a "$OUT/summary.txt"
  RUNS=2 bench_mem fp8_2048_vae_tiled --model random --sizes 2048x2048 --vae-tiled || echo "FAILED: fp8 2048 tiled" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  timeout 120 /tmp/zimage bench --ops --device cuda 2>&1 | grep "fp8\|vae\|attention\|swiglu\|rms" | grep -v '"op"' | tee -a "$OUT/summary.txt" || true
  serve_and_disk_memory
  ;;
round3c)
  # issue 21, third call: FP8 row scales applied by the next kernel (the default on Hopper now)
  # against per-tensor scaling, same call: checks and FP8-vs-bf16 PSNR, 1024 and 2048 benches
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  check check
  export RUNS=5
  bench_mem fp8_folded_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 folded 1024" | tee -a "$OUT/summary.txt"
  ZIMAGE_FP8_SCALING=tensor bench_mem fp8_tensor_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 tensor 1024" | tee -a "$OUT/summary.txt"
  RUNS=2 bench_mem fp8_folded_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 folded 2048" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  ;;
round3d)
  # issue 21, fourth call: cuBLASLt autotuning in alternating rounds (op profile: heuristic vs
  # tuned), the FP8 1024 bench, and the checks (the unit-scale product with row scales after)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  timeout 60 /tmp/zimage bench --ops --device cuda 2>&1 | grep "fp8 matmul" | grep -v '"op"' | tee -a "$OUT/summary.txt" || true
  RUNS=5 bench_mem fp8_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 1024" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  timeout 90 /tmp/zimage bench --check --model random --device cuda --sizes 1024x1024 --steps 8 \
      --out "$OUT/check.json" 2>&1 | grep "fp8\|FP8" | tee -a "$OUT/summary.txt" || echo "check stopped" | tee -a "$OUT/summary.txt"
  ;;
autotune)
  # FP8 1024 with cuBLASLt autotuning and with the heuristic's first pick, same call
  RUNS=5 bench_mem fp8_tuned_1024 --model random --sizes 1024x1024 || true
  ZIMAGE_FP8_AUTOTUNE=0 RUNS=5 bench_mem fp8_heuristic_1024 --model random --sizes 1024x1024 || true
  for f in "$OUT"/zimage_fp8_*_1024.json; do python3 -c "
import json, sys; r = json.load(open(sys.argv[1])); runs = r['sizes'][0]['runs']
st = sorted(x for run in runs for x in run['steps_ms'][1:]); de = sorted(x['denoising_ms'] for x in runs)
print(sys.argv[1].split('/')[-1], 'step median', round(st[len(st)//2], 2), 'denoising median', round(de[len(de)//2], 1), 'total', r['sizes'][0]['median_total_ms'])
" "$f" | tee -a "$OUT/summary.txt"; done
  ;;
fp8attn)
  # issue 21: FlashAttention-3's FP8 forward: kernel checks against the CPU E4M3 reference and the
  # image PSNR against bf16 attention (bench --check), the op profile's attention rows, then FP8
  # 1024 and 2048 and bf16 1024 with bf16 attention and with FP8 attention, same call
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  CHECK_LIMIT=300 check check
  timeout 90 /tmp/zimage bench --ops --device cuda 2>&1 | grep -i "attention\|e4m3\|rope" | grep -v '"op"' | tee -a "$OUT/summary.txt" || true
  RUNS=3 bench_mem fp8_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 1024" | tee -a "$OUT/summary.txt"
  ZIMAGE_ATTENTION=fa3-fp8 RUNS=3 bench_mem fp8_attnfp8_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 attn-fp8 1024" | tee -a "$OUT/summary.txt"
  RUNS=2 bench_mem fp8_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 2048" | tee -a "$OUT/summary.txt"
  ZIMAGE_ATTENTION=fa3-fp8 RUNS=2 bench_mem fp8_attnfp8_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 attn-fp8 2048" | tee -a "$OUT/summary.txt"
  ZIMAGE_ATTENTION=fa3-fp8 RUNS=3 bench_mem bf16_attnfp8_1024 --model random --precision bf16 --sizes 1024x1024 || echo "FAILED: bf16 attn-fp8 1024" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  ;;
round5)
  # issue 21, round 5 (the defaults since: FA3 e4m3 without device asserts and with CTA
  # pairs, channels-last VAE with the padded 3-channel output convolution, lasting weights packed
  # into their own memory pool) against the session's starting build (BEFORE): the memory split,
  # FP8 1024 and 2048, images compared, the VAE's stages both ways, then the kernel checks
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  unpack_binary "${BEFORE:-dist/zimage-before.xz}" /tmp/zimage-before
  gen_image /tmp/zimage /tmp/a.png; ZIMAGE_VAE_LAYOUT=nchw gen_image /tmp/zimage /tmp/nchw.png
  ZIMAGE_FA3_FP8_CLUSTER=0 gen_image /tmp/zimage /tmp/nocluster.png; gen_image /tmp/zimage-before /tmp/b.png
  compare_images /tmp/a.png "NCHW VAE (ZIMAGE_VAE_LAYOUT=nchw)=/tmp/nchw.png" \
      "no CTA pairs (ZIMAGE_FA3_FP8_CLUSTER=0)=/tmp/nocluster.png" "session's starting build=/tmp/b.png"
  BENCH_BIN=/tmp/zimage-before RUNS=3 bench_mem fp8_before_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 before 1024" | tee -a "$OUT/summary.txt"
  RUNS=5 bench_mem fp8_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 1024" | tee -a "$OUT/summary.txt"
  BENCH_BIN=/tmp/zimage-before RUNS=2 bench_mem fp8_before_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 before 2048" | tee -a "$OUT/summary.txt"
  RUNS=2 bench_mem fp8_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 2048" | tee -a "$OUT/summary.txt"
  RUNS=3 bench_mem bf16_1024 --model random --precision bf16 --sizes 1024x1024 || echo "FAILED: bf16 1024" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  memory_split fp8_before_1024 fp8_1024 fp8_2048
  timeout 100 /tmp/zimage bench --ops --device cuda 2>&1 | grep -i "vae\|e4m3" | grep -v '"op"' | tee -a "$OUT/summary.txt" || true
  CHECK_LIMIT=${CHECK_LIMIT:-170} check check
  ;;
rows)
  # issue 21: the per-row E4M3 kernels (RMSNorm -> E4M3, SwiGLU -> E4M3) and the q/k norm + RoPE
  # -> E4M3 kernel with their loads issued together and rows kept in registers, against the same
  # build without that change (PREV=dist/zimage-round5.xz): the same image bit for bit, op times,
  # FP8 1024 and 2048 both ways, then the kernel checks
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  unpack_binary "${PREV:-dist/zimage-round5.xz}" /tmp/zimage-prev
  gen_image /tmp/zimage /tmp/a.png; gen_image /tmp/zimage-prev /tmp/p.png
  cmp -s /tmp/a.png /tmp/p.png && echo "image 1024: identical bytes to the previous build" | tee -a "$OUT/summary.txt" || echo "image 1024: DIFFERS from the previous build" | tee -a "$OUT/summary.txt"
  timeout 100 /tmp/zimage bench --ops --device cuda 2>&1 | grep -v '"op"' | grep "ms" | tee -a "$OUT/summary.txt" || true
  BENCH_BIN=/tmp/zimage-prev RUNS=5 bench_mem fp8_prev_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 prev 1024" | tee -a "$OUT/summary.txt"
  RUNS=5 bench_mem fp8_1024 --model random --sizes 1024x1024 || echo "FAILED: fp8 1024" | tee -a "$OUT/summary.txt"
  BENCH_BIN=/tmp/zimage-prev RUNS=2 bench_mem fp8_prev_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 prev 2048" | tee -a "$OUT/summary.txt"
  RUNS=2 bench_mem fp8_2048 --model random --sizes 2048x2048 || echo "FAILED: fp8 2048" | tee -a "$OUT/summary.txt"
  summarize | tee -a "$OUT/summary.txt"
  CHECK_LIMIT=${CHECK_LIMIT:-150} check check
  ;;
load)
  # issue 21 item 4: images/s under 1, 4 and 16 clients of `zimage serve` (random full-size model)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  serve_load
  ;;
parity_only)
  # full-size parity (random weights saved in the diffusers layout, diffusers' reference, ours,
  # per-step errors against diffusers bf16 and the f32 truth), no benches
  python3 scripts/gpu/full_size.py make-model --model-dir /tmp/zfull --ref /tmp/ref.safetensors 2>&1 | grep -v "it/s]" | tail -3
  /tmp/zimage parity --model /tmp/zfull --inputs /tmp/ref.safetensors --prompt "$(cat /tmp/ref.safetensors.prompt.txt)" \
      --out /tmp/ours.safetensors --device cuda 2>&1 | tail -20 > "$OUT/parity_run.log"
  python3 scripts/gpu/full_size.py compare --ref /tmp/ref.safetensors --ours /tmp/ours.safetensors --json "$OUT/parity.json" 2>&1 | tee -a "$OUT/summary.txt"
  ;;
startup_parity)
  OUT_FINAL=$OUT; OUT=/tmp/res; mkdir -p $OUT; cp "$OUT_FINAL/summary.txt" $OUT/
  trap 'OUT=$OUT_FINAL; pack' EXIT
  startup_measure
  sleep 2
  /tmp/zimage parity --model /tmp/zfull --inputs /tmp/ref.safetensors --prompt "$(cat /tmp/ref.safetensors.prompt.txt)" \
      --out /tmp/ours.safetensors --device cuda 2>&1 | tail -20 > "$OUT/parity_run.log"
  python3 scripts/gpu/full_size.py compare --ref /tmp/ref.safetensors --ours /tmp/ours.safetensors --json "$OUT/parity.json" 2>&1 | tee -a "$OUT/summary.txt"
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
