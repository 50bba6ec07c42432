"""Fine-tune the CNN detector on a lab's own labelled fields.

    from tilscore.detect import finetune
    result = finetune(["f1.png", "f2.png"], ["f1.csv", "f2.geojson"], mpp=0.5, out="my_model")
    detect_cells(image, mpp=0.5, model=result.folder)

Every labelled nucleus of a field is a point (see :mod:`tilscore.detect.labels`); the labels are
taken as **exhaustive for the cells to be found**: an unlabelled nucleus is learned as background
(label positive cells only and the detector learns to find positive cells only).

The fields are split by image into training and validation (a single image is split into two
halves); the network starts from ``base_model``, trains with mild stain, scale, blur and JPEG
augmentation, is scored on the validation fields every ``val_every`` steps, keeps the best state
and stops after ``patience`` scores without a gain (early stopping). The heatmap threshold is
then chosen on the validation fields. The model folder (``model.safetensors``, ``config.json``,
``metrics.json``, ``README.md``: the data it saw, its settings and its metrics before and after)
is written beside ``out`` under a temporary name and renamed only when complete: an interrupted
fine-tune (Ctrl-C, an error, ``cancel``) leaves no model folder behind.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, TilscoreError
from . import cnn
from .fit import Cancelled, Field, Sampler, batches, field_scores, fit
from .labels import CLASS_NAMES, LabelError, check_labels, read_labels

__all__ = ["Cancelled", "FinetuneResult", "finetune", "make_fields", "split_fields"]

#: fewest labelled cells a fine-tune accepts (all fields together)
MIN_CELLS = 30
#: thresholds the validation fields choose from
THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
#: augmentation of fine-tuning crops: milder than the shipped models' (the lab's own stain)
FINETUNE_AUGMENT: dict[str, Any] = {
    "h_scale": [0.8, 1.25],
    "dab_scale": [0.8, 1.25],
    "hue_deg": 5.0,
    "nuclear_dab_p": 0.0,
    "background": [225.0, 255.0],
    "blur_p": 0.3,
    "blur_sigma_px": [0.3, 1.0],
    "noise_sigma": [0.0, 3.0],
    "jpeg_p": 0.3,
    "jpeg_quality": [60, 95],
    "white_background_p": 0.3,
    "lowres_p": 0.0,
}
_CLASS_INDEX = {c: i + 1 for i, c in enumerate(cnn.CLASSES)}


@dataclass
class FinetuneResult:
    """What :func:`finetune` wrote: the model ``folder`` and its ``metrics`` (also on disk)."""

    folder: Path
    metrics: dict[str, Any]


def _read_image(src: Any) -> tuple[np.ndarray, str]:
    if isinstance(src, np.ndarray):
        return cnn._check_rgb(src), "array"
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise TilscoreError("image not found", path=path)
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            arr = np.asarray(Image.open(path).convert("RGB"))
    except Exception as exc:  # any decoder error is a bad file
        raise TilscoreError(f"cannot read the image: {exc}", path=path) from None
    return cnn._check_rgb(arr), path


def make_fields(
    images: Sequence[Any], labels: Sequence[Any] | None, mpp: float | Sequence[float] | None
) -> list[Field]:
    """Read images and their labels into checked :class:`~tilscore.detect.fit.Field` objects.

    ``images`` may also be :class:`Field` objects (``labels`` and ``mpp`` then unused).
    """
    if len(images) and all(isinstance(i, Field) for i in images):
        return list(images)
    if labels is None or len(labels) != len(images):
        raise ConfigError(
            f"{len(images)} images but {0 if labels is None else len(labels)} label sources",
            hint="give one label file (or table, or mask) per image, in the same order",
        )
    if not images:
        raise ConfigError("no images to fine-tune on")
    mpps = list(mpp) if isinstance(mpp, (list, tuple, np.ndarray)) else [mpp] * len(images)
    if len(mpps) != len(images) or any(m is None for m in mpps):
        raise ConfigError(
            "the µm/px of each image is needed", hint="pass mpp=0.5 (one for all) or one per image"
        )
    fields = []
    for img, lab, m in zip(images, labels, mpps):
        m = float(m)
        if not np.isfinite(m) or not 0.05 <= m <= 20:
            raise ConfigError(f"µm/px must be between 0.05 and 20, got {m}")
        rgb, name = _read_image(img)
        lab_name = os.fspath(lab) if isinstance(lab, (str, os.PathLike)) else f"labels of {name}"
        table = read_labels(lab, mpp=m)
        check_labels(table, rgb.shape[:2], lab_name)
        cls = None
        if "cell_class" in table:
            cls = np.array(
                [_CLASS_INDEX.get(CLASS_NAMES.get(str(c), ""), 0) for c in table["cell_class"]]
            )
        pos = table["positive"].to_numpy(bool) if "positive" in table else None
        fields.append(
            Field(
                rgb,
                m,
                table[["x", "y"]].to_numpy(float),
                cls=cls,
                positive=pos,
                name=name if name != "array" else f"image {len(fields) + 1}",
                background=cnn._quiet_estimate_background(rgb).astype(np.float32),
            )
        )
    return fields


def _half(f: Field, which: int) -> Field:
    h, w = f.rgb.shape[:2]
    axis = 1 if w >= h else 0
    cut = (w if axis == 1 else h) // 2
    lo, hi = (0, cut) if which == 0 else (cut, w if axis == 1 else h)
    coord = 0 if axis == 1 else 1  # columns are x (xy[:, 0]), rows are y (xy[:, 1])
    keep = (f.xy[:, coord] >= lo) & (f.xy[:, coord] < hi)
    xy = f.xy[keep].copy()
    xy[:, coord] -= lo
    rgb = f.rgb[:, lo:hi] if axis == 1 else f.rgb[lo:hi]
    sub = None if f.cls is None else f.cls[keep]
    pos = None if f.positive is None else f.positive[keep]
    return Field(
        rgb,
        f.mpp,
        xy,
        sub,
        pos,
        f"{f.name} ({'first' if which == 0 else 'second'} half)",
        f.background,
    )


def split_fields(fields: list[Field], val_fraction: float, seed: int) -> tuple[list, list]:
    """Training and validation fields, split by image (one image: split into halves)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(fields) == 1:
        return [_half(fields[0], 0)], [_half(fields[0], 1)]
    rng = np.random.default_rng([int(seed), 5])
    n_val = min(len(fields) - 1, max(1, round(val_fraction * len(fields))))
    for _ in range(50):  # a split with cells on both sides, where there is one
        order = rng.permutation(len(fields))
        val = [fields[i] for i in sorted(order[:n_val])]
        train = [fields[i] for i in sorted(order[n_val:])]
        if all(sum(len(f.xy) for f in part) for part in (train, val)):
            break
    return train, val


def _resolve(base_model: str | os.PathLike) -> Path:
    return cnn.model_folder(base_model)


def _detector_from(model, config: dict[str, Any], device: str) -> cnn.CNNDetector:
    import torch

    m = copy.deepcopy(model).to("cpu").eval()
    cnn.fuse_batchnorm(m)
    m = m.to(device=device, memory_format=torch.channels_last)
    return cnn.CNNDetector(m, dict(config), "finetuning", "", device)


def _positive_scores(folder: str | Path, fields: list[Field], marker: str) -> dict[str, Any]:
    """Positive-cell P/R/F1 of ``detect_cells`` with the model in ``folder`` on labelled fields."""
    import pandas as pd

    from ..evaluate import evaluate_cells
    from . import detect_cells

    tp = fp = fn = 0
    for f in fields:
        cells = detect_cells(f.rgb, mpp=f.mpp, marker=marker, model=str(folder), workers=1)
        truth = pd.DataFrame({"x": f.xy[:, 0], "y": f.xy[:, 1], "positive": f.positive})
        positive_only = bool(np.all(f.positive))
        m = evaluate_cells(
            cells[["x", "y", "positive"]], truth, 4.0 / f.mpp, truth_positive_only=positive_only
        )
        tp, fp, fn = tp + m["pos_tp"], fp + m["pos_fp"], fn + m["pos_fn"]
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(2 * p * r / max(p + r, 1e-9), 4),
        "marker": marker,
    }


def finetune(
    images: Sequence[Any],
    labels: Sequence[Any] | None = None,
    *,
    out: str | os.PathLike,
    base_model: str | os.PathLike = "default",
    mpp: float | Sequence[float] | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    steps: int = 600,
    lr: float = 5e-4,
    batch_size: int = 8,
    crop_px: int = 192,
    max_minutes: float = 15.0,
    val_every: int = 50,
    patience: int = 6,
    marker: str | None = None,
    device: str | None = "cpu",
    workers: int = 0,
    threads: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
    min_cells: int = MIN_CELLS,
    progress: Callable[[int, int, dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a detector on labelled fields and write a new model folder.

    Parameters
    ----------
    images
        Image files (PNG, JPEG, TIFF) or (H, W, 3) uint8 arrays; or
        :class:`~tilscore.detect.fit.Field` objects (then ``labels`` and ``mpp`` are unused).
    labels
        One label source per image: a CSV ``x, y[, positive][, cell_class]`` (px of that image),
        a QuPath GeoJSON export of points, detections or cells, a label-mask file or array, or a
        DataFrame (see :mod:`tilscore.detect.labels`). Every cell to be found must be labelled.
    out
        The model folder to write (must not exist unless ``overwrite``). Use it as
        ``detect_cells(..., model=out)``, ``tilscore detect --model out``, or
        ``[detect] model = "out"`` in the config file.
    base_model
        Shipped model name ("default", "synthetic") or a model folder.
    mpp
        µm/px of the images: one value for all or one per image.
    val_fraction, seed
        Share of the images held out for validation (at least one) and the seed of the split,
        the crops and the initialisation of everything random.
    steps, lr, batch_size, crop_px
        Optimisation: at most ``steps`` AdamW steps (OneCycle, peak ``lr``) of ``batch_size``
        crops of ``crop_px`` px at the model's µm/px.
    max_minutes
        Wall-clock limit of the training loop.
    val_every, patience
        Validation every ``val_every`` steps; stop after ``patience`` validations without a
        gain (0: never stop early). The best state is kept.
    marker
        If given and the labels carry ``positive``, the positive-cell F1 of the full pipeline
        (``detect_cells`` with this marker preset) is reported before and after.
    device, workers, threads
        torch device ("cpu", "cuda", "auto"), crop-drawing processes (0: in this process) and
        torch CPU threads (None: unchanged).
    name
        Model name written in its config and card (default: the folder name).
    overwrite
        Replace an existing ``out`` (only once the new folder is complete).
    min_cells
        Fewest labelled cells accepted (default :data:`MIN_CELLS`).
    progress
        ``progress(step, steps, info)`` after every step; ``info`` may hold ``loss``, ``val``.
    cancel
        Polled every step; returning True stops the fine-tune (no folder is written).
    log
        Called with one line per message (default: silent).

    Returns
    -------
    FinetuneResult

    Raises
    ------
    TilscoreError
        Bad images or labels (:class:`~tilscore.detect.labels.LabelError`), fewer than
        :data:`MIN_CELLS` cells, an existing ``out``, a bad base model. ``KeyboardInterrupt``
        and cancellation leave no folder.
    """
    import torch

    say = log or (lambda _m: None)
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ConfigError(
            "the model folder already exists", path=out, hint="choose another --out or overwrite"
        )
    if not out.parent.is_dir():
        raise ConfigError("the parent folder of the model does not exist", path=out.parent)
    base_folder = _resolve(base_model)
    base = cnn.CNNDetector.load(base_folder, device="cpu")
    fields = make_fields(images, labels, mpp)
    n_cells = int(sum(len(f.xy) for f in fields))
    if n_cells < max(1, int(min_cells)):
        raise LabelError(
            f"only {n_cells} labelled cells in {len(fields)} image(s); at least {min_cells} "
            "are needed",
            hint="label every cell of a few more fields (a dozen 512 px fields is a good start)",
        )
    train_f, val_f = split_fields(fields, val_fraction, seed)
    if sum(len(f.xy) for f in val_f) == 0 or sum(len(f.xy) for f in train_f) == 0:
        raise LabelError(
            "the training or validation images hold no labelled cell",
            hint="label cells in more images, or change val_fraction / seed",
        )
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(int(seed))
    dev = cnn.select_device(device)
    config = dict(base.config)
    model = cnn.build_model(config)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(base_folder / "model.safetensors")))
    thresholds = list(THRESHOLDS)
    before = field_scores(base, val_f, [base.threshold])[f"{base.threshold:.2f}"]
    say(f"before: validation F1 {before['f1']:.3f} ({len(val_f)} field(s))")

    def validate(m) -> float:
        det = _detector_from(m, config, dev)
        return max(v["f1"] for v in field_scores(det, val_f, thresholds).values())

    sampler = Sampler(
        model=config,
        augment=FINETUNE_AUGMENT,
        crop=int(crop_px),
        fields=train_f,
        scale_jitter=(0.9, 1.1),
    )
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    t0 = time.time()
    try:
        stream = batches(sampler, int(batch_size), int(seed), int(workers))
        hist = fit(
            model,
            stream,
            steps=int(steps),
            lr=float(lr),
            device=dev,
            max_minutes=float(max_minutes),
            log=say,
            validate=validate,
            val_every=int(val_every),
            patience=int(patience),
            cancel=cancel,
            progress=progress,
            warmup=0.05,
            freeze_bn=True,
        )
        model = model.to("cpu")
        det = _detector_from(model, config, "cpu")
        table = field_scores(det, val_f, thresholds)
        best = max(table, key=lambda k: table[k]["f1"])
        config["threshold"] = float(best)
        config["name"] = name or out.name
        config["base_model"] = {"name": str(base_model), "sha256": base.sha256}
        if tmp.exists():
            shutil.rmtree(tmp)
        sha = cnn.save_weights(model, tmp, config)
        config["weights_sha256"] = sha
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        metrics: dict[str, Any] = {
            "weights_sha256": sha,
            "base_model": config["base_model"],
            "data": {
                "train": [_describe(f) for f in train_f],
                "validation": [_describe(f) for f in val_f],
                "cells": n_cells,
            },
            "settings": {
                "steps": int(steps),
                "steps_done": hist["steps_done"],
                "stopped": hist["stopped"],
                "lr": float(lr),
                "batch_size": int(batch_size),
                "crop_px": int(crop_px),
                "val_every": int(val_every),
                "patience": int(patience),
                "seed": int(seed),
                "device": dev,
                "seconds": round(time.time() - t0, 1),
                "validation_curve": hist["val"],
            },
            "validation_all_cells": {
                "before": {**before, "threshold": base.threshold},
                "after": {**table[best], "threshold": float(best)},
            },
        }
        has_pos = all(f.positive is not None for f in val_f)
        if marker and has_pos:
            metrics["validation_positive_cells"] = {
                "before": _positive_scores(base_folder, val_f, marker),
                "after": _positive_scores(tmp, val_f, marker),
            }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(config, metrics))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(
        f"after: validation F1 {metrics['validation_all_cells']['after']['f1']:.3f} "
        f"(threshold {best}); wrote {out}"
    )
    return FinetuneResult(out, metrics)


def _describe(f: Field) -> dict[str, Any]:
    h, w = f.rgb.shape[:2]
    return {"name": f.name, "mpp": f.mpp, "size_px": [w, h], "cells": len(f.xy)}


def model_card(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The README.md of a fine-tuned model folder."""
    d, s = metrics["data"], metrics["settings"]
    a = metrics["validation_all_cells"]
    lines = [
        f"# Model card: `{config['name']}` (fine-tuned CNN nucleus detector)",
        "",
        f"- Weights: `model.safetensors`, sha256 `{metrics['weights_sha256']}`",
        f"- Base model: `{config['base_model']['name']}` (sha256 "
        f"`{config['base_model']['sha256']}`); architecture as in its card",
        f"- Input: {config['mpp']} µm/px, heatmap threshold {config['threshold']} (chosen on the "
        "validation fields)",
        f"- Written by `tilscore.detect.finetune` on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{s['steps_done']} of {s['steps']} steps ({s['stopped']}), {s['seconds']} s on "
        f"{s['device']}, seed {s['seed']}",
        "",
        f"## Data seen ({d['cells']} labelled cells)",
        "",
        "| split | image | µm/px | size (px) | cells |",
        "|---|---|---|---|---|",
    ]
    for split in ("train", "validation"):
        for f in d[split]:
            lines.append(
                f"| {split} | {f['name']} | {f['mpp']} | {f['size_px'][0]} x {f['size_px'][1]} "
                f"| {f['cells']} |"
            )
    lines += [
        "",
        "## Validation metrics (matching radius 4 µm)",
        "",
        "| | threshold | precision | recall | F1 (all labelled cells) |",
        "|---|---|---|---|---|",
    ]
    for k in ("before", "after"):
        v = a[k]
        lines.append(f"| {k} | {v['threshold']} | {v['precision']} | {v['recall']} | {v['f1']} |")
    if "validation_positive_cells" in metrics:
        p = metrics["validation_positive_cells"]
        lines += [
            "",
            f"Positive cells through `detect_cells` (marker {p['before']['marker']}): "
            f"F1 {p['before']['f1']} before, {p['after']['f1']} after.",
        ]
    lines += [
        "",
        "The validation fields also chose the threshold and the training step kept, so these "
        "figures are optimistic for new slides; score a few more of your own fields with "
        "`tilscore evaluate` before relying on the model.",
        "",
    ]
    return "\n".join(lines)
