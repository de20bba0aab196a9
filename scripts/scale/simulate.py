#!/usr/bin/env python3
"""A Redis deployment at scale with simulated GPUs (docs/SCALE.md): one redis-server, F front ends
(`zimage serve --queue`), W workers (`zimage worker --simulate-job-ms J`: each job sleeps J ms over
its steps, then a real PNG is encoded, sent through Redis and stored by a front end), C clients
looping POST /api/generate spread over the front ends, for D seconds after a warm-up. Prints one
JSON line: images/s, the ideal W*1000/J, the CPU seconds per second that Redis, the front ends
and the workers used (from /proc), and Redis's commands and output bytes per image, so that where
each saturates can be read off.

    scripts/scale/simulate.py --workers 100 --front-ends 10 --job-ms 700 --clients 300 --seconds 20

Ports: Redis on 3320, front ends from 3321. Uses target/release/zimage (--bin to change).
"""
import argparse, json, os, shutil, subprocess, tempfile, threading, time, urllib.request

p = argparse.ArgumentParser()
p.add_argument("--bin", default="target/release/zimage")
p.add_argument("--workers", type=int, default=10)
p.add_argument("--front-ends", type=int, default=2)
p.add_argument("--job-ms", type=int, default=700)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--clients", type=int, default=0, help="default: 2 x workers + 10")
p.add_argument("--seconds", type=float, default=20)
p.add_argument("--warmup", type=float, default=5)
a = p.parse_args()
clients = a.clients or 2 * a.workers + 10
tmp = tempfile.mkdtemp()
procs = []
HZ = os.sysconf("SC_CLK_TCK")


def spawn(args, log):
    procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, log), "w")))
    return procs[-1]


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime + stime
        except OSError:
            pass
    return total / HZ


def redis_stat(name):
    out = subprocess.run(["redis-cli", "-p", "3320", "info", "stats"], capture_output=True, text=True).stdout
    return int(next(l.split(":")[1] for l in out.splitlines() if l.startswith(name + ":")))


def get(url):
    try:
        return urllib.request.urlopen(url, timeout=5).status
    except Exception:
        return 0


try:
    redis = spawn(["redis-server", "--port", "3320", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", tmp], "redis.log")
    url = "redis://127.0.0.1:3320/0"
    time.sleep(0.3)
    ports = [3321 + i for i in range(a.front_ends)]
    fes = [spawn([a.bin, "serve", "--queue", url, "--model", "tiny", "--addr", f"127.0.0.1:{port}",
                  "--data-dir", os.path.join(tmp, "data"), "--site-root", os.path.join(tmp, "none"),
                  "--submissions-per-minute", "0", "--max-queued-per-client", "0", "--queue-capacity", "100000"],
                 f"fe{port}.log") for port in ports]
    workers = [spawn([a.bin, "worker", "--queue", url, "--simulate-job-ms", str(a.job_ms)], f"w{i}.log")
               for i in range(a.workers)]
    for port in ports:
        t0 = time.time()
        while get(f"http://127.0.0.1:{port}/readyz") != 200:
            assert time.time() - t0 < 60, f"front end {port} not ready"
            time.sleep(0.1)
    done, errors, latencies = [0], [0], []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        port = ports[i % len(ports)]
        body = json.dumps({"prompt": f"simulated {i}", "steps": a.steps, "seed": i,
                           "kind": {"mode": "generate", "width": 1024, "height": 1024}}).encode()
        while not stop.is_set():
            t = time.time()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body,
                                         headers={"content-type": "application/json", "accept": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=120).read()
                with lock:
                    done[0] += 1
                    latencies.append(time.time() - t)
            except Exception:
                with lock:
                    errors[0] += 1
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(a.warmup)
    groups = {"redis": [redis.pid], "front_ends": [f.pid for f in fes], "workers": [w.pid for w in workers]}
    cpu0 = {k: cpu_seconds(v) for k, v in groups.items()}
    commands0, net0 = redis_stat("total_commands_processed"), redis_stat("total_net_output_bytes")
    with lock:
        done0, lat0 = done[0], len(latencies)
    t0 = time.time()
    time.sleep(a.seconds)
    with lock:
        n, lat = done[0] - done0, sorted(latencies[lat0:])
    elapsed = time.time() - t0
    commands, net = redis_stat("total_commands_processed") - commands0, redis_stat("total_net_output_bytes") - net0
    cpu = {k: round((cpu_seconds(v) - cpu0[k]) / elapsed, 2) for k, v in groups.items()}
    stop.set()
    print(json.dumps({
        "workers": a.workers, "front_ends": a.front_ends, "job_ms": a.job_ms, "steps": a.steps, "clients": clients,
        "images_per_s": round(n / elapsed, 1), "ideal_images_per_s": round(a.workers * 1000 / a.job_ms, 1),
        "latency_p50_s": round(lat[len(lat) // 2], 2) if lat else None,
        "errors": errors[0], "cpu_cores_used": cpu,
        "redis_commands_per_image": round(commands / max(n, 1), 1), "redis_out_kb_per_image": round(net / max(n, 1) / 1024, 1), "machine_cores": os.cpu_count(),
    }))
finally:
    for pr in procs:
        pr.kill()
    for pr in procs:
        pr.wait()
    shutil.rmtree(tmp, ignore_errors=True)
