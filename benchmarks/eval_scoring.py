"""Evaluate per-compartment scoring against known truth (issue 4's targets).

1. Synthetic example slides (CD8, CD68, CD56; truth from the generator): scored with their
   annotations and with automatic compartments; % positive and density per compartment beside
   the truth, and the automatic nests' and tumour bed's IoU with the true polygons.
2. The real Ki67 field of ../shared/data/ki67-points-dlubak (503-05), scored with its ROI mask as
   the region (µm/px unknown; 0.5 assumed from nucleus size, as in eval_detectors.py): counts and
   % positive beside the annotation (which marks tumour nuclei only), and the overlap of the
   automatic tumour nests with that ROI.

Run::

    python benchmarks/eval_scoring.py [--shared ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import tilscore
from tilscore.errors import TilscoreWarning
from tilscore.evaluate import to_jsonable
from tilscore.regions import RegionSet
from tilscore.synthetic.layout import SyntheticSlideSpec, make_layout

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_slides"


def iou(a, b) -> float:
    u = a.union(b).area
    return float(a.intersection(b).area / u) if u > 0 else float("nan")


def synthetic() -> list[dict]:
    rows = []
    for marker in ("CD8", "CD68", "CD56"):
        stem = EXAMPLES / f"synthetic_{marker.lower()}"
        truth = pd.read_csv(f"{stem}.cells.csv")
        spec = json.loads(Path(f"{stem}.spec.json").read_text())["spec"]
        true_regions = make_layout(SyntheticSlideSpec.from_dict(spec)).regions
        for mode, regions in (("annotation", f"{stem}.regions.geojson"), ("automatic", None)):
            res = tilscore.score_slide(f"{stem}.tif", marker=marker, regions=regions)
            g = res.compartments.geometries
            for tname, comp, geom in (
                ("tumour", "intratumoral", true_regions["tumour"]),
                ("stroma", "stromal", true_regions["stroma"]),
            ):
                sel = truth["compartment"] == tname
                n, k = int(sel.sum()), int((sel & truth["positive"]).sum())
                true_area = geom.area * spec["mpp"] ** 2 / 1e6
                row = res.row(comp)
                rows.append(
                    {
                        "marker": marker,
                        "regions": mode,
                        "compartment": comp,
                        "pct_positive": row["pct_positive"],
                        "pct_truth": 100.0 * k / n,
                        "pct_error": row["pct_positive"] - 100.0 * k / n,
                        "density_per_mm2": row["density_per_mm2"],
                        "density_truth": k / true_area,
                        "density_error_pct": 100.0 * (row["density_per_mm2"] / (k / true_area) - 1),
                        "area_mm2": row["area_mm2"],
                        "area_truth_mm2": true_area,
                        "iou": iou(g[comp], geom) if mode == "automatic" else None,
                    }
                )
            if mode == "automatic":
                rows.append(
                    {
                        "marker": marker,
                        "regions": mode,
                        "compartment": "tumour_bed",
                        "iou": iou(g["tumour_bed"], true_regions["tumour_bed"]),
                    }
                )
    return rows


def dlubak(shared: Path) -> dict | None:
    d = shared / "ki67-points-dlubak" / "labeled"
    if not d.is_dir():
        return None
    from PIL import Image

    image = np.asarray(Image.open(d / "503-05_image.png").convert("RGB"))
    roi = np.asarray(Image.open(d / "503-05_roi.png").convert("L")) > 127
    marks = pd.read_csv(d / "503-05_markers.csv")
    n_true, k_true = len(marks), int((marks["type"] == 1).sum())
    res = tilscore.score_image(image, 0.5, "Ki67", regions=RegionSet.from_mask(roi, 1.0, "roi"))
    row = res.row("tissue")
    auto = tilscore.score_image(image, 0.5, "Ki67")
    nests = auto.compartments.geometries["intratumoral"]
    roi_geom = RegionSet.from_mask(roi, 1.0, "roi").geometry("roi")
    return {
        "n_cells": row["n_cells"],
        "n_positive": row["n_positive"],
        "pct_positive": row["pct_positive"],
        "n_tumour_class": int(
            ((res.cells["compartment"] != "outside") & (res.cells["cell_class"] == "tumour")).sum()
        ),
        "annotated_cells": n_true,
        "annotated_positive": k_true,
        "annotated_pct_positive": 100.0 * k_true / n_true,
        "roi_area_mm2": row["area_mm2"],
        "auto_nests_iou_with_roi": iou(nests, roi_geom),
        "auto_nests_cover_roi_pct": 100.0 * nests.intersection(roi_geom).area / roi_geom.area,
        "auto_nests_area_mm2": auto.row("intratumoral")["area_mm2"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", TilscoreWarning)
    pd.set_option("display.width", 160)
    rows = synthetic()
    table = pd.DataFrame(rows)
    print("Synthetic example slides: scored vs truth per compartment")
    print(table.round(2).to_string(index=False))
    real = dlubak(args.shared)
    if real is None:
        print(f"\n{args.shared}/ki67-points-dlubak absent: real field skipped")
    else:
        print("\nReal Ki67 field 503-05 (dlubak), ROI mask as the region, 0.5 µm/px assumed")
        for k, v in real.items():
            print(f"  {k:<28} {v:.3f}" if isinstance(v, float) else f"  {k:<28} {v}")
    if args.json:
        args.json.write_text(json.dumps(to_jsonable({"synthetic": rows, "dlubak": real}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
