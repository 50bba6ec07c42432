"""Evaluate the detectors (CNN and classical, side by side) on labelled data.

Sets:

- synthetic test slides (CD8, CD68, CD56; seeds never used in training), all cells and
  positive cells against the generator's truth;
- the real labelled sets in ``../shared/data`` (validation only, except EndoNuke's training
  hundreds, which are left out: only ``ENDONUKE_VAL_HUNDREDS`` are scored), each scored by what
  its labels mean; the table of sets, markers, estimated µm/px and label meanings is in
  ``real_sets.py`` (and each set's MANIFEST.md).

Run::

    python benchmarks/eval_detectors.py [--shared ../shared/data] [--json out.json] [--quick]
        [--models default synthetic] [--sets lyon19 endonuke ...]

``--models`` runs the CNN once per model (a shipped name or a model folder); the rows are named
``cnn:<model>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tilscore.detect import detect_cells
from tilscore.evaluate import evaluate_cells

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_sets import (
    ENDONUKE_VAL_HUNDREDS,
    deepliif_cases,
    dlubak_cases,
    ehh_cases,
    endonuke_cases,
    endonuke_ids,
    lyon19_cases,
)

REPO = Path(__file__).resolve().parents[1]
RADIUS_UM = 4.0
SYNTHETIC_TEST = {"CD8": 9101, "CD68": 9102, "CD56": 9103}


def synthetic_cases(size_px: int):
    from tilscore.synthetic import make_layout, render_region

    for marker, seed in SYNTHETIC_TEST.items():
        layout = make_layout(marker=marker, width_px=size_px, height_px=size_px, mpp=0.5, seed=seed)
        rgb = render_region(layout, 0, 0, size_px, size_px, 0.5)
        truth = layout.truth()
        truth = truth[(truth.x < size_px) & (truth.y < size_px)]
        yield {
            "set": f"synthetic-{marker}",
            "image": rgb,
            "mpp": 0.5,
            "marker": marker,
            "truth": truth[["x", "y", "positive"]],
            "positive_only": False,
            "roi": None,
            "background": tuple(layout.spec.background),
        }


def run_case(case: dict, detector: str) -> tuple[pd.DataFrame, float]:
    """``detector``: "classical", "cnn" (the default model) or "cnn:<model name or folder>"."""
    kind, _, model = detector.partition(":")
    extra = {"model": model} if model else {}
    start = time.perf_counter()
    cells = detect_cells(
        case["image"],
        mpp=case["mpp"],
        marker=case["marker"],
        detector=kind,
        background=case.get("background"),
        **extra,
    )
    return cells, time.perf_counter() - start


def _roi_filter(df: pd.DataFrame, roi: np.ndarray | None) -> pd.DataFrame:
    if roi is None or not len(df):
        return df
    xi = np.clip(df["x"].to_numpy().astype(int), 0, roi.shape[1] - 1)
    yi = np.clip(df["y"].to_numpy().astype(int), 0, roi.shape[0] - 1)
    return df.loc[roi[yi, xi]]


def evaluate_set(cases: list[dict], detector: str) -> dict:
    """Pool the matches of all images of a set (micro-averaged metrics)."""
    tp = fp = fn = ptp = pfp = pfn = 0
    n_pred = n_pos_pred = n_truth = n_pos_truth = 0
    pct_errors = []
    seconds = 0.0
    megapixels = 0.0
    for case in cases:
        cells, dt = run_case(case, detector)
        seconds += dt
        megapixels += (
            case["image"].shape[0] * case["image"].shape[1] * (case["mpp"] / 0.5) ** 2 / 1e6
        )
        pred = _roi_filter(cells[["x", "y", "positive"]], case["roi"])
        truth = _roi_filter(case["truth"], case["roi"])
        radius_px = RADIUS_UM / case["mpp"]
        m = evaluate_cells(pred, truth, radius_px, truth_positive_only=case["positive_only"])
        if not case["positive_only"]:
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
            pct_errors.append(m["pct_positive_error"])
        ptp, pfp, pfn = ptp + m["pos_tp"], pfp + m["pos_fp"], pfn + m["pos_fn"]
        n_pred += len(pred)
        n_pos_pred += int(pred["positive"].sum())
        n_truth += len(truth)
        n_pos_truth += int(truth["positive"].sum())

    def prf(t, f_p, f_n):
        p = t / (t + f_p) if t + f_p else float("nan")
        r = t / (t + f_n) if t + f_n else float("nan")
        f = 2 * p * r / (p + r) if (p + r) and np.isfinite(p + r) else float("nan")
        return round(p, 4), round(r, 4), round(f, 4)

    out = {
        "images": len(cases),
        "n_pred": n_pred,
        "n_pred_positive": n_pos_pred,
        "n_truth": n_truth,
        "n_truth_positive": n_pos_truth,
        "seconds": round(seconds, 2),
        "mp_per_s_at_0.5": round(megapixels / seconds, 2) if seconds else None,
    }
    out["positive_precision"], out["positive_recall"], out["positive_f1"] = prf(ptp, pfp, pfn)
    if not cases[0]["positive_only"]:
        out["precision"], out["recall"], out["f1"] = prf(tp, fp, fn)
        out["pct_positive_abs_error_mean"] = round(float(np.mean(np.abs(pct_errors))), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--detectors", nargs="+", default=["cnn", "classical"])
    parser.add_argument(
        "--models", nargs="+", default=None, help="CNN models (names or folders) instead of 'cnn'"
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        default=None,
        help="only these sets (synthetic, lyon19, deepliif, dlubak, ehh2025, endonuke)",
    )
    parser.add_argument("--synthetic-size", type=int, default=2048, help="test slide side (px)")
    parser.add_argument("--quick", action="store_true", help="synthetic 1024 px; fewer images")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    size = 1024 if args.quick else args.synthetic_size

    want = set(args.sets) if args.sets else None
    detectors = list(args.detectors)
    if args.models:
        detectors = [f"cnn:{m}" for m in args.models] + [d for d in detectors if d != "cnn"]
    sets: dict[str, list[dict]] = {}
    if want is None or "synthetic" in want:
        for case in synthetic_cases(size):
            sets[case["set"]] = [case]
    if args.shared.is_dir():
        val_ids = [i for i in endonuke_ids(args.shared) if i // 100 in ENDONUKE_VAL_HUNDREDS]
        loaders = {
            "lyon19": lyon19_cases,
            "deepliif": deepliif_cases,
            "dlubak": dlubak_cases,
            "ehh2025": ehh_cases,
            "endonuke": lambda root: endonuke_cases(root, ids=val_ids),
        }
        for key, loader in loaders.items():
            if want is not None and key not in want:
                continue
            for case in loader(args.shared):
                sets.setdefault(case["set"], []).append(case)
    else:
        print(f"no shared data at {args.shared}: synthetic sets only", file=sys.stderr)

    results = {}
    for name, cases in sets.items():
        for det in detectors:
            results[f"{name}/{det}"] = evaluate_set(cases, det)
            r = results[f"{name}/{det}"]
            print(
                f"{name:<18} {det:<9} pos P/R/F1 {r['positive_precision']}/"
                f"{r['positive_recall']}/{r['positive_f1']}"
                + (
                    f"  all P/R/F1 {r['precision']}/{r['recall']}/{r['f1']}"
                    f"  |%pos err| {r['pct_positive_abs_error_mean']}"
                    if "f1" in r
                    else ""
                )
                + f"  ({r['n_pred']} pred, {r['n_truth']} truth, {r['seconds']} s)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
