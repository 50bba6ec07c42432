"""``python -m tilscore.synthetic examples OUTDIR``: regenerate the example slides."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .write import make_example_slides, truth_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tilscore.synthetic")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("examples", help="write the CD8, CD68 and CD56 example slides")
    ex.add_argument("outdir", type=Path)
    ex.add_argument("--width", type=int, default=4000, help="level-0 width in px")
    ex.add_argument("--height", type=int, default=3000, help="level-0 height in px")
    ex.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px")
    ex.add_argument("--jpeg-quality", type=int, default=75, help="JPEG quality of the tiles")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = make_example_slides(
        args.outdir, args.width, args.height, args.mpp, jpeg_quality=args.jpeg_quality
    )
    total = 0
    for name, path in paths.items():
        files = [path, *truth_paths(path).values()]
        size = sum(f.stat().st_size for f in files)
        total += size
        print(f"{name}: {path} ({size / 1e6:.2f} MB with truth)")
    print(f"total {total / 1e6:.2f} MB in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
