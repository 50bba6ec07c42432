"""Result folders read back: :func:`load_result` and :func:`load_review`.

A folder written by :meth:`tilscore.score.SlideResult.save` (``tilscore score -o DIR``) holds
run.json, summary.csv, cells.parquet, regions.geojson and compartments.geojson (the compartment
geometries, so a review recounts without scoring again). Where a review was made
(``review.jsonl``, see :mod:`tilscore.review`), :func:`load_result` returns the reviewed state:
the log replayed onto the scored cells, with ``provenance["review"]`` saying what changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .errors import ConfigError, TilscoreError, TilscoreWarning

if TYPE_CHECKING:  # pragma: no cover
    from .review import Review
    from .score import SlideResult

__all__ = [
    "COMPARTMENTS_FILE",
    "edited_box",
    "export_labels",
    "load_result",
    "load_review",
    "save_review",
    "write_compartments",
]

COMPARTMENTS_FILE = "compartments.geojson"
_RESCORE = "Score the slide again with this tilscore (tilscore score SLIDE -o DIR) to review it"


def write_compartments(result: SlideResult, path: str | os.PathLike) -> Path:
    """The compartment geometries, the excluded area and the scored area as GeoJSON (level-0
    px; one feature each, ``properties.tilscore_compartment`` names it)."""
    import shapely

    from .export import atomic_write

    comps = result.compartments
    parts = dict(comps.geometries)
    parts["excluded"] = comps.excluded
    area = getattr(result, "scored_area", None)
    if area is not None:
        parts["scored_area"] = area
    features = [
        {
            "type": "Feature",
            "geometry": json.loads(shapely.to_geojson(geom)),
            "properties": {
                "tilscore_compartment": name,
                "source": comps.sources.get(name, ""),
                "objectType": "annotation",
            },
        }
        for name, geom in parts.items()
        if geom is not None
    ]
    text = json.dumps({"type": "FeatureCollection", "features": features})
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_compartments(path: Path) -> tuple[Any, Any]:
    """``(Compartments, scored area or None)`` from :func:`write_compartments`'s file."""
    import shapely

    from .regions import COMPARTMENTS, Compartments

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        parts = {
            f["properties"]["tilscore_compartment"]: (
                shapely.geometry.shape(f["geometry"]),
                f["properties"].get("source", ""),
            )
            for f in data["features"]
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TilscoreError(
            f"unreadable compartments file ({exc})", path=path, hint=_RESCORE
        ) from None
    missing = [c for c in (*COMPARTMENTS, "excluded") if c not in parts]
    if missing:
        raise TilscoreError(f"compartments {missing} are missing", path=path, hint=_RESCORE)
    comps = Compartments(
        geometries={c: parts[c][0] for c in COMPARTMENTS},
        sources={c: parts[c][1] for c in COMPARTMENTS},
        excluded=parts["excluded"][0],
    )
    area = parts.get("scored_area", (None, ""))[0]
    return comps, area


def _need(folder: Path, name: str, hint: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise TilscoreError(f"the result folder has no {name}", path=folder, hint=hint)
    return path


def load_result(
    folder: str | os.PathLike, *, reviewed: bool = True, thumbnail: bool = True
) -> SlideResult:
    """A result folder as a :class:`~tilscore.score.SlideResult`; the reviewed state where a
    ``review.jsonl`` is present (and ``reviewed``).

    Parameters
    ----------
    folder
        Written by ``tilscore score -o DIR`` / ``SlideResult.save`` (and reviewed in napari).
    reviewed
        False: the result as scored, ignoring any review.
    thumbnail
        Read a small overview from the slide file (for the overlay and report) when it is still
        where run.json says.

    Raises
    ------
    TilscoreError
        Not a result folder, a file missing (an older tilscore wrote no compartments.geojson),
        unreadable files; :class:`tilscore.review.ReviewError` for a bad review.jsonl.
    """
    from .review import REVIEW_FILE

    folder = Path(folder)
    if reviewed and (folder / REVIEW_FILE).is_file():
        return load_review(folder, thumbnail=thumbnail).result()
    return _load_scored(folder, thumbnail)


def _load_scored(folder: Path, thumbnail: bool = True) -> SlideResult:
    from .regions import RegionSet
    from .score import SlideResult

    if not folder.is_dir():
        raise TilscoreError("result folder not found", path=folder)
    run = _need(folder, "run.json", "Give a folder written by tilscore score -o DIR")
    try:
        prov = json.loads(run.read_text(encoding="utf-8"))
        slide = prov["slide"]
        rule = prov["detection"]["marker"]
        mpp = float(slide["mpp"])
        dims = tuple(int(v) for v in slide["dimensions"])
        marker = str(rule["name"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TilscoreError(
            f"run.json is not a tilscore run record ({type(exc).__name__}: {exc})",
            path=run,
            hint=_RESCORE,
        ) from None
    prov.pop("review", None)  # the scored state; a review is replayed on top of it
    cells_path = _need(
        folder, "cells.parquet", "Score with [output] cells_parquet = true to review the cells"
    )
    comp_path = folder / "compartments.geojson"
    if not comp_path.is_file():
        raise TilscoreError(
            f"written by tilscore {prov.get('tilscore_version', '(unknown version)')}, which "
            "saved no compartments.geojson; its cells cannot be recounted",
            path=folder,
            hint=_RESCORE,
        )
    try:
        cells = pd.read_parquet(cells_path)
        summary = pd.read_csv(_need(folder, "summary.csv", _RESCORE))
    except TilscoreError:
        raise
    except Exception as exc:  # pyarrow / pandas errors of a damaged file
        raise TilscoreError(f"unreadable table ({exc})", path=cells_path, hint=_RESCORE) from None
    comps, area = read_compartments(comp_path)
    regions = RegionSet([], prov.get("regions", {}).get("source", "none"))
    if (folder / "regions.geojson").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TilscoreWarning)
            with contextlib.suppress(TilscoreError):  # no polygon: the result had none
                regions = RegionSet.from_geojson(folder / "regions.geojson")
        regions = RegionSet(regions.regions, prov.get("regions", {}).get("source", "file"))
    thumb, ds = None, 1.0
    if thumbnail and slide.get("path") and Path(slide["path"]).is_file():
        try:
            from .slide import open_slide

            with open_slide(slide["path"], mpp=mpp) as s:
                thumb = s.thumbnail(1600)
            ds = dims[0] / thumb.shape[1]
        except Exception as exc:  # the overview is optional: say why it is missing
            warnings.warn(
                f"{slide['path']}: no overview for the report ({exc})",
                TilscoreWarning,
                stacklevel=2,
            )
    return SlideResult(
        slide_id=str(slide.get("slide_id") or folder.name),
        path=slide.get("path"),
        marker=marker,
        mpp=mpp,
        dimensions=dims,  # type: ignore[arg-type]
        summary=summary,
        cells=cells,
        regions=regions,
        compartments=comps,
        provenance=prov,
        thumbnail=thumb,
        thumbnail_downsample=ds,
        scored_area=area,
    )


def load_review(
    folder: str | os.PathLike, user: str | None = None, *, thumbnail: bool = True
) -> Review:
    """The :class:`~tilscore.review.Review` of a result folder, its edits replayed, attached to
    the folder (further edits append to its review.jsonl). A folder without review.jsonl starts
    an empty review.

    A last line cut short by a crash is moved to ``review.jsonl.partial`` (with a warning) so
    that new edits start on a line of their own.
    """
    from .review import REVIEW_FILE, Review, read_review_log

    folder = Path(folder)
    base = _load_scored(folder, thumbnail)
    review = Review(base, user=user)
    path = folder / REVIEW_FILE
    if path.is_file():
        header, records = read_review_log(path)
        review._check_header(header, path)
        review.replay(records, path)
        cut_partial_line(path)
    review.attach(folder)
    return review


def cut_partial_line(path: Path) -> None:
    """Move a last line cut short (no newline at the end) to ``<name>.partial``."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return  # the usual case: one byte read
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    path.with_name(path.name + ".partial").write_bytes(data[keep:])
    with open(path, "r+b") as fh:
        fh.truncate(keep)


# -- fine-tuning labels -------------------------------------------------------------------------


def export_labels(
    results: Any, folder: str | os.PathLike, *, reviewed_only: bool = True
) -> dict[str, Any]:
    """Write the corrected cells of reviewed results as fine-tuning labels.

    One CSV per slide, ``<slide_id>.csv`` with columns ``x, y, positive, cell_class`` (level-0
    px, the format ``tilscore finetune`` reads), and ``labels.json`` listing for each: the slide
    file, its µm/px, the marker, the box that holds the review's edits (level-0 px) and the
    review counts.

    Parameters
    ----------
    results
        Reviewed result folders, :class:`Review` objects or reviewed SlideResults (one or many).
    reviewed_only
        Refuse results with no edit (their labels would only repeat the detector).

    Returns
    -------
    dict
        The manifest written to ``labels.json``.
    """
    from .evaluate import to_jsonable
    from .export import atomic_write
    from .review import Review

    items = results if isinstance(results, (list, tuple)) else [results]
    folder = Path(folder)
    entries = []
    used: set[str] = set()
    for item in items:
        edited_box = None
        if isinstance(item, Review):
            res, edited_box = item.result(), item.edited_box()
        elif isinstance(item, (str, os.PathLike)):
            review = _load_review_or_none(item)
            res = review.result() if review is not None else load_result(item)
            edited_box = review.edited_box() if review is not None else None
        else:
            res = item
        review_prov = res.provenance.get("review")
        if reviewed_only and not (review_prov and review_prov.get("counts", {}).get("edits")):
            raise ConfigError(
                f"{res.slide_id}: the result has no review edits; its labels would only repeat "
                "the detector",
                hint="Review it in napari first, or pass reviewed_only=False",
            )
        name = res.slide_id
        k = 1
        while name in used:
            k += 1
            name = f"{res.slide_id}_{k}"
        used.add(name)
        cells = res.cells[["x", "y", "positive", "cell_class"]].copy()
        cells["positive"] = cells["positive"].astype(bool)
        atomic_write(folder / f"{name}.csv", lambda p, c=cells: c.to_csv(p, index=False))
        entries.append(
            {
                "labels": f"{name}.csv",
                "slide": res.path,
                "slide_id": res.slide_id,
                "mpp": float(res.mpp),
                "dimensions": list(res.dimensions),
                "marker": res.marker,
                "n_cells": len(cells),
                "edited_box_px": edited_box,
                "scored_box_px": _scored_box(res),
                "review": (review_prov or {}).get("counts"),
            }
        )
    manifest = {
        "format": "tilscore labels 1",
        "columns": ["x", "y", "positive", "cell_class"],
        "units": "level-0 px",
        "slides": entries,
    }
    atomic_write(
        folder / "labels.json", lambda p: p.write_text(json.dumps(to_jsonable(manifest), indent=1))
    )
    return manifest


def _scored_box(res: Any) -> list[float] | None:
    """Level-0 box ``[x, y, width, height]`` of the area the result scored (None: unknown)."""
    area = getattr(res, "scored_area", None)
    if area is None or area.is_empty:
        return None
    x0, y0, x1, y1 = (float(v) for v in area.bounds)
    return [x0, y0, x1 - x0, y1 - y0]


def _load_review_or_none(folder: Any) -> Review | None:
    if not (Path(folder) / "review.jsonl").exists():
        return None
    return load_review(folder)


def edited_box(review: Review) -> list[float] | None:
    """The level-0 box ``[x, y, width, height]`` around every edited cell (None: no cell edit)."""
    xs: list[float] = []
    ys: list[float] = []
    for r in review.records:
        if r.action not in ("add_cell", "delete", "set_positive", "set_class", "move"):
            continue
        for v in [*r.before, *r.after]:
            if isinstance(v, dict) and "x" in v:
                xs.append(float(v["x"]))
                ys.append(float(v["y"]))
        if r.ids:
            sub = review._table[review._table["cell_id"].isin(list(r.ids))]
            xs += sub["x"].astype(float).tolist()
            ys += sub["y"].astype(float).tolist()
    if not xs:
        return None
    x0, y0 = min(xs), min(ys)
    return [x0, y0, max(xs) - x0, max(ys) - y0]


def save_review(review: Review, folder: str | os.PathLike, config: Any = None) -> dict[str, Path]:
    """:meth:`tilscore.review.Review.save`: the scored outputs (unless ``folder`` holds them),
    the audit trail and the reviewed outputs."""
    from .evaluate import to_jsonable
    from .export import atomic_write, write_cells
    from .review_log import REVIEW_FILE, REVIEWED_CELLS, REVIEWED_REGIONS, REVIEWED_SUMMARY

    folder = Path(folder)
    if _holds_base(review, folder):  # opened from this folder: its scored files stay as written
        base_files = {"summary": folder / "summary.csv", "cells": folder / "cells.parquet"}
    else:
        base_files = review.base_result().save(folder, config)
    if review.folder is None or review.folder.resolve() != folder.resolve():
        review.attach(folder)
    else:
        review._flush()
    files = dict(base_files)
    files["review"] = folder / REVIEW_FILE
    if not review.records:
        return files
    reviewed = review.result()
    files["summary_reviewed"] = atomic_write(
        folder / REVIEWED_SUMMARY, lambda p: reviewed.summary.to_csv(p, index=False)
    )
    files["cells_reviewed"] = write_cells(reviewed.cells, folder / REVIEWED_CELLS)
    if review.regions is not review.base.regions:
        files["regions_reviewed"] = reviewed.compartment_regions().save(folder / REVIEWED_REGIONS)
        write_compartments(reviewed, folder / "compartments_reviewed.geojson")
    prov = json.dumps(to_jsonable(reviewed.provenance), indent=1)
    files["run"] = atomic_write(folder / "run.json", lambda p: p.write_text(prov))
    text = reviewed.to_html()
    files["report"] = atomic_write(
        folder / "report.html", lambda p: p.write_text(text, encoding="utf-8")
    )
    return files


def _holds_base(review: Review, folder: Path) -> bool:
    """Whether ``folder`` already holds the scored outputs of these cells at this rule."""
    from .review_log import cells_fingerprint

    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        xy = pd.read_parquet(folder / "cells.parquet", columns=["x", "y"])
    except Exception:  # missing or unreadable: write them
        return False
    return (
        (folder / "compartments.geojson").is_file()
        and run.get("detection", {}).get("marker") == review.rule.to_dict()
        and len(xy) == review.n_scored
        and cells_fingerprint(xy) == review.fingerprint
    )
