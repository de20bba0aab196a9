#!/usr/bin/env python3
"""Serving as users see it: real HTTP requests against a running `zimage serve`.

  serve_load.py --url http://127.0.0.1:3000 --concurrency 1,4,16 --json out.json

For each concurrency c, c client threads each send POST /api/generate (1024x1024, 8 steps, fixed
seeds) back to back until `--requests-per-client` are done; latency is request sent -> last PNG
byte received. Reports images/s over the whole round and p50/p95 latency. Then the websocket path
once per `--ws-runs`: POST /api/submit_job, watch the job on /ws, GET the PNG when `done` arrives
(latency submit -> PNG bytes). Only the standard library, plus aiohttp (on the GPU machine) for
the websocket.
"""

import argparse
import asyncio
import json
import statistics
import threading
import time
import urllib.request


def request_png(url, seed, size, steps):
    body = json.dumps({"prompt": "a lighthouse on a cliff at dusk, oil painting", "style": "none", "steps": steps,
                       "seed": seed, "kind": {"mode": "generate", "width": size, "height": size}}).encode()
    req = urllib.request.Request(url + "/api/generate", data=body, headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        png = r.read()
        status = r.status
    dt = time.perf_counter() - t0
    if status != 200 or not png.startswith(b"\x89PNG"):
        raise RuntimeError(f"bad answer {status}, {len(png)} bytes")
    return dt


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def http_round(url, c, n_per_client, size, steps):
    lat, errors, lock = [], [], threading.Lock()

    def client(k):
        for i in range(n_per_client):
            try:
                dt = request_png(url, 1000 * k + i, size, steps)
                with lock:
                    lat.append(dt)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"concurrency": c, "images": len(lat), "errors": errors[:5], "error_count": len(errors),
            "wall_s": wall, "images_per_s": len(lat) / wall,
            "p50_ms": 1e3 * pct(lat, 50) if lat else None, "p95_ms": 1e3 * pct(lat, 95) if lat else None}


async def ws_once(url, seed, size, steps):
    import aiohttp
    body = {"req": {"prompt": "a lighthouse on a cliff at dusk, oil painting", "style": "none", "steps": steps,
                    "seed": seed, "kind": {"mode": "generate", "width": size, "height": size}}}
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url.replace("http", "ws", 1) + "/ws") as ws:
            t0 = time.perf_counter()
            async with s.post(url + "/api/submit_job", json=body) as r:
                ticket = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"submit_job {r.status}: {ticket}")
            await ws.send_str(json.dumps({"type": "watch", "job_id": ticket["job_id"]}))
            steps_seen = 0
            async for msg in ws:
                ev = json.loads(msg.data)
                if ev.get("type") == "step":
                    steps_seen += 1
                if ev.get("type") in ("done", "error", "cancelled"):
                    break
            if ev.get("type") != "done":
                raise RuntimeError(f"job ended with {ev}")
            async with s.get(url + ev["result"]["image_url"]) as r:
                png = await r.read()
            dt = time.perf_counter() - t0
            if not png.startswith(b"\x89PNG"):
                raise RuntimeError("not a PNG")
            return dt, steps_seen, ev["result"]["timings"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests-per-client", default="8,4,2", help="per concurrency level")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ws-runs", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    report = {"size": a.size, "steps": a.steps, "http": [], "ws": None}
    request_png(a.url, 7, a.size, a.steps)  # first request of this shape (graph capture)
    for c, n in zip([int(x) for x in a.concurrency.split(",")], [int(x) for x in a.requests_per_client.split(",")]):
        r = http_round(a.url, c, n, a.size, a.steps)
        print(f"http c={c}: {r['images']} images in {r['wall_s']:.2f} s = {r['images_per_s']:.3f} images/s, "
              f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, errors {r['error_count']}", flush=True)
        report["http"].append(r)
    if a.ws_runs:
        try:
            runs = [asyncio.run(ws_once(a.url, 500 + i, a.size, a.steps)) for i in range(a.ws_runs)]
            lat = [r[0] for r in runs]
            report["ws"] = {"runs": a.ws_runs, "p50_ms": 1e3 * statistics.median(lat), "steps_seen": [r[1] for r in runs],
                            "server_timings": runs[-1][2]}
            print(f"ws: submit -> PNG bytes p50 {1e3 * statistics.median(lat):.0f} ms over {a.ws_runs} runs, "
                  f"step events {runs[-1][1]}, server timings {runs[-1][2]}", flush=True)
        except Exception as e:  # noqa: BLE001
            report["ws"] = {"error": str(e)}
            print(f"ws: failed: {e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
