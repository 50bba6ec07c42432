"""Assigning cells to compartments: tilscore's vectorised path vs the plain shapely way.

Cells (uniform points over a synthetic slide's tissue) are assigned to the compartments of its
regions with :meth:`tilscore.regions.Compartments.assign` (prepared geometries,
``shapely.contains_xy``) and, as the peer, with shapely Point objects tested one geometry at a
time (``shapely.contains`` on unprepared geometries: what a notebook would write first). Both
must agree exactly; the script prints the time of each and the ratio.

Run::

    python benchmarks/bench_assign.py [--cells 2000000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import shapely

from tilscore.regions import build_compartments
from tilscore.synthetic import make_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=2_000_000)
    args = ap.parse_args()
    layout = make_layout(marker="CD8", width_px=16000, height_px=12000, mpp=0.5, seed=3)
    from tilscore.regions import Region, RegionSet

    g = layout.regions
    regions = RegionSet(
        [
            Region("tumour_bed", g["tumour_bed"], "Tumor bed"),
            Region("tumour", g["tumour"], "Tumor"),
            Region("roi", g["tissue"], "Tissue"),
        ]
    )
    comps = build_compartments(regions, None, mpp=0.5)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16000, args.cells)
    y = rng.uniform(0, 12000, args.cells)
    n_vertices = sum(shapely.get_num_coordinates(v) for v in comps.geometries.values())

    t0 = time.perf_counter()
    label, margin = comps.assign(x, y)
    ours = time.perf_counter() - t0

    n_peer = min(args.cells, 200_000)  # the peer is slow: time a subset and scale
    pts = shapely.points(x[:n_peer], y[:n_peer])
    t0 = time.perf_counter()
    fresh = {k: shapely.from_wkb(shapely.to_wkb(v)) for k, v in comps.geometries.items()}
    peer_label = np.full(n_peer, "outside", dtype=object)
    for name in ("tissue", "stromal", "intratumoral"):
        peer_label[shapely.contains(fresh[name], pts)] = name
    peer_margin = shapely.contains(fresh["invasive_margin"], pts)
    peer = (time.perf_counter() - t0) * args.cells / n_peer
    assert (peer_label == label[:n_peer]).all()
    assert (peer_margin == margin[:n_peer]).all()
    print(f"{args.cells:,} cells, compartments with {n_vertices:,} vertices")
    print(f"  tilscore Compartments.assign     {ours:8.2f} s")
    print(f"  shapely.contains, unprepared     {peer:8.2f} s (timed on {n_peer:,}, scaled)")
    print(f"  ratio                            {peer / ours:8.1f}x")


if __name__ == "__main__":
    main()
