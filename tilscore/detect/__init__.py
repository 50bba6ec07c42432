"""Cell detection: find every nucleated cell, measure its stain, call it positive or not.

:func:`detect_cells` is the one entry point, for an image in memory (with its µm/px) or a slide
(optionally restricted to a region). It lays a grid of tiles at the detector's pixel size
(0.5 µm/px), each with a halo, runs the detector and the per-cell measurements on the whole
tile, and keeps the cells whose centre lies in the tile's core, so that a cell on a tile border
is found exactly once whatever the tile size. The marker rule (:mod:`tilscore.markers`) then
decides which cells are positive.

Detectors: ``"cnn"`` (:class:`tilscore.detect.cnn.CNNDetector`, shipped weights) and
``"classical"`` (:func:`tilscore.detect.classical.detect_nuclei_classical`, QuPath-like).

Coordinates in the result are continuous pixel coordinates of the input image (or level 0 of a
slide), QuPath's convention: pixel (i, j) covers [i, i + 1) x [j, j + 1), so its centre is at
(i + 0.5, j + 0.5). Detectors work in array indices and :func:`detect_cells` converts.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import shapely

    from ..markers import MarkerRule
    from ..qc import StainQC
    from ..slide import Slide, Tile
    from ..stain import StainMatrix
    from ..tissue import TissueMask

__all__ = ["DETECTORS", "DetectionSettings", "detect_cells", "finetune", "iter_detect_cells"]


def finetune(images, labels=None, **kwargs):
    """Fine-tune the CNN detector on labelled fields (:func:`.finetuning.finetune`)."""
    from .finetuning import finetune as _finetune

    return _finetune(images, labels, **kwargs)


#: Detector names accepted by :func:`detect_cells`.
DETECTORS = ("cnn", "classical")
#: Pixel size (µm/px) the classical detector works at (QuPath's default for detection).
CLASSICAL_MPP = 0.5
#: Near-black grey pixels (brightest channel below this, 8-bit, little colour) are opaque, not
#: stain: black ink, carbon pigment. Very dark brown DAB keeps its colour and is not affected.
OPAQUE_MAX_INTENSITY = 16
#: tiles processed at once in threads by default (capped at the CPU count; see
#: ``benchmarks/run.py`` and docs/performance.md for the measurement behind it)
DEFAULT_WORKERS = 2
#: a cut tile's corner lies on a multiple of this many tile px (the network's largest stride)
_CROP_ALIGN = 32
#: a tile is cut to its tissue only where that leaves less than this share of its pixels
_CROP_MIN_SAVING = 0.9


@dataclass(frozen=True)
class DetectionSettings:
    """What a detection run used (recorded with the results).

    Attributes
    ----------
    detector
        "cnn" or "classical"; with the model name and weights hash for the CNN.
    mpp
        Pixel size the detector ran at (µm/px).
    tile_size_px, halo_px
        Tile core and halo (px at ``mpp``).
    rule
        The marker rule (thresholds, measured compartment, expansion).
    stains, background
        Stain vectors and glass brightness ``I0`` used for the optical densities.
    """

    detector: str
    model: str | None
    model_sha256: str | None
    mpp: float
    tile_size_px: int
    halo_px: int
    rule: MarkerRule
    stains: StainMatrix
    background: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record."""
        return {
            "detector": self.detector,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "mpp": self.mpp,
            "tile_size_px": self.tile_size_px,
            "halo_px": self.halo_px,
            "marker": self.rule.to_dict(),
            "stains": self.stains.to_dict(),
            "background": list(self.background),
        }


@lru_cache(maxsize=4)
def _cnn(name: str, device: str | None):
    from .cnn import CNNDetector

    return CNNDetector.load(name, device=device)


def _opaque(rgb: np.ndarray) -> np.ndarray:
    """Dark, colourless pixels: brightest channel < OPAQUE_MAX_INTENSITY, chroma < 35 %."""
    import cv2

    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    hi = cv2.max(cv2.max(r, g), b)
    dark = hi < OPAQUE_MAX_INTENSITY
    if not dark.any():
        return dark
    lo = cv2.min(cv2.min(r, g), b).astype(np.int16)
    hi16 = hi.astype(np.int16)
    return dark & ((hi16 - lo) * 20 <= hi16 * 7 + 60)


class _Detector:
    """The chosen detector behind one call: tile RGB + concentrations -> centres, labels."""

    def __init__(self, kind: str, model: str, device: str | None, params: dict[str, Any]):
        if kind not in DETECTORS:
            raise ConfigError(
                f"unknown detector {kind!r}", hint=f"Use one of: {', '.join(DETECTORS)}"
            )
        self.kind = kind
        self.params = dict(params)
        if kind == "cnn":
            self.model = _cnn(model, device)
            self.mpp = float(self.model.mpp)
            self.name, self.sha256 = self.model.name, self.model.sha256
        else:
            self.model = None
            self.mpp = CLASSICAL_MPP
            self.name = self.sha256 = None

    def __call__(self, rgb: np.ndarray, conc: np.ndarray, background: np.ndarray, rule):
        if self.kind == "cnn":
            return self.model.predict(rgb, background, **self.params)
        from .classical import detect_nuclei_classical

        # the rule tells whether DAB belongs to the nucleus (Ki67, FOXP3) or around it
        return detect_nuclei_classical(conc, self.mpp, rule=rule, **self.params)


class _Area:
    """Tissue mask and/or region, as the ``fraction_in`` that ``Slide.iter_tiles`` asks."""

    def __init__(self, tissue: TissueMask | None, region: shapely.Geometry | None):
        self.tissue, self.region = tissue, region

    def fraction_in(self, x: float, y: float, width: float, height: float) -> float:
        import shapely

        if self.region is not None:
            # the user's region is scored as drawn: its tiles are visited whatever the mask says
            hit = shapely.intersects(self.region, shapely.box(x, y, x + width, y + height))
            return 1.0 if hit else 0.0
        return 1.0 if self.tissue is None else self.tissue.fraction_in(x, y, width, height)


def _as_region(region: Any, slide: Slide) -> shapely.Geometry | None:
    """A shapely geometry (level-0 px) from a geometry or an (x, y, width, height) box."""
    import shapely

    from ..errors import RegionError

    if region is None:
        return None
    if isinstance(region, shapely.Geometry):
        geom = region
    else:
        try:
            x, y, w, h = (float(v) for v in region)
        except (TypeError, ValueError):
            raise RegionError(
                f"region must be a shapely geometry or (x, y, width, height), got {region!r}"
            ) from None
        if not (w > 0 and h > 0):
            raise RegionError(f"region box {region!r} has no area")
        geom = shapely.box(x, y, x + w, y + h)
    sw, sh = slide.dimensions
    if geom.is_empty or not geom.intersects(shapely.box(0, 0, sw, sh)):
        raise RegionError(
            f"the region {tuple(round(v) for v in geom.bounds)} lies outside the slide "
            f"(0, 0, {sw}, {sh}) in level-0 px",
            path=slide.path,
            hint="Regions are in level-0 pixels; check their scale",
        )
    return geom


def _count_tiles(slide: Slide, mpp: float, size: int, area: _Area | None) -> int:
    core0 = size * mpp / slide.mpp
    w0, h0 = slide.dimensions
    n_cols, n_rows = math.ceil(w0 / core0 - 1e-9), math.ceil(h0 / core0 - 1e-9)
    if area is None:
        return n_cols * n_rows
    return sum(
        area.fraction_in(c * core0, r * core0, core0, core0) > 0
        for r in range(n_rows)
        for c in range(n_cols)
    )


def _stains_and_background(
    slide: Slide, stains: Any, background: Any, is_array: bool, qc: StainQC | None = None
) -> tuple[StainMatrix, np.ndarray, TissueMask | None]:
    """Resolve the stain vectors, ``I0`` and tissue mask of a run (estimated where asked).

    A slide file, or an image in memory given without stains and background: the tissue mask,
    ``I0`` and vectors are estimated from it as :func:`tilscore.score.score_image` does (``qc``:
    a :func:`tilscore.qc.slide_stain_qc` result already computed for it), so that detect_cells
    and score_image find the same cells. An image in memory with stains or a background given:
    Ruifrok-Johnston and I0 = 255 for the one not given; ``stains="estimate"`` estimates the
    vectors from the image itself (no tissue mask).
    """
    from ..stain import RUIFROK_HDAB, StainMatrix, estimate_stain_vectors

    if isinstance(stains, str) and stains != "estimate":
        raise ConfigError(f"stains must be a StainMatrix, 'estimate' or None, got {stains!r}")
    tissue = None
    if not is_array or qc is not None or (stains is None and background is None):
        if qc is None:
            from ..qc import slide_stain_qc

            qc = slide_stain_qc(slide)
        tissue = qc.tissue
        stains = qc.stains if (stains is None or stains == "estimate") else stains
        background = qc.background if background is None else background
    bg = np.full(3, 255.0) if background is None else np.asarray(background, float).reshape(-1)
    if bg.size == 1:
        bg = np.repeat(bg, 3)
    if bg.size != 3 or not np.all(np.isfinite(bg)) or np.any(bg <= 0):
        raise ConfigError(
            f"background must be 3 positive intensities (R, G, B), got {background!r}"
        )
    if stains == "estimate":
        w, h = slide.dimensions
        stains = estimate_stain_vectors(slide.read_region(0, 0, w, h), background=bg)
    stains = RUIFROK_HDAB if stains is None else stains
    if not isinstance(stains, StainMatrix):
        raise ConfigError(f"stains must be a StainMatrix, got {type(stains).__name__}")
    return stains, bg, tissue


def _tissue_box(
    x: float, y: float, ds: float, size: int, tissue: TissueMask, margin_px: float
) -> tuple[slice, slice] | None:
    """The part of a tile near tissue: ``(row slice, column slice)``, or None (all of it).

    The tile is ``size`` px square at ``ds`` level-0 px per px, its corner at level-0 ``x``,
    ``y`` (the ``crop`` that :meth:`tilscore.slide.Slide.iter_tiles` asks for). The box is the
    bounding box of the tissue-mask pixels under the tile, grown by ``margin_px`` (tile px)
    plus one mask pixel or 8 µm, whichever is more; None where that box is most of the tile
    anyway.
    """
    h = w = size
    mds, m = tissue.downsample, tissue.mask
    c0, r0 = max(0, math.floor(x / mds)), max(0, math.floor(y / mds))
    c1 = min(m.shape[1], math.ceil((x + w * ds) / mds))
    r1 = min(m.shape[0], math.ceil((y + h * ds) / mds))
    if c1 <= c0 or r1 <= r0:
        return None
    sub = m[r0:r1, c0:c1]
    rows, cols = np.flatnonzero(sub.any(axis=1)), np.flatnonzero(sub.any(axis=0))
    if not rows.size:
        return None
    # one mask pixel, and at least 8 µm (a fine mask of a small slide is tight around the tissue)
    pad = margin_px + max(mds, 8.0 * mds / tissue.mpp) / ds
    # the box's corner on a multiple of _CROP_ALIGN px: the network sees the cut tile on the
    # same pixel grid as the whole one (its pooling and output stride), so the cells are the same
    a = _CROP_ALIGN
    x0 = max(0, math.floor(((c0 + cols[0]) * mds - x) / ds - pad) // a * a)
    x1 = min(w, math.ceil(((c0 + cols[-1] + 1) * mds - x) / ds + pad))
    y0 = max(0, math.floor(((r0 + rows[0]) * mds - y) / ds - pad) // a * a)
    y1 = min(h, math.ceil(((r0 + rows[-1] + 1) * mds - y) / ds + pad))
    if (x1 - x0) * (y1 - y0) >= _CROP_MIN_SAVING * w * h:
        return None
    return slice(y0, y1), slice(x0, x1)


def _detect_tile(
    tile: Tile,
    det: _Detector,
    rule: MarkerRule,
    stains: StainMatrix,
    bg: np.ndarray,
    tile_size_px: int,
    halo_px: int,
) -> pd.DataFrame | None:
    """Cells of one tile whose centre lies in its core (level-0 px), or None (no cells).

    The tile's pixels are read once and serve the stain separation, the detector and the
    measurements. A tile cut to its tissue (``tile.ox``, ``tile.oy``: see
    :func:`_tissue_box`) is processed as it is: the rest is glass, where no cell is counted.
    """
    from ..cells import measure_cells
    from ..stain import deconvolve

    image, ox, oy = tile.image, tile.ox, tile.oy
    conc = deconvolve(image, stains, bg)
    # opaque pixels (black ink, carbon pigment, folds: dark and grey) are neither hematoxylin
    # nor DAB; treated as unstained, they make no nucleus and no positivity
    opaque = _opaque(image)
    if opaque.any():
        conc[opaque] = 0.0
    centres, labels = det(image, conc, bg, rule)
    if not len(centres):
        return None
    cells = measure_cells(centres, conc, det.mpp, rule, nuclei=labels)
    # keep cells whose centre (continuous coordinates) lies in the tile's core
    cx, cy = cells["x"].to_numpy() + 0.5 + ox, cells["y"].to_numpy() + 0.5 + oy
    lo, hi = halo_px, halo_px + tile_size_px
    core = (cx >= lo) & (cx < hi) & (cy >= lo) & (cy < hi)
    cells = cells.loc[core].copy()
    cells["x"] = tile.x + cx[core] * tile.downsample
    cells["y"] = tile.y + cy[core] * tile.downsample
    return cells


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return None


def release_freed_memory() -> None:
    """Return the memory that the C allocator keeps after a stage to the system (glibc only).

    glibc keeps freed memory for reuse, but only by the thread arena that freed it: what the
    stain QC and the tissue mask freed in the calling thread cannot serve the tile workers, and
    what the workers freed cannot serve the regions and scoring that follow. Called once before
    and once after the tiles (not per tile: memory given back is faulted in again).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _n_workers(workers: int | None) -> int:
    """Tiles processed at once: ``None`` -> :data:`DEFAULT_WORKERS` (at most the CPU count)."""
    import os

    if workers is None:
        return max(1, min(DEFAULT_WORKERS, os.cpu_count() or 1))
    n = int(workers)
    if n < 1:
        raise ConfigError(f"workers must be >= 1, got {workers!r}")
    return n


def _pipelined(
    fn: Callable[[Any], Any], items: Iterator[Any], workers: int
) -> Generator[Any, None, None]:
    """``map(fn, items)`` in order, with up to ``workers`` calls running in threads.

    The items are pulled (for tiles: read and decoded) in the calling thread while the workers
    run, and at most ``workers + 1`` items are in flight, so memory stays bounded whatever the
    slide size. OpenCV, NumPy, the JPEG decoder and torch release the GIL, so the stages of
    neighbouring tiles overlap. Closing the generator cancels the work not yet started.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tilscore-tile")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            while len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_detect_cells(
    source: np.ndarray | Slide | str,
    mpp: float | None = None,
    marker: str | MarkerRule = "CD8",
    detector: str = "cnn",
    *,
    region: Any = None,
    stains: StainMatrix | str | None = None,
    background: Any = None,
    qc: StainQC | None = None,
    tile_size_px: int = 1024,
    halo_px: int = 48,
    model: str = "default",
    device: str | None = None,
    detector_params: dict[str, Any] | None = None,
    workers: int | None = None,
    **overrides: Any,
) -> Generator[tuple[int, int], None, tuple[pd.DataFrame, DetectionSettings]]:
    """Detect cells tile by tile, yielding progress ``(tiles_done, tiles_total)``.

    The generator's return value (``StopIteration.value``) is ``(cells, settings)``; see
    :func:`detect_cells` for the parameters. The CLI draws a progress bar from it and the napari
    widget can stop it between tiles.
    """
    from ..cells import validate_cells
    from ..markers import classify_cells, get_marker
    from ..slide import Slide, open_slide

    rule = get_marker(marker, **overrides)
    tile_size_px, halo_px = int(tile_size_px), int(halo_px)
    if tile_size_px < 64 or halo_px < 0:
        raise ConfigError(
            f"tile_size_px must be >= 64 and halo_px >= 0, got {tile_size_px}, {halo_px}"
        )
    if isinstance(source, Slide):
        slide, owned, is_array = source, False, source.vendor == "array"
    elif isinstance(source, np.ndarray):
        slide, owned, is_array = Slide.from_array(source, mpp), True, True
    else:
        slide, owned, is_array = open_slide(source, mpp=mpp), True, False
    try:
        det = _Detector(detector, model, device, detector_params or {})
        stains_used, bg, tissue = _stains_and_background(slide, stains, background, is_array, qc)
        geom = _as_region(region, slide)
        area = _Area(tissue, geom) if (tissue is not None or geom is not None) else None
        total = _count_tiles(slide, det.mpp, tile_size_px, area)
        release_freed_memory()
        parts: list[pd.DataFrame] = []
        done = 0
        yield done, total

        def process(tile) -> pd.DataFrame | None:
            return _detect_tile(tile, det, rule, stains_used, bg, tile_size_px, halo_px)

        def crop(x: float, y: float, ds: float, size: int) -> tuple[slice, slice] | None:
            # only the part of a tile within the halo of tissue is read and processed; a region
            # is read whole, as drawn, and the classical detector (whose background opening
            # sees the whole tile) always reads whole tiles
            if tissue is None or geom is not None or det.kind != "cnn":
                return None
            return _tissue_box(x, y, ds, size, tissue, halo_px)

        tiles = slide.iter_tiles(det.mpp, tile_size_px, halo_px, mask=area, crop=crop)
        # closing: a caller that stops early (napari's cancel) also stops the worker threads
        with closing(_pipelined(process, tiles, _n_workers(workers))) as results:
            for cells in results:
                if cells is not None:
                    parts.append(cells)
                done += 1
                yield done, total
        cells = pd.concat(parts, ignore_index=True) if parts else measure_cells_empty()
        del parts
        # what only the tiles needed: the decoded-tile cache and the tissue mask's summed-area
        # table (rebuilt if asked for again), given back with the tiles' freed memory
        slide.clear_cache()
        if tissue is not None:
            tissue.release_cache()
        release_freed_memory()
        w0, h0 = slide.dimensions
        inside = (cells["x"] >= 0) & (cells["x"] < w0) & (cells["y"] >= 0) & (cells["y"] < h0)
        cells = cells.loc[inside]
        if geom is not None and len(cells):
            import shapely

            cells = cells.loc[shapely.contains_xy(geom, cells["x"], cells["y"])]
        cells = cells.reset_index(drop=True)
        cells["x_um"] = cells["x"] * slide.mpp_x
        cells["y_um"] = cells["y"] * slide.mpp_y
        cells = classify_cells(cells, rule)
        settings = DetectionSettings(
            detector=det.kind,
            model=det.name,
            model_sha256=det.sha256,
            mpp=det.mpp,
            tile_size_px=tile_size_px,
            halo_px=halo_px,
            rule=rule,
            stains=stains_used,
            background=tuple(float(v) for v in bg),
        )
        return validate_cells(cells), settings
    finally:
        if owned:
            slide.close()


def measure_cells_empty() -> pd.DataFrame:
    """An empty cells table with the right columns and dtypes."""
    from ..cells import validate_cells

    return validate_cells(pd.DataFrame({"x": pd.Series(dtype=float), "y": pd.Series(dtype=float)}))


def detect_cells(
    source: np.ndarray | Slide | str,
    mpp: float | None = None,
    marker: str | MarkerRule = "CD8",
    detector: str = "cnn",
    **kwargs: Any,
) -> pd.DataFrame:
    """Find every cell, measure it and call it positive for the marker.

    Parameters
    ----------
    source
        An RGB image (numpy array: RGB, RGBA, grey, 8/16-bit) with its ``mpp``, an open
        :class:`~tilscore.slide.Slide`, or a slide path.
    mpp
        Pixel size of an array (µm/px; required for arrays), or an override for a slide path.
        The image is resampled internally to the detector's pixel size (0.5 µm/px).
    marker
        Marker preset name ("CD8", "CD68", "CD56", "CD3", "CD4", "CD20", "FOXP3", "Ki67") or a
        :class:`~tilscore.markers.MarkerRule`.
    detector
        "cnn" (default; shipped weights) or "classical".
    region
        Keyword: restrict a slide to a shapely geometry or an (x, y, width, height) box in
        level-0 px.
    stains, background
        Keyword: stain matrix (or "estimate") and glass brightness ``I0`` (R, G, B). When both
        are omitted they are estimated from the slide or image with its tissue mask, as
        :func:`tilscore.score.score_image` does; for an array given one of them, the other
        defaults to the Ruifrok-Johnston vectors or I0 = 255.
    qc
        Keyword: the slide's :func:`tilscore.qc.slide_stain_qc` result, when the caller already
        has it (its tissue mask, vectors and ``I0`` are then not computed again).
    tile_size_px, halo_px
        Keyword: tile core and halo at the detector's pixel size (px). The halo must exceed a
        nucleus radius plus the cell expansion; the result does not depend on the tile size.
    model, device, detector_params
        Keyword: CNN model (a shipped name: "default", "synthetic"; or a model folder such as
        one written by :func:`finetune`), torch device ("cpu", "cuda"), extra detector
        parameters.
    workers
        Keyword: tiles processed at once in threads (``None``: :data:`DEFAULT_WORKERS`, at most
        the CPU count; 1: one tile at a time). The result does not depend on it.
    **overrides
        Marker-rule fields to override (e.g. ``threshold_od=0.25``, ``expansion_um=6``).

    Returns
    -------
    pandas.DataFrame
        One row per cell, columns of :data:`tilscore.cells.CELL_COLUMNS`; ``attrs["settings"]``
        holds the :class:`DetectionSettings` record.
    """
    from ..progress import run_to_end

    cells, settings = run_to_end(iter_detect_cells(source, mpp, marker, detector, **kwargs))
    cells.attrs["settings"] = settings.to_dict()
    return cells
