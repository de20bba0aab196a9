#!/usr/bin/env bash
# What the Redis queue adds per job and per step event, against the in-process queue
# (docs/SCALE.md). Both run the same simulated generator with 0 ms per job, so what is timed is
# the queue, the events, the PNG encoding (a 1024x1024 flat image) and the storing: N jobs one
# after another through POST /api/generate, at 4 and at 16 steps (the per-step cost is the
# difference / 12). Ports 3310-3313; uses target/release/zimage (ZIMAGE_BIN to change).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${ZIMAGE_BIN:-target/release/zimage}
N=${N:-60}
TMP=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait; rm -rf "$TMP"' EXIT
wait_ready() { for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return; sleep 0.1; done; echo "port $1 not ready"; exit 1; }
redis-server --port 3311 --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" >"$TMP/redis.log" 2>&1 & PIDS+=($!)
COMMON=(--submissions-per-minute 0 --max-queued-per-client 0 --site-root "$TMP/none")
"$BIN" serve --simulate-job-ms 0 --addr 127.0.0.1:3312 --data-dir "$TMP/inproc" "${COMMON[@]}" >"$TMP/inproc.log" 2>&1 & PIDS+=($!)
"$BIN" serve --queue redis://127.0.0.1:3311 --model tiny --addr 127.0.0.1:3313 --data-dir "$TMP/redis" "${COMMON[@]}" >"$TMP/fe.log" 2>&1 & PIDS+=($!)
"$BIN" worker --queue redis://127.0.0.1:3311 --simulate-job-ms 0 >"$TMP/worker.log" 2>&1 & PIDS+=($!)
wait_ready 3312; wait_ready 3313
run() { # port steps [jobs] -> median and p90 of the jobs (N), ms
  for i in $(seq 1 "${3:-$N}"); do
    curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$1/api/generate" -H 'content-type: application/json' \
      -H 'accept: application/json' -d "{\"prompt\":\"overhead $i\",\"steps\":$2,\"seed\":1,\"kind\":{\"mode\":\"generate\",\"width\":1024,\"height\":1024}}"
  done | sort -n | awk '{a[NR]=$1*1000} END {printf "median %.1f ms, p90 %.1f ms", a[int(NR/2)+1], a[int(NR*0.9)]}'
}
for steps in 4 16; do
  run 3312 "$steps" 5 >/dev/null; run 3313 "$steps" 5 >/dev/null   # warm-up
  echo "steps $steps: in-process $(run 3312 "$steps"); redis $(run 3313 "$steps")"
done
