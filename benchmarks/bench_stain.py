"""Benchmark: tilscore.stain.deconvolve against skimage.color.rgb2hed on the same tiles.

Run standalone::

    python benchmarks/bench_stain.py [--sizes 1024 2048] [--repeats 7] [--json out.json]

The tiles are cut (and tiled where needed) from scikit-image's own IHC image
(``skimage.data.immunohistochemistry``, shipped inside the wheel), so the benchmark needs no
download and no test data. Prints megapixels per second for both and their ratio (median of the
repeats); the threads are whatever OpenCV and NumPy use by default on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np


def make_tile(size: int) -> np.ndarray:
    """A (size, size, 3) uint8 IHC tile: the skimage IHC image mirrored and tiled to size."""
    from skimage import data

    ihc = data.immunohistochemistry()
    block = np.concatenate([ihc, ihc[:, ::-1]], axis=1)
    block = np.concatenate([block, block[::-1]], axis=0)
    reps = -(-size // block.shape[0])
    big = np.tile(block, (reps, reps, 1))
    return np.ascontiguousarray(big[:size, :size])


def time_it(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="tile side, px")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per size (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    import cv2
    from skimage.color import rgb2hed

    from tilscore.stain import deconvolve

    rows = []
    for size in args.sizes:
        tile = make_tile(size)
        out = np.empty(tile.shape, dtype=np.float32)
        mpix = size * size / 1e6
        t_sk = time_it(lambda tile=tile: rgb2hed(tile), args.repeats)
        t_ours = time_it(lambda tile=tile: deconvolve(tile), args.repeats)
        t_out = time_it(lambda tile=tile, out=out: deconvolve(tile, out=out), args.repeats)
        rows.append(
            {
                "size_px": size,
                "megapixels": mpix,
                "skimage_rgb2hed_s": t_sk,
                "deconvolve_s": t_ours,
                "deconvolve_out_s": t_out,
                "skimage_mpix_per_s": mpix / t_sk,
                "deconvolve_mpix_per_s": mpix / t_ours,
                "deconvolve_out_mpix_per_s": mpix / t_out,
                "ratio": t_sk / t_ours,
                "ratio_out": t_sk / t_out,
            }
        )

    print(
        f"cpu cores: {os.cpu_count()}  cv2 threads: {cv2.getNumThreads()}  repeats: {args.repeats}"
    )
    header = (
        f"{'tile':>11} {'rgb2hed MP/s':>13} {'deconvolve MP/s':>16} {'(out=) MP/s':>12} "
        f"{'ratio':>7} {'(out=)':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size_px']:>5}x{r['size_px']:<5} {r['skimage_mpix_per_s']:>13.1f} "
            f"{r['deconvolve_mpix_per_s']:>16.1f} {r['deconvolve_out_mpix_per_s']:>12.1f} "
            f"{r['ratio']:>6.1f}x {r['ratio_out']:>6.1f}x"
        )
    if args.json:
        import skimage

        record = {
            "benchmark": "stain.deconvolve vs skimage.color.rgb2hed",
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cv2_threads": cv2.getNumThreads(),
            "numpy": np.__version__,
            "skimage": skimage.__version__,
            "opencv": cv2.__version__,
            "repeats": args.repeats,
            "results": rows,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
