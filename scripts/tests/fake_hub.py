#!/usr/bin/env python3
"""A local HTTP server in the Hugging Face hub's layout, serving one repository from a folder, for
the download tests (server/tests/download.rs, end2end/tests/download.spec.ts). It answers the two
calls a hub client makes:

  GET /api/models/{repo}/revision/{rev}?blobs=true  -> {"sha", "siblings": [{rfilename, size, blobId, lfs}]}
  GET /{repo}/resolve/{rev}/{path}                  -> the file, with Range support (206), ETag and
                                                       X-Repo-Commit headers as the hub sends them

and can misbehave on purpose: --drop-after N closes the first transfer of the largest file after N
bytes (an interrupted download), --rate B/s throttles every transfer, --missing PATH lists a file
but answers 404 for it, --huge PATH lists a file as 10 TB (a full disk), --token T answers 401
without `Authorization: Bearer T`. Each request is appended as one JSON line to --log. Prints
`port N` on stdout once listening (use --port 0 for a free port).
"""
import argparse
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "5eed0c0ffee5eed0c0ffee5eed0c0ffee5eed0c0"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="the repository's files")
    ap.add_argument("--repo", required=True, help="org/name it is served as")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0, help="bytes per second per transfer (0: unlimited)")
    ap.add_argument("--drop-after", type=int, default=-1)
    ap.add_argument("--missing", action="append", default=[])
    ap.add_argument("--huge", action="append", default=[])
    ap.add_argument("--token")
    ap.add_argument("--log")
    a = ap.parse_args()

    files = {}
    for dirpath, _, names in os.walk(a.root):
        for n in names:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, a.root).replace(os.sep, "/")
            data = open(full, "rb").read()
            entry = {"rfilename": rel, "size": len(data), "blobId": git_blob_id(data)}
            if rel.endswith(".safetensors"):
                # LFS files: the hub lists the pointer's blob id and the real file's size and SHA-256
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            files[rel] = (full, entry)
    for h in a.huge:
        files[h][1]["size"] = 10 * 10**12
        if "lfs" in files[h][1]:
            files[h][1]["lfs"]["size"] = 10 * 10**12
    largest = max(files, key=lambda k: os.path.getsize(files[k][0]))
    dropped = {"done": a.drop_after < 0}
    lock = threading.Lock()

    def log(rec: dict) -> None:
        if a.log:
            with lock, open(a.log, "a") as f:
                f.write(json.dumps(rec) + "\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def fail(self, code: int, msg: str) -> None:
            body = json.dumps({"error": msg}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlparse(self.path)
            path = unquote(url.path)
            rng = self.headers.get("Range")
            log({"path": path, "range": rng, "auth": self.headers.get("Authorization")})
            if a.token and self.headers.get("Authorization") != f"Bearer {a.token}":
                return self.fail(401, "Access to this repository is restricted.")
            api = f"/api/models/{a.repo}/revision/"
            resolve = f"/{a.repo}/resolve/"
            if path.startswith(api):
                siblings = [e for _, e in sorted(files.values(), key=lambda fe: fe[1]["rfilename"])]
                body = json.dumps({"id": a.repo, "sha": COMMIT, "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if not path.startswith(resolve):
                return self.fail(404, "Repository not found")
            rel = path[len(resolve):].split("/", 1)[1]
            if rel not in files or rel in a.missing:
                return self.fail(404, f"Entry not found: {rel}")
            full, entry = files[rel]
            data = open(full, "rb").read()
            start = 0
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
            if start > len(data):
                return self.fail(416, "Range Not Satisfiable")
            chunk = data[start:]
            self.send_response(206 if start else 200)
            etag = entry["lfs"]["sha256"] if "lfs" in entry else entry["blobId"]
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(chunk)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            limit = len(chunk)
            with lock:
                if rel == largest and not dropped["done"]:
                    dropped["done"] = True
                    limit = min(limit, a.drop_after)
            sent, step, t0 = 0, 16384, time.monotonic()
            try:
                while sent < limit:
                    n = min(step, limit - sent)
                    self.wfile.write(chunk[sent:sent + n])
                    self.wfile.flush()
                    sent += n
                    if a.rate > 0:
                        ahead = sent / a.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
            except (BrokenPipeError, ConnectionResetError):
                return
            if limit < len(chunk):
                # the interruption: close without the rest of the promised body
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass

    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    print(f"port {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
