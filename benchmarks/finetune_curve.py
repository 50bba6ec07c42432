"""Fine-tuning learning curve on LYON19 (leave-ROI-out): positive F1 after 0, 3, 7, all patches.

The 14 shared LYON19 patches (one ROI each) are split into folds of two held-out patches. For
each fold, the detector is fine-tuned (``tilscore.detect.finetune``) on n of the other patches
(the first n of a seeded permutation; the fine-tune holds a quarter of them out for its own
early stopping), and the full pipeline (``detect_cells``, CD8 preset) is scored on the two
held-out patches. n = 0 is the base model. Matches of all folds are pooled.

The labels are DAB-positive lymphocytes only, so the fine-tuned detector learns to find those
cells only: this demonstrates fine-tuning on a lab's own labels. LYON19 is validation data: no
weights trained here are shipped.

    python benchmarks/finetune_curve.py --model default --fold 0 --json fold0.json  # one fold
    python benchmarks/finetune_curve.py --merge fold*.json --json curve.json         # pool them
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_detectors import RADIUS_UM
from real_sets import SHARED_DATA, lyon19_cases

from tilscore.detect import detect_cells, finetune
from tilscore.detect.fit import Field
from tilscore.evaluate import evaluate_cells

SIZES = (0, 3, 7, 12)
FOLD_SIZE = 2


def _score(cases, model) -> dict:
    tp = fp = fn = 0
    for c in cases:
        cells = detect_cells(c["image"], mpp=c["mpp"], marker="CD8", model=str(model), workers=1)
        m = evaluate_cells(
            cells[["x", "y", "positive"]],
            c["truth"],
            RADIUS_UM / c["mpp"],
            truth_positive_only=True,
        )
        tp, fp, fn = tp + m["pos_tp"], fp + m["pos_fp"], fn + m["pos_fn"]
    return {"tp": tp, "fp": fp, "fn": fn}


def run_fold(model: str, fold: int, args) -> dict:
    cases = list(lyon19_cases(args.shared))
    test_idx = list(range(fold * FOLD_SIZE, min(len(cases), (fold + 1) * FOLD_SIZE)))
    test = [cases[i] for i in test_idx]
    pool = [c for i, c in enumerate(cases) if i not in test_idx]
    order = np.random.default_rng([args.seed, fold]).permutation(len(pool))
    out = {"fold": fold, "test": [c["name"] for c in test], "by_n": {}}
    for n in SIZES:
        t0 = time.time()
        if n == 0:
            res = _score(test, model)
            out["by_n"]["0"] = {**res, "seconds": round(time.time() - t0, 1)}
            if args.json and args.fold is not None:
                args.json.write_text(json.dumps(out, indent=2))
            continue
        chosen = [pool[i] for i in order[: min(n, len(pool))]]
        fields = [
            Field(
                c["image"],
                c["mpp"],
                c["truth"][["x", "y"]].to_numpy(float),
                positive=c["truth"]["positive"].to_numpy(bool),
                name=c["name"],
            )
            for c in chosen
        ]
        with tempfile.TemporaryDirectory() as tmp:
            r = finetune(
                fields,
                out=Path(tmp) / "model",
                base_model=model,
                seed=args.seed,
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                crop_px=128,
                val_every=args.val_every,
                patience=3,
                device=args.device,
                workers=0,
                threads=2,
                max_minutes=args.max_minutes,
                min_cells=1,
            )
            res = _score(test, r.folder)
        out["by_n"][str(n)] = {
            **res,
            "train_patches": [c["name"] for c in chosen],
            "steps_done": r.metrics["settings"]["steps_done"],
            "threshold": r.metrics["validation_all_cells"]["after"]["threshold"],
            "seconds": round(time.time() - t0, 1),
        }
        print(f"fold {fold} n {n}: {out['by_n'][str(n)]}", flush=True)
        if args.json and args.fold is not None:  # keep what is done if the run is cut short
            args.json.write_text(json.dumps(out, indent=2))
    return out


def merge(parts: list[dict]) -> dict:
    curve = {}
    for n in SIZES:
        tp = sum(p["by_n"][str(n)]["tp"] for p in parts if str(n) in p["by_n"])
        fp = sum(p["by_n"][str(n)]["fp"] for p in parts if str(n) in p["by_n"])
        fn = sum(p["by_n"][str(n)]["fn"] for p in parts if str(n) in p["by_n"])
        folds = sum(str(n) in p["by_n"] for p in parts)
        pr, rc = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        curve[str(n)] = {
            "folds": folds,
            "precision": round(pr, 4),
            "recall": round(rc, 4),
            "positive_f1": round(2 * pr * rc / max(pr + rc, 1e-9), 4),
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }
    return {"curve": curve, "folds": parts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=SHARED_DATA)
    ap.add_argument("--model", default="default")
    ap.add_argument("--fold", type=int, default=None, help="run one fold (0-6)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="fold JSONs to pool")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--max-minutes", type=float, default=3.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.merge:
        res = merge([json.loads(p.read_text()) for p in args.merge if p.is_file()])
    else:
        folds = [args.fold] if args.fold is not None else list(range(7))
        res = merge([run_fold(args.model, f, args) for f in folds])
    print(json.dumps(res["curve"], indent=2))
    if args.json and (args.merge or args.fold is None):
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
