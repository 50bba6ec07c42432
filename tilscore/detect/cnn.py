"""A small CNN nucleus detector: nucleus-centre heatmap + nucleus class, with shipped weights.

The network (:func:`build_model`) is a four-level U-Net-like encoder/decoder whose first
convolution has stride 2: it reads an RGB tile at 0.5 µm/px as optical density and predicts, at
1 µm/px (half the input resolution),

* one nucleus-centre heatmap channel (sigmoid; Gaussian targets of sigma 1.5 µm), and
* four nucleus-class logits: background, "tumour", "immune", "other".

:class:`CNNDetector` turns peaks of the heatmap (max-pool non-maximum suppression, threshold)
into one row per cell with a confidence (the peak height) and the class with the largest mean
probability around the peak. Weights are ``models/<name>/model.safetensors`` beside a
``config.json`` (architecture, input scale and channels, decoding settings); nothing is ever
downloaded. torch is imported only here, never at ``import tilscore``.

Coordinates: ``x``, ``y`` are array-index coordinates of the input image (x = column): the
centre of pixel ``(row i, column j)`` is ``(x=j, y=i)``, so ``round(x)`` is the column holding
the centre. (The synthetic truth tables and :func:`tilscore.detect.detect_cells` use continuous
coordinates, ``index + 0.5``.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, TilscoreError

#: nucleus classes predicted by the network (index 0 of the logits is background)
CLASSES = ("tumour", "immune", "other")
#: synthetic ``cell_type`` -> nucleus class
CELL_TYPE_TO_CLASS = {
    "tumour": "tumour",
    "lymphocyte": "immune",
    "nk": "immune",
    "fibroblast": "other",
    "macrophage": "other",
    "nerve": "other",
}

#: architecture and decoding defaults (``config.json`` overrides each key)
DEFAULT_CONFIG: dict[str, Any] = {
    "architecture": "tiny-unet",
    "in_channels": 3,
    "widths": [16, 32, 64, 64],
    "n_classes": len(CLASSES) + 1,
    "classes": ["background", *CLASSES],
    "mpp": 0.5,
    "output_stride": 2,
    "input": "od-rgb",
    "od_clip": [0.0, 2.5],
    "default_background": [255.0, 255.0, 255.0],
    "heat_sigma_um": 1.5,
    "threshold": 0.35,
    "nms_radius_um": 2.5,
    "bf16": False,  # True, False or "auto" (see autocast_dtype); the shipped model: False
}

_MULTIPLE = 16  # the input size must be a multiple of this (stride 2 stem + 3 downsamplings)


# ------------------------------------------------------------------------------------------------
# model


#: oneDNN (torch's CPU convolutions) caches the primitives it builds for each input shape, up
#: to 1024 by default. Tiles cut to their tissue come in hundreds of shapes, and the cache grew
#: with the slide (about 0.25 GB more peak memory on a 4-gigapixel slide); the full-tile shape,
#: which repeats, stays cached with a few entries. A value the user set is kept.
_ONEDNN_CACHE = "16"


def _torch():
    # read by oneDNN when it first builds a primitive, so it must be set before the first
    # convolution; setdefault keeps a value from the user's environment
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", _ONEDNN_CACHE)
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        raise TilscoreError(
            "the CNN detector needs torch", hint="pip install torch, or use detector='classical'"
        ) from exc
    return torch


def select_device(device: str | None = None) -> str:
    """The torch device to run on: ``None`` or ``"auto"`` -> CUDA when present, else CPU.

    Raises
    ------
    ConfigError
        A CUDA device is asked for on a machine (or a torch build) without CUDA, or the device
        string is not one torch knows.
    """
    torch = _torch()
    if device is None or str(device).lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(str(device))
    except RuntimeError as exc:
        raise ConfigError(
            f"unknown torch device {device!r}: {exc}", hint="use 'auto', 'cpu' or 'cuda'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} asked for, but torch sees no CUDA GPU",
                hint="use device 'auto' or 'cpu', or install a CUDA build of torch",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)"
            )
    return str(dev)


def _cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX-512 BF16 or AMX)."""
    torch = _torch()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(device: str, bf16: bool | str = "auto"):
    """The autocast dtype of inference on ``device``, or ``None`` for plain float32.

    Parameters
    ----------
    device
        torch device string ("cpu", "cuda", "cuda:1").
    bf16
        ``True``: bfloat16; ``False``: float32; ``"auto"``: bfloat16 where the device computes
        it natively (a CUDA GPU with bf16 support, a CPU with AVX-512 BF16 or AMX), float32
        elsewhere. The shipped model's ``config.json`` says ``false``: bf16 is 2.3-2.5x faster
        for the network on an AMX CPU but changed a cell on the synthetic evaluation (see
        docs/performance.md).

    Returns
    -------
    torch.dtype or None
    """
    torch = _torch()
    if isinstance(bf16, str):
        if bf16.lower() != "auto":
            raise ConfigError(f"bf16 must be true, false or 'auto', got {bf16!r}")
        if torch.device(device).type == "cuda":
            native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else:
            native = _cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    return torch.bfloat16 if bf16 else None


def build_model(config: dict[str, Any] | None = None):
    """The detector network described by ``config`` (see :data:`DEFAULT_CONFIG`).

    Parameters
    ----------
    config
        Architecture keys: ``in_channels``, ``widths`` (channels at 1, 2, 4 and 8 µm/px for a
        0.5 µm/px input), ``n_classes`` (background included).

    Returns
    -------
    torch.nn.Module
        Maps (N, in_channels, H, W) float32 (H, W multiples of 16) to (N, 1 + n_classes,
        H / 2, W / 2): heatmap logit, then class logits.
    """
    torch = _torch()
    nn = torch.nn
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    widths = [int(w) for w in cfg["widths"]]
    if len(widths) < 2 or min(widths) < 1:
        raise ConfigError(f"widths must be positive channel counts, got {cfg['widths']}")

    def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    depth = [int(d) for d in cfg.get("depth", [1] * len(widths))]
    stride = int(cfg["output_stride"])
    head_level = round(math.log2(stride)) - 1  # level 0 is at stride 2
    if (
        len(depth) != len(widths)
        or not 0 <= head_level < len(widths)
        or 2 ** (head_level + 1) != stride
    ):
        raise ConfigError(f"bad architecture: widths {widths}, depth {depth}, stride {stride}")

    class TinyUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = widths
            cin = int(cfg["in_channels"])
            stages = []
            for i, wi in enumerate(w):
                layers = [block(cin if i == 0 else w[i - 1], wi, 2)]
                layers += [block(wi, wi) for _ in range(depth[i])]
                stages.append(nn.Sequential(*layers))
            self.down = nn.ModuleList(stages)
            levels = range(head_level, len(w) - 1)
            self.lateral = nn.ModuleList([nn.Conv2d(w[i + 1], w[i], 1) for i in levels])
            self.up = nn.ModuleList([block(w[i], w[i]) for i in levels])
            self.head = nn.Conv2d(w[head_level], 1 + int(cfg["n_classes"]), 1)

        def forward(self, x):
            skips = []
            for stage in self.down:
                x = stage(x)
                skips.append(x)
            for j in range(len(self.up) - 1, -1, -1):
                x = nn.functional.interpolate(self.lateral[j](x), scale_factor=2.0, mode="nearest")
                x = self.up[j](x + skips[head_level + j])
            # the 1x1 head always runs in float32: in bf16 its logits would be rounded to 8
            # mantissa bits, and equal neighbouring peaks would become duplicate detections
            with torch.autocast(x.device.type, enabled=False):
                return self.head(x.float())

    return TinyUNet()


def fuse_batchnorm(model) -> None:
    """Fold every BatchNorm that follows a bias-free convolution into it (inference only)."""
    torch = _torch()
    nn = torch.nn
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        if (
            len(children) == 3
            and isinstance(children[0], nn.Conv2d)
            and isinstance(children[1], nn.BatchNorm2d)
        ):
            conv, bn = children[0], children[1]
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                bias = bn.bias - bn.running_mean * scale
                conv.bias = nn.Parameter(bias.clone())
            module[1] = nn.Identity()


def save_weights(model, folder: str | Path, config: dict[str, Any]) -> str:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``; return the file's sha256."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = folder / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "architecture": config["architecture"]})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sha256_of(path)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_FOLDER_HINT = (
    "a model folder holds model.safetensors, config.json and metrics.json as written by "
    "tilscore finetune or tilscore.detect.train: copy the whole folder again, or reinstall "
    "tilscore for a shipped model"
)


def model_folder(name: str | Path) -> Path:
    """The folder of model ``name``: a shipped name ("default", "synthetic") or a path.

    Raises
    ------
    ConfigError
        Neither a shipped model nor a folder holding ``model.safetensors``.
    """
    folder = Path(name).expanduser()
    if (folder / "model.safetensors").is_file():
        return folder
    from tilscore.models import available_models, model_dir

    if str(name) in available_models():
        return model_dir(str(name))
    if folder.is_dir():
        raise ConfigError(
            "the model folder has no model.safetensors", path=folder, hint=_FOLDER_HINT
        )
    raise ConfigError(
        f"unknown model {str(name)!r}: not a shipped model nor a model folder",
        hint=f"Shipped models: {', '.join(available_models()) or 'none'}; or give the path of "
        "a folder written by tilscore finetune",
    )


def recorded_sha256(folder: str | Path) -> str | None:
    """The weights hash a model folder records (config.json, else metrics.json), or None."""
    folder = Path(folder)
    for name in ("config.json", "metrics.json"):
        try:
            sha = json.loads((folder / name).read_text()).get("weights_sha256")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if sha:
            return str(sha)
    return None


def check_model(name: str | Path) -> tuple[Path, str]:
    """Check a model without building it: its folder, config and weights hash.

    Returns
    -------
    (folder, sha256)

    Raises
    ------
    ConfigError
        Unknown name, no ``model.safetensors`` or ``config.json``, unreadable config, or
        weights that differ from the hash the folder records.
    """
    folder = model_folder(name)
    load_config(folder)
    weights = folder / "model.safetensors"
    sha = sha256_of(weights)
    recorded = recorded_sha256(folder)
    if recorded is not None and recorded != sha:
        raise ConfigError(
            f"the weights' sha256 {sha[:12]}… differs from the {recorded[:12]}… recorded "
            "in the folder: the weights were changed or only partly copied",
            path=weights,
            hint=_FOLDER_HINT,
        )
    return folder, sha


def load_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder merged over :data:`DEFAULT_CONFIG`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError("the model folder has no config.json", path=folder, hint=_FOLDER_HINT)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read the model config: {exc}", path=path, hint=_FOLDER_HINT
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError("the model config is not a JSON object", path=path, hint=_FOLDER_HINT)
    data.pop("weights_sha256", None)
    return {**DEFAULT_CONFIG, **data}


# ------------------------------------------------------------------------------------------------
# input


def od_input(
    rgb: np.ndarray,
    background: Sequence[float] | np.ndarray | None = None,
    clip: Sequence[float] = (0.0, 2.5),
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Network input: optical density ``-log10(max(I, 1) / I0)`` per RGB channel, clipped.

    Parameters
    ----------
    rgb
        (H, W, 3) uint8 RGB.
    background
        Glass intensity ``I0`` (R, G, B) in 8-bit units; ``None`` = 255.
    clip
        (low, high) OD bounds.
    out
        Optional (H, W, 3) float32 array to write into (may be a view of a larger image whose
        rows are contiguous, such as the top-left corner of a padded batch).

    Returns
    -------
    numpy.ndarray
        (H, W, 3) float32 (``out`` where given).
    """
    import cv2

    bg = np.full(3, 255.0) if background is None else np.asarray(background, np.float64)
    if bg.shape != (3,) or not np.all(np.isfinite(bg)) or np.any(bg <= 1):
        raise ConfigError(f"background must be 3 finite intensities > 1, got {background!r}")
    from ..stain import _od_lut

    lut = np.clip(_od_lut(bg), clip[0], clip[1])  # the stain separation's OD table, clipped
    rgb = np.ascontiguousarray(rgb)
    if out is None:
        return cv2.LUT(rgb, lut)
    if out.shape != rgb.shape or out.dtype != np.float32:
        raise ConfigError(f"out must be float32 of shape {rgb.shape}, got {out.dtype} {out.shape}")
    result = cv2.LUT(rgb, lut, dst=out)
    if result is not out and not np.shares_memory(result, out):  # pragma: no cover - OpenCV
        out[...] = result  # a binding that allocated instead of writing into ``out``
    return out


def _check_rgb(rgb: Any) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise TilscoreError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint16:
        a = (a // 257).astype(np.uint8)
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and np.nanmax(a, initial=0.0) <= 1.0:
            a = np.clip(np.nan_to_num(a) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            raise TilscoreError(
                f"expected a uint8 RGB image, got dtype {a.dtype}", hint="convert to uint8 first"
            )
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise TilscoreError(f"empty image of shape {a.shape}")
    return a


# ------------------------------------------------------------------------------------------------
# decoding


def decode(
    heat: np.ndarray,
    class_prob: np.ndarray,
    *,
    threshold: float,
    nms_radius_px: int,
    stride: int,
    height: int,
    width: int,
) -> pd.DataFrame:
    """Cells from one heatmap: local maxima above ``threshold``, refined to sub-pixel.

    Parameters
    ----------
    heat
        (h, w) float32 sigmoid heatmap at ``stride`` input px per pixel.
    class_prob
        (n_classes, h, w) float32 class probabilities (background first).
    threshold
        Smallest peak height kept (0-1).
    nms_radius_px
        Peaks closer than this (heatmap px, Chebyshev) to a higher one are dropped.
    stride
        Input px per heatmap px.
    height, width
        Input image size in px (cells outside are dropped).

    Returns
    -------
    pandas.DataFrame
        x, y (input px, array-index coordinates), confidence, cell_class.
    """
    from scipy import ndimage

    size = 2 * int(nms_radius_px) + 1
    local_max = ndimage.maximum_filter(heat, size=size, mode="constant", cval=0.0)
    peaks = (heat >= local_max) & (heat >= threshold)
    rows, cols = np.nonzero(peaks)
    h, w = heat.shape
    if rows.size:
        # 3x3 weighted centroid (clipped at the border) for sub-pixel centres
        offs = np.array([-1, 0, 1])
        rr = np.clip(rows[:, None, None] + offs[None, :, None], 0, h - 1)
        cc = np.clip(cols[:, None, None] + offs[None, None, :], 0, w - 1)
        patch = heat[rr, cc]
        patch = np.maximum(patch - patch.min(axis=(1, 2), keepdims=True), 0) + 1e-6
        tot = patch.sum(axis=(1, 2))
        dy = (patch * offs[None, :, None]).sum(axis=(1, 2)) / tot
        dx = (patch * offs[None, None, :]).sum(axis=(1, 2)) / tot
        probs = class_prob[1:, rr, cc].mean(axis=(2, 3))  # (classes, n)
        cls = np.asarray(CLASSES, dtype=object)[np.argmax(probs, axis=0)]
        conf = heat[rows, cols]
        x = (cols + 0.5 + dx) * stride - 0.5  # heatmap px j covers input [s*j, s*j + s)
        y = (rows + 0.5 + dy) * stride - 0.5
    else:
        x = y = conf = np.zeros(0, np.float64)
        cls = np.zeros(0, dtype=object)
    keep = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    return pd.DataFrame(
        {
            "x": x[keep].astype(np.float64),
            "y": y[keep].astype(np.float64),
            "confidence": conf[keep].astype(np.float32),
            "cell_class": pd.Series(cls[keep], dtype=object),
        }
    )


# ------------------------------------------------------------------------------------------------
# detector


@dataclass
class CNNDetector:
    """A loaded nucleus detector; use :meth:`load`.

    Attributes
    ----------
    model
        The torch module (BatchNorm folded, eval mode, channels-last).
    config
        Merged ``config.json``.
    name
        Model name (folder under ``tilscore.models``) or path.
    sha256
        Hex sha256 of the weights file (provenance; record it with results).
    device
        torch device string.
    """

    model: Any
    config: dict[str, Any]
    name: str
    sha256: str
    device: str = "cpu"

    @property
    def mpp(self) -> float:
        """µm/px the network expects its input at."""
        return float(self.config["mpp"])

    @property
    def threshold(self) -> float:
        """Default heatmap threshold of :meth:`predict`."""
        return float(self.config["threshold"])

    @classmethod
    def load(cls, name: str | Path = "default", device: str | None = None) -> CNNDetector:
        """Load shipped weights (no network access, ever).

        Parameters
        ----------
        name
            A model name under ``tilscore.models`` (``"default"``, ``"synthetic"``), or a
            folder holding ``model.safetensors`` and ``config.json`` (:func:`model_folder`).
            The weights must match the sha256 the folder records (config.json or
            metrics.json), else :class:`~tilscore.errors.ConfigError`.
        device
            "cpu", "cuda", "cuda:1" ...; ``None`` or "auto": CUDA when available, else CPU
            (:func:`select_device`). Inference runs in float32, or in bfloat16 autocast where
            ``config.json`` sets ``"bf16": true`` (or ``"auto"``: where the device computes it
            natively; :func:`autocast_dtype`).
        """
        torch = _torch()
        from safetensors.torch import load_file

        folder, sha = check_model(name)
        config = load_config(folder)
        weights = folder / "model.safetensors"
        device = select_device(device)
        model = build_model(config)
        try:
            state = load_file(str(weights))
            model.load_state_dict(state)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the model weights: {exc}", path=weights, hint=_FOLDER_HINT
            ) from exc
        model.eval()
        fuse_batchnorm(model)
        model = model.to(device=device, memory_format=torch.channels_last)
        return cls(model, config, str(name), sha, str(device))

    # -- inference --------------------------------------------------------------------------------

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) float32 OD (H, W multiples of 16) -> heat (N, h, w), probs (N, C, h, w)."""
        torch = _torch()
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype(self.device, self.config.get("bf16", False))
        dev_type = torch.device(self.device).type
        with (
            torch.inference_mode(),
            torch.autocast(dev_type, dtype or torch.bfloat16, enabled=dtype is not None),
        ):
            out = self.model(x).float()
            heat = torch.sigmoid(out[:, 0])
            prob = torch.softmax(out[:, 1:], dim=1)
        return heat.cpu().numpy(), prob.cpu().numpy()

    def _prepare(self, arrays: Sequence[np.ndarray], background, shape: tuple[int, int]):
        """(N, H, W, 3) float32 OD of RGB images padded to ``shape`` with glass (OD 0).

        Each image's OD is written straight into the batch (no per-image copy, no stacking).
        """
        bg = self.config["default_background"] if background is None else background
        exact = all(a.shape[:2] == tuple(shape) for a in arrays)
        batch = (np.empty if exact else np.zeros)((len(arrays), *shape, 3), np.float32)
        for a, dst in zip(arrays, batch):
            od_input(a, bg, self.config["od_clip"], out=dst[: a.shape[0], : a.shape[1]])
        return batch

    def predict(
        self,
        rgb: np.ndarray,
        background: Sequence[float] | np.ndarray | None = None,
        *,
        threshold: float | None = None,
    ) -> tuple[pd.DataFrame, np.ndarray | None]:
        """Detect nuclei in one RGB image at :attr:`mpp` µm/px.

        Parameters
        ----------
        rgb
            (H, W, 3) uint8 RGB at ``self.mpp`` µm/px, any size (padded internally with glass).
        background
            Glass intensity ``I0`` (R, G, B) of the slide (8-bit units), e.g. from
            :func:`tilscore.stain.estimate_background` on a thumbnail; ``None`` = 255.
        threshold
            Heatmap peak threshold (0-1); default ``self.threshold`` (tuned on synthetic
            validation tiles).

        Returns
        -------
        cells : pandas.DataFrame
            x, y (px in ``rgb``, array indices: x = column, pixel centres at integers),
            confidence (peak height, 0-1), cell_class ("tumour", "immune", "other").
        nuclei : None
            This model predicts no nucleus masks; :func:`tilscore.cells.measure_cells`
            segments them.
        """
        return self.predict_batch([rgb], background, threshold=threshold)[0]

    def predict_batch(
        self,
        tiles: Sequence[np.ndarray],
        background: Sequence[float] | np.ndarray | None = None,
        *,
        threshold: float | None = None,
        batch_size: int = 8,
    ) -> list[tuple[pd.DataFrame, np.ndarray | None]]:
        """:meth:`predict` for many tiles, run through the network in batches.

        Tiles are batched with others of the same padded size, so each result equals
        :meth:`predict` on that tile.
        """
        thr = self.threshold if threshold is None else float(threshold)
        if not math.isfinite(thr) or not 0.0 < thr < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold!r}")
        stride = int(self.config["output_stride"])
        nms_px = max(1, round(float(self.config["nms_radius_um"]) / (self.mpp * stride)))
        arrays = [_check_rgb(t) for t in tiles]
        bs = max(1, int(batch_size))
        results: list[tuple[pd.DataFrame, np.ndarray | None]] = [None] * len(arrays)  # type: ignore[list-item]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):  # same padded shape -> same result as predict()
            groups.setdefault(_padded_shape(a.shape), []).append(i)
        for shape, idx in groups.items():
            for start in range(0, len(idx), bs):
                chunk = idx[start : start + bs]
                batch = self._prepare([arrays[i] for i in chunk], background, shape)
                heat, prob = self._forward(batch)
                for k, i in enumerate(chunk):
                    if _is_flat(arrays[i]):  # e.g. all black: its border would look like a nucleus
                        results[i] = (
                            decode(
                                heat[k],
                                prob[k],
                                threshold=1.0,
                                nms_radius_px=1,
                                stride=stride,
                                height=0,
                                width=0,
                            ),
                            None,
                        )
                        continue
                    cells = decode(
                        heat[k],
                        prob[k],
                        threshold=thr,
                        nms_radius_px=nms_px,
                        stride=stride,
                        height=arrays[i].shape[0],
                        width=arrays[i].shape[1],
                    )
                    results[i] = (_drop_saturated(cells, batch[k]), None)
        return results

    def heatmaps(
        self, rgb: np.ndarray, background: Sequence[float] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs for one image: heat (h, w) and class probabilities (C, h, w) at 1/stride."""
        a = _check_rgb(rgb)
        heat, prob = self._forward(self._prepare([a], background, _padded_shape(a.shape)))
        s = int(self.config["output_stride"])
        h, w = -(-a.shape[0] // s), -(-a.shape[1] // s)
        return heat[0, :h, :w], prob[0, :, :h, :w]


def _drop_saturated(cells: pd.DataFrame, od: np.ndarray, max_od: float = 2.0) -> pd.DataFrame:
    """Drop cells centred on near-black pixels (mean OD of R, G, B over 5x5 px above ``max_od``).

    No stained nucleus absorbs 99 % of the light in every channel; black ink, scanner
    artefacts and their corners against glass do, and would otherwise look like nuclei.
    """
    if len(cells) == 0:
        return cells
    # sample only the 5x5 windows around the centres (edge pixels repeated), not the whole image
    r = np.rint(cells["y"].to_numpy()).astype(int)[:, None] + np.arange(-2, 3)[None, :]
    c = np.rint(cells["x"].to_numpy()).astype(int)[:, None] + np.arange(-2, 3)[None, :]
    r = np.clip(r, 0, od.shape[0] - 1)
    c = np.clip(c, 0, od.shape[1] - 1)
    mean = od[r[:, :, None], c[:, None, :]].mean(axis=(1, 2, 3))
    return cells[mean <= max_od].reset_index(drop=True)


def _is_flat(rgb: np.ndarray, tolerance: int = 12) -> bool:
    """True for an image without contrast (all pixels within ``tolerance`` grey levels)."""
    return int(rgb.max()) - int(rgb.min()) <= tolerance


def _padded_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(H, W) rounded up to the network's multiple."""
    return (-(-shape[0] // _MULTIPLE) * _MULTIPLE, -(-shape[1] // _MULTIPLE) * _MULTIPLE)


def count_parameters(model) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _quiet_estimate_background(rgb: np.ndarray) -> np.ndarray:
    """estimate_background without the fallback warning (255 where no glass is visible)."""
    from tilscore.errors import TilscoreWarning
    from tilscore.stain import estimate_background

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)
        return estimate_background(rgb)
