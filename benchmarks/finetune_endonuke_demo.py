"""Fine-tuning on CPU, shown on real data: the synthetic-only model fine-tuned on 20 EndoNuke
tiles (ids 300-499, drawn with seed 0), scored on the held-out id hundreds 6xx and 9xx.

    python benchmarks/finetune_endonuke_demo.py OUT_MODEL_DIR  # prints the metrics as JSON
"""

import json
import sys
import time

import numpy as np
import torch
from real_sets import SHARED_DATA

from tilscore.detect import cnn, finetune, fit, train

torch.set_num_threads(2)
ENDONUKE = SHARED_DATA / "endonuke-ihc"
allf = train.endonuke_fields(ENDONUKE, [3, 4], keep=True, mpp=0.5)
rng = np.random.default_rng(0)
pick = [allf[i] for i in sorted(rng.choice(len(allf), 20, replace=False))]
val = train.endonuke_fields(ENDONUKE, [6, 9], keep=True, mpp=0.5)
t0 = time.time()
res = finetune(
    pick,
    out=sys.argv[1],
    base_model="synthetic",
    steps=200,
    val_every=25,
    seed=0,
    device="cpu",
    log=lambda m: print(m, flush=True),
)
dt = time.time() - t0
base = cnn.CNNDetector.load("synthetic", device="cpu")
new = cnn.CNNDetector.load(sys.argv[1], device="cpu")
out = {
    "seconds": round(dt, 1),
    "fields": 20,
    "cells": res.metrics["data"]["cells"],
    "settings": res.metrics["settings"],
    "own_validation": res.metrics["validation_all_cells"],
    "endonuke_val_before": fit.field_scores(base, val, [base.threshold]),
    "endonuke_val_after": fit.field_scores(new, val, [new.threshold]),
}
print(json.dumps(out, indent=1))
