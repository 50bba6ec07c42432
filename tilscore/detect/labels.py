"""Read a lab's cell labels for fine-tuning: point CSVs, QuPath GeoJSON, label masks.

:func:`read_labels` returns one table per image, ``x, y`` in continuous px coordinates of the
image (the centre of pixel (row i, column j) is (j + 0.5, i + 0.5), as QuPath writes them),
with ``positive`` (bool, or missing) and ``cell_class`` ("tumour", "immune", "other", or
missing). :func:`check_labels` rejects labels that cannot belong to the image.

Accepted:

* **CSV** with columns ``x, y`` and optionally ``positive`` (1/0, true/false, yes/no,
  "positive"/"negative") and ``cell_class``. Coordinates are px of the image as given; a CSV
  whose coordinates are in µm has columns ``x_um, y_um`` and is converted with the image's µm/px.
  CSV coordinates are taken as QuPath's (continuous): add nothing.
* **QuPath GeoJSON** ("Export objects as GeoJSON"): points (the counting tool: ``Point`` or
  ``MultiPoint`` geometry, any object type) and detections or cells (``objectType``
  "detection"/"cell": the centroid of the nucleus, else of the polygon). Region annotations
  (polygons of ``objectType`` "annotation") are not cells and are refused.
  ``classification.name`` gives ``positive`` ("Positive", "Negative", "1+", "2+", "3+") and
  ``cell_class`` ("Tumor", "Immune cells", "Lymphocyte", "Stroma", "Other", ...).
* **Label masks** (PNG/TIFF, same size as the image): each label (or, for a binary mask, each
  connected component) is one cell at its centroid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import TilscoreError

#: QuPath / common class names -> the detector's nucleus classes
CLASS_NAMES = {
    "tumour": "tumour",
    "tumor": "tumour",
    "epithelium": "tumour",
    "immune": "immune",
    "immune cells": "immune",
    "lymphocyte": "immune",
    "lymphocytes": "immune",
    "t cell": "immune",
    "other": "other",
    "stroma": "other",
    "fibroblast": "other",
    "macrophage": "other",
}
_POSITIVE = {"positive": True, "negative": False, "1+": True, "2+": True, "3+": True}
_TRUE = {"1", "true", "yes", "y", "positive", "pos", "+"}
_FALSE = {"0", "false", "no", "n", "negative", "neg", "-", ""}


class LabelError(TilscoreError):
    """A label file cannot be used for fine-tuning (unreadable, empty, wrong kind, wrong scale)."""


def _bool_column(values: pd.Series, path: str) -> pd.Series:
    out = []
    for v in values:
        t = str(v).strip().lower()
        if t in _TRUE:
            out.append(True)
        elif t in _FALSE or t == "nan":
            out.append(False)
        else:
            raise LabelError(
                f"column 'positive' holds {v!r}", path=path, hint="use 1/0, true/false or yes/no"
            )
    return pd.Series(out, dtype=bool)


def _class_column(values: pd.Series) -> pd.Series:
    return pd.Series(
        [CLASS_NAMES.get(str(v).strip().lower()) if pd.notna(v) else None for v in values],
        dtype=object,
    )


def _read_csv(path: str, mpp: float | None) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise LabelError(
            "the label file is empty", path=path, hint="export the points again"
        ) from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise LabelError(f"cannot read the label CSV: {exc}", path=path) from None
    cols = {c.strip().lower(): c for c in df.columns}
    if "x" in cols and "y" in cols:
        x, y = df[cols["x"]], df[cols["y"]]
    elif "x_um" in cols and "y_um" in cols:
        if not mpp:
            raise LabelError("points are in µm (x_um, y_um) but no µm/px is known", path=path)
        x, y = df[cols["x_um"]] / mpp, df[cols["y_um"]] / mpp
    else:
        raise LabelError(
            f"no x, y columns (found {', '.join(map(str, df.columns)) or 'none'})",
            path=path,
            hint="a label CSV needs columns x, y (px) and optionally positive, cell_class",
        )
    try:
        out = pd.DataFrame({"x": pd.to_numeric(x), "y": pd.to_numeric(y)}).astype(float)
    except (ValueError, TypeError):
        raise LabelError("x and y must be numbers", path=path) from None
    if "positive" in cols:
        out["positive"] = _bool_column(df[cols["positive"]], path).to_numpy()
    if "cell_class" in cols:
        out["cell_class"] = _class_column(df[cols["cell_class"]]).to_numpy()
    return out


def _centroid(geom: dict[str, Any]) -> tuple[float, float] | None:
    coords = geom.get("coordinates")
    kind = geom.get("type")
    if kind == "Polygon" and coords:
        ring = np.asarray(coords[0], float)
        if len(ring) < 3:
            return None
        xs, ys = ring[:, 0], ring[:, 1]
        cross = xs[:-1] * ys[1:] - xs[1:] * ys[:-1]
        a = cross.sum() / 2
        if abs(a) < 1e-9:
            return float(xs.mean()), float(ys.mean())
        cx = ((xs[:-1] + xs[1:]) * cross).sum() / (6 * a)
        cy = ((ys[:-1] + ys[1:]) * cross).sum() / (6 * a)
        return float(cx), float(cy)
    if kind == "MultiPolygon" and coords:
        return _centroid({"type": "Polygon", "coordinates": coords[0]})
    return None


def _class_name(props: dict[str, Any]) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        return c.get("name")
    if isinstance(c, str):
        return c
    return None


def _read_geojson(path: str) -> pd.DataFrame:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"cannot read the label file: {exc}", path=path) from None
    if not text.strip():
        raise LabelError("the label file is empty", path=path, hint="export the cells again")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelError(f"not valid JSON ({exc.msg} at line {exc.lineno})", path=path) from None
    except RecursionError:
        raise LabelError("the JSON is nested too deeply to read", path=path) from None
    feats = data.get("features", [data]) if isinstance(data, dict) else data
    rows: list[tuple[float, float, str | None]] = []
    regions = 0
    for f in feats if isinstance(feats, list) else []:
        if not isinstance(f, dict):
            continue
        props = f.get("properties") or {}
        geom = f.get("geometry") or {}
        kind = str(props.get("objectType", "annotation")).lower()
        name = _class_name(props)
        if geom.get("type") == "Point":
            x, y = geom["coordinates"][:2]
            rows.append((float(x), float(y), name))
        elif geom.get("type") == "MultiPoint":
            rows += [(float(p[0]), float(p[1]), name) for p in geom.get("coordinates", [])]
        elif kind in ("detection", "cell"):
            c = _centroid(props.get("nucleusGeometry") or f.get("nucleusGeometry") or geom)
            if c is not None:
                rows.append((c[0], c[1], name))
        elif kind == "annotation":
            regions += 1
    if not rows:
        if regions:
            raise LabelError(
                f"holds {regions} region annotation(s) and no cells",
                path=path,
                hint="export the cell detections or points instead (QuPath: select the "
                "detections, or use the Points tool, then File > Export objects as GeoJSON)",
            )
        raise LabelError("holds no cells (no points, detections or cells)", path=path)
    out = pd.DataFrame({"x": [r[0] for r in rows], "y": [r[1] for r in rows]}, dtype=float)
    names = [r[2] for r in rows]
    if any(n is not None for n in names):
        low = [str(n).strip().lower() if n is not None else "" for n in names]
        if any(t in _POSITIVE or t.startswith(("positive", "negative")) for t in low):
            out["positive"] = [
                _POSITIVE.get(t, t.startswith("positive") or t.endswith(": positive")) for t in low
            ]
        classes = [CLASS_NAMES.get(t.split(":")[0].strip()) for t in low]
        if any(c is not None for c in classes):
            out["cell_class"] = pd.Series(classes, dtype=object).to_numpy()
    return out


def _from_mask(mask: np.ndarray, path: str) -> pd.DataFrame:
    from scipy import ndimage

    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    if m.ndim != 2:
        raise LabelError(f"a label mask must be 2-D, got shape {m.shape}", path=path)
    if m.max(initial=0) <= 1 or np.unique(m).size <= 2:  # binary: connected components
        lab = ndimage.label(m > (m.max(initial=0) / 2))[0]
    else:
        lab = m.astype(np.int64)
    ids = np.unique(lab)
    ids = ids[ids != 0]
    if ids.size == 0:
        raise LabelError("the label mask has no labelled cell", path=path)
    cy, cx = np.asarray(ndimage.center_of_mass(np.ones_like(lab), lab, ids)).T.reshape(2, -1)
    return pd.DataFrame({"x": cx + 0.5, "y": cy + 0.5})


def read_labels(source: Any, mpp: float | None = None) -> pd.DataFrame:
    """Cell labels from a CSV, QuPath GeoJSON, label mask file or array, or a table.

    Parameters
    ----------
    source
        Path (``.csv``, ``.geojson``/``.json``, ``.png``/``.tif``/``.tiff`` mask), a
        DataFrame with ``x, y`` (continuous px), or an integer/bool label mask array.
    mpp
        µm/px of the image, to convert ``x_um, y_um`` CSV columns.

    Raises
    ------
    LabelError
        Missing, unreadable or empty file; no x, y columns; region annotations instead of
        cells; a mask without cells.
    """
    if isinstance(source, pd.DataFrame):
        if not {"x", "y"} <= set(source.columns):
            raise LabelError("a label table needs columns x, y")
        out = source.copy()
        out[["x", "y"]] = out[["x", "y"]].astype(float)
        return out.reset_index(drop=True)
    if isinstance(source, np.ndarray):
        return _from_mask(source, "label mask")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise LabelError("label file not found", path=path)
    ext = Path(path).suffix.lower()
    if ext == ".csv":
        return _read_csv(path, mpp)
    if ext in (".geojson", ".json"):
        return _read_geojson(path)
    if ext in (".png", ".tif", ".tiff"):
        if os.path.getsize(path) == 0:
            raise LabelError("the label file is empty", path=path)
        from PIL import Image

        try:
            return _from_mask(np.asarray(Image.open(path)), path)
        except OSError as exc:
            raise LabelError(f"cannot read the label mask: {exc}", path=path) from None
    raise LabelError(
        f"unknown label file type {ext!r}", path=path, hint="use .csv, .geojson or a mask .png/.tif"
    )


def check_labels(labels: pd.DataFrame, shape: tuple[int, int], name: str) -> None:
    """Refuse labels that cannot belong to an image of ``shape`` (H, W).

    Raises
    ------
    LabelError
        No cells; points outside the image (with the scale factor that would fit them, when one
        does: points exported at another resolution); points covering only a corner of the
        image (exported at a lower resolution, or the image is not the labelled one).
    """
    h, w = int(shape[0]), int(shape[1])
    if len(labels) == 0:
        raise LabelError("no cells in the labels", path=name, hint="label at least a few cells")
    x, y = labels["x"].to_numpy(float), labels["y"].to_numpy(float)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise LabelError("some label coordinates are not finite numbers", path=name)
    outside = (x < 0) | (x > w) | (y < 0) | (y > h)
    if outside.any():
        fx, fy = x.max() / w, y.max() / h
        hint = "points must be in px of this image (level 0, origin at its top-left corner)"
        if fx > 1.05 and fy > 1.05 and abs(np.log(fx / fy)) < 0.25:
            hint += (
                f"; they extend to {fx:.2f}x its width and {fy:.2f}x its height: were they "
                "exported at another resolution or pyramid level?"
            )
        raise LabelError(
            f"{int(outside.sum())} of {len(x)} points lie outside the {w}x{h} px image",
            path=name,
            hint=hint,
        )
    if len(x) >= 20 and x.max() < 0.5 * w and y.max() < 0.5 * h:
        raise LabelError(
            f"all {len(x)} points lie in the top-left {100 * x.max() / w:.0f}% x "
            f"{100 * y.max() / h:.0f}% of the {w}x{h} px image",
            path=name,
            hint="points in another scale (e.g. exported at a lower resolution)? If only "
            "that corner is labelled, crop the image to it: unlabelled cells would be "
            "learned as background",
        )


def read_label_export(
    folder: str | os.PathLike,
    *,
    mpp: float = 0.5,
    field_um: float = 256.0,
    margin_um: float = 32.0,
) -> tuple[list[np.ndarray], list[pd.DataFrame], list[float]]:
    """Images, labels and µm/px for :func:`~tilscore.detect.finetune` from reviewed cells.

    ``folder`` is what :func:`tilscore.results.export_labels` (napari's *Export labels…*)
    writes: ``labels.json`` and one CSV of level-0 px per slide. From each slide the box that
    holds the review's edits, grown by ``margin_um`` (at least one ``field_um`` square) but kept
    within the box of the scored area, is read at ``mpp`` and cut into fields of at most
    ``field_um``; each field keeps the cells inside it
    (fields without a cell are left out). Every cell the detector found there and the reviewer
    kept, added or re-called is a label: review a box completely before fine-tuning on it.

    Raises
    ------
    LabelError
        No ``labels.json``, a slide that cannot be opened, or no field with a cell.
    """
    from ..slide import open_slide

    folder = Path(folder)
    manifest_path = folder / "labels.json" if folder.is_dir() else folder
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = list(manifest["slides"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise LabelError(
            f"not a label export ({exc.__class__.__name__}: {exc})",
            path=manifest_path,
            hint="write one with Export labels… in napari or tilscore.results.export_labels",
        ) from None
    images: list[np.ndarray] = []
    tables: list[pd.DataFrame] = []
    for entry in entries:
        table = read_labels(manifest_path.parent / entry["labels"])
        if not entry.get("slide"):
            raise LabelError(
                f"{entry.get('slide_id')}: scored from an image in memory, so there is no slide "
                "file to cut the fields from",
                path=manifest_path,
                hint="save the image (PNG/TIFF) and score the file, or pass the image and its "
                f"CSV {entry['labels']} to tilscore.detect.finetune directly",
            )
        slide = open_slide(entry["slide"], mpp=entry.get("mpp"))
        width, height = slide.dimensions
        scale = mpp / slide.mpp  # level-0 px per field px
        box = entry.get("edited_box_px") or [0, 0, width, height]
        grow = margin_um / slide.mpp
        side = field_um / slide.mpp
        # within the scored area's box: cells beyond it were never detected nor reviewed
        sx, sy, sw, sh = entry.get("scored_box_px") or [0, 0, width, height]
        lo_x, lo_y = max(0.0, sx), max(0.0, sy)
        hi_x, hi_y = min(float(width), sx + sw), min(float(height), sy + sh)
        x0, y0 = max(lo_x, box[0] - grow), max(lo_y, box[1] - grow)
        x1 = min(hi_x, max(box[0] + box[2] + grow, x0 + side))
        y1 = min(hi_y, max(box[1] + box[3] + grow, y0 + side))
        if x1 - x0 < 1 or y1 - y0 < 1:  # the edits lie outside the scored area
            continue
        nx, ny = max(1, round((x1 - x0) / side)), max(1, round((y1 - y0) / side))
        xs, ys = np.linspace(x0, x1, nx + 1), np.linspace(y0, y1, ny + 1)
        for i in range(ny):
            for j in range(nx):
                bx, by = xs[j], ys[i]
                bw, bh = xs[j + 1] - bx, ys[i + 1] - by
                inside = table[
                    (table["x"] >= bx) & (table["x"] < bx + bw)
                    & (table["y"] >= by) & (table["y"] < by + bh)
                ].copy()  # fmt: skip
                if inside.empty:
                    continue
                rgb = slide.read_at_mpp(bx, by, bw, bh, mpp=mpp)
                inside["x"] = ((inside["x"] - bx) / scale).clip(0, rgb.shape[1])
                inside["y"] = ((inside["y"] - by) / scale).clip(0, rgb.shape[0])
                images.append(rgb)
                tables.append(inside.reset_index(drop=True))
    if not images:
        raise LabelError(
            "no reviewed cell in the label export",
            path=manifest_path,
            hint="review (and keep) some cells before fine-tuning",
        )
    return images, tables, [float(mpp)] * len(images)
