#!/usr/bin/env python3
"""Start-up of `zimage serve` as a user meets it: from process start to `/readyz` 200, with the
time each phase began (downloading, loading, compiling_kernels, warming_up, ready) read from
`/readyz` every 20 ms. Leaves the server running when --keep is given (its pid is printed).

  startup_time.py --bin /tmp/zimage --json out.json -- serve --model /tmp/zfull --devices cuda:0 ...
"""
import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request


def readyz(url):
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except Exception:
        return 0, {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--log", default="/tmp/startup_serve.log")
    ap.add_argument("--json")
    ap.add_argument("--limit", type=float, default=600)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    t0 = time.perf_counter()
    proc = subprocess.Popen([a.bin] + args, stdout=subprocess.DEVNULL, stderr=open(a.log, "w"))
    phases, last, port_open = [], None, None
    while time.perf_counter() - t0 < a.limit:
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}); see {a.log}")
        status, body = readyz(a.url)
        now = time.perf_counter() - t0
        if status and port_open is None:
            port_open = now
        state = body.get("state")
        if state and state != last:
            phases.append({"state": state, "at_s": round(now, 3), "message": body.get("message", "")})
            last = state
        if status == 200:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        sys.exit(f"not ready within {a.limit} s; phases {phases}")
    result = {"ready_s": round(time.perf_counter() - t0, 3), "port_open_s": port_open, "phases": phases, "pid": proc.pid}
    print(json.dumps(result))
    if a.json:
        json.dump(result, open(a.json, "w"), indent=1)
    if not a.keep:
        proc.terminate()
        proc.wait(timeout=120)


if __name__ == "__main__":
    main()
