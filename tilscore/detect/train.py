"""Train the CNN nucleus detector on synthetic tiles and real labelled fields (reproducible).

    python -m tilscore.detect.train --config models/default/train.toml [--out models/default]

Steps: render a pool of synthetic tiles (random marker, µm/px, densities and appearance; seeds
from the config) with nucleus-centre and nucleus-class targets; train with heavy stain, scale,
blur, noise and JPEG augmentation; tune the heatmap threshold on held-out synthetic validation
tiles (separate seeds); write ``model.safetensors``, ``config.json`` and ``metrics.json``.

Everything random follows ``seed`` in the config; the pool is cached under ``cache_dir``
(default ``/tmp/tilscore-train``) keyed by the pool settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import cnn

CLASS_INDEX = {c: i + 1 for i, c in enumerate(cnn.CLASSES)}


# ------------------------------------------------------------------------------------------------
# config


def load_train_config(path: str | Path) -> dict[str, Any]:
    """Read the training TOML (sections: model, pool, augment, train, validation)."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        return tomllib.load(f)


# ------------------------------------------------------------------------------------------------
# targets


def make_targets(
    cells, shape: tuple[int, int], mpp: float, model_mpp: float, stride: int, sigma_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap and class targets at ``stride`` for a truth table of a render at ``mpp``.

    The Gaussian sigma is ``sigma_um`` at the model's nominal scale (in model px, so a render
    at another µm/px is a scale augmentation); a pixel belongs to the nucleus of the nearest
    centre when within its radius (+ half an output px).
    """
    from scipy.spatial import cKDTree

    from .fit import gaussian_windows

    h, w = shape[0] // stride, shape[1] // stride
    heat = np.zeros((h, w), np.float32)
    cls = np.zeros((h, w), np.uint8)
    if len(cells) == 0:
        return heat, cls
    x = cells["x"].to_numpy(float) / stride - 0.5
    y = cells["y"].to_numpy(float) / stride - 0.5
    sigma = sigma_um / (model_mpp * stride)
    for _, rs, cs, d2 in gaussian_windows(x, y, sigma, (h, w)):
        g = np.exp(-d2 / (2 * sigma**2)).astype(np.float32)
        np.maximum(heat[rs, cs], g, out=heat[rs, cs])
    tree = cKDTree(np.c_[x, y])
    gy, gx = np.mgrid[0:h, 0:w]
    dist, idx = tree.query(np.c_[gx.ravel(), gy.ravel()], k=1)
    radius = cells["nucleus_diameter_um"].to_numpy(float) / 2 / mpp / stride + 0.5
    labels = np.array([CLASS_INDEX[cnn.CELL_TYPE_TO_CLASS[t]] for t in cells["cell_type"]])
    inside = dist <= radius[idx]
    cls.ravel()[inside] = labels[idx[inside]]
    return heat, cls


# ------------------------------------------------------------------------------------------------
# pool


def _render_spec(cfg: dict[str, Any], seed: int, rng: np.random.Generator) -> dict[str, Any]:
    pool = cfg["pool"]
    markers = pool.get("markers", ["CD8", "CD68", "CD56"])
    marker = str(markers[rng.integers(len(markers))])
    mpp = float(rng.uniform(*pool.get("mpp_range", [0.4, 0.65])))
    lym = float(rng.choice([0.3, 1.0, 2.0, 4.0]))
    over = {
        "tissue_fraction": float(rng.choice([1.0, 1.0, 0.85, 0.6])),
        "tumour_bed_fraction": float(rng.uniform(0.2, 1.0)),
        "nest_fraction": float(rng.uniform(0.15, 0.75)),
        "fibroblast_density_per_mm2": float(rng.uniform(500, 2500)),
        "tumour_cell_spacing_um": float(rng.uniform(12.0, 20.0)),
        "immune_clustering": float(rng.uniform(0.3, 1.2)),
        "hue_jitter_deg": float(rng.uniform(2.0, 10.0)),
        "lymphocyte_density_per_mm2": {
            "tumour": 80.0 * lym,
            "stroma": 600.0 * lym,
            "margin": 450.0 * lym,
            "outside": 60.0 * lym,
        },
        "nerve_count": int(rng.choice([0, 0, 1, 2])) if marker == "CD56" else int(rng.integers(2)),
    }
    return {"marker": marker, "mpp": mpp, "seed": int(seed), "overrides": over}


def render_one(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Render one pool tile (size ``pool.render_px``) and its targets."""
    from tilscore.synthetic import SyntheticSlideSpec, make_layout, render_region

    rng = np.random.default_rng([int(cfg["seed"]), seed, 7])
    r = _render_spec(cfg, seed, rng)
    size = int(cfg["pool"]["render_px"])
    spec = SyntheticSlideSpec(
        marker=r["marker"], width_px=size, height_px=size, mpp=r["mpp"], seed=seed
    )
    try:
        layout = make_layout(spec, **r["overrides"])
    except IndexError:  # the generator finds no room for a nerve in a small tile
        layout = make_layout(spec, **{**r["overrides"], "nerve_count": 0})
    rgb = render_region(layout, 0, 0, size, size, r["mpp"])
    cells = layout.truth()
    m = cfg["model"]
    heat, cls = make_targets(
        cells, rgb.shape[:2], r["mpp"], m["mpp"], m["output_stride"], m["heat_sigma_um"]
    )
    s = layout.spec
    return {
        "rgb": rgb,
        "heat": heat.astype(np.float16),
        "cls": cls,
        "background": np.asarray(s.background, np.float32),
        "vectors": np.asarray(s.stain_vectors, np.float32),
        "marker": r["marker"],
        "mpp": r["mpp"],
    }


def generator_hash() -> str:
    """sha256 (12 hex) of the synthetic generator's source: the pool depends on it."""
    import tilscore.synthetic as syn

    h = hashlib.sha256()
    for name in ("layout.py", "render.py", "write.py"):
        h.update((Path(syn.__file__).parent / name).read_bytes())
    return h.hexdigest()[:12]


def build_pool(cfg: dict[str, Any], log) -> list[dict[str, Any]]:
    """Render (or load from the cache) the training pool."""
    pool = cfg["pool"]
    key = json.dumps(
        {
            "pool": pool,
            # only what the targets depend on (not the architecture)
            "model": {k: cfg["model"].get(k) for k in ("mpp", "output_stride", "heat_sigma_um")},
            "seed": cfg["seed"],
            "generator": generator_hash(),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache = Path(cfg.get("cache_dir", "/tmp/tilscore-train")) / f"pool-{digest}.npz"
    n = int(pool["n_renders"])
    seeds = [int(pool["seed_start"]) + i for i in range(n)]
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("rgb", "heat", "cls", "background", "vectors")}
        log(f"pool: loaded {n} renders from {cache}")
        return [{k: v[i] for k, v in arrays.items()} for i in range(n)]
    t0 = time.time()
    workers = int(cfg.get("train", {}).get("workers", 0))
    if workers > 1:  # render in processes (each render is independent and seeded)
        import multiprocessing as mp
        from functools import partial

        with mp.get_context("fork").Pool(workers) as procs:
            items = procs.map(partial(render_one, cfg), seeds, chunksize=4)
    else:
        items = []
        for i, s in enumerate(seeds):
            items.append(render_one(cfg, s))
            if (i + 1) % 50 == 0:
                log(f"pool: {i + 1}/{n} renders ({time.time() - t0:.0f} s)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        cache,
        **{k: np.stack([it[k] for it in items]) for k in ("rgb", "heat", "cls", "background")},
        vectors=np.stack([it["vectors"] for it in items]),
    )
    log(f"pool: rendered {n} in {time.time() - t0:.0f} s, cached at {cache}")
    return items


# ------------------------------------------------------------------------------------------------
# augmentation


def _rotate(v: np.ndarray, max_deg: float, rng: np.random.Generator) -> np.ndarray:
    v = v / np.linalg.norm(v)
    d = rng.normal(size=3)
    d -= d.dot(v) * v
    d /= np.linalg.norm(d)
    ang = math.radians(max_deg) * rng.uniform(-1, 1)
    out = np.abs(v * math.cos(ang) + d * math.sin(ang))
    return out / np.linalg.norm(out)


def _stain_basis(h: np.ndarray, dab: np.ndarray) -> np.ndarray:
    r = np.cross(h, dab)
    r = np.abs(r) / np.linalg.norm(r)
    return np.stack([h, dab, r])


def augment(
    rgb: np.ndarray,
    background: np.ndarray,
    vectors: np.ndarray,
    aug: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-stain, re-light, blur, add noise and JPEG-compress one crop.

    Returns the augmented RGB (uint8) and the I0 the model is told (a slightly wrong estimate
    of the new glass brightness, or 255).
    """
    import cv2

    h, w = rgb.shape[:2]
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / background[None, None, :])
    basis = _stain_basis(vectors[0].astype(np.float64), vectors[1].astype(np.float64))
    conc = od.reshape(-1, 3) @ np.linalg.inv(basis).astype(np.float32)
    conc[:, 0] *= rng.uniform(*aug["h_scale"])
    conc[:, 1] *= rng.uniform(*aug["dab_scale"])
    conc[:, 2] *= rng.uniform(0.0, 1.5)
    if rng.random() < aug["nuclear_dab_p"]:  # brown nuclei (Ki67, FOXP3 ...) in patches
        field = rng.uniform(0, 1, (4, 4)).astype(np.float32)
        field = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC).reshape(-1)
        field = np.clip((field - rng.uniform(0.2, 0.6)) * 3.0, 0, 1) * rng.uniform(0.4, 1.0)
        hc = np.maximum(conc[:, 0], 0)
        conc[:, 1] += field * hc * rng.uniform(0.6, 1.6)
        conc[:, 0] -= 0.7 * field * hc
    spread = float(aug.get("dab_spread_p", 0.0))
    if spread > 0 and rng.random() < spread:  # DAB filling whole cells (hides the nucleus)
        dab = conc[:, 1].reshape(h, w)
        halo = cv2.GaussianBlur(np.maximum(dab, 0), (0, 0), rng.uniform(1.0, 3.0))
        conc[:, 1] = (dab + halo * rng.uniform(0.5, 2.0)).reshape(-1)
    new_basis = _stain_basis(
        _rotate(basis[0], aug["hue_deg"], rng), _rotate(basis[1], aug["hue_deg"], rng)
    ).astype(np.float32)
    od2 = np.clip((conc @ new_basis).reshape(h, w, 3), -0.1, 3.0)
    base = rng.uniform(*aug["background"])
    i0 = np.clip(base + rng.uniform(-6, 6, 3), 200, 255).astype(np.float32)
    light = i0 * np.power(np.float32(10.0), -od2)
    if rng.random() < aug["blur_p"]:
        light = cv2.GaussianBlur(light, (0, 0), rng.uniform(*aug["blur_sigma_px"]))
    light += rng.normal(0, rng.uniform(*aug["noise_sigma"]), light.shape).astype(np.float32)
    out = np.clip(np.rint(light), 0, 255).astype(np.uint8)
    if rng.random() < aug["jpeg_p"]:
        q = int(rng.integers(aug["jpeg_quality"][0], aug["jpeg_quality"][1] + 1))
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [1, q])
        if ok:
            out = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if rng.random() < aug["white_background_p"]:
        told = np.full(3, 255.0, np.float32)
    else:
        told = np.clip(i0 * rng.uniform(0.97, 1.02, 3), 150, 255).astype(np.float32)
    return out, told


# validation


def match_count(pred_xy: np.ndarray, truth_xy: np.ndarray, radius: float) -> np.ndarray:
    """One-to-one matches (Hungarian) within ``radius``: (k, 2) index pairs."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    if len(pred_xy) == 0 or len(truth_xy) == 0:
        return np.zeros((0, 2), int)
    tree = cKDTree(truth_xy)
    pairs = tree.query_ball_point(pred_xy, radius)
    big = 1e6
    cost = np.full((len(pred_xy), len(truth_xy)), big)
    for i, js in enumerate(pairs):
        if js:
            js = np.asarray(js)
            cost[i, js] = np.hypot(*(pred_xy[i][:, None] - truth_xy[js].T))
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < big
    return np.c_[r[ok], c[ok]]


def validation_tiles(cfg: dict[str, Any]):
    """Held-out synthetic tiles: (marker, rgb, truth, background) per seed in the config."""
    from tilscore.synthetic import synthetic_tile

    v = cfg["validation"]
    out = []
    for marker in v["markers"]:
        for seed in v["seeds"]:
            over = {}
            if seed % 2:  # half of them with stroma and glass, as on a real slide
                over = {"tumour_bed_fraction": 0.5, "tissue_fraction": 0.8}
            try:
                rgb, truth = synthetic_tile(
                    marker, int(v["tile_px"]), mpp=0.5, seed=int(seed), **over
                )
            except IndexError:  # the generator finds no room for a nerve: drop the stroma option
                rgb, truth = synthetic_tile(
                    marker, int(v["tile_px"]), mpp=0.5, seed=int(seed), nerve_count=0
                )
            out.append((marker, rgb, truth))
    return out


def score(detector, tiles, thresholds, radius_um: float = 4.0) -> dict[str, Any]:
    """F1 per marker and threshold, class accuracy of matched cells, at each threshold."""
    from tilscore.stain import estimate_background

    res: dict[str, Any] = {}
    outs = []
    for marker, rgb, truth in tiles:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bg = estimate_background(rgb)
        outs.append((marker, detector.heatmaps(rgb, bg), rgb.shape, truth))
    stride = int(detector.config["output_stride"])
    nms_px = max(1, round(float(detector.config["nms_radius_um"]) / (detector.mpp * stride)))
    radius = radius_um / detector.mpp
    for thr in thresholds:
        per: dict[str, list[float]] = {}
        for marker, (heat, prob), shape, truth in outs:
            cells = cnn.decode(
                heat,
                prob,
                threshold=thr,
                nms_radius_px=nms_px,
                stride=stride,
                height=shape[0],
                width=shape[1],
            )
            t_xy = truth[["x", "y"]].to_numpy(float) - 0.5  # truth: continuous coordinates
            m = match_count(cells[["x", "y"]].to_numpy(float), t_xy, radius)
            tcls = np.array([cnn.CELL_TYPE_TO_CLASS[c] for c in truth["cell_type"]], dtype=object)
            correct = int(np.sum(cells["cell_class"].to_numpy()[m[:, 0]] == tcls[m[:, 1]]))
            acc = per.setdefault(marker, [0, 0, 0, 0])
            acc[0] += len(m)
            acc[1] += len(cells)
            acc[2] += len(truth)
            acc[3] += correct
        table = {}
        for marker, (tp, npred, ntruth, correct) in per.items():
            p = tp / max(npred, 1)
            r = tp / max(ntruth, 1)
            table[marker] = {
                "precision": round(p, 4),
                "recall": round(r, 4),
                "f1": round(2 * p * r / max(p + r, 1e-9), 4),
                "class_accuracy": round(correct / max(tp, 1), 4),
                "n_truth": ntruth,
            }
        res[f"{thr:.2f}"] = table
    return res


# ------------------------------------------------------------------------------------------------
# speed


def measure_speed(
    detector, size_px: int = 1024, repeats: int = 5, seed: int = 920001
) -> dict[str, Any]:
    """End-to-end :meth:`CNNDetector.predict` megapixels/s on a synthetic tile (fp32 and bf16).

    Includes the OD input, padding, the network and peak decoding; 2 torch threads. Also counts
    the network alone. CPU time per megapixel is reported too (robust to other load).
    """
    import os

    import torch

    from tilscore.synthetic import synthetic_tile

    torch.set_num_threads(2)
    rgb, _ = synthetic_tile("CD8", size_px, mpp=0.5, seed=seed)
    mp = rgb.shape[0] * rgb.shape[1] / 1e6
    out: dict[str, Any] = {"tile_px": size_px, "threads": 2, "repeats": repeats}
    saved = detector.config.get("bf16", False)
    try:
        for name, bf in (("fp32", False), ("bf16", True)):
            detector.config["bf16"] = bf
            detector.predict(rgb)  # warm-up
            t, c = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                detector.predict(rgb)
            wall = (time.perf_counter() - t) / repeats
            cpu = (time.process_time() - c) / repeats
            x = np.zeros((1, *rgb.shape), np.float32)
            detector._forward(x)
            t = time.perf_counter()
            for _ in range(repeats):
                detector._forward(x)
            net = (time.perf_counter() - t) / repeats
            out[name] = {
                "predict_mp_per_s": round(mp / wall, 2),
                "network_only_mp_per_s": round(mp / net, 2),
                "cpu_seconds_per_mp": round(cpu / mp, 3),
            }
    finally:
        detector.config["bf16"] = saved
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    return out


# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# real labelled fields (EndoNuke: CC BY 4.0, may be trained on with attribution)


def endonuke_fields(folder: str | Path, hundreds: list[int], *, keep: bool, mpp: float):
    """EndoNuke tiles as :class:`~tilscore.detect.fit.Field` objects.

    ``keep=True``: the tiles whose ``id // 100`` is in ``hundreds``; ``keep=False``: all others.
    Points are integer pixel indices in the source (centres at +0.5); their class (stroma,
    epithelium, other) is not mapped to the network's classes (class loss ignored).
    """
    from PIL import Image

    from .fit import Field

    folder = Path(folder)
    out = []
    for img in sorted((folder / "images").glob("*.png"), key=lambda p: int(p.stem)):
        if (int(img.stem) // 100 in hundreds) != keep:
            continue
        lab = np.loadtxt(folder / "labels" / f"{img.stem}.txt", ndmin=2).reshape(-1, 3)
        rgb = np.asarray(Image.open(img).convert("RGB"))
        bg = cnn._quiet_estimate_background(rgb)
        out.append(Field(rgb, mpp, lab[:, :2] + 0.5, name=f"endonuke/{img.stem}", background=bg))
    return out


# ------------------------------------------------------------------------------------------------
# training


def _pick_threshold(syn: dict[str, Any], real: dict[str, Any] | None) -> str:
    """Threshold maximising the mean synthetic F1 (and the real training fields' F1, averaged)."""

    def syn_f1(k):
        return float(np.mean([v["f1"] for v in syn[k].values()]))

    if real is None:
        return max(syn, key=syn_f1)
    return max(syn, key=lambda k: 0.5 * syn_f1(k) + 0.5 * real[k]["f1"])


def train(cfg: dict[str, Any], out: Path, log) -> dict[str, Any]:
    """Run the whole training; returns the metrics written to ``metrics.json``.

    ``[train] device`` ("cpu", "cuda", "auto") and ``workers`` (crop-drawing processes) set
    where it runs; ``[real]`` adds real labelled fields (EndoNuke) to the synthetic pool, with
    the ``val_hundreds`` id range held out and scored.
    """
    import torch

    from . import fit

    torch.manual_seed(int(cfg["seed"]))
    tc = cfg["train"]
    torch.set_num_threads(int(tc.get("threads", 2)))
    device = cnn.select_device(tc.get("device", "cpu"))
    t_start = time.time()
    pool = build_pool(cfg, log)
    t_pool = time.time() - t_start
    real_cfg = cfg.get("real", {})
    fields, val_fields = [], []
    if real_cfg.get("endonuke"):
        hundreds = [int(h) for h in real_cfg.get("val_hundreds", [])]
        mpp = float(real_cfg.get("mpp", 0.5))
        fields = endonuke_fields(real_cfg["endonuke"], hundreds, keep=False, mpp=mpp)
        val_fields = endonuke_fields(real_cfg["endonuke"], hundreds, keep=True, mpp=mpp)
        log(f"real: {len(fields)} EndoNuke training tiles, {len(val_fields)} held out {hundreds}")
    model_cfg = {**cnn.DEFAULT_CONFIG, **cfg["model"]}
    model = cnn.build_model(model_cfg)
    n_params = cnn.count_parameters(model)
    log(f"model: {n_params} parameters, {model_cfg['widths']} depth {model_cfg.get('depth')}")
    sampler = fit.Sampler(
        model=model_cfg,
        augment=cfg["augment"],
        crop=int(tc["crop_px"]),
        synthetic=pool,
        fields=fields,
        real_p=float(real_cfg.get("real_p", 0.5)),
        scale_jitter=tuple(real_cfg.get("scale_jitter", [1.0, 1.0])),
    )
    stream = fit.batches(
        sampler, int(tc["batch_size"]), int(cfg["seed"]), int(tc.get("workers", 0))
    )
    hist = fit.fit(
        model,
        stream,
        steps=int(tc["steps"]),
        lr=float(tc["lr"]),
        device=device,
        heat_weight=float(tc.get("heat_weight", 4.0)),
        class_weights=tc.get("class_weights"),
        max_minutes=float(tc.get("max_minutes", 1e9)),
        log=log,
    )
    t_train = hist["seconds"]
    model = model.to("cpu")
    model_cfg = dict(model_cfg)
    sha = cnn.save_weights(model, out, model_cfg)
    detector = cnn.CNNDetector.load(out, device=device)
    thresholds = [float(t) for t in cfg["validation"]["thresholds"]]
    res = score(detector, validation_tiles(cfg), thresholds)
    real_train = fit.field_scores(detector, fields, thresholds) if fields else None
    best = _pick_threshold(res, real_train)
    model_cfg["threshold"] = float(best)
    sha = cnn.save_weights(model, out, model_cfg)
    metrics = {
        "weights_sha256": sha,
        "parameters": n_params,
        "steps_done": hist["steps_done"],
        "device": device,
        "pool_seconds": round(t_pool, 1),
        "train_seconds": round(t_train, 1),
        "threshold": float(best),
        "synthetic_generator_sha256_12": generator_hash(),
        "synthetic_validation": {
            "seeds": cfg["validation"]["seeds"],
            "tile_px": cfg["validation"]["tile_px"],
            "radius_um": 4.0,
            "per_marker": res[best],
            "by_threshold_mean_f1": {
                k: round(float(np.mean([m["f1"] for m in v.values()])), 4) for k, v in res.items()
            },
        },
    }
    if fields:
        val = fit.field_scores(detector, val_fields, thresholds)
        metrics["endonuke"] = {
            "mpp_assumed": float(real_cfg.get("mpp", 0.5)),
            "val_hundreds": real_cfg.get("val_hundreds", []),
            "n_train_tiles": len(fields),
            "n_val_tiles": len(val_fields),
            "train_by_threshold": real_train,
            "val_by_threshold": val,
            "val_at_threshold": val[best],
        }
        log(f"EndoNuke validation at {best}: {json.dumps(val[best])}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"threshold {best}: {json.dumps(res[best])}")
    log(f"wrote {out} (sha256 {sha}); train {t_train:.0f} s, pool {t_pool:.0f} s")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m tilscore.detect.train", description=__doc__)
    ap.add_argument("--config", required=True, help="training TOML (models/default/train.toml)")
    ap.add_argument("--out", default=None, help="output folder (default: the config's folder)")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (smoke runs)")
    ap.add_argument("--renders", type=int, default=None, help="override pool.n_renders")
    ap.add_argument("--device", default=None, help="override train.device (cpu, cuda, auto)")
    ap.add_argument("--workers", type=int, default=None, help="override train.workers")
    ap.add_argument("--max-minutes", type=float, default=None, help="override train.max_minutes")
    ap.add_argument("--endonuke", default=None, help="override real.endonuke (folder)")
    ap.add_argument(
        "--speed",
        action="store_true",
        help="only measure the model in --out: MP/s fp32 vs bf16 and bf16 accuracy (metrics.json)",
    )
    args = ap.parse_args(argv)
    cfg = load_train_config(args.config)
    if args.steps is not None:
        cfg["train"]["steps"] = args.steps
    if args.renders is not None:
        cfg["pool"]["n_renders"] = args.renders
    if args.device is not None:
        cfg["train"]["device"] = args.device
    if args.workers is not None:
        cfg["train"]["workers"] = args.workers
    if args.max_minutes is not None:
        cfg["train"]["max_minutes"] = args.max_minutes
    if args.endonuke is not None:
        cfg.setdefault("real", {})["endonuke"] = args.endonuke
    out = Path(args.out) if args.out else Path(args.config).parent

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.speed:
        detector = cnn.CNNDetector.load(out, device="cpu")
        res = {"speed": measure_speed(detector)}
        tiles = validation_tiles(cfg)
        for bf in (False, True):
            detector.config["bf16"] = bf
            table = score(detector, tiles, [detector.threshold])
            res[f"synthetic_validation_{'bf16' if bf else 'fp32'}"] = next(iter(table.values()))
        path = out / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        metrics.update(res)
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        log(json.dumps(res, indent=2))
        return 0
    train(cfg, out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
