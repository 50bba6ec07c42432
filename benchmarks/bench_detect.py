"""Benchmark: detection throughput at 0.5 µm/px, CNN beside the classical baseline, same run.

Both detectors run through :func:`tilscore.detect.detect_cells` on the same synthetic field
(rendered at 0.5 µm/px, mostly tissue), so the figure is the whole detection stage: stain
separation, the detector, per-cell measurements and the marker rule. Prints megapixels per
second of each and their ratio (median of the repeats).

Run::

    python benchmarks/bench_detect.py [--size 2048] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from tilscore.detect import detect_cells
from tilscore.synthetic import make_layout, render_region


def make_field(size: int, marker: str = "CD8") -> np.ndarray:
    """A (size, size, 3) uint8 synthetic field at 0.5 µm/px, all tissue (tumour bed)."""
    layout = make_layout(
        marker=marker, width_px=size, height_px=size, mpp=0.5, seed=777,
        tissue_fraction=1.0, tumour_bed_fraction=1.0,
    )  # fmt: skip
    return render_region(layout, 0, 0, size, size, 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="field side (px at 0.5 µm/px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--marker", default="CD8")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--models", nargs="+", default=["default"], help="CNN models (names or folders)"
    )
    args = parser.parse_args(argv)

    rgb = make_field(args.size, args.marker)
    mp = rgb.shape[0] * rgb.shape[1] / 1e6
    rows = {}
    names = ["classical"] + ["cnn" if m == "default" else f"cnn:{m}" for m in args.models]
    for det in names:
        kind, _, model = det.partition(":")
        kw = {"detector": kind, "model": model or "default"}
        detect_cells(rgb[:512, :512], mpp=0.5, marker=args.marker, **kw)  # warm-up
        times, n = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cells = detect_cells(rgb, mpp=0.5, marker=args.marker, **kw)
            times.append(time.perf_counter() - t0)
            n = len(cells)
        med = statistics.median(times)
        rows[det] = {"seconds": round(med, 3), "mp_per_s": round(mp / med, 2), "cells": n}
    ours = rows[names[1]]
    ratio = ours["mp_per_s"] / rows["classical"]["mp_per_s"]
    print(f"detection at 0.5 µm/px on a {args.size} x {args.size} field ({mp:.1f} MP), "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'detector':<10} {'seconds':>8} {'MP/s':>7} {'cells':>7}")
    for det, r in rows.items():
        print(f"{det[-10:]:<10} {r['seconds']:>8.2f} {r['mp_per_s']:>7.2f} {r['cells']:>7d}")
    print(f"cnn / classical throughput ratio: {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stage": "detection", "ours": ours, "peer": rows["classical"],
                       "ratio": round(ratio, 3), "megapixels": mp}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
