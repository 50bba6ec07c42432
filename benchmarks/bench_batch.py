"""Benchmark: LocalCluster shapes (workers x threads per worker) for ``tilscore batch``.

Run standalone::

    python benchmarks/bench_batch.py [--copies 2] [--shapes 1x1 1x2 2x1] [--repeats 1]
                                     [--detector cnn]

Scores ``copies`` copies of the three example slides (6 slides by default) with
:func:`tilscore.batch.run_batch` once per cluster shape, each into a fresh output folder, the
shapes taken in turn ``repeats`` times (so that a change in the machine's load hits them all),
and prints each run's wall time (cluster start-up included), then per shape the median, slides
per minute and the ratio to the first shape. On this project's 2-core machine this chose the
default of :func:`tilscore.batch.default_cluster_size`; docs/scaling.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "example_slides"


def make_folder(folder: Path, copies: int) -> int:
    """``copies`` copies of each example slide in ``folder``; returns the number of slides."""
    n = 0
    for c in range(copies):
        for src in sorted(EXAMPLES.glob("*.tif")):
            shutil.copy(src, folder / f"{src.stem}_copy{c}.tif")
            n += 1
    return n


def run_shape(folder: Path, shape: str, config: dict) -> float:
    """Wall time (s) of one batch of ``folder`` on a LocalCluster of ``shape`` ("WxT")."""
    from tilscore.batch import run_batch

    workers, threads = (int(v) for v in shape.split("x"))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        report = run_batch(
            [folder], out, config=config, workers=workers, threads_per_worker=threads
        )
        seconds = time.perf_counter() - t0
    if not report.ok:
        raise SystemExit(f"{shape}: {report.failed}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["1x1", "1x2", "2x1"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--detector", default="cnn", choices=["cnn", "classical"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    # the figures are not the point here: scoring alone
    config = {
        "detect": {"detector": args.detector},
        "output": {k: False for k in ("cells_geojson", "overlay", "heatmap", "report")},
    }
    results = {
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "detector": args.detector,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n = make_folder(folder, args.copies)
        results["slides"] = n
        times: dict[str, list[float]] = {shape: [] for shape in args.shapes}
        for r in range(args.repeats):
            for shape in args.shapes:
                seconds = run_shape(folder, shape, config)
                times[shape].append(seconds)
                print(f"round {r + 1}: {shape:>5} {seconds:6.1f} s", flush=True)
    first = statistics.median(times[args.shapes[0]])
    for shape, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{shape:>5}: median {med:6.1f} s for {n} slides, {60 * n / med:5.1f} slides/min, "
            f"{first / med:4.2f}x {args.shapes[0]}"
        )
    results["seconds"] = times
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
