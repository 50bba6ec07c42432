"""The training loop of the CNN detector, shared by shipped-model training and fine-tuning.

:mod:`tilscore.detect.train` trains the shipped models (synthetic renders, optionally with real
labelled fields such as EndoNuke); :mod:`tilscore.detect.finetune` adapts a model to a lab's own
labelled fields. Both draw crops from:

* synthetic pool items (``train.render_one``: RGB with precomputed heat and class targets), and
* :class:`Field` objects: a real RGB image at its own µm/px with nucleus-centre points (and
  optionally their classes); targets are made per crop, after scaling to the model's µm/px.

Every crop is re-stained, re-lit, blurred, noised and JPEG-compressed (``train.augment``) and,
with probability ``lowres_p``, degraded to a coarser scan (area-downsampled by 1.5-3x and
upsampled back, as :func:`tilscore.detect.detect_cells` upsamples a 1-1.5 µm/px image), so that
the network sees 0.5-1.5 µm/px inputs at its 0.5 µm/px.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cnn

#: class target value that the class loss ignores (real points without a class)
IGNORE = 255
#: Ruifrok-Johnston H and DAB (unit vectors), the stain basis assumed for real fields
RUIFROK_H = np.array([0.650, 0.704, 0.286], np.float32)
RUIFROK_DAB = np.array([0.268, 0.570, 0.776], np.float32)


@dataclass
class Field:
    """A real labelled image: every nucleus to be found is a point.

    Attributes
    ----------
    rgb
        (H, W, 3) uint8 RGB at ``mpp`` µm/px.
    mpp
        µm/px of ``rgb``.
    xy
        (n, 2) nucleus centres in continuous px coordinates of ``rgb`` (the centre of pixel
        (row i, column j) is (j + 0.5, i + 0.5), as QuPath writes them).
    cls
        (n,) class index per point (1 tumour, 2 immune, 3 other; 0 = unknown) or None.
    positive
        (n,) bool marker positivity per point, or None (used for metrics, not for training).
    name
        For messages and the model card.
    background
        Glass intensity I0 (R, G, B) of the image.
    """

    rgb: np.ndarray
    mpp: float
    xy: np.ndarray
    cls: np.ndarray | None = None
    positive: np.ndarray | None = None
    name: str = ""
    background: np.ndarray = field(default_factory=lambda: np.full(3, 255.0, np.float32))


def point_targets(
    xy: np.ndarray,
    cls: np.ndarray | None,
    shape: tuple[int, int],
    stride: int,
    sigma_px: float,
    radius_px: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Heat (Gaussians at the points) and class targets at ``stride`` for a crop.

    ``xy`` are continuous coordinates in crop px at the model's scale; ``sigma_px`` and
    ``radius_px`` are in crop px. Class targets are :data:`IGNORE` except within ``radius_px``
    of a point with a known class.
    """
    h, w = shape[0] // stride, shape[1] // stride
    heat = np.zeros((h, w), np.float32)
    tcls = np.full((h, w), IGNORE, np.uint8)
    if len(xy) == 0:
        return heat, tcls
    x = xy[:, 0] / stride - 0.5
    y = xy[:, 1] / stride - 0.5
    s = sigma_px / stride
    rad = radius_px / stride + 0.5
    for k, rs, cs, d2 in gaussian_windows(x, y, s, (h, w)):
        g = np.exp(-d2 / (2 * s**2)).astype(np.float32)
        np.maximum(heat[rs, cs], g, out=heat[rs, cs])
        if cls is not None and cls[k] > 0:
            tcls[rs, cs][d2 <= rad**2] = int(cls[k])
    return heat, tcls


def gaussian_windows(
    x: np.ndarray, y: np.ndarray, sigma: float, shape: tuple[int, int]
) -> Iterator[tuple[int, slice, slice, np.ndarray]]:
    """For each centre ``(x[k], y[k])`` (continuous px of a ``shape`` grid): ``k``, the row and
    column slices of its 3-sigma window clipped to the grid, and the squared distance of each
    window pixel to the centre; centres whose window lies outside the grid are skipped."""
    h, w = shape
    r = math.ceil(3 * sigma)
    for k, (cx, cy) in enumerate(zip(x, y)):
        c0, r0 = round(cx), round(cy)
        cs = slice(max(0, c0 - r), min(w, c0 + r + 1))
        rs = slice(max(0, r0 - r), min(h, r0 + r + 1))
        if cs.start >= cs.stop or rs.start >= rs.stop:
            continue
        gx = np.arange(cs.start, cs.stop) - cx
        gy = np.arange(rs.start, rs.stop) - cy
        yield k, rs, cs, gy[:, None] ** 2 + gx[None, :] ** 2


def _lowres(rgb: np.ndarray, factor: float) -> np.ndarray:
    """A coarser scan of ``rgb``: area-downsample by ``factor``, upsample back (linear)."""
    import cv2

    h, w = rgb.shape[:2]
    small = cv2.resize(
        rgb, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def synthetic_crop(item: dict[str, Any], crop: int, stride: int, rng: np.random.Generator):
    """A crop of a synthetic pool item: rgb, heat, cls, background, vectors."""
    size_y, size_x = item["rgb"].shape[:2]
    oy = int(rng.integers(0, (size_y - crop) // stride + 1)) * stride
    ox = int(rng.integers(0, (size_x - crop) // stride + 1)) * stride
    sl = (slice(oy // stride, (oy + crop) // stride), slice(ox // stride, (ox + crop) // stride))
    rgb = item["rgb"][oy : oy + crop, ox : ox + crop]
    return rgb, item["heat"][sl], item["cls"][sl], item["background"], item["vectors"]


def field_crop(
    f: Field,
    crop: int,
    model: dict[str, Any],
    rng: np.random.Generator,
    scale_jitter: tuple[float, float] = (1.0, 1.0),
):
    """A crop of a real field resampled to the model's µm/px (times a random scale jitter)."""
    import cv2

    stride = int(model["output_stride"])
    scale = f.mpp / float(model["mpp"]) * float(rng.uniform(*scale_jitter))
    win = crop / scale  # source px covered by the crop
    h, w = f.rgb.shape[:2]
    ox = float(rng.uniform(min(0.0, w - win), max(0.0, w - win)))
    oy = float(rng.uniform(min(0.0, h - win), max(0.0, h - win)))
    # affine map source -> crop; pixels outside the image are glass
    m = np.array([[scale, 0, -ox * scale], [0, scale, -oy * scale]], np.float64)
    m[:, 2] += 0.5 * scale - 0.5  # continuous-coordinate convention (pixel centres at +0.5)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    if scale < 1:  # area-shrink first (warpAffine has no area filter), then place
        small = cv2.resize(
            f.rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp
        )
        sx, sy = small.shape[1] / w, small.shape[0] / h
        m2 = np.array([[scale / sx, 0, -ox * scale], [0, scale / sy, -oy * scale]], np.float64)
        m2[:, 2] += 0.5 * scale / sx - 0.5
        src, mm = small, m2
    else:
        src, mm = f.rgb, m
    bg = tuple(int(v) for v in np.clip(np.rint(f.background), 0, 255))
    rgb = cv2.warpAffine(
        src,
        mm,
        (crop, crop),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=bg,
    )
    xy = (f.xy - [ox, oy]) * scale
    inside = (xy[:, 0] > -8) & (xy[:, 0] < crop + 8) & (xy[:, 1] > -8) & (xy[:, 1] < crop + 8)
    mpp0 = float(model["mpp"])
    heat, tcls = point_targets(
        xy[inside],
        None if f.cls is None else f.cls[inside],
        (crop, crop),
        stride,
        float(model["heat_sigma_um"]) / mpp0,
        3.0 / mpp0,
    )
    vectors = np.stack([RUIFROK_H, RUIFROK_DAB])
    return rgb, heat, tcls, np.asarray(f.background, np.float32), vectors


@dataclass
class Sampler:
    """Draws augmented training crops from synthetic items and real fields.

    ``real_p`` is the probability that a crop comes from ``fields`` (when both are given).
    """

    model: dict[str, Any]
    augment: dict[str, Any]
    crop: int
    synthetic: list[dict[str, Any]] = field(default_factory=list)
    fields: list[Field] = field(default_factory=list)
    real_p: float = 0.5
    scale_jitter: tuple[float, float] = (1.0, 1.0)

    def one(self, rng: np.random.Generator):
        from .train import augment

        stride = int(self.model["output_stride"])
        use_real = bool(self.fields) and (not self.synthetic or rng.random() < self.real_p)
        if use_real:
            f = self.fields[int(rng.integers(len(self.fields)))]
            rgb, heat, tcls, bg, vec = field_crop(f, self.crop, self.model, rng, self.scale_jitter)
        else:
            item = self.synthetic[int(rng.integers(len(self.synthetic)))]
            rgb, heat, tcls, bg, vec = synthetic_crop(item, self.crop, stride, rng)
        rgb, told = augment(rgb, bg, vec, self.augment, rng)
        lowres_p = float(self.augment.get("lowres_p", 0.0))
        if lowres_p > 0 and rng.random() < lowres_p:
            rgb = _lowres(rgb, float(rng.uniform(*self.augment.get("lowres_factor", [1.5, 3.0]))))
        x = cnn.od_input(rgb, told, self.model.get("od_clip", [0.0, 2.5]))
        k = int(rng.integers(4))
        x, heat, tcls = (np.rot90(a, k) for a in (x, heat, tcls))
        if rng.random() < 0.5:
            x, heat, tcls = (a[:, ::-1] for a in (x, heat, tcls))
        return (
            np.ascontiguousarray(x.transpose(2, 0, 1)),
            np.ascontiguousarray(heat, dtype=np.float32),
            np.ascontiguousarray(tcls, dtype=np.int64),
        )

    def batch(self, n: int, rng: np.random.Generator):
        parts = [self.one(rng) for _ in range(n)]
        return tuple(np.stack(p) for p in zip(*parts))


def batches(
    sampler: Sampler, batch_size: int, seed: int, workers: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """An endless stream of batches; ``workers`` > 0 draws them in that many processes."""
    if workers <= 0:
        rng = np.random.default_rng([seed, 99])
        while True:
            yield sampler.batch(batch_size, rng)
    import torch

    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([seed, 99, info.id if info else 0])
            while True:
                yield sampler.batch(batch_size, rng)

    def _init(_worker: int) -> None:  # one thread each: the workers are the parallelism
        import cv2

        cv2.setNumThreads(1)
        torch.set_num_threads(1)

    loader = torch.utils.data.DataLoader(
        _Stream(),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=True,
        worker_init_fn=_init,
    )
    for b in loader:
        yield tuple(np.asarray(t) for t in b)


class Cancelled(Exception):
    """Raised inside :func:`fit` when ``cancel()`` returns True."""


def fit(
    model,
    stream: Iterator,
    *,
    steps: int,
    lr: float,
    device: str = "cpu",
    heat_weight: float = 4.0,
    class_weights: list[float] | None = None,
    max_minutes: float = 1e9,
    log: Callable[[str], None] = print,
    validate: Callable[[Any], float] | None = None,
    val_every: int = 0,
    patience: int = 0,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    warmup: float = 0.1,
    freeze_bn: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place (AdamW; warm-up, then cosine decay); returns a history dict.

    The learning-rate schedule follows the larger of the step and the time fraction, so a run
    cut short by ``max_minutes`` still ends with a small learning rate.

    With ``validate`` (model -> score, higher is better) and ``val_every``, the best state seen
    (the starting state included: a run that never improves returns it unchanged) is restored
    at the end, and training stops after ``patience`` validations without a gain
    (early stopping; 0 = never). ``cancel()`` is polled every step (raises :class:`Cancelled`);
    ``progress(step, steps, info)`` is called every step. ``freeze_bn`` keeps the BatchNorm
    statistics of the starting model (fine-tuning on a few small batches).
    """
    import copy

    import torch

    model.to(device=device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=float(lr), weight_decay=1e-4)
    total = max(1, int(steps))
    limit_s = float(max_minutes) * 60.0

    def set_lr(step: int) -> float:
        # warm-up then cosine decay over the run's progress: the larger of the step fraction
        # and the time fraction, so that a run cut by max_minutes still ends annealed
        p = max(step / total, (time.time() - t0) / limit_s)
        if p < warmup:
            f = (p + 1.0 / total) / warmup
        else:
            f = 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (p - warmup) / (1 - warmup))))
        for g in opt.param_groups:
            g["lr"] = float(lr) * min(1.0, f)
        return p

    cw = torch.tensor(class_weights or [0.5, 1.0, 2.0, 2.0], dtype=torch.float32, device=device)
    t0 = time.time()
    history: dict[str, Any] = {"val": [], "steps_done": 0, "stopped": "steps"}
    best, best_state, since = -math.inf, None, 0
    if validate is not None and val_every > 0:  # the starting point competes too
        model.eval()
        best = float(validate(model))
        best_state = copy.deepcopy(model.state_dict())
        history["val"].append((0, round(best, 4)))
        log(f"step 0: validation {best:.4f}")
    for step in range(int(steps)):
        if set_lr(step) >= 1.0:
            history["stopped"] = "max_minutes"
            log(f"stopping at step {step}: max_minutes {max_minutes} reached")
            break
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled at step {step}")
        model.train()
        if freeze_bn:
            for mod in model.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.eval()
        x, th, tcl = next(stream)
        xt = torch.as_tensor(x, device=device).contiguous(memory_format=torch.channels_last)
        th_t = torch.as_tensor(th, device=device)
        out = model(xt)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            out[:, 0], th_t, reduction="none"
        )
        loss_h = (bce * (1.0 + 9.0 * th_t)).mean()
        tcl_t = torch.as_tensor(tcl, device=device)
        if bool((tcl_t != IGNORE).any()):
            loss_c = torch.nn.functional.cross_entropy(out[:, 1:], tcl_t, cw, ignore_index=IGNORE)
        else:
            loss_c = out[:, 1:].sum() * 0.0
        loss = heat_weight * loss_h + loss_c
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["steps_done"] = step + 1
        info = {"loss": float(loss.item()) if step % 50 == 0 else None}
        if step % 100 == 0 or step == steps - 1:
            log(
                f"step {step}/{steps} loss {loss.item():.4f} (heat {loss_h.item():.4f} class "
                f"{loss_c.item():.4f}) lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f} s"
            )
        if (
            validate is not None
            and val_every > 0
            and ((step + 1) % val_every == 0 or step + 1 == steps)
        ):
            model.eval()
            score = float(validate(model))
            model.train()
            history["val"].append((step + 1, round(score, 4)))
            info["val"] = score
            log(f"step {step + 1}: validation {score:.4f}")
            if score > best:
                best, since = score, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since += 1
                if patience and since >= patience:
                    history["stopped"] = "early stopping"
                    if progress is not None:
                        progress(step + 1, steps, info)
                    break
        if progress is not None:
            progress(step + 1, steps, info)
    if best_state is not None:
        model.load_state_dict(best_state)
        history["best_val"] = round(best, 4)
    history["seconds"] = round(time.time() - t0, 1)
    model.eval()
    return history


def _field_at_model_scale(f: Field, model_mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(rgb, xy) of a field resampled to ``model_mpp`` (area down, linear up)."""
    import cv2

    scale = f.mpp / model_mpp
    if abs(scale - 1) < 1e-6:
        return f.rgb, f.xy
    h, w = f.rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    rgb = cv2.resize(f.rgb, size, interpolation=interp)
    return rgb, f.xy * np.array([size[0] / w, size[1] / h])


def field_scores(
    detector, fields: list[Field], thresholds, radius_um: float = 4.0
) -> dict[str, dict[str, float]]:
    """All-cell precision, recall and F1 of ``detector`` on real fields, pooled, per threshold.

    Each field is resampled to the detector's µm/px; predicted and true centres are matched
    one-to-one (Hungarian) within ``radius_um``.
    """
    from .train import match_count

    stride = int(detector.config["output_stride"])
    nms_px = max(1, round(float(detector.config["nms_radius_um"]) / (detector.mpp * stride)))
    outs = []
    for f in fields:
        rgb, xy = _field_at_model_scale(f, detector.mpp)
        outs.append((detector.heatmaps(rgb, f.background), rgb.shape, xy - 0.5))
    radius = radius_um / detector.mpp
    res = {}
    for thr in thresholds:
        tp = npred = ntruth = 0
        for (heat, prob), shape, txy in outs:
            cells = cnn.decode(
                heat,
                prob,
                threshold=float(thr),
                nms_radius_px=nms_px,
                stride=stride,
                height=shape[0],
                width=shape[1],
            )
            tp += len(match_count(cells[["x", "y"]].to_numpy(float), txy, radius))
            npred += len(cells)
            ntruth += len(txy)
        p, r = tp / max(npred, 1), tp / max(ntruth, 1)
        res[f"{float(thr):.2f}"] = {
            "precision": round(p, 4),
            "recall": round(r, 4),
            "f1": round(2 * p * r / max(p + r, 1e-9), 4),
            "n_pred": npred,
            "n_truth": ntruth,
        }
    return res
