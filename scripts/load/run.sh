#!/usr/bin/env bash
# The load and abuse harness against a real server: starts `zimage serve --model tiny
# --queue-capacity 8` on a free port with a fresh data folder, waits until it is ready (/readyz
# when the server has it, else /healthz), and runs scripts/load/harness.py, which prints the
# figures and exits non-zero when a hard rule breaks.
#   scripts/load/run.sh            full run: 200 clients, 10,000 malformed requests, 5 rounds
#   scripts/load/run.sh --quick    CI size: 40 clients, 600 malformed requests, 2 rounds
# Other arguments go to harness.py (see `--help`). Extra server flags come from ZIMAGE_SERVE_ARGS,
# e.g. ZIMAGE_SERVE_ARGS="--max-queued-per-client 2". Makes its venv (target/load-venv) and the
# release server when missing. The server's log is target/load-server.log, the figures
# target/load-report.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${ZIMAGE_BIN:-target/release/zimage}
[ -x "$BIN" ] || cargo build --release -p server --bin zimage --locked
VENV=target/load-venv
scripts/python-venv.sh "$VENV" scripts/load/requirements.txt
WORK=$(mktemp -d -t zimage-load.XXXXXX)
DATA=$WORK/data
SITE=${ZIMAGE_SITE_ROOT:-target/site}
LOG=target/load-server.log
read -r -a EXTRA <<<"${ZIMAGE_SERVE_ARGS:-}"
# port 0: the OS picks a free one; the server says which in its log
"$BIN" serve --model tiny --queue-capacity 8 --addr 127.0.0.1:0 --data-dir "$DATA" --site-root "$SITE" \
  ${EXTRA[@]+"${EXTRA[@]}"} >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
URL=""
UP=""
for _ in $(seq 1 240); do
  kill -0 $SERVER 2>/dev/null || { echo "the server exited:"; cat "$LOG"; exit 1; }
  if [ -z "$URL" ]; then
    URL=$(grep -o 'listening on http://[0-9.:]*' "$LOG" | head -1 | sed 's/listening on //' || true)
  fi
  if [ -n "$URL" ]; then
    READY=$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz" || true)
    [ "$READY" = 200 ] && { UP=readyz; break; }
    # a server without /readyz answers it with the 404 page: then /healthz says it is up
    if [ "$READY" = 404 ] && curl -sf "$URL/healthz" >/dev/null; then UP=healthz; break; fi
  fi
  sleep 0.5
done
[ -n "$UP" ] || { echo "the server did not get ready (url: ${URL:-none}):"; cat "$LOG"; exit 1; }
echo "== server $URL (pid $SERVER, ready by /$UP), data $DATA, log $LOG"
"$VENV/bin/python" scripts/load/harness.py --url "$URL" --pid "$SERVER" --log "$LOG" \
  --data-dir "$DATA" --site-root "$SITE" --report target/load-report.json "$@"
