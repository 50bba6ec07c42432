"""The cells table, and the per-cell measurements a marker rule reads.

:func:`measure_cells` takes nucleus centres (from any detector) and the deconvolved image, finds
each nucleus (or takes a given label image), grows each cell around its nucleus up to
``rule.expansion_um`` while stopping where neighbouring cells meet (every pixel belongs to the
nearest nucleus, as QuPath's cell expansion does), and measures the mean hematoxylin and DAB
optical density of each compartment:

==============  =====================================================================
nucleus         the nucleus
membrane        a ring ``rule.membrane_width_um`` wide just outside the nucleus
cytoplasm       the cell minus its nucleus
cell            nucleus and cytoplasm
surround        a band 1-4 µm beyond the membrane ring (still nearest to this cell);
                brown surroundings mark extended DAB structures such as nerves
==============  =====================================================================

Everything is vectorised: two OpenCV distance transforms with nearest-pixel labels and a few
``numpy.bincount`` calls over the whole image, whatever the number of cells.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, check_positive
from .markers import CELL_CLASSES, MarkerRule, get_marker

#: the cells table: column -> dtype, in order (required ones first)
CELL_COLUMNS: dict[str, str] = {
    "x": "float64",
    "y": "float64",
    "x_um": "float64",
    "y_um": "float64",
    "confidence": "float32",
    "cell_class": "object",
    "nucleus_area_um2": "float32",
    "h_od_nucleus": "float32",
    "dab_od_nucleus": "float32",
    "dab_od_membrane": "float32",
    "dab_od_cytoplasm": "float32",
    "dab_od_cell": "float32",
    "positive": "bool",
    "intensity_bin": "int8",
}
#: measured columns beyond the required ones (kept when present)
OPTIONAL_COLUMNS: dict[str, str] = {"dab_od_surround": "float32", "cell_area_um2": "float32"}

_NUCLEUS_MAX_RADIUS_UM = 10.0  # largest nucleus radius searched around a centre
_SMOOTH_SIGMA_UM = 0.75  # smoothing of the segmentation signal
_FOREGROUND_OD = 0.08  # absolute floor of a nucleus pixel's smoothed OD
_PEAK_FRACTION = 0.5  # a nucleus pixel is at least this fraction of its centre's OD
_SURROUND_UM = (1.0, 4.0)  # surround band beyond the membrane ring, µm


def validate_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Check a cells table and return it with every :data:`CELL_COLUMNS` column and dtype.

    Missing optional columns are added: ``x_um``/``y_um`` and measurements as NaN,
    ``confidence`` 1, ``cell_class`` "other", ``positive`` False, ``intensity_bin`` 0.
    Extra columns are kept after the standard ones.

    Raises
    ------
    ConfigError
        Missing or non-finite x/y, unknown cell classes, intensity bins outside 0-3.
    """
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"cells must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in ("x", "y") if c not in df.columns]
    if missing:
        raise ConfigError(f"cells table lacks column(s) {missing}", hint="give x and y in px")
    out = df.copy()
    n = len(out)
    defaults: dict[str, Any] = {
        "confidence": 1.0,
        "cell_class": "other",
        "positive": False,
        "intensity_bin": 0,
    }
    for col, dtype in CELL_COLUMNS.items():
        if col not in out.columns:
            out[col] = np.full(n, defaults.get(col, np.nan), dtype=dtype)
    try:
        for col, dtype in {**CELL_COLUMNS, **OPTIONAL_COLUMNS}.items():
            if col not in out.columns or col == "cell_class":
                continue
            if col == "positive" and not pd.api.types.is_bool_dtype(out[col]):
                if out[col].isna().any():
                    raise ConfigError("cells column positive has missing values")
                if not pd.api.types.is_numeric_dtype(out[col]):
                    raise ConfigError("cells column positive must be boolean")
            if out[col].dtype != dtype:  # columns already right are not copied again
                out[col] = out[col].astype(dtype)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cells column {col} cannot be {dtype}: {exc}") from None
    if not (np.isfinite(out["x"]).all() and np.isfinite(out["y"]).all()):
        raise ConfigError("cells table has NaN or infinite x/y")
    cls = out["cell_class"].astype(object)
    try:  # a few distinct values: check those, not every row
        kinds = pd.unique(cls.dropna().to_numpy())
    except TypeError:  # unhashable values
        kinds = pd.unique(cls.dropna().astype(str).to_numpy())
    bad = sorted({str(v) for v in kinds} - set(CELL_CLASSES))
    if bad or cls.isna().any():
        raise ConfigError(
            f"unknown cell_class value(s) {bad or ['<missing>']}", hint=f"use {CELL_CLASSES}"
        )
    if not all(type(v) is str for v in kinds):
        cls = cls.astype(str).astype(object)
    out["cell_class"] = cls
    ib = out["intensity_bin"]
    if ((ib < 0) | (ib > 3)).any():
        raise ConfigError("intensity_bin must be 0-3")
    extra = [c for c in out.columns if c not in CELL_COLUMNS]
    return out[list(CELL_COLUMNS) + extra].reset_index(drop=True)


def _check_conc(conc: Any) -> np.ndarray:
    if not isinstance(conc, np.ndarray) or conc.ndim != 3 or conc.shape[2] != 3:
        shape = getattr(conc, "shape", None)
        raise ConfigError(
            f"expected stain concentrations of shape (H, W, 3), got {shape}",
            hint="pass tilscore.stain.deconvolve(rgb)",
        )
    if conc.dtype != np.float32:
        conc = conc.astype(np.float32)
    return conc


def _check_mpp(mpp: Any) -> float:
    return check_positive(mpp, "mpp (µm per px)")


def nearest_label(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to and label of the nearest labelled pixel, for every pixel.

    Parameters
    ----------
    labels
        (H, W) int label image, 0 = background.

    Returns
    -------
    dist : numpy.ndarray
        (H, W) float32 Euclidean distance in px to the nearest labelled pixel (0 on labels).
    nearest : numpy.ndarray
        (H, W) int32 label of that pixel (0 where the image holds no label at all).
    """
    import cv2

    fg = labels > 0
    if not fg.any():
        return np.full(labels.shape, np.inf, np.float32), np.zeros(labels.shape, np.int32)
    src = np.logical_not(fg).view(np.uint8)  # 0 on labels, 1 elsewhere (no int64 temporary)
    dist, idx = cv2.distanceTransformWithLabels(
        src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE, labelType=cv2.DIST_LABEL_PIXEL
    )
    lut = np.zeros(int(idx.max()) + 1, np.int32)
    lut[idx[fg]] = labels[fg]
    return dist, lut[idx]


def segment_nuclei(
    centres_xy: np.ndarray,
    signal: np.ndarray,
    mpp: float,
    *,
    max_radius_um: float = _NUCLEUS_MAX_RADIUS_UM,
    foreground_od: float = _FOREGROUND_OD,
    peak_fraction: float = _PEAK_FRACTION,
) -> np.ndarray:
    """Nucleus label image grown from centres on a (smoothed) OD signal.

    Each pixel goes to its nearest centre (neighbour-limited, like a watershed on distance)
    within ``max_radius_um``, and is kept when its OD is at least ``foreground_od`` and at least
    ``peak_fraction`` of the OD at its centre; the centre pixel itself is always kept.

    Parameters
    ----------
    centres_xy
        (n, 2) x, y in px.
    signal
        (H, W) float32 smoothed nuclear OD (hematoxylin, plus DAB for nuclear markers).
    mpp
        µm per px.
    max_radius_um
        Largest nucleus radius in µm.
    foreground_od, peak_fraction
        Absolute (OD) and relative floors of a nucleus pixel.

    Returns
    -------
    numpy.ndarray
        (H, W) int32 labels, label i + 1 = centre i (0 = no nucleus).
    """
    h, w = signal.shape
    n = len(centres_xy)
    labels = np.zeros((h, w), np.int32)
    if n == 0:
        return labels
    cx = np.clip(np.floor(centres_xy[:, 0]).astype(np.int64), 0, w - 1)
    cy = np.clip(np.floor(centres_xy[:, 1]).astype(np.int64), 0, h - 1)
    labels[cy, cx] = np.arange(1, n + 1, dtype=np.int32)  # duplicates: the last one wins
    dist, near = nearest_label(labels)
    peak = np.zeros(n + 1, np.float32)
    peak[1:] = signal[cy, cx]
    floor = np.maximum(foreground_od, peak_fraction * peak).astype(np.float32)
    keep = (dist <= max_radius_um / mpp) & (signal >= floor[near])
    out = np.where(keep, near, 0).astype(np.int32)
    out[cy, cx] = labels[cy, cx]
    return out


def _means(labels: np.ndarray, values: list[np.ndarray], n: int) -> tuple[np.ndarray, list]:
    """Pixel counts and per-label means of ``values`` over labels 1..n (NaN where empty)."""
    flat = labels.ravel()
    inside = np.flatnonzero(flat)  # labelled pixels only: most of a tile is not in a region
    flat = flat[inside]
    counts = np.bincount(flat, minlength=n + 1)[: n + 1].astype(np.float64)
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for v in values:
            s = np.bincount(flat, weights=v.ravel()[inside], minlength=n + 1)[: n + 1]
            out.append((s / counts)[1:])
    return counts[1:], out


def measure_cells(
    centres: pd.DataFrame,
    conc: np.ndarray,
    mpp: float,
    rule: MarkerRule | str,
    nuclei: np.ndarray | None = None,
) -> pd.DataFrame:
    """Segment (or take) nuclei, expand them into cells and measure H and DAB per compartment.

    Parameters
    ----------
    centres
        Table with x, y (px in ``conc``), and optionally confidence and cell_class.
    conc
        (H, W, 3) float32 hematoxylin, DAB, residual concentrations (OD units) from
        :func:`tilscore.stain.deconvolve` of the same image.
    mpp
        µm per px of ``conc``.
    rule
        Marker rule (or name): ``expansion_um`` and ``membrane_width_um`` set the cell and
        ring; a nuclear marker adds the DAB OD to the segmentation signal (brown nuclei).
    nuclei
        Optional (H, W) int label image, label i + 1 = row i of ``centres``; otherwise nuclei
        are segmented here from the centres (:func:`segment_nuclei`, bounded at 10 µm radius).

    Returns
    -------
    pandas.DataFrame
        The cells table (:data:`CELL_COLUMNS` plus ``dab_od_surround``), one row per centre in
        the same order; ``x_um = x * mpp``. ``positive`` and ``intensity_bin`` are left False/0:
        call :func:`tilscore.markers.classify_cells`. Compartments without pixels (a cell
        squeezed by its neighbours) give NaN.
    """
    import cv2

    rule = get_marker(rule)
    conc = _check_conc(conc)
    mpp = _check_mpp(mpp)
    table = validate_cells(centres)
    n = len(table)
    h, w = conc.shape[:2]
    if n == 0:
        out = table.copy()
        out["dab_od_surround"] = np.zeros(0, np.float32)
        out["cell_area_um2"] = np.zeros(0, np.float32)
        return validate_cells(out)
    hem = np.ascontiguousarray(conc[..., 0])
    dab = np.ascontiguousarray(conc[..., 1])
    if nuclei is None:
        signal = hem + dab if rule.measure == "nucleus" else hem.copy()
        sigma = _SMOOTH_SIGMA_UM / mpp
        signal = cv2.GaussianBlur(signal, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        xy = table[["x", "y"]].to_numpy(np.float64)
        nuclei = segment_nuclei(xy, signal, mpp)
    else:
        if not isinstance(nuclei, np.ndarray) or nuclei.shape != (h, w):
            raise ConfigError(
                f"nuclei must be an int label image of shape {(h, w)}, "
                f"got {getattr(nuclei, 'shape', None)}"
            )
        if not np.issubdtype(nuclei.dtype, np.integer):
            raise ConfigError(f"nuclei must be an integer label image, got {nuclei.dtype}")
        nuclei = np.where((nuclei > 0) & (nuclei <= n), nuclei, 0).astype(np.int32)
    dist, near = nearest_label(nuclei)
    exp_px = rule.expansion_um / mpp
    mem_px = rule.membrane_width_um / mpp
    outer = dist > 0
    cyto = np.where(outer & (dist <= exp_px), near, 0)
    ring = np.where(outer & (dist <= min(mem_px, exp_px)), near, 0)
    s0, s1 = mem_px + _SURROUND_UM[0] / mpp, mem_px + _SURROUND_UM[1] / mpp
    surround = np.where((dist > s0) & (dist <= s1), near, 0)
    n_area, (h_nuc, d_nuc) = _means(nuclei, [hem, dab], n)
    _, (d_ring,) = _means(ring, [dab], n)
    n_cyto, (d_cyto,) = _means(cyto, [dab], n)
    _, (d_sur,) = _means(surround, [dab], n)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = n_area + n_cyto
        d_cell = (np.nan_to_num(d_nuc) * n_area + np.nan_to_num(d_cyto) * n_cyto) / total
    out = table.copy()
    out["x_um"] = out["x"] * mpp
    out["y_um"] = out["y"] * mpp
    out["nucleus_area_um2"] = n_area * mpp * mpp
    out["h_od_nucleus"] = h_nuc
    out["dab_od_nucleus"] = d_nuc
    out["dab_od_membrane"] = d_ring
    out["dab_od_cytoplasm"] = d_cyto
    out["dab_od_cell"] = d_cell
    out["dab_od_surround"] = d_sur
    # nucleus + expansion (limited by neighbours): the area a positive cell covers
    out["cell_area_um2"] = (n_area + n_cyto) * mpp * mpp
    out["positive"] = False
    out["intensity_bin"] = 0
    return validate_cells(out)
