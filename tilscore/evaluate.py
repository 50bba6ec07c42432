"""Evaluation of detected cells against labelled cells: one-to-one matching within a radius.

Every predicted cell is matched to at most one true cell and vice versa (Hungarian assignment,
:func:`scipy.optimize.linear_sum_assignment`, minimising the total distance among pairs closer
than the radius), so two predictions near one true cell give one true positive and one false
positive.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError


def _xy(points: Any, what: str) -> np.ndarray:
    if isinstance(points, pd.DataFrame):
        missing = [c for c in ("x", "y") if c not in points.columns]
        if missing:
            raise ConfigError(f"{what} table lacks column(s) {missing}")
        points = points[["x", "y"]].to_numpy(np.float64)
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ConfigError(f"{what} points must be an (n, 2) array of x, y, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ConfigError(f"{what} points contain NaN or infinite coordinates")
    return arr


def match_points(pred_xy: Any, truth_xy: Any, radius_px: float) -> np.ndarray:
    """One-to-one matching of predicted to true points within a radius.

    Parameters
    ----------
    pred_xy, truth_xy
        (n, 2) and (m, 2) arrays of x, y in px (or tables with x and y columns).
    radius_px
        Largest distance in px of a matched pair (inclusive).

    Returns
    -------
    numpy.ndarray
        (k, 2) int64 index pairs (prediction row, truth row), sorted by prediction; the pairing
        maximises the number of matches and, among those, minimises the total distance.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    radius = float(radius_px)
    if not math.isfinite(radius) or radius < 0:
        raise ConfigError(f"radius_px must be a finite non-negative number, got {radius_px!r}")
    p, t = _xy(pred_xy, "predicted"), _xy(truth_xy, "truth")
    empty = np.zeros((0, 2), np.int64)
    if len(p) == 0 or len(t) == 0:
        return empty
    pairs = cKDTree(p).sparse_distance_matrix(cKDTree(t), radius, output_type="ndarray")
    if len(pairs) == 0:
        return empty
    pi, ti, dist = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    # Solve each connected group of candidate pairs separately (small dense problems).
    n_p = len(p)
    graph = csr_array((np.ones(len(pi)), (pi, ti + n_p)), shape=(n_p + len(t),) * 2)
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[pi]
    order = np.argsort(pair_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
    out = []
    # Cost: distance, plus a large constant for forbidden (out-of-radius) pairs; a real pair
    # also earns a bonus larger than any distance so that the number of matches is maximised.
    big = 1e6 * (radius + 1.0)
    for group in np.split(order, bounds):
        gp, gp_inv = np.unique(pi[group], return_inverse=True)
        gt, gt_inv = np.unique(ti[group], return_inverse=True)
        if len(gp) == 1 or len(gt) == 1:
            best = np.argmin(dist[group])
            out.append((gp[gp_inv[best]], gt[gt_inv[best]]))
            continue
        cost = np.full((len(gp), len(gt)), big)
        cost[gp_inv, gt_inv] = dist[group] - 2 * (radius + 1.0) * len(gp)
        rows, cols = linear_sum_assignment(cost)
        ok = cost[rows, cols] < big
        out.extend(zip(gp[rows[ok]], gt[cols[ok]]))
    res = np.asarray(out, dtype=np.int64).reshape(-1, 2)
    return res[np.argsort(res[:, 0], kind="stable")]


def _in_roi(df: pd.DataFrame, roi: Any) -> np.ndarray:
    x = df["x"].to_numpy(np.float64)
    y = df["y"].to_numpy(np.float64)
    if isinstance(roi, np.ndarray):
        if roi.ndim != 2:
            raise ConfigError(f"roi mask must be 2-D (H, W) bool, got shape {roi.shape}")
        mask = roi.astype(bool, copy=False)
        col = np.floor(x).astype(np.int64)
        row = np.floor(y).astype(np.int64)
        inside = (col >= 0) & (row >= 0) & (col < mask.shape[1]) & (row < mask.shape[0])
        out = np.zeros(len(df), bool)
        out[inside] = mask[row[inside], col[inside]]
        return out
    try:
        import shapely
    except ImportError:  # pragma: no cover - shapely is a dependency
        raise ConfigError("roi geometries need shapely") from None
    if not isinstance(roi, shapely.Geometry):
        raise ConfigError(
            f"roi must be a bool mask or a shapely geometry, got {type(roi).__name__}"
        )
    return shapely.contains_xy(roi, x, y) if len(df) else np.zeros(0, bool)


def _positive(df: pd.DataFrame, what: str) -> np.ndarray:
    if "positive" not in df.columns:
        raise ConfigError(f"{what} table lacks a `positive` column")
    col = df["positive"]
    if not (pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col)):
        col = col.map(lambda v: str(v).strip().lower() in ("true", "1", "yes", "positive", "pos"))
    return col.fillna(False).to_numpy(dtype=bool)


def _prf(tp: int, n_pred: int, n_truth: int) -> dict[str, float]:
    precision = tp / n_pred if n_pred else float("nan")
    recall = tp / n_truth if n_truth else float("nan")
    f1 = 2 * tp / (n_pred + n_truth) if n_pred + n_truth else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1}


def evaluate_cells(
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    radius_px: float,
    *,
    truth_positive_only: bool = False,
    roi: Any = None,
) -> dict[str, Any]:
    """Detection and positivity metrics of predicted cells against true cells.

    Parameters
    ----------
    pred, truth
        Tables with x, y (px, same coordinates) and ``positive``.
    radius_px
        Matching radius in px (e.g. 4 µm / µm per px).
    truth_positive_only
        The truth lists positive cells only (e.g. LYON19): the all-cells metrics and the
        % positive are then not computed (reported as None).
    roi
        Restrict both tables to a region: a bool mask (H, W) indexed by pixel (x = column), or a
        shapely geometry in the same px coordinates. ``None``: everything.

    Returns
    -------
    dict
        Flat JSON-able dict: ``n_pred``, ``n_truth``, ``tp``, ``fp``, ``fn``, ``precision``,
        ``recall``, ``f1`` (all cells), the same prefixed ``pos_`` for positive cells (positive
        predictions matched to positive truth), ``pct_positive_pred``, ``pct_positive_truth``
        and ``pct_positive_error`` (percentage points, pred - truth), and ``radius_px``.
        Undefined ratios (no cells) are NaN.
    """
    radius = float(radius_px)
    for what, df in (("predicted", pred), ("truth", truth)):
        if not isinstance(df, pd.DataFrame):
            raise ConfigError(f"{what} cells must be a pandas DataFrame, got {type(df).__name__}")
    if roi is not None:
        pred = pred.loc[_in_roi(pred, roi)]
        truth = truth.loc[_in_roi(truth, roi)]
    p_xy, t_xy = _xy(pred, "predicted"), _xy(truth, "truth")
    p_pos, t_pos = _positive(pred, "predicted"), _positive(truth, "truth")
    out: dict[str, Any] = {"radius_px": radius, "truth_positive_only": bool(truth_positive_only)}
    if truth_positive_only:
        out.update(
            {k: None for k in ("n_pred", "n_truth", "tp", "fp", "fn", "precision", "recall")}
        )
        out["f1"] = None
    else:
        pairs = match_points(p_xy, t_xy, radius)
        tp = len(pairs)
        out.update(n_pred=len(p_xy), n_truth=len(t_xy), tp=tp)
        out.update(fp=len(p_xy) - tp, fn=len(t_xy) - tp)
        out.update(_prf(tp, len(p_xy), len(t_xy)))
    pp, tt = p_xy[p_pos], t_xy[t_pos]
    pos_tp = len(match_points(pp, tt, radius))
    out.update(pos_n_pred=len(pp), pos_n_truth=len(tt), pos_tp=pos_tp)
    out.update(pos_fp=len(pp) - pos_tp, pos_fn=len(tt) - pos_tp)
    out.update({f"pos_{k}": v for k, v in _prf(pos_tp, len(pp), len(tt)).items()})
    pct_pred = 100.0 * len(pp) / len(p_xy) if len(p_xy) else float("nan")
    if truth_positive_only:
        pct_truth = None
        err = None
    else:
        pct_truth = 100.0 * len(tt) / len(t_xy) if len(t_xy) else float("nan")
        err = pct_pred - pct_truth
    out.update(pct_positive_pred=pct_pred, pct_positive_truth=pct_truth, pct_positive_error=err)
    return out


def to_jsonable(value: Any) -> Any:
    """``value`` ready for ``json.dump``: NaN and infinities as None, numpy scalars and arrays as
    Python numbers and lists, tuples as lists, through nested dicts and lists."""
    if isinstance(value, dict):
        return {key: to_jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_table(metrics: dict[str, Any], title: str = "tilscore evaluate") -> str:
    """A plain-text table of :func:`evaluate_cells` metrics (all cells, positive cells, %)."""

    def fmt(v: Any, pct: bool = False) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return f"{v:.1f}" if pct else f"{v:.3f}"

    head = ("cells", "n_pred", "n_truth", "TP", "FP", "FN", "precision", "recall", "F1")
    rows = []
    for label, pre in (("all", ""), ("positive", "pos_")):
        rows.append(
            (
                label,
                *(fmt(metrics.get(pre + k)) for k in ("n_pred", "n_truth", "tp", "fp", "fn")),
                *(fmt(metrics.get(pre + k)) for k in ("precision", "recall", "f1")),
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(
        "% positive: pred {}  truth {}  error {} points (radius {} px)".format(
            fmt(metrics.get("pct_positive_pred"), True),
            fmt(metrics.get("pct_positive_truth"), True),
            fmt(metrics.get("pct_positive_error"), True),
            fmt(metrics.get("radius_px"), True),
        )
    )
    return "\n".join(lines)


def evaluate_tables(
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    radius_um: float = 4.0,
    mpp: float | None = None,
    *,
    truth_positive_only: bool = False,
    names: tuple[str, str] = ("predicted", "truth"),
) -> dict[str, Any]:
    """:func:`evaluate_cells` for two cells tables as read from files (``tilscore evaluate``).

    Both tables are matched in µm: from their ``x_um, y_um`` columns when both have them,
    else from ``x, y`` in px times ``mpp``.

    Parameters
    ----------
    pred, truth
        Cells tables (``x, y`` or ``x_um, y_um``, and ``positive``).
    radius_um
        Matching radius (µm).
    mpp
        Pixel size (µm/px) of ``x, y`` when a table lacks µm columns.
    truth_positive_only
        The truth lists positive cells only.
    names
        How errors name the two tables.

    Returns
    -------
    dict
        JSON-able metrics (NaN as None), plus ``radius_um`` and the tables' names.
    """
    if not (radius_um > 0 and math.isfinite(radius_um)):
        raise ConfigError(f"radius_um must be a positive number of µm, got {radius_um!r}")
    tables = []
    for df, name in zip((pred, truth), names):
        if {"x_um", "y_um"} <= set(df.columns) and mpp is None:
            xy = df[["x_um", "y_um"]].to_numpy(float)
        elif {"x", "y"} <= set(df.columns):
            if mpp is None:
                raise ConfigError(
                    "the table has x, y in px but no x_um, y_um",
                    path=name,
                    hint="Pass the pixel size (--mpp) to convert px to µm",
                )
            xy = df[["x", "y"]].to_numpy(float) * float(mpp)
        else:
            raise ConfigError("the table has no x, y (px) or x_um, y_um columns", path=name)
        if "positive" not in df.columns:
            raise ConfigError("the table has no 'positive' column", path=name)
        tables.append(pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "positive": df["positive"]}))
    metrics = evaluate_cells(
        tables[0], tables[1], radius_um, truth_positive_only=truth_positive_only
    )
    metrics = to_jsonable(metrics)
    metrics.update(radius_um=float(radius_um), pred=names[0], truth=names[1])
    return metrics
