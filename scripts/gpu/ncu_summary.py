#!/usr/bin/env python3
"""Kernel-time summary of one `zimage bench --runs 0` request traced by
`ncu --metrics gpu__time_duration.sum --csv --page raw` (run.sh engine2/profile write it).

The request's kernels are split at the attention calls: the text encoder's causal flash calls come
first (--text-layers of them), then the denoiser's (--steps x --attn-per-step); everything after the
last one is the final layer, the VAE decode and the image conversion. Prints, per region, the total
and the kernels grouped by name, largest first (the denoising region divided by --steps).

Usage: ncu_summary.py ncu_fp8_1024.csv [--steps 8] [--attn-per-step 32] [--text-layers 35]
"""
import argparse
import csv
import io
import re
from collections import defaultdict


def load(path):
    text = open(path, errors="replace").read()
    # ncu prints its own log lines before the CSV: start at the header row.
    start = text.find('"ID"')
    rows = list(csv.reader(io.StringIO(text[start:])))
    header, rows = rows[0], rows[1:]
    name_col = header.index("Kernel Name")
    time_col = header.index("gpu__time_duration.sum")
    units = rows[0][time_col] if rows and not rows[0][0].strip().isdigit() else "ns"
    scale = {"ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "nsecond": 1e-6}.get(units, 1e-6)
    kernels = []
    for r in rows:
        if not r or not r[0].strip().isdigit():
            continue
        t = float(r[time_col].replace(",", "")) * scale
        kernels.append((r[name_col], t))
    return kernels


def short(name):
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name.strip()[:72]


def report(title, kernels, divide=1):
    total = sum(t for _, t in kernels) / divide
    print(f"== {title}: {len(kernels) // divide} kernels, {total:.2f} ms of kernel time")
    by = defaultdict(lambda: [0, 0.0])
    for n, t in kernels:
        b = by[short(n)]
        b[0] += 1
        b[1] += t
    for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:24]:
        c, t = c / divide, t / divide
        print(f"  {t:7.2f} ms  {c:6.0f} x {1000 * t / max(c, 1e-9):8.1f} us  {n}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--attn-per-step", type=int, default=32)
    ap.add_argument("--text-layers", type=int, default=35)
    a = ap.parse_args()
    kernels = load(a.csv)
    attn = [i for i, (n, _) in enumerate(kernels) if "flash" in n.lower() or "attn" in n.lower()]
    need = a.text_layers + a.steps * a.attn_per_step
    print(f"{len(kernels)} kernels, {sum(t for _, t in kernels):.2f} ms; {len(attn)} attention calls (expected {need})")
    if len(attn) < need:
        report("whole request", kernels)
        return
    attn = attn[-need:]
    text_end = attn[a.text_layers - 1] + 1
    last = attn[-1] + 1
    report("text encoding and conditioning (up to the encoder's last attention)", kernels[:text_end])
    report(f"one denoising step (the region to the last step's attention / {a.steps})", kernels[text_end:last], a.steps)
    report("after the last attention: final layer, VAE decode, image conversion", kernels[last:])


if __name__ == "__main__":
    main()
