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

``dab_ring_coverage`` is the fraction of the membrane ring's pixels whose DAB OD exceeds
:data:`RING_COVERAGE_OD`: about 1 for a membrane stained all round, lower for a cell that
touches a brown neighbour on one side only.

Everything is vectorised, whatever the number of cells: two OpenCV distance transforms with
nearest-pixel labels (one from the centres, one from the nucleus pixels), then one pass over the
image in row blocks that gives every pixel a key (its cell and distance interval) and sums the
keys with ``numpy.bincount``; each compartment adds up its intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, check_positive
from .markers import CELL_CLASSES, MarkerRule, get_marker
from .stain import row_blocks

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
OPTIONAL_COLUMNS: dict[str, str] = {
    "dab_od_surround": "float32",
    "cell_area_um2": "float32",
    "dab_ring_coverage": "float32",
}

_NUCLEUS_MAX_RADIUS_UM = 10.0  # largest nucleus radius searched around a centre
_SMOOTH_SIGMA_UM = 0.75  # smoothing of the segmentation signal
_FOREGROUND_OD = 0.08  # absolute floor of a nucleus pixel's smoothed OD
_PEAK_FRACTION = 0.5  # a nucleus pixel is at least this fraction of its centre's OD
_SURROUND_UM = (1.0, 4.0)  # surround band beyond the membrane ring, µm
#: DAB OD above which a ring pixel counts as stained for ``dab_ring_coverage`` (the ring
#: threshold with true nuclei, half the CD8 preset's: see tilscore.markers)
RING_COVERAGE_OD = 0.07
_BLOCK_PX = 1 << 16  # pixels per block of the per-pixel steps after a distance transform


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


def _distance_transform(
    src: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's Euclidean distance transform of ``src`` (uint8, 0 = source pixel).

    Returns the float32 distance in px and, for every pixel, the int32 number of its nearest
    source pixel (OpenCV numbers the source pixels 1, 2, ... in raster order). ``out``: arrays
    of that shape and dtype to write them into.
    """
    import cv2

    dist, idx = out if out is not None else (None, None)
    return cv2.distanceTransformWithLabels(
        src,
        cv2.DIST_L2,
        cv2.DIST_MASK_PRECISE,
        dst=dist,
        labels=idx,
        labelType=cv2.DIST_LABEL_PIXEL,
    )


def _source_lut(
    idx: np.ndarray, values: np.ndarray, first: int, last: int, positions
) -> np.ndarray:
    """Table from a source pixel's number in ``idx`` to its label ``values`` (0 at index 0).

    ``values`` are the source pixels' labels in raster order, ``first`` and ``last`` the flat
    indices of the first and last source pixel. OpenCV numbers the source pixels in raster
    order, so the table is ``values`` itself; that is checked at the first and last source
    pixel, and otherwise the numbers are read at every source pixel (``positions()``: their
    flat indices).
    """
    lut = np.zeros(len(values) + 1, values.dtype)
    flat = idx.ravel()
    if flat[first] == 1 and flat[last] == len(values):
        lut[1:] = values
    else:  # pragma: no cover - a numbering other than OpenCV's
        lut[flat[positions()]] = values
    return lut


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
    dist, idx, lut = _nearest_source(labels)
    if lut is None:
        return dist, idx
    return dist, np.take(lut.astype(np.int32, copy=False), idx)


def _nearest_source(
    labels: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`nearest_label` before the final look-up: the distance, the number of the nearest
    labelled pixel and the number -> label table (None, with distance inf and number 0
    everywhere, when nothing is labelled). ``out``: see :func:`_distance_transform`."""
    fg = labels != 0
    values = labels[fg]  # the labelled pixels in raster order
    if not len(values):
        return np.full(labels.shape, np.inf, np.float32), np.zeros(labels.shape, np.int32), None
    flat_fg = fg.ravel()
    first = int(np.argmax(flat_fg))
    last = flat_fg.size - 1 - int(np.argmax(flat_fg[::-1]))
    src = np.logical_not(fg, out=fg).view(np.uint8)  # 0 on labels, 1 elsewhere
    dist, idx = _distance_transform(src, out)
    lut = _source_lut(idx, values, first, last, lambda: np.flatnonzero(labels))
    return dist, idx, lut


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
    return _segment_nuclei(centres_xy, signal, mpp, max_radius_um, foreground_od, peak_fraction)[0]


def _segment_nuclei(
    centres_xy: np.ndarray,
    signal: np.ndarray,
    mpp: float,
    max_radius_um: float = _NUCLEUS_MAX_RADIUS_UM,
    foreground_od: float = _FOREGROUND_OD,
    peak_fraction: float = _PEAK_FRACTION,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """:func:`segment_nuclei`, and its distance transform's arrays (None without centres),
    which a caller may reuse as scratch space."""
    h, w = signal.shape
    n = len(centres_xy)
    if n == 0:
        return np.zeros((h, w), np.int32), None
    cx = np.clip(np.floor(centres_xy[:, 0]).astype(np.int64), 0, w - 1)
    cy = np.clip(np.floor(centres_xy[:, 1]).astype(np.int64), 0, h - 1)
    # centre pixels in raster order and their labels (duplicates: the last centre wins)
    pos_rev = (cy * w + cx)[::-1]
    positions, first = np.unique(pos_rev, return_index=True)
    lab = (n - first).astype(np.int32)
    src = np.ones((h, w), np.uint8)
    src.ravel()[positions] = 0
    dist, idx = _distance_transform(src)
    lut = _source_lut(idx, lab, positions[0], positions[-1], lambda: positions)
    peak = signal.ravel()[positions]
    floor = np.zeros(len(lut), np.float32)  # index 0 is never used: every pixel has a centre
    floor[1:] = np.maximum(foreground_od, peak_fraction * peak)
    radius = max_radius_um / mpp  # a Python float: compared in float32
    out = np.empty((h, w), np.int32)
    blocks, rows = row_blocks(h, w, _BLOCK_PX)
    floor_px = np.empty((rows, w), np.float32)
    keep, near = np.empty((rows, w), bool), np.empty((rows, w), bool)
    for ys in blocks:
        r = ys.stop - ys.start
        np.take(floor, idx[ys], out=floor_px[:r], mode="clip")
        np.greater_equal(signal[ys], floor_px[:r], out=keep[:r])
        keep[:r] &= np.less_equal(dist[ys], radius, out=near[:r])
        np.take(lut, idx[ys], out=out[ys], mode="clip")
        out[ys] *= keep[:r]
    out.ravel()[positions] = lab
    return out, (dist, idx)


def _compartment_sums(
    nuclei: np.ndarray,
    value: np.ndarray,
    nucleus_value: np.ndarray,
    n: int,
    bands: list[tuple[float, float]],
    scratch: tuple[np.ndarray, np.ndarray] | None = None,
    flag: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts and sums per cell over its nucleus and distance bands around it.

    Every pixel belongs to the cell of its nearest nucleus pixel, at distance ``d`` (px, 0 on
    the nucleus). The compartments are the nucleus (``d == 0``) and one band per ``(lo, hi)``:
    ``lo < d <= hi``, compared in float32. They all come from one distance transform and one
    ``bincount`` pass over the image: a pixel's key is its cell and the interval between
    consecutive band edges that holds its distance, and a band adds up its intervals.

    Parameters
    ----------
    nuclei
        (H, W) int32 labels 0..n.
    value
        (H, W) float values summed over every compartment (e.g. DAB OD).
    nucleus_value
        (H, W) float values summed over the nucleus only (e.g. hematoxylin OD).
    n
        Number of cells (labels 1..n).
    bands
        ``(lo, hi)`` distance bands in px, ``0 <= lo``.
    scratch
        Optional (H, W) float32 and int32 arrays for the distance transform to write into.
    flag
        Optional (H, W) bool image whose True pixels are counted per compartment too.

    Returns
    -------
    counts, sums : numpy.ndarray
        (1 + len(bands), n) float64 pixel counts and sums of ``value``: nucleus, then each band.
    nucleus_sums : numpy.ndarray
        (n,) float64 sums of ``nucleus_value`` over each nucleus.
    flag_counts : numpy.ndarray
        (1 + len(bands), n) float64 counts of ``flag`` pixels (zeros without ``flag``).
    """
    dist, idx, lut = _nearest_source(nuclei, scratch)
    if lut is None:  # no nucleus pixel: every compartment is empty
        zeros = np.zeros((1 + len(bands), n))
        return zeros, zeros.copy(), np.zeros(n), zeros.copy()
    # each pixel's interval: 0 on the nucleus, else 1 + the number of edges below its distance
    edges = sorted({float(e) for e in np.float32([e for band in bands for e in band]) if e > 0})
    m = len(edges) + 2
    size = (n + 1) * m
    key_lut = lut.astype(np.intp) * m
    counts = np.zeros(size, np.intp)
    sums, nuc_sums = np.zeros(size), np.zeros(size)
    flag_counts = np.zeros(size, np.intp)
    h, w = dist.shape
    blocks, rows = row_blocks(h, w, _BLOCK_PX)
    code, above = np.empty((rows, w), np.uint8), np.empty((rows, w), bool)
    key = np.empty((rows, w), np.intp)
    val, nuc_val = np.empty((rows, w)), np.empty((rows, w))  # float64, as bincount reads them
    for ys in blocks:
        r = ys.stop - ys.start
        d, c, k = dist[ys], code[:r], key[:r]
        np.greater(d, 0, out=c.view(bool))
        for e in edges:  # Python floats: compared in float32, as ``dist <= hi`` would be
            c += np.greater(d, e, out=above[:r])
        np.take(key_lut, idx[ys], out=k, mode="clip")
        k += c
        flat = k.ravel()
        counts += np.bincount(flat, minlength=size)[:size]
        np.copyto(val[:r], value[ys])
        np.copyto(nuc_val[:r], nucleus_value[ys])
        sums += np.bincount(flat, weights=val[:r].ravel(), minlength=size)[:size]
        nuc_sums += np.bincount(flat, weights=nuc_val[:r].ravel(), minlength=size)[:size]
        if flag is not None:
            flagged = flat[flag[ys].ravel()]
            flag_counts += np.bincount(flagged, minlength=size)[:size]
    counts = counts.reshape(n + 1, m)[1:].T
    sums = sums.reshape(n + 1, m)[1:].T
    flag_counts = flag_counts.reshape(n + 1, m)[1:].T

    def band(table: np.ndarray, lo: float, hi: float) -> np.ndarray:
        lo32, hi32 = float(np.float32(lo)), float(np.float32(hi))
        first = 1 + sum(e <= lo32 for e in edges)  # d > lo: every edge at or below lo is below d
        last = 1 + sum(e < hi32 for e in edges)  # d <= hi: no edge at or above hi is below d
        if hi32 <= 0 or last < first:
            return np.zeros(table.shape[1], table.dtype)
        return table[first : last + 1].sum(axis=0)

    counts_out = np.stack([counts[0]] + [band(counts, lo, hi) for lo, hi in bands])
    sums_out = np.stack([sums[0]] + [band(sums, lo, hi) for lo, hi in bands])
    flag_out = np.stack([flag_counts[0]] + [band(flag_counts, lo, hi) for lo, hi in bands])
    nuc_out = nuc_sums.reshape(n + 1, m)[1:, 0]
    return counts_out.astype(np.float64), sums_out, nuc_out, flag_out.astype(np.float64)


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
        The cells table (:data:`CELL_COLUMNS` plus :data:`OPTIONAL_COLUMNS`), one row per centre in
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
        return _with_columns(table, {col: np.zeros(0) for col in OPTIONAL_COLUMNS})
    scratch = None
    if nuclei is None:
        hem_img = np.ascontiguousarray(conc[..., 0])
        signal = hem_img + conc[..., 1] if rule.measure == "nucleus" else hem_img
        sigma = _SMOOTH_SIGMA_UM / mpp
        signal = cv2.GaussianBlur(signal, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        xy = table[["x", "y"]].to_numpy(np.float64)
        nuclei, scratch = _segment_nuclei(xy, signal, mpp)
    else:
        if not isinstance(nuclei, np.ndarray) or nuclei.shape != (h, w):
            raise ConfigError(
                f"nuclei must be an int label image of shape {(h, w)}, "
                f"got {getattr(nuclei, 'shape', None)}"
            )
        if not np.issubdtype(nuclei.dtype, np.integer):
            raise ConfigError(f"nuclei must be an integer label image, got {nuclei.dtype}")
        in_range = nuclei.dtype == np.int32 and (
            nuclei.size == 0 or (nuclei.min() >= 0 and nuclei.max() <= n)
        )
        if not in_range:  # labels outside 1..n are no nucleus
            nuclei = np.where((nuclei > 0) & (nuclei <= n), nuclei, 0).astype(np.int32)
    exp_px = rule.expansion_um / mpp
    mem_px = rule.membrane_width_um / mpp
    s0, s1 = mem_px + _SURROUND_UM[0] / mpp, mem_px + _SURROUND_UM[1] / mpp
    # nucleus, membrane ring, cytoplasm (the expansion), surround: counts and sums per cell
    bands = [(0.0, min(mem_px, exp_px)), (0.0, exp_px), (s0, s1)]
    dab = conc[..., 1]
    counts, d_sum, h_sum, stained = _compartment_sums(
        nuclei, dab, conc[..., 0], n, bands, scratch=scratch, flag=dab > RING_COVERAGE_OD
    )
    n_area, _, n_cyto, _ = counts
    with np.errstate(invalid="ignore", divide="ignore"):
        h_nuc = h_sum / n_area
        d_nuc, d_ring, d_cyto, d_sur = d_sum / counts
        coverage = stained[1] / counts[1]
        total = n_area + n_cyto
        d_cell = (np.nan_to_num(d_nuc) * n_area + np.nan_to_num(d_cyto) * n_cyto) / total
    measured = {
        "x_um": table["x"].to_numpy() * mpp,
        "y_um": table["y"].to_numpy() * mpp,
        "nucleus_area_um2": n_area * mpp * mpp,
        "h_od_nucleus": h_nuc,
        "dab_od_nucleus": d_nuc,
        "dab_od_membrane": d_ring,
        "dab_od_cytoplasm": d_cyto,
        "dab_od_cell": d_cell,
        "positive": np.zeros(n, bool),
        "intensity_bin": np.zeros(n, np.int8),
        "dab_od_surround": d_sur,
        # fraction of the ring's pixels above RING_COVERAGE_OD: ~1 all round a stained
        # membrane, low where only one side touches a brown neighbour
        "dab_ring_coverage": coverage,
        # nucleus + expansion (limited by neighbours): the area a positive cell covers
        "cell_area_um2": (n_area + n_cyto) * mpp * mpp,
    }
    return _with_columns(table, measured)


def _with_columns(table: pd.DataFrame, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """A validated cells table with columns set or added, built in one step.

    The same frame as assigning each column and calling :func:`validate_cells` again (standard
    columns first, then the table's extra columns, then new ones), without a second check:
    ``table`` is already valid and the new values get their standard dtypes here.
    """
    dtypes = {**CELL_COLUMNS, **OPTIONAL_COLUMNS}
    data = {c: table[c].to_numpy() for c in table.columns}
    for col, arr in values.items():
        a = np.asarray(arr)
        data[col] = a.astype(dtypes.get(col, a.dtype), copy=False)
    order = list(CELL_COLUMNS) + [c for c in data if c not in CELL_COLUMNS]
    out = pd.DataFrame({c: data[c] for c in order}, copy=False)
    # pandas would infer a string dtype from the object array; the table's column stays object
    out["cell_class"] = table["cell_class"].reset_index(drop=True)
    return out
