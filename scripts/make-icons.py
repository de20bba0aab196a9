#!/usr/bin/env python3
"""Renders the PWA icons and favicon (lightning bolt on the studio blue) with the standard library only.
Writes public/icons/icon-{192,512}.png, icon-maskable-512.png and public/favicon.ico."""
import os, struct, zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "public")
# bolt polygon in a 512 box (same as icon.svg)
BOLT = [(283, 64), (112, 296), (240, 296), (221, 448), (392, 216), (264, 216)]
BOLT_MASKABLE = [(276, 112), (150, 284), (246, 284), (232, 400), (358, 228), (262, 228)]

def inside(poly, x, y):
    c = False
    j = len(poly) - 1
    for i in range(len(poly)):
        xi, yi = poly[i]; xj, yj = poly[j]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            c = not c
        j = i
    return c

def in_rounded(x, y, r):
    # rounded square 0..512 with corner radius r
    cx = min(max(x, r), 512 - r); cy = min(max(y, r), 512 - r)
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r

def render(size, maskable):
    ss = 3  # supersampling per axis
    rows = []
    poly = BOLT_MASKABLE if maskable else BOLT
    for py in range(size):
        row = bytearray([0])
        for px in range(size):
            acc = [0.0, 0.0, 0.0, 0.0]
            for sy in range(ss):
                for sx in range(ss):
                    x = (px + (sx + 0.5) / ss) * 512 / size
                    y = (py + (sy + 0.5) / ss) * 512 / size
                    if not maskable and not in_rounded(x, y, 112):
                        continue
                    if inside(poly, x, y):
                        col = (255, 255, 255)
                    elif maskable:
                        col = (37, 99, 235)
                    else:
                        t = (x + y) / 1024  # #3b82f6 -> #1d4ed8 diagonal gradient
                        col = (59 + (29 - 59) * t, 130 + (78 - 130) * t, 246 + (216 - 246) * t)
                    acc[0] += col[0]; acc[1] += col[1]; acc[2] += col[2]; acc[3] += 255
            n = ss * ss
            a = acc[3] / n
            if a > 0:
                row += bytes([int(acc[0] / (acc[3] / 255)), int(acc[1] / (acc[3] / 255)), int(acc[2] / (acc[3] / 255)), int(a)])
            else:
                row += bytes([0, 0, 0, 0])
        rows.append(bytes(row))
    return png(size, size, b"".join(rows))

def png(w, h, raw):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))

def ico(pngs):
    # ICO with embedded PNG images
    header = struct.pack("<HHH", 0, 1, len(pngs))
    offset = 6 + 16 * len(pngs)
    entries = b""; data = b""
    for size, blob in pngs:
        entries += struct.pack("<BBBBHHII", size % 256, size % 256, 0, 0, 1, 32, len(blob), offset + len(data))
        data += blob
    return header + entries + data

os.makedirs(os.path.join(ROOT, "icons"), exist_ok=True)
for size in (192, 512):
    open(os.path.join(ROOT, "icons", f"icon-{size}.png"), "wb").write(render(size, False))
open(os.path.join(ROOT, "icons", "icon-maskable-512.png"), "wb").write(render(512, True))
open(os.path.join(ROOT, "favicon.ico"), "wb").write(ico([(s, render(s, False)) for s in (16, 32, 48)]))
print("icons written")
