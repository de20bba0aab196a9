#!/usr/bin/env python3
"""Load and abuse harness for a running `zimage serve` (scripts/load/run.sh starts one).

Parts, repeated for --rounds rounds:
  (a) N websocket clients each submit a job (POST /api/submit_job) and watch it on /ws: every
      accepted job ends with exactly one terminal event; every refusal is a 4xx or 503 with a reason.
  (b) M malformed requests across every route (broken JSON, wrong types, huge numbers, unknown
      fields, random bytes, wrong content types and methods, huge bodies and headers, path
      traversal tricks), plus websocket sessions that send garbage: no 5xx but 503, every request
      answered (a status read, not a reset), no file outside the data folder or site root served.
  (c) uploads: decompression bombs, a truncated PNG, a GIF, a text file, a 30 MB body on every
      upload route: each refused with a 4xx and a reason; peak RSS.
  (d) the server's RSS after each round, and whether it levels off.
After every part: the server is alive (/healthz) and its log has no "panicked".

Prints a summary table and exits 1 when a hard rule broke. Every malformed case is derived from
(--seed, round, index), so `--replay ROUND:INDEX` sends one case again and prints its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import json
import os
import random
import re
import secrets
import socket
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import websockets

# ---------------------------------------------------------------------------------------------
# What the server answers with, and the raw HTTP client that reads it
# ---------------------------------------------------------------------------------------------

# How a request ended: a status was read, or the connection gave no answer.
ANSWERED = "answered"
RESET = "reset"  # ECONNRESET / EPIPE with no answer readable
CLOSED = "closed"  # the server closed cleanly without answering
TIMEOUT = "timeout"

MAX_BODY_KEPT = 1 << 20  # a response body is read up to this many bytes (enough for any reason)


@dataclasses.dataclass
class Reply:
    outcome: str
    status: int | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    send_failed: bool = False  # the server stopped reading before the request was sent whole
    seconds: float = 0.0

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def reason_of(status: int | None, headers: dict[str, str], body: bytes) -> str | None:
    """The sentence a refusal gives, from our JSON error shapes or a text/HTML body; None if none."""
    if not body:
        return None
    ctype = headers.get("content-type", "")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        # studio {kind, reason}; A1111 {error, detail}; OpenAI {error: {message}}
        for key in ("reason", "detail", "message"):
            if isinstance(data.get(key), str) and data[key].strip():
                return data[key].strip()
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"].strip():
            return err["message"].strip()
        if isinstance(err, str) and err.strip():
            return err.strip()
        return None
    if ctype.startswith("text/") or not ctype:
        text = re.sub(r"<[^>]*>", " ", body[:4096].decode("utf-8", "replace"))
        text = " ".join(text.split())
        return text[:300] or None
    return None


def limit_in_words(reason: str | None) -> bool:
    """Whether a 413's reason says the limit, e.g. "at most 20 MB"."""
    return bool(reason) and re.search(r"\d+(\.\d+)?\s*(bytes|[KMG]i?B)\b", reason) is not None


def _read_response(sock: socket.socket, deadline: float) -> tuple[int, dict[str, str], bytes]:
    """Reads one HTTP/1.1 response (Content-Length, chunked, or until close)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            if buf:
                break
            raise EOFError("closed before an answer")
        buf += chunk
        if len(buf) > 256 * 1024:
            break
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = rest

    def more() -> bytes:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            return sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return b""

    if "content-length" in headers:
        want = min(int(headers["content-length"]), MAX_BODY_KEPT)
        while len(body) < want:
            chunk = more()
            if not chunk:
                break
            body += chunk
        body = body[:want]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        raw = body
        while b"0\r\n\r\n" not in raw and len(raw) < MAX_BODY_KEPT:
            chunk = more()
            if not chunk:
                break
            raw += chunk
        body = b""
        while raw:
            size_line, _, raw = raw.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break
            if size == 0:
                break
            body += raw[:size]
            raw = raw[size + 2 :]
    elif status not in (101, 204, 304):
        while len(body) < MAX_BODY_KEPT:
            chunk = more()
            if not chunk:
                break
            body += chunk
    return status, headers, body


def exchange(addr: tuple[str, int], request: bytes, timeout: float) -> Reply:
    """Sends a raw request whole, then reads the answer, as HTTP libraries do (httpx, curl): when the
    server stops reading early the send fails, and the answer it wrote before is still read if the
    connection gives it. One connection per request (`Connection: close` is in every request)."""
    start = time.monotonic()
    deadline = start + timeout
    send_failed = False
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except OSError as e:
        return Reply(RESET if isinstance(e, ConnectionError) else TIMEOUT, seconds=time.monotonic() - start)
    try:
        sock.settimeout(timeout)
        view = memoryview(request)
        try:
            for off in range(0, len(view), 1 << 16):
                sock.sendall(view[off : off + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            send_failed = True
        except socket.timeout:
            return Reply(TIMEOUT, send_failed=True, seconds=time.monotonic() - start)
        try:
            status, headers, body = _read_response(sock, deadline)
        except (ConnectionResetError, BrokenPipeError):
            return Reply(RESET, send_failed=send_failed, seconds=time.monotonic() - start)
        except EOFError:
            return Reply(CLOSED, send_failed=send_failed, seconds=time.monotonic() - start)
        except socket.timeout:
            return Reply(TIMEOUT, send_failed=send_failed, seconds=time.monotonic() - start)
        except ValueError:
            return Reply(CLOSED, send_failed=send_failed, seconds=time.monotonic() - start)
        return Reply(ANSWERED, status, headers, body, send_failed, time.monotonic() - start)
    finally:
        sock.close()


def build_request(method: str, target: str, host: str, headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"", content_type: str | None = None, raw_head: bytes | None = None) -> bytes:
    """An HTTP/1.1 request; `raw_head` replaces the request line and headers for garbage requests."""
    if raw_head is not None:
        return raw_head + body
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", "User-Agent: zimage-load-harness"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


# ---------------------------------------------------------------------------------------------
# The server process: memory, log, liveness
# ---------------------------------------------------------------------------------------------


def proc_status_kib(pid: int, field: str) -> int | None:
    """VmRSS / VmHWM of a process from /proc/<pid>/status, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


class RssSampler:
    """Samples the server's RSS every 20 ms in a thread; `peak()` is the highest since `reset()`."""

    def __init__(self, pid: int):
        self.pid = pid
        self._peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            rss = proc_status_kib(self.pid, "VmRSS")
            if rss is not None:
                with self._lock:
                    self._peak = max(self._peak, rss)

    def reset(self) -> None:
        with self._lock:
            self._peak = proc_status_kib(self.pid, "VmRSS") or 0

    def peak(self) -> int:
        with self._lock:
            return self._peak

    def stop(self) -> None:
        self._stop.set()


def server_alive(pid: int, addr: tuple[str, int], host: str) -> bool:
    if not Path(f"/proc/{pid}").exists():
        return False
    r = exchange(addr, build_request("GET", "/healthz", host), 10)
    return r.outcome == ANSWERED and r.status == 200


def panics_in_log(log: Path) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if "panicked" in line]


# ---------------------------------------------------------------------------------------------
# Figures and hard rules
# ---------------------------------------------------------------------------------------------


class Verdict:
    """Collects broken hard rules (with an example each) and informational notes."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.notes: list[str] = []

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"  FAIL: {message}", flush=True)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.fail(message)

    def note(self, message: str) -> None:
        self.notes.append(message)
        print(f"  note: {message}", flush=True)


def count_line(counter: collections.Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: str(kv[0]))) or "-"


# ---------------------------------------------------------------------------------------------
# (a) websocket clients that each submit a job and watch it
# ---------------------------------------------------------------------------------------------

TERMINAL = {"done", "error", "cancelled"}
EVENT_TYPES = {"queued", "started", "step"} | TERMINAL


def job_request(prompt: str, seed: int) -> dict:
    """A valid Generate request at the cheapest settings (4 steps, the smallest of the 18 sizes)."""
    return {"prompt": prompt, "style": "none", "steps": 4, "seed": seed,
            "kind": {"mode": "generate", "width": 1536, "height": 640}, "negative_prompt": ""}


@dataclasses.dataclass
class ClientResult:
    accepted: bool = False
    status: int | None = None
    reason: str | None = None
    retry_after: str | None = None
    terminal_events: list[str] = dataclasses.field(default_factory=list)
    events: int = 0
    bad_events: list[str] = dataclasses.field(default_factory=list)
    cancel_sent: bool = False
    image_ok: bool | None = None
    error: str | None = None


async def ws_client(i: int, round_no: int, base: str, ws_url: str, http: httpx.AsyncClient,
                    cancel: bool, job_deadline: float, duplicate_grace: float) -> ClientResult:
    res = ClientResult()
    try:
        async with websockets.connect(ws_url, open_timeout=60, max_size=2**22, ping_interval=None) as ws:
            body = {"req": job_request(f"load round {round_no} client {i}: a lighthouse at dusk", i)}
            try:
                r = await http.post(f"{base}/api/submit_job", json=body)
            except httpx.HTTPError as e:
                res.error = f"submission: {type(e).__name__}: {e}"
                return res
            res.status = r.status_code
            if r.status_code != 200:
                res.reason = reason_of(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)
                res.retry_after = r.headers.get("retry-after")
                return res
            res.accepted = True
            job_id = r.json()["job_id"]
            await ws.send(json.dumps({"type": "watch", "job_id": job_id}))
            done_at = None
            while True:
                now = time.monotonic()
                if done_at is not None and now >= done_at + duplicate_grace:
                    break  # listened long enough after the terminal event for a duplicate
                limit = (done_at + duplicate_grace) if done_at is not None else job_deadline
                if now >= limit:
                    break
                try:
                    msg = await asyncio.wait_for(ws.recv(), timeout=limit - now)
                except asyncio.TimeoutError:
                    break
                ev = json.loads(msg)
                if ev.get("job_id") != job_id or ev.get("type") not in EVENT_TYPES:
                    res.bad_events.append(str(msg)[:200])
                    continue
                res.events += 1
                if ev["type"] in TERMINAL:
                    res.terminal_events.append(ev["type"])
                    if done_at is None:
                        done_at = time.monotonic()
                    if ev["type"] == "done":
                        img = await http.get(base + ev["result"]["image_url"])
                        res.image_ok = img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
                elif cancel and not res.cancel_sent:
                    res.cancel_sent = True
                    c = await http.post(f"{base}/api/cancel_job", json={"job_id": job_id})
                    if c.status_code != 200:
                        res.bad_events.append(f"cancel_job answered {c.status_code}: {c.text[:200]}")
    except (OSError, httpx.HTTPError, websockets.WebSocketException, asyncio.TimeoutError, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_clients(args, round_no: int) -> list[ClientResult]:
    base = args.url
    ws_url = "ws" + base[len("http"):] + "/ws"
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    job_deadline = time.monotonic() + args.job_timeout
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        # which clients cancel: spread over the indexes (golden-ratio steps), whoever gets accepted
        tasks = [ws_client(i, round_no, base, ws_url, http, cancel=(i * 0.6180339887) % 1 < args.cancel_share,
                           job_deadline=job_deadline, duplicate_grace=args.duplicate_grace)
                 for i in range(args.clients)]
        return await asyncio.gather(*tasks)


def part_a(args, round_no: int, verdict: Verdict, pid: int, sampler: RssSampler) -> dict:
    print(f"== ({round_no}a) {args.clients} websocket clients each submit a job and watch it", flush=True)
    sampler.reset()
    rss_before = proc_status_kib(pid, "VmRSS")
    t = time.monotonic()
    results = asyncio.run(run_clients(args, round_no))
    seconds = time.monotonic() - t
    rss_after = proc_status_kib(pid, "VmRSS")
    accepted = [r for r in results if r.accepted]
    refused = [r for r in results if not r.accepted and r.status is not None]
    failed = [r for r in results if r.error is not None]
    statuses = collections.Counter(r.status for r in refused)
    endings = collections.Counter(r.terminal_events[0] if r.terminal_events else "none" for r in accepted)
    no_end = [r for r in accepted if not r.terminal_events and r.error is None]
    several = [r for r in accepted if len(r.terminal_events) > 1]
    bad_refusals = [r for r in refused
                    if not ((400 <= r.status < 500 or r.status == 503) and r.reason
                            and (r.status != 429 or r.retry_after))]
    bad_events = [e for r in results for e in r.bad_events]
    images_missing = [r for r in accepted if r.terminal_events[:1] == ["done"] and not r.image_ok]
    verdict.check(not failed, f"({round_no}a) {len(failed)} clients failed: {failed[0].error if failed else ''}")
    verdict.check(len(accepted) > 0, f"({round_no}a) no job was accepted, so nothing was watched")
    verdict.check(not no_end, f"({round_no}a) {len(no_end)} accepted jobs saw no terminal event within {args.job_timeout} s")
    verdict.check(not several, f"({round_no}a) {len(several)} jobs saw several terminal events: {several[0].terminal_events if several else ''}")
    verdict.check(not bad_refusals, f"({round_no}a) {len(bad_refusals)} refusals were not a 4xx/503 with a reason"
                  + (f" (e.g. {bad_refusals[0].status}: {bad_refusals[0].reason!r})" if bad_refusals else ""))
    verdict.check(not bad_events, f"({round_no}a) {len(bad_events)} unexpected messages: {bad_events[:1]}")
    verdict.check(not images_missing, f"({round_no}a) {len(images_missing)} finished jobs' PNGs could not be read back")
    reasons = collections.Counter((r.status, (r.reason or "")[:80]) for r in refused)
    print(f"   accepted {len(accepted)} ({count_line(endings)}), refused {len(refused)} ({count_line(statuses)}), "
          f"failed {len(failed)}, in {seconds:.1f} s; RSS {mib(rss_before)} -> {mib(rss_after)} MiB, peak {mib(sampler.peak())} MiB", flush=True)
    for (status, reason), n in reasons.most_common(3):
        print(f"   refusal x{n}: {status} {reason!r}")
    return {"clients": args.clients, "accepted": len(accepted), "endings": dict(endings),
            "refused": len(refused), "refusal_statuses": {str(k): v for k, v in statuses.items()},
            "failed": len(failed), "no_terminal": len(no_end), "several_terminal": len(several),
            "refusals_without_reason": len(bad_refusals), "seconds": round(seconds, 1),
            "rss_before_kib": rss_before, "rss_after_kib": rss_after, "peak_rss_kib": sampler.peak()}


# ---------------------------------------------------------------------------------------------
# (b) malformed requests across every route
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    route: str  # a label, e.g. "POST /api/submit_job"
    mutation: str  # what is wrong with it
    request: bytes
    timeout: float = 30.0
    huge_body: bool = False  # must be refused 413 with the limit in words
    traversal: bool = False  # must not serve a canary
    cancel_if_accepted: bool = False  # a submit_job that went through: cancel its job afterwards


def hex_id(rng: random.Random) -> str:
    """An id in the server's format (32 lowercase hex digits) that names nothing."""
    return rng.randbytes(16).hex()


def valid_job(rng: random.Random) -> dict:
    return job_request(rng.choice(["a red fox", "a castle on a hill", "tea shop at night"]), rng.randrange(1 << 32))


JSON_ROUTES: dict[str, callable] = {
    # server functions: the body is an object of the function's arguments
    "/api/server_info": lambda rng: {},
    "/api/submit_job": lambda rng: {"req": valid_job(rng)},
    "/api/cancel_job": lambda rng: {"job_id": hex_id(rng)},
    "/api/image_info": lambda rng: {"image_id": hex_id(rng)},
    "/api/history": lambda rng: {"search": rng.choice(["", "fox", "a"]), "page": rng.randrange(3)},
    "/api/delete_image": lambda rng: {"image_id": hex_id(rng)},
    # plain JSON routes (these wait for the job when one is accepted)
    "/api/generate": lambda rng: valid_job(rng),
    "/v1/images/generations": lambda rng: {"prompt": "a red fox", "model": "z-image-turbo", "n": 1,
                                           "size": "1536x640", "response_format": "url", "steps": 4},
    # only fields the route checks: an ignored one of a wrong type would leave a request valid
    "/sdapi/v1/txt2img": lambda rng: {"prompt": "a red fox", "steps": 4, "width": 1536, "height": 640,
                                      "seed": rng.randrange(1000)},
    "/sdapi/v1/img2img": lambda rng: {"prompt": "a red fox", "steps": 4, "init_images": [TINY_PNG_B64],
                                      "denoising_strength": 0.6, "width": 1536, "height": 640},
    "/sdapi/v1/options": lambda rng: {"sd_model_checkpoint": "z-image-turbo", "CLIP_stop_at_last_layers": 2},
    "/sdapi/v1/interrupt": lambda rng: {},
}
# /sdapi/v1/interrupt takes no body: a huge one is not read there, so it is no body-limit case
BODY_READING_JSON_ROUTES = set(JSON_ROUTES) - {"/sdapi/v1/interrupt"}
# JSON routes whose limit is an upload's (base64 images inside)
HUGE_JSON_ROUTES = {"/sdapi/v1/img2img"}
# Routes whose request waits for the job: a case that happens to be valid runs one (bounded by the
# queue), so they get a long timeout.
WAITING_ROUTES = {"/api/generate", "/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"}
MULTIPART_ROUTES = ["/api/upload_image", "/v1/images/edits"]
GET_ROUTES = ["/", "/embed", "/share/{id}", "/images/{id}.png", "/uploads/{id}.png", "/thumbs/{id}.jpg",
              "/pkg/{name}", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/models/{name}",
              "/sdapi/v1/progress", "/sdapi/v1/sd-models", "/sdapi/v1/samplers", "/sdapi/v1/scripts",
              "/sdapi/v1/options", "/api/history", "/ws", "/favicon.ico", "/manifest.webmanifest"]


def png_bytes(width: int, height: int, pixel: bytes = b"\x80", color_type: int = 0, level: int = 6) -> bytes:
    """A PNG of one repeated pixel (grey by default), written with zlib: fast even for 30000x30000."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    comp = zlib.compressobj(level)
    row = b"\x00" + pixel * width
    out = []
    for _ in range(height):
        out.append(comp.compress(row))
    out.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(out)) + chunk(b"IEND", b"")


TINY_PNG = png_bytes(64, 48, b"\x10\x80\xf0", color_type=2)
TINY_PNG_B64 = base64.b64encode(TINY_PNG).decode()
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
       b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")

WRONG_VALUES = [None, True, False, 0, -1, 1.5, "", "text", [], [1, 2], {}, {"a": 1}, "1e400", "\u0000", "🦊" * 50]
HUGE_NUMBERS = ["1e309", "-1e309", "18446744073709551616", "-9223372036854775809", "99999999999999999999999999999999",
                "4294967296", "1e-400", "-0", "0.0000000000000000000000001", "123456789012345678901234567890e10",
                "NaN", "Infinity", "-Infinity", "0x10", "1_000"]


def leaf_paths(value, prefix=()):
    """Paths to every leaf of a JSON value, e.g. ("req", "kind", "width")."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaf_paths(v, prefix + (k,))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from leaf_paths(v, prefix + (i,))
    if prefix:
        yield prefix


def set_path(value, path, new):
    for p in path[:-1]:
        value = value[p]
    value[path[-1]] = new


def json_dumps_raw(value, raw_at=None, raw_text=None) -> str:
    """JSON with one leaf replaced by raw text (for numbers JSON parsers must refuse or clamp)."""
    if raw_at is None:
        return json.dumps(value)
    marker = "@@RAW" + secrets.token_hex(4) + "@@"
    copy = json.loads(json.dumps(value))
    set_path(copy, raw_at, marker)
    return json.dumps(copy).replace(json.dumps(marker), raw_text)


def json_mutation(rng: random.Random, base: dict, waits: bool) -> tuple[str, bytes, str]:
    """(mutation name, body, content type) of one malformed JSON body derived from `base`. On routes
    that wait for the job (`waits`) the prompt is empty and left alone: every field is still read
    and checked, then the request is refused for the prompt, where one that stayed valid (a null
    where a default applies, junk that is only whitespace) would run a job for minutes."""
    kinds = ["broken", "broken", "wrong_type", "wrong_type", "huge_number", "huge_number",
             "unknown_fields", "random_bytes", "not_an_object", "deep_nesting", "long_string",
             "invalid_utf8", "empty", "duplicate_keys", "wrong_content_type", "form_encoded"]
    kind = rng.choice(kinds)
    if waits:
        base = dict(base, prompt="")
    text = json.dumps(base)
    paths = [p for p in leaf_paths(base) if not (waits and p == ("prompt",))]
    if not paths and kind in ("wrong_type", "huge_number", "long_string"):
        kind = "unknown_fields"  # an empty argument object has no field to change
    if kind == "broken":
        how = rng.choice(["truncate", "garbage", "trailing_comma", "single_quotes", "unquoted_key", "comment"])
        if how == "truncate" and len(text) > 1:
            return "broken JSON (truncated)", text[: rng.randrange(1, len(text))].encode(), "application/json"
        if how == "garbage":
            at = rng.randrange(len(text) + 1)
            junk = "".join(rng.choice("{}[]:,\"'\\ \t\n0x-+.eE") for _ in range(rng.randrange(1, 8)))
            return "broken JSON (garbage inside)", (text[:at] + junk + text[at:]).encode(), "application/json"
        if how == "trailing_comma":
            return "broken JSON (trailing comma)", (text[:-1] + ",}").encode(), "application/json"
        if how == "single_quotes":
            return "broken JSON (single quotes)", text.replace('"', "'").encode(), "application/json"
        if how == "unquoted_key":
            return "broken JSON (unquoted key)", re.sub(r'"(\w+)":', r"\1:", text).encode(), "application/json"
        return "broken JSON (comment)", ("/* hi */" + text).encode(), "application/json"
    if kind == "wrong_type":
        value = json.loads(text)
        set_path(value, rng.choice(paths), rng.choice(WRONG_VALUES))
        return "wrong type", json.dumps(value).encode(), "application/json"
    if kind == "huge_number":
        return "huge number", json_dumps_raw(base, rng.choice(paths), rng.choice(HUGE_NUMBERS)).encode(), "application/json"
    if kind == "unknown_fields":
        value = json.loads(text)
        value["zz_unknown_" + rng.randbytes(2).hex()] = rng.choice(WRONG_VALUES)
        for p in paths:
            if isinstance(p[-1], str) and rng.random() < 0.3:
                parent = value
                for q in p[:-1]:
                    parent = parent[q]
                if isinstance(parent, dict):
                    parent["__proto__"] = {"polluted": True}
        return "unknown fields", json.dumps(value).encode(), "application/json"
    if kind == "random_bytes":
        return "random bytes", rng.randbytes(rng.randrange(1, 4096)), rng.choice(["application/json", "application/octet-stream"])
    if kind == "not_an_object":
        return "not an object", rng.choice([b"[]", b"null", b"42", b'"text"', b"true", b"[{}]"]), "application/json"
    if kind == "deep_nesting":
        depth = rng.choice([200, 2000, 50000])
        return f"deep nesting ({depth})", (b"[" * depth + b"]" * depth), "application/json"
    if kind == "long_string":
        value = json.loads(text)
        set_path(value, rng.choice(paths), "x" * rng.choice([2001, 70000, 500000]))
        return "long string", json.dumps(value).encode(), "application/json"
    if kind == "invalid_utf8":
        raw = text.encode()
        at = rng.randrange(len(raw) + 1)
        return "invalid UTF-8", raw[:at] + rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + raw[at:], "application/json"
    if kind == "empty":
        return "empty body", b"", "application/json"
    if kind == "duplicate_keys":
        return "duplicate keys", (text[:-1] + ", " + text[1:]).encode() if len(text) > 2 else b'{"a":1,"a":2}', "application/json"
    if kind == "wrong_content_type":
        ctype = rng.choice(["text/plain", "application/xml", "image/png", "multipart/form-data", "a/b/c;;;=",
                            "application/json; charset=utf-16", "", "application/x-www-form-urlencoded"])
        return f"wrong content type ({ctype or 'empty'})", text.encode(), ctype
    assert kind == "form_encoded", kind
    form = "&".join(f"{k}={v}" for k, v in base.items() if not isinstance(v, (dict, list)))
    return "form encoded", form.encode(), "application/x-www-form-urlencoded"


def multipart_body(fields: list[tuple[str, str | None, str | None, bytes]], boundary: str) -> bytes:
    """multipart/form-data: (name, filename, content type, data) per field."""
    out = b""
    for name, filename, ctype, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def multipart_mutation(rng: random.Random, route: str) -> tuple[str, bytes, str]:
    boundary = "----zimage" + rng.randbytes(8).hex()
    ctype = f"multipart/form-data; boundary={boundary}"
    prompt = [("prompt", None, None, b"a red fox")] if route == "/v1/images/edits" else []
    kind = rng.choice(["no_boundary", "wrong_boundary", "no_image_field", "empty_file", "random_file", "text_as_png",
                       "gif", "truncated", "many_fields", "huge_field_name", "bad_strength", "bad_n", "bad_size",
                       "two_images", "mask", "not_multipart", "random_bytes"])
    image = [("image", "in.png", "image/png", TINY_PNG)]
    if kind == "no_boundary":
        return "multipart without boundary", multipart_body(prompt + image, boundary), "multipart/form-data"
    if kind == "wrong_boundary":
        return "multipart with another boundary", multipart_body(prompt + image, boundary + "x"), ctype
    if kind == "no_image_field":
        return "no image field", multipart_body(prompt + [("picture", "in.png", "image/png", TINY_PNG)], boundary), ctype
    if kind == "empty_file":
        return "empty file", multipart_body(prompt + [("image", "in.png", "image/png", b"")], boundary), ctype
    if kind == "random_file":
        return "random bytes as image", multipart_body(prompt + [("image", "in.png", "image/png", rng.randbytes(rng.randrange(1, 20000)))], boundary), ctype
    if kind == "text_as_png":
        return "text as image/png", multipart_body(prompt + [("image", "in.png", "image/png", b"hello, not an image\n" * 50)], boundary), ctype
    if kind == "gif":
        return "GIF", multipart_body(prompt + [("image", "in.gif", "image/gif", GIF)], boundary), ctype
    if kind == "truncated":
        body = multipart_body(prompt + image, boundary)
        return "truncated multipart", body[: rng.randrange(1, len(body))], ctype
    # the bulky forms without a prompt: read whole, then refused on edits rather than running a job
    if kind == "many_fields":
        return "2000 fields", multipart_body([(f"f{i}", None, None, b"x") for i in range(2000)] + image, boundary), ctype
    if kind == "huge_field_name":
        return "100 KB field name", multipart_body([("n" * 100_000, None, None, b"x")] + image, boundary), ctype
    if kind == "bad_strength":
        return "bad strength", multipart_body(prompt + image + [("strength", None, None, rng.choice([b"NaN", b"-1", b"1e400", b"x", b"5"]))], boundary), ctype
    if kind == "bad_n":
        return "bad n", multipart_body(prompt + image + [("n", None, None, rng.choice([b"0", b"99", b"-1", b"1.5", b"1e3"]))], boundary), ctype
    if kind == "bad_size":
        return "bad size", multipart_body(prompt + image + [("size", None, None, rng.choice([b"1x1", b"99999x99999", b"x", b"1024", b"-1x-1"]))], boundary), ctype
    if kind == "two_images":
        return "two images", multipart_body(prompt + image + image, boundary), ctype
    if kind == "mask":
        return "mask", multipart_body(prompt + image + [("mask", "m.png", "image/png", TINY_PNG)], boundary), ctype
    if kind == "not_multipart":
        return "JSON instead of multipart", json.dumps({"image": TINY_PNG_B64, "prompt": "x"}).encode(), "application/json"
    return "random bytes", rng.randbytes(rng.randrange(1, 4096)), ctype


class Canaries:
    """Files planted next to the data folder and next to the site root, with a random token each:
    no answer may ever contain a token (or /etc/passwd)."""

    def __init__(self, data_dir: Path, site_root: Path, seed: int):
        # the names from the seed, so that a replayed case asks for the same paths; the content a
        # secret of its own (an error that echoes the path it was asked for names the file, which
        # is fine: serving the file's content is what must not happen)
        name = "canary-" + random.Random(f"{seed}:canary").randbytes(12).hex()
        self.token = "content-" + secrets.token_hex(16)
        self.files = [data_dir.resolve().parent / f"{name}-data.txt", site_root.resolve().parent / f"{name}-site.txt"]
        for f in self.files:
            f.write_text(f"{self.token} must never be served\n")
        self.data_dir = data_dir.resolve()
        self.site_root = site_root.resolve()

    def leaked(self, body: bytes) -> str | None:
        if self.token.encode() in body:
            return "a canary file"
        if b"root:x:0:0:" in body:
            return "/etc/passwd"
        return None

    def remove(self) -> None:
        for f in self.files:
            f.unlink(missing_ok=True)


TRAVERSAL_DOTS = ["../", "%2e%2e/", "%2e%2e%2f", "..%2f", "%2E%2E%2F", "%252e%252e%252f", "..%5c", "..\\",
                  "%c0%ae%c0%ae/", ".%2e/", "%2e./", "....//", "..;/", "..%00/", "..%c0%af", "%uff0e%uff0e/", "..././"]
TRAVERSAL_PREFIXES = ["/images/", "/uploads/", "/thumbs/", "/share/", "/pkg/", "/", "/embed/", "/api/",
                      "/v1/models/", "/sdapi/v1/", "/pkg/../", "/images/x/"]


def traversal_case(rng: random.Random, canaries: Canaries, host: str) -> Case:
    kind = rng.choice(["relative", "relative", "relative", "absolute", "absolute_form", "etc_passwd"])
    target_file = rng.choice(canaries.files)
    prefix = rng.choice(TRAVERSAL_PREFIXES)
    if kind == "relative":
        dots = rng.choice(TRAVERSAL_DOTS)
        depth = rng.randrange(1, 9)
        suffix = rng.choice(["", "%00.png", ".png", "#.png", "?x=.png", "%23.png"])
        path = prefix + dots * depth + target_file.name + suffix
        mutation = f"traversal {dots!r} x{depth}"
    elif kind == "absolute":
        enc = rng.choice([str(target_file), str(target_file).replace("/", "%2f"), str(target_file).replace("/", "%2F"),
                          "/" + str(target_file), str(target_file).replace("/", "\\")])
        path = prefix.rstrip("/") + ("" if enc.startswith(("/", "%")) else "/") + enc
        if not path.startswith("/"):
            path = "/" + path
        mutation = "absolute path"
    elif kind == "absolute_form":
        path = f"http://{host}{prefix}" + "../" * rng.randrange(1, 8) + target_file.name
        mutation = "absolute-form target with ../"
    else:
        path = prefix + rng.choice(["../", "%2e%2e/", "..%2f"]) * rng.randrange(3, 12) + "etc/passwd"
        mutation = "traversal to /etc/passwd"
    return Case(f"GET {prefix}", mutation, build_request("GET", path, host), traversal=True)


def get_case(rng: random.Random, host: str) -> Case:
    route = rng.choice(GET_ROUTES)
    name = rng.choice([hex_id(rng), "x" * rng.choice([1, 33, 5000, 60000]), "ZZ" * 16, "%00" * 5, "🦊",
                       "%ff%fe", hex_id(rng).upper(), "a.b.c", "", "%", "%zz", "con", "...."])
    path = route.replace("{id}", name).replace("{name}", name)
    kind = rng.choice(["bad_id", "bad_id", "query", "method", "huge_header", "many_headers", "bad_header", "ws"])
    if kind == "bad_id":
        return Case(f"GET {route}", "bad id", build_request("GET", path, host))
    if kind == "query":
        query = rng.choice(["?" + "a=1&" * 5000, "?page=-1&search=%ff", "?%%%", "?x=" + "y" * 30000, "?__proto__[x]=1"])
        return Case(f"GET {route}", "garbage query", build_request("GET", path + query, host))
    if kind == "method":
        method = rng.choice(["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO", "GET\x00"])
        return Case(f"{method} {route}", "wrong method", build_request(method, path, host, body=b"{}"))
    if kind == "huge_header":
        size = rng.choice([20_000, 200_000, 1_000_000])
        return Case(f"GET {route}", f"{size // 1000} KB header", build_request("GET", path, host, [("X-Big", "b" * size)]))
    if kind == "many_headers":
        return Case(f"GET {route}", "500 headers", build_request("GET", path, host, [(f"X-H{i}", "v") for i in range(500)]))
    if kind == "bad_header":
        hdr = rng.choice([("Content-Length", "-1"), ("Content-Length", "abc"), ("Content-Length", "99999999999999999999"),
                          ("Transfer-Encoding", "chunked, identity"), ("Host", ""), ("Range", "bytes=999999999-"),
                          ("Accept-Encoding", "x" * 5000), ("Cookie", "a=" + "%" * 5000), ("If-None-Match", '"' * 1000)])
        return Case(f"GET {route}", f"bad header {hdr[0]}", build_request("GET", path, host, [hdr]))
    headers = rng.choice([[("Upgrade", "websocket"), ("Connection", "Upgrade")],
                          [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "8"), ("Sec-WebSocket-Key", "x")],
                          [("Upgrade", "h2c"), ("Connection", "Upgrade")],
                          [("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]])
    return Case("GET /ws", "bad websocket upgrade", build_request("GET", "/ws", host, headers))


def garbage_request_case(rng: random.Random) -> Case:
    raw = rng.choice([rng.randbytes(rng.randrange(1, 2000)), b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                      b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                      b"POST /api/history HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
                      b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                      b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\n" * 100 + b"\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
    return Case("raw", "garbage request", raw)


def huge_json_case(rng: random.Random, host: str, route: str) -> Case:
    """A JSON body larger than the route takes: 3 MB (JSON routes take 256 KiB), 30 MB for
    A1111's img2img, whose JSON carries base64 images (it takes about 26 MB)."""
    body = JSON_ROUTES[route](rng)
    mb = 30 if route in HUGE_JSON_ROUTES else 3
    filler = "x" * (mb * 1024 * 1024)
    if route == "/api/submit_job":
        body["req"]["prompt"] = filler
    else:
        body["prompt"] = filler
    return Case(f"POST {route}", f"{mb} MB JSON body", build_request("POST", route, host, body=json.dumps(body).encode(),
                content_type="application/json"), timeout=60, huge_body=True)


def huge_upload_case(host: str, route: str) -> Case:
    """A 30 MB upload: past the 20 MB upload limit."""
    boundary = "----zimage" + secrets.token_hex(8)
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(30 * 1024 * 1024)
    fields = ([("prompt", None, None, b"a red fox")] if route == "/v1/images/edits" else []) + [("image", "big.png", "image/png", data)]
    return Case(f"POST {route}", "30 MB upload", build_request("POST", route, host, body=multipart_body(fields, boundary),
                content_type=f"multipart/form-data; boundary={boundary}"), timeout=120, huge_body=True)


def malformed_case(seed: int, round_no: int, index: int, host: str, canaries: Canaries) -> Case:
    """Case `index` of a round: derived from (seed, round, index) alone, so it can be replayed."""
    rng = random.Random(f"{seed}:{round_no}:{index}")
    # a few huge bodies, spread over the round: 1 in 100 a 3 MB JSON (30 MB to img2img), 1 in 1000 a 30 MB upload
    if index % 1000 == 500:
        return huge_upload_case(host, rng.choice(MULTIPART_ROUTES))
    if index % 100 == 50:
        return huge_json_case(rng, host, rng.choice(sorted(BODY_READING_JSON_ROUTES)))
    family = rng.choices(["json", "multipart", "get", "traversal", "garbage"], weights=[50, 12, 16, 18, 4])[0]
    if family == "json":
        route = rng.choice(sorted(JSON_ROUTES))
        waits = route in WAITING_ROUTES
        mutation, body, ctype = json_mutation(rng, JSON_ROUTES[route](rng), waits)
        timeout = 300 if waits else 30
        return Case(f"POST {route}", mutation, build_request("POST", route, host, body=body, content_type=ctype or None),
                    timeout=timeout, cancel_if_accepted=route == "/api/submit_job")
    if family == "multipart":
        route = rng.choice(MULTIPART_ROUTES)
        mutation, body, ctype = multipart_mutation(rng, route)
        return Case(f"POST {route}", mutation, build_request("POST", route, host, body=body, content_type=ctype),
                    timeout=300 if route in WAITING_ROUTES else 30)
    if family == "get":
        return get_case(rng, host)
    if family == "traversal":
        return traversal_case(rng, canaries, host)
    return garbage_request_case(rng)


@dataclasses.dataclass
class CaseResult:
    case: Case
    index: int
    reply: Reply
    reason: str | None
    leaked: str | None


def judge_case(res: CaseResult) -> list[str]:
    """The hard rules one malformed request broke (empty: fine)."""
    problems = []
    r, case = res.reply, res.case
    if r.outcome != ANSWERED:
        problems.append(f"no answer ({r.outcome}{', send failed' if r.send_failed else ''})")
    elif r.status >= 500 and not (r.status == 503 and res.reason):
        problems.append(f"{r.status} {(res.reason or '')[:120]!r}")
    elif r.status == 429 and not (r.headers.get("retry-after") and res.reason):
        problems.append("429 without Retry-After and a reason")
    if case.huge_body and r.outcome == ANSWERED and not (r.status == 413 and limit_in_words(res.reason)):
        problems.append(f"huge body answered {r.status} {(res.reason or '')[:120]!r}, not 413 with the limit in words")
    if res.leaked:
        problems.append(f"served {res.leaked}")
    return problems


def run_case(args, addr, host, canaries: Canaries, case: Case, index: int) -> CaseResult:
    reply = exchange(addr, case.request, case.timeout)
    reason = reason_of(reply.status, reply.headers, reply.body) if reply.outcome == ANSWERED else None
    res = CaseResult(case, index, reply, reason, canaries.leaked(reply.body))
    if case.cancel_if_accepted and reply.status == 200:
        try:
            job_id = json.loads(reply.body)["job_id"]
            exchange(addr, build_request("POST", "/api/cancel_job", host, body=json.dumps({"job_id": job_id}).encode(),
                                         content_type="application/json"), 30)
        except (ValueError, KeyError, TypeError):
            pass
    return res


async def ws_abuse_session(rng: random.Random, ws_url: str) -> str:
    """One websocket session that sends garbage; returns how it ended."""
    kind = rng.choice(["text_garbage", "binary", "bad_json", "bad_ids", "too_big", "many_watches", "unknown_type", "close_early"])
    try:
        async with websockets.connect(ws_url, open_timeout=30, max_size=2**22, ping_interval=None, close_timeout=5) as ws:
            if kind == "text_garbage":
                for _ in range(20):
                    await ws.send("".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 200))))
            elif kind == "binary":
                for _ in range(20):
                    await ws.send(rng.randbytes(rng.randrange(1, 4000)))
            elif kind == "bad_json":
                for msg in ['{"type":', "[]", "null", '{"type":"watch"}', '{"type":"watch","job_id":5}', "{" * 5000]:
                    await ws.send(msg)
            elif kind == "bad_ids":
                for jid in ["../../etc/passwd", "", "x" * 10000, secrets.token_hex(16), "%00", secrets.token_hex(16).upper()]:
                    await ws.send(json.dumps({"type": "watch", "job_id": jid}))
            elif kind == "too_big":
                await ws.send(json.dumps({"type": "watch", "job_id": "a" * 100_000}))
            elif kind == "many_watches":
                for _ in range(200):
                    await ws.send(json.dumps({"type": "watch", "job_id": secrets.token_hex(16)}))
            elif kind == "unknown_type":
                await ws.send(json.dumps({"type": "shutdown", "job_id": secrets.token_hex(16)}))
            else:
                return f"{kind}: closed by us"
            # answers (e.g. "unknown job" errors) are fine; what matters is how the session ends
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), timeout=1.0)
            except asyncio.TimeoutError:
                return f"{kind}: still open"
    except websockets.ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
        return f"{kind}: closed by the server ({code})" if code else f"{kind}: dropped without a close frame"
    except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as e:
        return f"{kind}: failed ({type(e).__name__})"


async def run_ws_abuse(args, seed: int, round_no: int, sessions: int) -> collections.Counter:
    ws_url = "ws" + args.url[len("http"):] + "/ws"
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> str:
        async with sem:
            return await ws_abuse_session(random.Random(f"{seed}:{round_no}:ws:{i}"), ws_url)

    return collections.Counter(await asyncio.gather(*(one(i) for i in range(sessions))))


def part_b(args, round_no: int, verdict: Verdict, addr, host, canaries: Canaries, sampler: RssSampler) -> dict:
    print(f"== ({round_no}b) {args.malformed} malformed requests across every route", flush=True)
    sampler.reset()
    t = time.monotonic()
    def make_and_run(i: int) -> CaseResult:
        # made in the worker: a round's requests hold hundreds of MB (the huge bodies)
        return run_case(args, addr, host, canaries, malformed_case(args.seed, round_no, i, host, canaries), i)

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(pool.map(make_and_run, range(args.malformed)))
    seconds = time.monotonic() - t
    ws_sessions = max(8, args.malformed // 200)
    ws_endings = asyncio.run(run_ws_abuse(args, args.seed, round_no, ws_sessions))
    outcomes = collections.Counter(r.reply.outcome for r in results)
    statuses = collections.Counter(r.reply.status for r in results if r.reply.outcome == ANSWERED)
    send_failed_answered = sum(1 for r in results if r.reply.send_failed and r.reply.outcome == ANSWERED)
    broken = [(r, judge_case(r)) for r in results]
    broken = [(r, p) for r, p in broken if p]
    no_reason = collections.Counter(r.case.route for r in results
                                    if r.reply.outcome == ANSWERED and 400 <= r.reply.status < 600 and not r.reason)
    by_mutation = collections.defaultdict(collections.Counter)
    for r in results:
        by_mutation[r.case.mutation.split(" (")[0]][r.reply.outcome if r.reply.outcome != ANSWERED else "answered"] += 1
    print(f"   {len(results)} requests in {seconds:.1f} s ({len(results) / max(seconds, 1e-9):.0f}/s); "
          f"answers: {count_line(statuses)}", flush=True)
    print(f"   read the status: {outcomes[ANSWERED]} (of which {send_failed_answered} after the server stopped reading); "
          f"reset: {outcomes[RESET]}; closed unanswered: {outcomes[CLOSED]}; timed out: {outcomes[TIMEOUT]}")
    print(f"   websocket abuse ({ws_sessions} sessions): {count_line(ws_endings)}; peak RSS {mib(sampler.peak())} MiB")
    if no_reason:
        verdict.note(f"({round_no}b) refusals with an empty body, by route: {count_line(no_reason)}")
    for r in sorted(results, key=lambda r: -r.reply.seconds)[:3]:
        print(f"   slowest: case {round_no}:{r.index} [{r.case.route} | {r.case.mutation}] {r.reply.seconds:.1f} s -> {r.reply.status}")
    for r, problems in broken[: args.show_failures]:
        print(f"   case {round_no}:{r.index} [{r.case.route} | {r.case.mutation}]: {'; '.join(problems)}  "
              f"(replay: --seed {args.seed} --replay {round_no}:{r.index})")
    kinds = collections.Counter(p.split(" ")[0] if not p.startswith("huge body") else "huge body" for _, ps in broken for p in ps)
    verdict.check(not broken, f"({round_no}b) {len(broken)} malformed requests broke a rule ({count_line(kinds)})")
    failed_ws = sum(n for k, n in ws_endings.items() if "failed" in k)
    verdict.check(failed_ws == 0, f"({round_no}b) {failed_ws} websocket abuse sessions failed to connect or errored")
    return {"requests": len(results), "seconds": round(seconds, 1), "peak_rss_kib": sampler.peak(), "statuses": {str(k): v for k, v in statuses.items()},
            "answered": outcomes[ANSWERED], "answered_after_send_failed": send_failed_answered, "reset": outcomes[RESET],
            "closed_unanswered": outcomes[CLOSED], "timeout": outcomes[TIMEOUT], "broken": len(broken),
            "broken_by_kind": dict(kinds), "refusals_without_body": dict(no_reason),
            "ws_sessions": ws_sessions, "ws_endings": dict(ws_endings),
            "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())}}


# ---------------------------------------------------------------------------------------------
# (c) hostile uploads
# ---------------------------------------------------------------------------------------------

UPLOAD_ROUTES = ["/api/upload_image", "/v1/images/edits", "/sdapi/v1/img2img"]


@dataclasses.dataclass
class UploadFile:
    name: str
    data: bytes
    content_type: str
    must_refuse: bool = True  # within every limit files may be taken; the others must be refused
    needs_limit_words: bool = False


def upload_files(big_legal: bool) -> list[UploadFile]:
    t = time.monotonic()
    bomb = png_bytes(30000, 30000, b"\x00", color_type=0, level=9)
    files = [UploadFile(f"30000x30000 PNG bomb ({len(bomb) / 1e6:.2f} MB)", bomb, "image/png")]
    bomb16 = png_bytes(16384, 16384, b"\x00", color_type=2, level=9)
    files.append(UploadFile(f"16384x16384 RGB PNG bomb ({len(bomb16) / 1e6:.2f} MB, 805 MB decoded)", bomb16, "image/png"))
    full = png_bytes(600, 400, b"\x10\x80\xf0", color_type=2)
    files.append(UploadFile("truncated PNG", full[: len(full) // 2], "image/png"))
    files.append(UploadFile("GIF", GIF, "image/gif"))
    files.append(UploadFile("GIF sent as image/png", GIF, "image/png"))
    files.append(UploadFile("text file", b"just some text, not an image\n" * 40, "text/plain"))
    files.append(UploadFile("30 MB body", b"\x89PNG\r\n\x1a\n" + os.urandom(30 * 1024 * 1024), "image/png", needs_limit_words=True))
    if big_legal:
        grey = png_bytes(16000, 16000, b"\x80", color_type=0, level=9)
        files.append(UploadFile(f"16000x16000 grey PNG within the limits ({len(grey) / 1e6:.2f} MB)", grey, "image/png", must_refuse=False))
    print(f"   (made the upload files in {time.monotonic() - t:.1f} s)", flush=True)
    return files


def upload_request(route: str, f: UploadFile, host: str) -> bytes:
    if route == "/sdapi/v1/img2img":
        body = json.dumps({"prompt": "a red fox", "steps": 4, "init_images": [base64.b64encode(f.data).decode()]}).encode()
        return build_request("POST", route, host, body=body, content_type="application/json")
    boundary = "----zimage" + secrets.token_hex(8)
    fields = ([("prompt", None, None, b"a red fox"), ("steps", None, None, b"4")] if route == "/v1/images/edits" else [])
    fields.append(("image", "upload", f.content_type, f.data))
    return build_request("POST", route, host, body=multipart_body(fields, boundary), content_type=f"multipart/form-data; boundary={boundary}")


def part_c(args, round_no: int, verdict: Verdict, addr, host, sampler: RssSampler, files: list[UploadFile]) -> dict:
    print(f"== ({round_no}c) hostile uploads on {', '.join(UPLOAD_ROUTES)}", flush=True)
    rows = []
    for f in files:
        # a legal upload on the other routes would queue a 2048x2048 Transform: stored only here
        for route in UPLOAD_ROUTES if f.must_refuse else ["/api/upload_image"]:
            sampler.reset()
            reply = exchange(addr, upload_request(route, f, host), 300)
            time.sleep(0.1)  # let the sampler see the memory the request left behind
            peak = sampler.peak()
            reason = reason_of(reply.status, reply.headers, reply.body) if reply.outcome == ANSWERED else None
            problems = []
            if reply.outcome != ANSWERED:
                problems.append(f"no answer ({reply.outcome}{', send failed' if reply.send_failed else ''})")
            elif f.must_refuse and not (400 <= reply.status < 500 and reason):
                problems.append(f"not refused with a 4xx and a reason: {reply.status} {(reason or '')[:100]!r}")
            elif not f.must_refuse and reply.status >= 500 and reply.status != 503:
                problems.append(f"{reply.status} {(reason or '')[:100]!r}")
            elif f.needs_limit_words and not (reply.status == 413 and limit_in_words(reason)):
                problems.append(f"answered {reply.status} {(reason or '')[:100]!r}, not 413 with the limit in words")
            status = reply.status if reply.outcome == ANSWERED else reply.outcome
            print(f"   {f.name:58} {route:20} {status!s:>7} {reply.seconds * 1000:7.0f} ms  peak RSS {mib(peak):>7} MiB  "
                  f"{(reason or '')[:70]!r}" + (f"  FAIL: {'; '.join(problems)}" if problems else ""), flush=True)
            rows.append({"file": f.name, "route": route, "status": status, "ms": round(reply.seconds * 1000),
                         "peak_rss_kib": peak, "reason": reason, "problems": problems})
    broken = [r for r in rows if r["problems"]]
    verdict.check(not broken, f"({round_no}c) {len(broken)} uploads broke a rule: "
                  + "; ".join(f"{r['file']} on {r['route']}: {r['problems'][0]}" for r in broken[:4]))
    return {"uploads": rows, "peak_rss_kib": max(r["peak_rss_kib"] for r in rows)}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def replay(args) -> int:
    """Sends one malformed case again and prints its request (head) and answer."""
    round_no, index = (int(x) for x in args.replay.split(":"))
    addr, host = address(args.url)
    canaries = Canaries(Path(args.data_dir), Path(args.site_root), args.seed)
    try:
        case = malformed_case(args.seed, round_no, index, host, canaries)
        head = case.request.split(b"\r\n\r\n", 1)[0]
        print(f"case {round_no}:{index} [{case.route} | {case.mutation}], {len(case.request)} bytes; head:")
        print(head[:2000].decode("latin-1"))
        res = run_case(args, addr, host, canaries, case, index)
        print(f"-> {res.reply.outcome} {res.reply.status} in {res.reply.seconds * 1000:.0f} ms"
              f"{' (the server stopped reading before the request was sent)' if res.reply.send_failed else ''}")
        print(f"   reason: {res.reason!r}")
        problems = judge_case(res)
        print("   rules broken: " + ("; ".join(problems) if problems else "none"))
        return 1 if problems else 0
    finally:
        canaries.remove()


def address(url: str) -> tuple[tuple[str, int], str]:
    u = urlsplit(url)
    return (u.hostname, u.port or 80), u.netloc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:3500")
    p.add_argument("--pid", type=int, help="the server's process id (for RSS); required unless --replay")
    p.add_argument("--log", type=Path, help="the server's log (checked for panics)")
    p.add_argument("--data-dir", help="the server's --data-dir (a canary file is planted next to it)")
    p.add_argument("--site-root", help="the server's --site-root (a canary file is planted next to it)")
    p.add_argument("--quick", action="store_true", help="CI size: 40 clients, 600 malformed, 2 rounds")
    p.add_argument("--clients", type=int, help="websocket clients per round (full: 200)")
    p.add_argument("--malformed", type=int, help="malformed requests per round (full: 10000)")
    p.add_argument("--rounds", type=int, help="rounds of (a)-(c) (full: 5)")
    p.add_argument("--concurrency", type=int, default=32, help="malformed requests in flight")
    p.add_argument("--cancel-share", type=float, help="share of the clients that cancel their job once it is queued "
                   "(full: 0.5; quick: 0.9, fewer jobs to run on a small CI machine)")
    p.add_argument("--job-timeout", type=float, default=900, help="seconds the accepted jobs of a round may take in all")
    p.add_argument("--duplicate-grace", type=float, default=1.0, help="seconds a client listens after its terminal event")
    p.add_argument("--big-legal-upload", action=argparse.BooleanOptionalAction, default=None,
                   help="also upload a 16000x16000 grey PNG within the limits (default: on in full mode)")
    p.add_argument("--seed", type=int, default=None, help="seed of the malformed cases (default: random, printed)")
    p.add_argument("--show-failures", type=int, default=12, help="broken cases printed per round")
    p.add_argument("--report", type=Path, help="write the figures as JSON here")
    p.add_argument("--replay", help="ROUND:INDEX: send that malformed case again and print the answer")
    args = p.parse_args()
    args.seed = args.seed if args.seed is not None else secrets.randbelow(1 << 31)
    full = not args.quick
    args.clients = args.clients or (200 if full else 40)
    args.malformed = args.malformed if args.malformed is not None else (10_000 if full else 600)
    args.rounds = args.rounds or (5 if full else 2)
    args.cancel_share = args.cancel_share if args.cancel_share is not None else (0.5 if full else 0.9)
    args.big_legal_upload = full if args.big_legal_upload is None else args.big_legal_upload
    if not (args.data_dir and args.site_root):
        p.error("--data-dir and --site-root are needed (canary files are planted next to them)")
    if args.replay:
        return replay(args)
    if not (args.pid and args.log):
        p.error("--pid and --log are needed for a run")

    addr, host = address(args.url)
    verdict = Verdict()
    canaries = Canaries(Path(args.data_dir), Path(args.site_root), args.seed)
    sampler = RssSampler(args.pid)
    started = time.monotonic()
    print(f"load harness: {args.url}, server pid {args.pid}, seed {args.seed}, {args.clients} clients, "
          f"{args.malformed} malformed, {args.rounds} rounds", flush=True)
    rss_start = proc_status_kib(args.pid, "VmRSS")
    rounds = []
    try:
        files = upload_files(args.big_legal_upload)
        for round_no in range(1, args.rounds + 1):
            t = time.monotonic()
            row = {"round": round_no}
            row["a"] = part_a(args, round_no, verdict, args.pid, sampler)
            row["b"] = part_b(args, round_no, verdict, addr, host, canaries, sampler)
            row["c"] = part_c(args, round_no, verdict, addr, host, sampler, files)
            alive = server_alive(args.pid, addr, host)
            panics = panics_in_log(args.log)
            verdict.check(alive, f"(round {round_no}) the server is not alive (/healthz) after the round")
            verdict.check(not panics, f"(round {round_no}) {len(panics)} panics in the server log: {panics[:1]}")
            row["rss_after_kib"] = proc_status_kib(args.pid, "VmRSS")
            row["hwm_kib"] = proc_status_kib(args.pid, "VmHWM")
            row["seconds"] = round(time.monotonic() - t, 1)
            rounds.append(row)
            print(f"== round {round_no} done in {row['seconds']} s: RSS {mib(row['rss_after_kib'])} MiB, "
                  f"peak so far {mib(row['hwm_kib'])} MiB, alive {alive}, panics {len(panics)}", flush=True)
            if not alive:
                break
    finally:
        sampler.stop()
        canaries.remove()

    # (d) does the RSS level off? growth of each round over the one before
    rss_seq = [rss_start] + [r["rss_after_kib"] for r in rounds]
    growth = [b - a for a, b in zip(rss_seq, rss_seq[1:]) if a is not None and b is not None]
    levels_off = None
    if len(growth) >= 2:
        # an allocator keeps some slack: growth below 4 MiB counts as level whatever the first was
        levels_off = growth[-1] < max(0.1 * growth[0], 4096)
        if args.rounds >= 3:
            verdict.check(levels_off, f"(d) RSS does not level off: growth per round {[round(g / 1024, 1) for g in growth]} MiB")
    metrics = exchange(addr, build_request("GET", "/metrics", host), 10)
    metrics_lines = len(metrics.text().splitlines()) if metrics.status == 200 else 0

    print()
    print("== summary (seed %d, %.0f s)" % (args.seed, time.monotonic() - started))
    header = (f"{'round':>5} | {'(a) accepted/refused':>20} | {'(a) ends':>24} | {'(b) answered/reset/closed/timeout':>33} | "
              f"{'(b) broken':>10} | {'peak RSS (a)/(b)/(c) MiB':>24} | {'RSS after':>9}")
    print(header)
    print("-" * len(header))
    for r in rounds:
        a, b = r["a"], r["b"]
        ends = " ".join(f"{k}:{v}" for k, v in sorted(a["endings"].items()))
        print(f"{r['round']:>5} | {a['accepted']:>9}/{a['refused']:<10} | {ends:>24} | "
              f"{b['answered']:>8}/{b['reset']}/{b['closed_unanswered']}/{b['timeout']:<14} | {b['broken']:>10} | "
              f"{mib(a['peak_rss_kib']) + '/' + mib(b['peak_rss_kib']) + '/' + mib(r['c']['peak_rss_kib']):>24} | {mib(r['rss_after_kib']):>5} MiB")
    print(f"RSS: start {mib(rss_start)} MiB, per round {' -> '.join(mib(x) for x in rss_seq[1:])} MiB; "
          f"growth per round {[round(g / 1024, 1) for g in growth]} MiB; "
          f"levels off: {'n/a (fewer than 2 rounds)' if levels_off is None else levels_off}"
          f"{'' if args.rounds >= 3 else ' (a rule from 3 rounds on)'}; peak (VmHWM) {mib(proc_status_kib(args.pid, 'VmHWM'))} MiB")
    if metrics_lines:
        print(f"/metrics answered with {metrics_lines} lines")
    for n in verdict.notes:
        print(f"note: {n}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({"seed": args.seed, "clients": args.clients, "malformed": args.malformed,
                                           "rounds": rounds, "rss_start_kib": rss_start, "growth_kib": growth,
                                           "levels_off": levels_off, "failures": verdict.failures, "notes": verdict.notes,
                                           "seconds": round(time.monotonic() - started, 1)}, indent=1))
    if verdict.failures:
        print(f"FAILED: {len(verdict.failures)} hard rules broken:")
        for f in verdict.failures:
            print(f"  - {f}")
        return 1
    print("PASSED: every hard rule held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
