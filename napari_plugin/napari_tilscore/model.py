"""The widget's state and computations, without Qt (testable and usable from scripts).

Coordinates: every layer the plugin makes holds **level-0 pixel** coordinates in napari's
(row = y, column = x) order with ``scale`` = the slide's µm/px, so the world (what napari shows,
and the scale bar) is in µm. :class:`ScoringSession` turns the widget's choices (marker,
detector, scope, region shapes) into a :func:`tilscore.score.iter_score_slide` run and its
:class:`~tilscore.score.SlideResult` into layer data and table rows; moving the threshold
re-classifies the cells of the same result without detecting them again.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Colours of marker-positive and negative cells (RGBA 0-1); chosen to stand out on brown/blue.
POSITIVE_RGBA = (1.0, 0.1, 0.1, 1.0)
NEGATIVE_RGBA = (0.1, 0.55, 1.0, 1.0)

#: Edge / face colours of the region Shapes layers, one per class.
REGION_COLOURS = {
    "tumour": "#e377c2",
    "stroma": "#2ca02c",
    "tumour_bed": "#9467bd",
    "margin": "#ff7f0e",
    "exclude": "#7f7f7f",
}
#: Colours of the scored compartments (Shapes layer of the result).
COMPARTMENT_COLOURS = {
    "intratumoral": "#e377c2",
    "stromal": "#2ca02c",
    "invasive_margin": "#ff7f0e",
    "tumour_bed": "#9467bd",
    "tissue": "#17becf",
    "excluded": "#7f7f7f",
}

SCOPES = ("field of view", "selected shapes", "whole slide")
DETECTORS = ("cnn", "classical")

#: Columns of the per-compartment table: (header, summary column, format).
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("compartment", "compartment", "{}"),
    ("cells", "n_cells", "{:d}"),
    ("positive", "n_positive", "{:d}"),
    ("per mm²", "density_per_mm2", "{:.1f}"),
    ("% positive", "pct_positive", "{:.1f}"),
    ("area mm²", "area_mm2", "{:.3f}"),
    ("area %", "area_fraction_pct", "{:.1f}"),
)

#: Per-cell columns shown as Points features (hovering a cell shows them).
FEATURE_COLUMNS = (
    "cell_id",
    "edited",
    "x",
    "y",
    "x_um",
    "y_um",
    "cell_class",
    "positive",
    "intensity_bin",
    "compartment",
    "confidence",
    "nucleus_area_um2",
    "cell_area_um2",
    "h_od_nucleus",
    "dab_od_nucleus",
    "dab_od_membrane",
    "dab_od_cytoplasm",
    "dab_od_cell",
    "dab_od_surround",
)


def marker_choices() -> dict[str, str]:
    """Marker presets as ``{label: name}``; the label shows what is measured and the threshold.

    Example: ``"CD8: membrane DAB ≥ 0.07 OD" -> "CD8"``.
    """
    from tilscore.markers import MARKERS

    return {f"{r.name}: {r.measure} DAB ≥ {r.threshold_od:g} OD": r.name for r in MARKERS.values()}


def preset_threshold(marker: str, config: Any = None) -> float:
    """The positivity threshold (DAB OD) of a marker under a config (default: the preset)."""
    from tilscore.config import load_config

    return float(load_config(config).marker_rule(marker).threshold_od)


# ------------------------------------------------------------------------- geometry / scope ---


def view_box_px(
    center_um: Sequence[float],
    canvas_size_px: Sequence[int],
    zoom: float,
    mpp: float,
    dimensions: Sequence[int],
) -> tuple[int, int, int, int]:
    """The part of the slide in view as a level-0 box ``(x, y, width, height)`` in px.

    Parameters
    ----------
    center_um
        The camera centre in world coordinates (µm), ``(..., y, x)``.
    canvas_size_px
        Canvas ``(height, width)`` in screen px.
    zoom
        Screen px per world unit (µm).
    mpp
        Level-0 µm/px of the slide.
    dimensions
        Level-0 ``(width, height)`` in px.

    Raises
    ------
    tilscore.errors.RegionError
        The view does not overlap the slide.
    """
    from tilscore.errors import RegionError

    cy, cx = float(center_um[-2]), float(center_um[-1])
    half_h = canvas_size_px[0] / zoom / 2.0
    half_w = canvas_size_px[1] / zoom / 2.0
    w0, h0 = int(dimensions[0]), int(dimensions[1])
    x0 = max(0, int(np.floor((cx - half_w) / mpp)))
    y0 = max(0, int(np.floor((cy - half_h) / mpp)))
    x1 = min(w0, int(np.ceil((cx + half_w) / mpp)))
    y1 = min(h0, int(np.ceil((cy + half_h) / mpp)))
    if x1 <= x0 or y1 <= y0:
        raise RegionError(
            "the field of view does not show any part of the slide",
            hint="Pan or zoom onto the slide, or choose the scope 'whole slide'",
        )
    return x0, y0, x1 - x0, y1 - y0


def box_polygon(box: Sequence[float]) -> Any:
    """A shapely box from ``(x, y, width, height)`` level-0 px."""
    from shapely.geometry import box as shapely_box

    x, y, w, h = (float(v) for v in box)
    return shapely_box(x, y, x + w, y + h)


def shapes_to_geometry(data: Sequence[np.ndarray], shape_types: Sequence[str] | None = None) -> Any:
    """The union of napari shapes (``(N, 2)`` arrays, (y, x) level-0 px) as a shapely geometry.

    Rectangles, polygons and ellipses count (as :meth:`tilscore.regions.RegionSet.from_shapes`
    reads them); lines and paths enclose no area and are ignored. None when nothing is left.
    """
    from tilscore.regions import RegionSet

    keep = [
        (np.asarray(v, float)[:, -2:], t)
        for v, t in zip(data, shape_types or ["polygon"] * len(data))
        if t not in ("line", "path")
    ]
    if not keep:
        return None
    geom = RegionSet.from_shapes([v for v, _ in keep], "roi", [t for _, t in keep]).geometry("roi")
    return None if geom.is_empty else geom


def geometry_to_shapes(geom: Any) -> list[np.ndarray]:
    """Exterior rings of a shapely (Multi)Polygon as napari (y, x) polygons (holes dropped)."""
    if geom is None or geom.is_empty:
        return []
    parts = list(getattr(geom, "geoms", [geom]))
    out = []
    for part in parts:
        if part.geom_type != "Polygon" or part.is_empty:
            continue
        xy = np.asarray(part.exterior.coords, dtype=float)[:-1]
        out.append(xy[:, ::-1].copy())
    return out


def regions_from_shapes(layers: Mapping[str, tuple[Sequence[np.ndarray], Sequence[str]]]) -> Any:
    """A :class:`tilscore.regions.RegionSet` from Shapes layer contents, one entry per class.

    Parameters
    ----------
    layers
        Region class -> ``(data, shape_types)`` of its Shapes layer ((y, x) level-0 px).

    Returns
    -------
    RegionSet or None
        None when no layer holds a shape.
    """
    from tilscore.regions import RegionSet

    data: list[np.ndarray] = []
    classes: list[str] = []
    types: list[str] = []
    for cls, (shapes, kinds) in layers.items():
        for verts, kind in zip(shapes, kinds):
            if kind in ("line", "path"):
                continue
            data.append(np.asarray(verts, dtype=float)[:, -2:])
            classes.append(cls)
            types.append(kind)
    if not data:
        return None
    return RegionSet.from_shapes(data, classes, shape_types=types)


def regions_for_run(regions: Any, scope: Any = None, automatic: bool = False) -> Any:
    """The RegionSet a run uses: drawn/loaded regions, the scope as its ``roi``.

    Parameters
    ----------
    regions
        :class:`tilscore.regions.RegionSet` or None.
    scope
        shapely geometry (level-0 px) the run is limited to, or None (whole slide).
    automatic
        Automatic compartments: drop the tumour / stroma / bed / margin regions (``exclude``
        and ``roi`` regions still apply).

    Raises
    ------
    tilscore.errors.RegionError
        The scope does not overlap the drawn ``roi`` regions.
    """
    import shapely

    from tilscore.errors import RegionError
    from tilscore.regions import QUPATH_CLASSES, Region, RegionSet

    kept = [r for r in (regions or []) if not automatic or r.cls in ("exclude", "roi")]
    if scope is not None:
        rois = [r.geometry for r in kept if r.cls == "roi"]
        area = scope if not rois else shapely.intersection(shapely.union_all(rois), scope)
        if area.is_empty or area.area <= 0:
            raise RegionError(
                "the scope does not overlap the drawn 'roi' regions",
                hint="Draw the roi inside the view, or choose the scope 'whole slide'",
            )
        kept = [r for r in kept if r.cls != "roi"] + [Region("roi", area, QUPATH_CLASSES["roi"][0])]
    if not kept:
        return None
    return RegionSet(kept, source=getattr(regions, "source", None) or "napari")


# -------------------------------------------------------------------------------- results ---


def cell_colours(positive: np.ndarray) -> np.ndarray:
    """(N, 4) RGBA face colours: :data:`POSITIVE_RGBA` for positive cells, else negative."""
    pos = np.asarray(positive, dtype=bool)
    out = np.empty((len(pos), 4), dtype=np.float32)
    out[:] = NEGATIVE_RGBA
    out[pos] = POSITIVE_RGBA
    return out


def hex_colour(rgba: Sequence[float]) -> str:
    """``#rrggbbaa`` of an RGBA colour with 0-1 components."""
    return "#" + "".join(f"{round(float(c) * 255):02x}" for c in rgba)


def translucent(colours: np.ndarray, alpha: float = 0.25) -> np.ndarray:
    """The same RGBA colours with opacity ``alpha`` (cell faces over the stain)."""
    out = np.array(colours, dtype=np.float32, copy=True)
    out[:, 3] = alpha
    return out


def cell_points(cells: Any) -> tuple[np.ndarray, Any, np.ndarray]:
    """Points layer contents of a cells table.

    Returns
    -------
    coords
        (N, 2) float (y, x) level-0 px.
    features
        pandas.DataFrame of the per-cell measurements in :data:`FEATURE_COLUMNS` that exist.
    colours
        (N, 4) RGBA colours by ``positive`` (the widget draws them as rings).
    """
    coords = np.stack([cells["y"].to_numpy(float), cells["x"].to_numpy(float)], axis=1)
    cols = [c for c in FEATURE_COLUMNS if c in cells.columns]
    features = cells[cols].reset_index(drop=True)
    return coords.reshape(-1, 2), features, cell_colours(cells["positive"].to_numpy(bool))


def density_heatmap(
    cells: Any, dimensions: Sequence[int], mpp: float, bin_um: float, positive_only: bool = True
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Cells per mm² on a grid of ``bin_um`` squares over the slide.

    Parameters
    ----------
    cells
        Cells table (``x``, ``y`` level-0 px; ``positive``).
    dimensions
        Slide level-0 ``(width, height)`` (px).
    mpp
        Level-0 µm/px.
    bin_um
        Grid square edge (µm).
    positive_only
        Count only marker-positive cells.

    Returns
    -------
    image, scale, translate
        float32 (rows, cols) density per mm², and the layer's ``scale`` and ``translate`` in µm
        so that each square lies over the part of the slide it counts.
    """
    w0, h0 = dimensions
    bin_px = bin_um / mpp
    nx, ny = max(1, int(np.ceil(w0 / bin_px))), max(1, int(np.ceil(h0 / bin_px)))
    sel = cells["positive"].to_numpy(bool) if positive_only else np.ones(len(cells), bool)
    x = cells["x"].to_numpy(float)[sel]
    y = cells["y"].to_numpy(float)[sel]
    counts, _, _ = np.histogram2d(y, x, bins=[ny, nx], range=[[0, ny * bin_px], [0, nx * bin_px]])
    area_mm2 = (bin_um / 1000.0) ** 2
    return (
        (counts / area_mm2).astype(np.float32),
        (bin_um, bin_um),
        (bin_um / 2.0, bin_um / 2.0),
    )


def table_rows(summary: Any) -> list[list[str]]:
    """The per-compartment summary as rows of text for the dock table (:data:`TABLE_COLUMNS`)."""
    rows = []
    for _, rec in summary.iterrows():
        row = []
        for _, col, fmt in TABLE_COLUMNS:
            value = rec.get(col)
            if value is None or (isinstance(value, float) and not np.isfinite(value)):
                row.append("–")
            elif fmt == "{:d}":
                row.append(fmt.format(int(value)))
            elif fmt == "{}":
                row.append(str(value))
            else:
                row.append(fmt.format(float(value)))
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------- review ---

#: Symbols of the cells: as detected, and touched by the review (added, flipped, re-classed).
DETECTED_SYMBOL = "disc"
EDITED_SYMBOL = "diamond"
NEW_CELL_CLASSES = ("immune", "tumour", "other")


def review_cells(review: Any) -> Any:
    """The review's cells with ``edited`` (bool: added or touched by an edit record)."""
    cells = review.cells
    touched = review.edited_ids()
    cells["edited"] = cells["cell_id"].isin(touched).to_numpy() | cells["added"].to_numpy(bool)
    return cells


def cell_symbols(cells: Any) -> np.ndarray:
    """Per-cell symbols: :data:`EDITED_SYMBOL` where ``edited``, else :data:`DETECTED_SYMBOL`."""
    edited = cells["edited"].to_numpy(bool) if "edited" in cells else np.zeros(len(cells), bool)
    return np.where(edited, EDITED_SYMBOL, DETECTED_SYMBOL)


def points_changes(
    ids: np.ndarray, xy: np.ndarray, layer_ids: np.ndarray, layer_yx: np.ndarray
) -> tuple[list[int], np.ndarray, tuple[list[int], np.ndarray]]:
    """What a user did to the cells' Points layer, against the review's cells.

    Parameters
    ----------
    ids, xy
        The review's cells: ids and level-0 ``(x, y)``.
    layer_ids, layer_yx
        The layer's ``cell_id`` feature (-1 for points added in the layer) and its ``(y, x)``.

    Returns
    -------
    deleted
        Ids no longer in the layer.
    added
        ``(N, 2)`` level-0 ``(x, y)`` of the new points.
    moved
        ``(ids, (N, 2) x, y)`` of the points whose position changed.
    """
    ids = np.asarray(ids, np.int64)
    layer_ids = np.asarray(layer_ids, np.int64)
    layer_xy = np.asarray(layer_yx, float).reshape(-1, 2)[:, ::-1]
    new = layer_ids < 0
    deleted = sorted(set(ids.tolist()) - set(layer_ids[~new].tolist()))
    pos = dict(zip(ids.tolist(), np.asarray(xy, float).reshape(-1, 2)))
    moved_ids, moved_xy = [], []
    for cid, p in zip(layer_ids[~new].tolist(), layer_xy[~new]):
        old = pos.get(cid)
        if old is not None and not np.allclose(old, p, atol=1e-6):
            moved_ids.append(cid)
            moved_xy.append(p)
    return deleted, layer_xy[new], (moved_ids, np.asarray(moved_xy, float).reshape(-1, 2))


def merge_region_edits(
    current: Any, layers: Mapping[str, tuple[Sequence[np.ndarray], Sequence[str]]]
) -> Any:
    """The review's regions with the classes whose Shapes layer was edited replaced.

    A napari polygon has no holes, so a class whose layer still shows exactly its regions'
    outlines keeps its regions as they are (holes included); an edited class is read from its
    layer (:func:`regions_from_shapes`). Classes without a layer are kept.

    Parameters
    ----------
    current
        The review's :class:`tilscore.regions.RegionSet`.
    layers
        Region class -> ``(data, shape_types)`` of its Shapes layer ((y, x) level-0 px).
    """
    from tilscore.regions import RegionSet

    shown = current.to_shapes()
    kept = []
    for region in current:
        data = layers.get(region.cls)
        if data is None or _same_shapes(shown.get(region.cls, []), data[0]):
            kept.append(region)
    edited = {
        cls: data for cls, data in layers.items() if not _same_shapes(shown.get(cls, []), data[0])
    }
    new = regions_from_shapes(edited) if edited else None
    return RegionSet([*kept, *(new or [])], "reviewed")


def _same_shapes(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    if len(a) != len(b):
        return False
    for p, q in zip(a, b):
        p = np.asarray(p, float)[:, -2:]
        q = np.asarray(q, float)[:, -2:]
        if p.shape != q.shape or not np.allclose(p, q, atol=1e-3):
            return False
    return True


def counts_text(review: Any) -> str:
    """One line for the dock: the review's edits and what they changed."""
    if review is None or not review.records:
        return "no edits"
    c = review.counts()
    return (
        f"{c['edits']} edits by {', '.join(sorted({r.user for r in review.records}))}: "
        f"{c['added']} added, {c['removed']} removed, {c['flipped']} flipped, "
        f"{c['class_changed']} re-classed, {c['moved']} moved, {c['region_edits']} region edits"
    )


def finetune_function() -> Any:
    """``tilscore.detect.finetune`` where this tilscore has it (the detector fine-tuning of
    issue 16), else None: the widget then says fine-tuning is not available in this version."""
    import importlib

    try:
        detect = importlib.import_module("tilscore.detect")
    except ImportError:
        return None
    fn = getattr(detect, "finetune", None)
    return fn if callable(fn) else None


def finetune_corrections(
    reviews: Sequence[Any],
    labels_dir: str | Path,
    model_dir: str | Path,
    stop: Any = None,
    **options: Any,
) -> Generator[tuple[str, int, int], None, Any]:
    """Export the reviews' corrected cells as labels, then fine-tune the detector on them.

    The labels (:func:`tilscore.results.export_labels`) are read back as fields around each
    review's edits (:func:`tilscore.detect.labels.read_label_export`) and passed to
    ``tilscore.detect.finetune(images, labels, out=model_dir, mpp=..., **options)``, which runs
    in a thread. Yields ``(stage, done, total)`` for a napari worker; closing the generator
    (quitting the worker) cancels the fine-tune, which then writes no folder. Returns the new
    model folder.

    Raises
    ------
    tilscore.errors.TilscoreError
        Fine-tuning is not in this version of tilscore, or the labels cannot be used.
    """
    import queue
    import threading

    from tilscore.errors import TilscoreError
    from tilscore.results import export_labels

    fn = finetune_function()
    if fn is None:
        raise TilscoreError(
            "fine-tuning is not available in this version of tilscore",
            hint="The corrections can be exported as labels (Export labels…) and used once "
            "`tilscore finetune` is installed",
        )
    yield "labels", 0, 1
    export_labels(list(reviews), labels_dir)
    from tilscore.detect.labels import read_label_export

    images, labels, mpps = read_label_export(labels_dir)
    yield "labels", 1, 1
    steps = int(options.get("steps", 600))
    events: queue.Queue = queue.Queue()
    stop = stop if stop is not None else threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = fn(
                images,
                labels,
                out=Path(model_dir),
                mpp=mpps,
                progress=lambda step, total, _info: events.put((step, total)),
                cancel=stop.is_set,
                **options,
            )
        except BaseException as e:  # handed to the caller's thread below
            outcome["error"] = e
        finally:
            events.put(None)

    thread = threading.Thread(target=work, name="tilscore-finetune", daemon=True)
    thread.start()
    try:
        while (item := events.get()) is not None:
            yield "fine-tuning", int(item[0]), int(item[1] or steps)
    finally:  # also when the worker is quit: the fine-tune stops at its next step
        stop.set()
        thread.join()
    if "error" in outcome:
        if stop.is_set():  # cancelled by the user: no folder, no error
            return None
        raise outcome["error"]
    result = outcome.get("result")
    return getattr(result, "folder", None) or Path(model_dir)


# -------------------------------------------------------------------------------- session ---


@dataclass
class ScoringSession:
    """What the widget will score and what it got.

    Attributes
    ----------
    source
        The slide (path or open :class:`tilscore.Slide`).
    mpp
        Level-0 µm/px override for a slide that records none (None: from the file).
    marker, detector
        Marker preset name and detector ("cnn" or "classical").
    regions
        Drawn or loaded :class:`tilscore.regions.RegionSet`, or None (automatic compartments).
    scope
        Level-0 shapely geometry to restrict the run to (field of view, selected shapes), or
        None for the whole slide; it is passed as the run's ``roi`` region.
    automatic
        Automatic compartments: ignore drawn tumour / stroma / bed / margin regions.
    config
        Anything :func:`tilscore.config.load_config` takes.
    result
        The last :class:`tilscore.score.SlideResult` (re-classified when the threshold moves).
    """

    source: Any
    mpp: float | None = None
    marker: str = "CD8"
    detector: str = "cnn"
    regions: Any = None
    scope: Any = None
    automatic: bool = False
    config: Any = None
    result: Any = None
    review: Any = None
    _raw: Any = field(default=None, repr=False)

    def effective_config(self) -> Any:
        """The config with the widget's detector choice in ``[detect]``."""
        from tilscore.config import Config, load_config

        cfg = load_config(self.config)
        values = cfg.to_dict()
        values.setdefault("detect", {})["detector"] = self.detector
        return Config.from_dict(values, source=cfg.source)

    def run(self) -> Generator[tuple[str, int, int], None, Any]:
        """Score the slide, yielding ``(stage, done, total)``; returns the SlideResult.

        Meant for a napari ``thread_worker``: quitting the worker stops the run between tiles.
        """
        from tilscore.score import iter_score_slide

        result = yield from iter_score_slide(
            self.source,
            marker=self.marker,
            regions=regions_for_run(self.regions, self.scope, self.automatic),
            config=self.effective_config(),
            mpp=self.mpp,
        )
        self.result = self._raw = result
        return result

    def set_result(self, result: Any) -> None:
        """Adopt a :class:`~tilscore.score.SlideResult` scored elsewhere (e.g. by a script)."""
        self.result = self._raw = result
        self.review = None

    def start_review(self, user: str | None = None) -> Any:
        """The :class:`tilscore.review.Review` of the current result (made on first call)."""
        from tilscore.review import Review

        if self.result is None:
            raise RuntimeError("score a slide first")
        if self.review is None:
            self.review = Review(self._raw if self._raw is not None else self.result, user=user)
            if self.result is not self._raw and self._raw is not None:  # threshold moved
                rule = self.result.provenance["detection"]["marker"]
                self.review.rule = type(self.review.rule).from_dict(rule)
                self.review._derive(np.ones(len(self.review._table), bool), where=False)
        return self.review

    def adopt_review(self, review: Any) -> None:
        """Continue a review loaded from a result folder (:func:`tilscore.load_review`)."""
        self.result = self._raw = review.base
        self.review = review
        self.marker = review.base.marker
        self.sync_review()

    def sync_review(self) -> Any:
        """``result`` becomes the review's current state (cells, summary, regions); cheap: no
        copy of the provenance, no before/after statistics."""
        from dataclasses import replace

        rv = self.review
        prov = dict(rv.base.provenance)
        prov["detection"] = {**prov.get("detection", {}), "marker": rv.rule.to_dict()}
        self.result = replace(
            rv.base,
            provenance=prov,
            cells=rv.cells,
            summary=rv.summary,
            regions=rv.regions,
            compartments=rv.compartments,
        )
        return self.result

    def threshold(self) -> float:
        """The threshold (DAB OD) the current result uses, else the preset's."""
        if self.result is not None:
            rule = self.result.provenance.get("detection", {}).get("marker", {})
            if "threshold_od" in rule:
                return float(rule["threshold_od"])
        return preset_threshold(self.marker, self.config)

    def reclassify(self, threshold_od: float) -> Any:
        """Re-classify the cells of the last run at a new threshold (no detection); a review's
        manual calls are kept and the change is recorded in its audit trail."""
        if self._raw is None:
            raise RuntimeError("score a slide first")
        if self.review is not None:
            if abs(self.review.rule.threshold_od - float(threshold_od)) > 1e-12:
                self.review.reclassify(threshold_od=float(threshold_od))
            return self.sync_review()
        self.result = self._raw.reclassify(threshold_od=float(threshold_od))
        return self.result

    def export(self, folder: str | Path) -> dict[str, Path]:
        """Write the current result with :meth:`tilscore.score.SlideResult.save`; a review with
        edits writes the scored outputs, its audit trail and the reviewed outputs
        (:meth:`tilscore.review.Review.save`) and keeps appending to that folder."""
        if self.result is None:
            raise RuntimeError("score a slide first")
        if self.review is not None and self.review.records:
            return self.review.save(folder)
        return self.result.save(folder)

    def threshold_of(self) -> float:
        """The threshold of the review's rule, else :meth:`threshold`."""
        if self.review is not None:
            return float(self.review.rule.threshold_od)
        return self.threshold()

    def unsaved_edits(self) -> int:
        """Edits of the review that are in no folder's review.jsonl yet (lost if replaced)."""
        return 0 if self.review is None else int(self.review.pending)
