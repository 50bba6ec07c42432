"""Real labelled IHC fields through the whole pipeline, exactly as a user scores them.

Every labelled real set in ``../shared/data`` (loaded by ``real_sets.py``) is run through
:func:`tilscore.score_image` with no regions (and, where the set has one, with its ROI drawn as a
tumour annotation), and through :func:`tilscore.detect.detect_cells` alone, so that the two can
never drift apart again. Per set it prints:

- ``labelled``: labelled cells (in the ROI where the set has one);
- ``in mask``: share of them inside the tissue mask (the stain QC's, as score_image computes it);
- ``in scored``: share inside the scored tissue (the ``tissue`` compartment);
- ``counted``: cells counted by score_image (the ``tissue`` row; cells in the ROI for a set with
  an ROI scored without regions; the ``intratumoral`` row when the ROI is a tumour annotation),
  and ``ratio`` = counted / labelled (meaningful where every cell is labelled);
- ``detect``: cells found by detect_cells alone (in the ROI), its ratio, and ``score/detect``:
  counted / detect_cells;
- ``%pos``: % positive counted, by detect_cells, and labelled;
- ``F1``: all-cell (or positive-cell where only positives are labelled) F1 of the counted cells at
  4 µm.

Run::

    python benchmarks/eval_fields.py [--sets deepliif dlubak ...] [--json out.json]
      [--endonuke-every 1] [--markdown]

The µm/px of each set is in ``real_sets.SET_MPP`` (estimated from nucleus sizes; the files do
not record it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_sets import SHARED_DATA, all_cases

RADIUS_UM = 4.0
COUNTED = ("intratumoral", "stromal", "tissue")


def _in_mask(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xi = np.clip(np.floor(x).astype(int), 0, mask.shape[1] - 1)
    yi = np.clip(np.floor(y).astype(int), 0, mask.shape[0] - 1)
    return mask[yi, xi]


def run_case(case: dict) -> dict:
    """Score one field as a user would; count cells the way its labels were made."""
    import shapely

    import tilscore
    from tilscore.detect import detect_cells
    from tilscore.evaluate import evaluate_cells
    from tilscore.qc import slide_stain_qc
    from tilscore.regions import RegionSet
    from tilscore.slide import Slide

    img, mpp, marker = case["image"], case["mpp"], case["marker"]
    truth = case["truth"]
    roi = case["roi"]
    if roi is not None:
        truth = truth[_in_mask(roi, truth.x.to_numpy(), truth.y.to_numpy())]
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = tilscore.score_image(img, mpp=mpp, marker=marker, slide_id=case["name"])
    seconds = time.perf_counter() - t0
    qc = slide_stain_qc(Slide.from_array(img, mpp))
    cells = res.cells
    counted = cells[cells["compartment"].isin(COUNTED)]
    if roi is not None:
        counted = counted[_in_mask(roi, counted.x.to_numpy(), counted.y.to_numpy())]
    det = detect_cells(img, mpp=mpp, marker=marker)
    if roi is not None:
        det = det[_in_mask(roi, det.x.to_numpy(), det.y.to_numpy())]
    tissue_geom = res.compartments.geometries["tissue"]
    in_scored = (
        shapely.contains_xy(tissue_geom, truth.x.to_numpy(), truth.y.to_numpy())
        if not tissue_geom.is_empty
        else np.zeros(len(truth), bool)
    )
    m = evaluate_cells(
        counted[["x", "y", "positive"]],
        truth,
        RADIUS_UM / mpp,
        truth_positive_only=case["positive_only"],
    )
    out = {
        "set": case["set"],
        "name": case["name"],
        "labelled": len(truth),
        "labelled_positive": int(truth.positive.sum()),
        "in_mask": int(qc.tissue.contains(truth.x, truth.y).sum()),
        "in_scored": int(in_scored.sum()),
        "counted": len(counted),
        "counted_positive": int(counted.positive.sum()),
        "detect": len(det),
        "detect_positive": int(det.positive.sum()),
        "tp": m["tp"],
        "fp": m["fp"],
        "fn": m["fn"],
        "pos_tp": m["pos_tp"],
        "pos_fp": m["pos_fp"],
        "pos_fn": m["pos_fn"],
        "seconds": seconds,
        "warnings": sorted({str(w.message) for w in caught}),
        "tissue_info": {k: v for k, v in qc.tissue.info.items() if k not in ("params",)},
    }
    if roi is not None:  # the ROI drawn as the user's tumour annotation
        regions = RegionSet.from_mask(roi, 1.0, "tumour")
        with warnings.catch_warnings(record=True) as caught_roi:
            warnings.simplefilter("always")
            res_roi = tilscore.score_image(
                img, mpp=mpp, marker=marker, regions=regions, slide_id=case["name"]
            )
        row = res_roi.row("intratumoral")
        out["roi_counted"] = int(row["n_cells"])
        out["roi_counted_positive"] = int(row["n_positive"])
        out["roi_source"] = str(row["source"])
        out["roi_warnings"] = sorted({str(w.message) for w in caught_roi})
    return out


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def summarise_set(rows: list[dict], case: dict) -> dict:
    df = pd.DataFrame(rows)
    s = df.select_dtypes("number").sum()
    lab = s["labelled"]
    out = {
        "set": case["set"],
        "images": len(df),
        "mpp": case["mpp"],
        "every_cell": case["every_cell"],
        "positive_only": case["positive_only"],
        "labelled": int(lab),
        "in_mask_pct": 100 * s["in_mask"] / lab if lab else float("nan"),
        "in_scored_pct": 100 * s["in_scored"] / lab if lab else float("nan"),
        "counted": int(s["counted"]),
        "detect": int(s["detect"]),
        "seconds": round(float(s["seconds"]), 1),
        "n_warnings": int(sum(len(w) for w in df["warnings"])),
    }
    if case["positive_only"]:  # compare positives only
        out["labelled"] = int(s["labelled_positive"])
        out["counted"] = int(s["counted_positive"])
        out["detect"] = int(s["detect_positive"])
        out["f1"] = _f1(s["pos_tp"], s["pos_fp"], s["pos_fn"])
    else:
        out["f1"] = _f1(s["tp"], s["fp"], s["fn"])
    out["ratio"] = out["counted"] / out["labelled"] if out["labelled"] else float("nan")
    out["detect_ratio"] = out["detect"] / out["labelled"] if out["labelled"] else float("nan")
    out["score_vs_detect"] = out["counted"] / out["detect"] if out["detect"] else float("nan")
    has_pos = not case.get("no_positive_labels") and not case["positive_only"]
    if has_pos:
        out["pct_pos_counted"] = 100 * s["counted_positive"] / max(s["counted"], 1)
        out["pct_pos_detect"] = 100 * s["detect_positive"] / max(s["detect"], 1)
        out["pct_pos_labelled"] = 100 * s["labelled_positive"] / max(lab, 1)
    if "roi_counted" in df:
        out["roi_counted"] = int(s["roi_counted"])
        out["roi_ratio"] = s["roi_counted"] / lab if lab else float("nan")
        out["roi_pct_pos"] = 100 * s["roi_counted_positive"] / max(s["roi_counted"], 1)
    return out


def _fmt(v, nd=2) -> str:
    if isinstance(v, float):
        return "–" if not np.isfinite(v) else f"{v:.{nd}f}"
    return str(v)


def markdown(summaries: list[dict]) -> str:
    head = (
        "| set | µm/px | labelled | in mask | counted | ratio | detect_cells | ratio "
        "| score / detect | % pos counted / detect / labelled | F1 (4 µm) | with ROI drawn |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for s in summaries:
        pct = (
            f"{s['pct_pos_counted']:.1f} / {s['pct_pos_detect']:.1f} / {s['pct_pos_labelled']:.1f}"
            if "pct_pos_counted" in s
            else "–"
        )
        kind = " (positives)" if s["positive_only"] else ""
        roi = (
            f"{s['roi_counted']} (ratio {s['roi_ratio']:.2f}, {s['roi_pct_pos']:.1f} % pos)"
            if "roi_counted" in s
            else "–"
        )
        lines.append(
            f"| {s['set']} ({s['images']}) | {s['mpp']} | {s['labelled']}{kind} "
            f"| {s['in_mask_pct']:.1f} % | {s['counted']} | {_fmt(s['ratio'])} | {s['detect']} "
            f"| {_fmt(s['detect_ratio'])} | {_fmt(s['score_vs_detect'], 3)} | {pct} "
            f"| {_fmt(s['f1'])} | {roi} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED_DATA)
    parser.add_argument("--sets", nargs="+", default=None, help="default: every set found")
    parser.add_argument(
        "--endonuke-every", type=int, default=1, help="score every Nth EndoNuke tile (247 tiles)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    if not args.shared.is_dir():
        print(f"no shared data at {args.shared}", file=sys.stderr)
        return 2
    sets = all_cases(args.shared, args.sets)
    if "endonuke" in sets:
        sets["endonuke"] = sets["endonuke"][:: args.endonuke_every]
    summaries, per_image = [], []
    for name, cases in sets.items():
        rows = [run_case(c) for c in cases]
        per_image += rows
        s = summarise_set(rows, cases[0])
        summaries.append(s)
        print(
            f"{name:<9} labelled {s['labelled']:>6}  in mask {s['in_mask_pct']:5.1f} %  "
            f"counted {s['counted']:>6} (ratio {_fmt(s['ratio'])})  detect {s['detect']:>6} "
            f"(ratio {_fmt(s['detect_ratio'])})  score/detect {_fmt(s['score_vs_detect'], 3)}  "
            + (
                f"%pos {s['pct_pos_counted']:.1f}/{s['pct_pos_detect']:.1f}/"
                f"{s['pct_pos_labelled']:.1f}  "
                if "pct_pos_counted" in s
                else ""
            )
            + f"F1 {_fmt(s['f1'])}  warnings {s['n_warnings']}"
            + (f"  ROI {s['roi_counted']} ({_fmt(s['roi_ratio'])})" if "roi_counted" in s else ""),
            flush=True,
        )
    if args.markdown:
        print()
        print(markdown(summaries))
    if args.json:
        args.json.write_text(
            json.dumps({"sets": summaries, "images": per_image}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
