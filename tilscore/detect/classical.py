"""A classical nucleus detector in the manner of QuPath's positive cell detection.

Steps, on the stain concentrations of :func:`tilscore.stain.deconvolve` (OD units):

1. signal = hematoxylin OD + ``dab_weight`` x DAB OD (positive nuclei and dense DAB rings hide
   the hematoxylin; QuPath offers the "optical density sum" for the same reason);
2. background subtraction: the signal minus its morphological opening with a disc of
   ``background_radius_um`` (8 µm), computed at half resolution (the background is smooth);
3. Gaussian smoothing with ``sigma_um`` (1.5 µm) and a threshold of ``threshold_od`` (0.1 OD),
   optionally raised to ``otsu_fraction`` x Otsu's threshold of the image (off by default:
   0.3 OD gives F1 0.85 instead of 0.78 on the packed synthetic tumour nests, but on the real
   DeepLIIF Ki67 tiles anything above 0.1 loses most nuclei);
4. seeds: local maxima of the smoothed signal plus a scaled distance to the foreground edge
   (the distance term splits touching nuclei at their neck, the intensity term favours dark
   centres); maxima closer than ``min_distance_um`` whose connecting segment has no neck are
   merged;
5. nuclei: each foreground pixel goes to its nearest seed within 10 µm, and is kept where the
   finely smoothed signal is at least half of its seed's
   (:func:`tilscore.cells.segment_nuclei`), which splits touching nuclei like a watershed on
   distance; nuclei outside ``min_area_um2``-``max_area_um2`` (10-400 µm²) are dropped;
6. a nucleus class from size, shape and darkness: elongated (major/minor axis > 2.2) ->
   "other"; area > ``tumour_area_um2`` (75 µm²) -> "tumour"; small and dark -> "immune"; small
   and pale (mean hematoxylin below half of the image's dark-nucleus level) -> "other"
   (macrophages, endothelium). Confidence grows with the peak's contrast above the threshold.

Everything runs as whole-image OpenCV/numpy passes; nothing loops over cells.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..cells import _check_conc, _check_mpp, segment_nuclei
from ..errors import ConfigError
from ..markers import MarkerRule, get_marker

DEFAULTS: dict[str, float] = {
    "dab_weight": 1.0,
    "background_radius_um": 8.0,
    "sigma_um": 1.5,
    "threshold_od": 0.1,
    "otsu_fraction": 0.0,
    "min_distance_um": 3.0,
    "distance_weight": 0.04,
    "min_area_um2": 10.0,
    "max_area_um2": 400.0,
    "max_radius_um": 10.0,
    "tumour_area_um2": 75.0,
    "elongation": 2.2,
}


def _params(params: dict[str, Any]) -> dict[str, float]:
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown classical detector option(s) {unknown}", hint=f"known: {sorted(DEFAULTS)}"
        )
    out = dict(DEFAULTS)
    for key, value in params.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"classical detector option {key} must be a number") from None
        if not math.isfinite(v) or v < 0:
            raise ConfigError(
                f"classical detector option {key} must be finite and non-negative, got {value!r}"
            )
        out[key] = v
    return out


def _disc(radius_px: float) -> np.ndarray:
    import cv2

    r = max(1, round(radius_px))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _background(signal: np.ndarray, radius_px: float) -> np.ndarray:
    """Morphological opening with a disc, at half resolution when the disc is large."""
    import cv2

    h, w = signal.shape
    if radius_px >= 6 and min(h, w) >= 8:
        small = cv2.resize(signal, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)
        opened = cv2.morphologyEx(small, cv2.MORPH_OPEN, _disc(radius_px / 2))
        return cv2.resize(opened, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.morphologyEx(signal, cv2.MORPH_OPEN, _disc(radius_px))


def _merge_close_peaks(xy: np.ndarray, score: np.ndarray, dist: np.ndarray, radius_px: float):
    """Drop the weaker of two peaks closer than ``radius_px`` unless a neck separates them."""
    from scipy.spatial import cKDTree

    if len(xy) < 2 or radius_px <= 0:
        return np.ones(len(xy), bool)
    pairs = cKDTree(xy).query_pairs(radius_px, output_type="ndarray")
    keep = np.ones(len(xy), bool)
    if len(pairs) == 0:
        return keep
    a, b = pairs[:, 0], pairs[:, 1]
    mid = np.round((xy[a] + xy[b]) / 2).astype(np.int64)
    d_mid = dist[mid[:, 1], mid[:, 0]]
    d_min = np.minimum(dist[xy[a, 1], xy[a, 0]], dist[xy[b, 1], xy[b, 0]])
    same = d_mid >= 0.75 * d_min  # no neck between them: one nucleus
    a, b = a[same], b[same]
    loser = np.where(score[a] >= score[b], b, a)
    # process strongest pairs first so that chains do not delete both ends
    order = np.argsort(-np.maximum(score[a], score[b]), kind="stable")
    for i in order:  # few pairs (duplicate maxima inside one nucleus)
        if keep[a[i]] and keep[b[i]]:
            keep[loser[i]] = False
    return keep


def detect_nuclei_classical(
    conc: np.ndarray,
    mpp: float,
    *,
    rule: MarkerRule | str | None = None,
    **params: Any,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Find nuclei in a deconvolved IHC image, QuPath style.

    Parameters
    ----------
    conc
        (H, W, 3) float32 hematoxylin, DAB, residual concentrations (OD units) from
        :func:`tilscore.stain.deconvolve`.
    mpp
        µm per px of ``conc`` (the defaults are meant for about 0.5 µm/px).
    rule
        Optional marker rule: for nuclear markers (``measure == "nucleus"``) the nucleus
        outlines include DAB (brown nuclei), for the others hematoxylin only (so that a DAB
        membrane ring is not taken for nucleus).
    **params
        Overrides of :data:`DEFAULTS`: ``dab_weight`` (DAB share of the detection signal),
        ``background_radius_um`` (µm), ``sigma_um`` (µm), ``threshold_od`` (OD),
        ``min_distance_um`` (µm), ``distance_weight`` (OD per µm of distance to the
        foreground edge in the seed score), ``min_area_um2``/``max_area_um2`` (µm²),
        ``max_radius_um`` (µm), ``tumour_area_um2`` (µm²), ``elongation`` (axis ratio),
        ``otsu_fraction`` (0 = fixed threshold).

    Returns
    -------
    centres : pandas.DataFrame
        x, y (px, centroid of the nucleus), confidence (0-1), cell_class, nucleus_area_um2;
        row i is label i + 1 of the label image.
    labels : numpy.ndarray
        (H, W) int32 nucleus labels (0 = none).
    """
    import cv2

    conc = _check_conc(conc)
    mpp = _check_mpp(mpp)
    p = _params(params)
    nuclear = rule is not None and get_marker(rule).measure == "nucleus"
    h, w = conc.shape[:2]
    hem = np.ascontiguousarray(conc[..., 0])
    dab = np.maximum(conc[..., 1], 0)
    signal = hem + np.float32(p["dab_weight"]) * dab
    np.nan_to_num(signal, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    signal = signal - _background(signal, p["background_radius_um"] / mpp)
    smooth = cv2.GaussianBlur(signal, (0, 0), max(p["sigma_um"] / mpp, 0.3))
    thr = p["threshold_od"]
    if p["otsu_fraction"] > 0:
        vals = smooth[smooth > thr]
        if vals.size > 64:
            from skimage.filters import threshold_otsu

            thr = max(
                thr,
                p["otsu_fraction"] * float(threshold_otsu(vals[:: max(1, vals.size // 200_000)])),
            )
    p["threshold_od"] = thr
    fg = (smooth > thr).astype(np.uint8)
    empty = (
        pd.DataFrame(
            {
                "x": np.zeros(0),
                "y": np.zeros(0),
                "confidence": np.zeros(0, np.float32),
                "cell_class": np.zeros(0, object),
                "nucleus_area_um2": np.zeros(0, np.float32),
            }
        ),
        np.zeros((h, w), np.int32),
    )
    if not fg.any():
        return empty
    dist = cv2.distanceTransform(fg, cv2.DIST_L2, 3)
    score = smooth + np.float32(p["distance_weight"] * mpp) * dist
    peak_r = max(1, round(0.5 * p["min_distance_um"] / mpp))
    local_max = cv2.dilate(score, _disc(peak_r))
    peaks = (score >= local_max) & (fg > 0)
    ys, xs = np.nonzero(peaks)
    xy = np.column_stack([xs, ys])
    keep = _merge_close_peaks(xy, score[ys, xs], dist, p["min_distance_um"] / mpp * 2)
    xy = xy[keep]
    if len(xy) == 0:
        return empty
    # nucleus outlines: finer smoothing of H (+ DAB for nuclear markers), background removed
    fine_src = hem + dab if nuclear else hem
    fine_src = fine_src - _background(fine_src, p["background_radius_um"] / mpp)
    fine = cv2.GaussianBlur(fine_src, (0, 0), max(0.75 / mpp, 0.3))
    fine = np.where(fg > 0, np.maximum(fine, 0.5 * p["threshold_od"]), fine).astype(np.float32)
    labels = segment_nuclei(
        xy.astype(np.float64) + 0.5,
        fine,
        mpp,
        max_radius_um=p["max_radius_um"],
        foreground_od=0.5 * p["threshold_od"],
    )
    n = len(xy)
    flat = labels.ravel()
    nz = np.flatnonzero(flat)
    lab = flat[nz]
    yy, xx = np.divmod(nz, w)
    xx, yy = xx.astype(np.float64), yy.astype(np.float64)

    def _sum(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(lab, weights=weights, minlength=n + 1)[1 : n + 1]

    count = _sum(None).astype(np.float64)
    area = count * mpp * mpp
    with np.errstate(invalid="ignore", divide="ignore"):
        sx = _sum(xx) / count
        sy = _sum(yy) / count
        sxx = _sum(xx * xx) / count - sx * sx
        syy = _sum(yy * yy) / count - sy * sy
        sxy = _sum(xx * yy) / count - sx * sy
        mean_h = _sum(hem.ravel()[nz].astype(np.float64)) / count
    tr, det = sxx + syy, sxx * syy - sxy * sxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-6)
    elong = np.sqrt(l1 / l2)
    ok = (area >= p["min_area_um2"]) & (area <= p["max_area_um2"])
    peak_val = smooth[xy[:, 1], xy[:, 0]]
    conf = 1.0 - np.exp(-(peak_val - p["threshold_od"]) / 0.15)
    dark_ref = np.quantile(mean_h[ok], 0.9) if ok.any() else 1.0
    cls = np.where(
        elong > p["elongation"],
        "other",
        np.where(
            area > p["tumour_area_um2"],
            "tumour",
            np.where(mean_h >= 0.5 * dark_ref, "immune", "other"),
        ),
    ).astype(object)
    idx = np.flatnonzero(ok)
    lut = np.zeros(n + 1, np.int32)
    lut[idx + 1] = np.arange(1, len(idx) + 1, dtype=np.int32)
    labels = lut[labels]
    centres = pd.DataFrame(
        {
            "x": sx[idx] + 0.5,
            "y": sy[idx] + 0.5,
            "confidence": np.clip(conf[idx], 0, 1).astype(np.float32),
            "cell_class": cls[idx],
            "nucleus_area_um2": area[idx].astype(np.float32),
        }
    )
    return centres, labels
