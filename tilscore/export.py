"""Writing results: cells tables as CSV, Parquet or QuPath-compatible GeoJSON.

Every writer is atomic: it writes a temporary file beside the target and renames it, so a
killed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError

#: QuPath classification colours (RGB) of positive and negative cells.
CLASS_COLOURS = {"Positive": [200, 50, 50], "Negative": [112, 112, 225]}
CELL_FORMATS = (".csv", ".parquet", ".geojson")
# measurement columns exported to QuPath, with QuPath-style names
_MEASUREMENTS = {
    "confidence": "Detection: confidence",
    "nucleus_area_um2": "Nucleus: Area µm^2",
    "h_od_nucleus": "Nucleus: Hematoxylin OD mean",
    "dab_od_nucleus": "Nucleus: DAB OD mean",
    "dab_od_membrane": "Membrane: DAB OD mean",
    "dab_od_cytoplasm": "Cytoplasm: DAB OD mean",
    "dab_od_cell": "Cell: DAB OD mean",
    "intensity_bin": "Intensity bin",
}


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and rename the temporary file to ``path`` when it succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _number(v: Any) -> float | int | None:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    f = float(v)
    return f if math.isfinite(f) else None


def cells_to_geojson(cells: pd.DataFrame) -> dict[str, Any]:
    """Cells as a GeoJSON FeatureCollection of QuPath detection objects.

    Each cell is a Point at its centre (level-0 px) with ``objectType`` "detection", a
    ``classification`` Positive / Negative with its colour (QuPath 0.4+ schema), the cell class
    as the object's name and its measurements as a name -> value mapping. QuPath imports it with
    *File > Import objects*.
    """
    features = []
    cols = [c for c in _MEASUREMENTS if c in cells.columns]
    xs, ys = cells["x"].to_numpy(float), cells["y"].to_numpy(float)
    pos = cells["positive"].to_numpy(bool)
    classes = cells["cell_class"].astype(str).to_numpy() if "cell_class" in cells else None
    values = {c: cells[c].to_numpy() for c in cols}
    for i in range(len(cells)):
        name = "Positive" if pos[i] else "Negative"
        props: dict[str, Any] = {
            "objectType": "detection",
            "classification": {"name": name, "color": CLASS_COLOURS[name]},
            "measurements": {_MEASUREMENTS[c]: _number(values[c][i]) for c in cols},
        }
        if classes is not None:
            props["name"] = classes[i]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [round(xs[i], 2), round(ys[i], 2)]},
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_cells(cells: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a cells table; the format follows the suffix: .csv, .parquet or .geojson."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return atomic_write(path, lambda p: cells.to_csv(p, index=False))
    if suffix == ".parquet":
        return atomic_write(path, lambda p: cells.to_parquet(p, index=False))
    if suffix == ".geojson":
        text = json.dumps(cells_to_geojson(cells))
        return atomic_write(path, lambda p: p.write_text(text))
    raise ConfigError(
        f"cannot tell the output format from {path.name!r}",
        hint=f"Use one of the suffixes {', '.join(CELL_FORMATS)}",
    )
