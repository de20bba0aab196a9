#!/usr/bin/env bash
# The script APIs tested with the clients people use: the official `openai` package (/v1/images/*)
# and `webuiapi` (AUTOMATIC1111's /sdapi/v1/*, LoRA tags included), against a real `zimage serve --model tiny` with an
# API key. Makes its Python venv (target/api-venv) when missing; builds the release server when
# missing (scripts/test.sh has built it for the browser tests).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${ZIMAGE_BIN:-target/release/zimage}
[ -x "$BIN" ] || cargo build --release -p server --locked
VENV=target/api-venv
scripts/python-venv.sh "$VENV" scripts/requirements-api-clients.txt
PORT=${ZIMAGE_API_PORT:-3200}
KEY="test-key-$RANDOM$RANDOM"
DATA=$(mktemp -d)
LOG=target/api-clients-server.log
# the LoRA the tests name: an ai-toolkit layout LoRA for the tiny model (the engine's fixture)
mkdir -p "$DATA/loras"
cp engine/tests/fixtures/lora/aitoolkit.safetensors "$DATA/loras/style.safetensors"
# One client (this machine, one API key) sends every test's jobs in quick succession: the limits
# per client (30 submissions a minute, 4 queued) are lifted so that they do not fail the suite.
"$BIN" serve --model tiny --addr "127.0.0.1:$PORT" --data-dir "$DATA" --api-key "$KEY" --site-root target/site \
  --submissions-per-minute 0 --max-queued-per-client 0 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break  # 503 until the model is loaded
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
"$VENV/bin/python" scripts/api_clients_test.py --url "http://127.0.0.1:$PORT" --key "$KEY" || { tail -20 "$LOG"; exit 1; }
