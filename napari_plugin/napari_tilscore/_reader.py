"""Reader contribution: whole-slide images as lazy multiscale image layers scaled in µm.

Every pyramid level of the slide becomes one lazy dask array (:meth:`tilscore.Slide.to_dask`):
napari reads only the tiles of the level it draws, so opening a 100,000 px slide reads nothing at
full resolution. The layer's ``scale`` is the level-0 pixel size in µm and its units are µm, so
the scale bar and every coordinate shown are in µm; cells, regions and heatmaps added by the
widget use the same scale over level-0 pixel coordinates.

A slide that records no pixel size is not given one: the reader raises
:class:`tilscore.errors.MissingPixelSizeError` naming the fix (the widget's µm/px field).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff")

#: Where the slide's details live in ``layer.metadata``.
META_KEY = "tilscore"

_MPP_HINT = (
    "Open it from the 'TIL scoring' widget (Plugins > tilscore) with its µm/px field, "
    "or pass mpp= to napari_tilscore.read_slide(path, mpp=0.5)"
)

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | Sequence[str]) -> Callable[..., list[LayerData]] | None:
    """napari's reader hook: a reader function for slide files, else None.

    Parameters
    ----------
    path
        One path or a list of paths (each must be a slide file).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(paths) == 1 and is_result_folder(paths[0]):
        return read_result_folder
    if not paths or not all(str(p).lower().endswith(SLIDE_SUFFIXES) for p in paths):
        return None
    return read_slides


def is_result_folder(path: str | os.PathLike) -> bool:
    """A folder written by ``tilscore score -o DIR`` (or the widget's Export…)."""
    p = Path(path)
    return p.is_dir() and (p / "run.json").is_file() and (p / "cells.parquet").is_file()


def read_result_folder(path: str | os.PathLike | Sequence[str]) -> list[Any]:
    """File > Open on a result folder: the "TIL scoring" widget opens it with its review.

    The slide, cells, compartments and every edit of ``review.jsonl`` come back through
    :meth:`napari_tilscore._widget.TilscoreWidget.open_result` (errors are notifications);
    napari gets no layer from the reader itself (its ``[(None,)]`` sentinel).
    """
    import napari

    folder = path if isinstance(path, (str, os.PathLike)) else path[0]
    viewer = napari.current_viewer()
    if viewer is None:
        return [(None,)]
    _, widget = viewer.window.add_plugin_dock_widget("napari-tilscore", "TIL scoring")
    widget.open_result(folder)
    return [(None,)]


def read_slides(path: str | Sequence[str]) -> list[LayerData]:
    """Read one or several slide files (napari's reader function)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        layers.extend(read_slide(p))
    return layers


def slide_layer_data(slide: Any, name: str | None = None) -> LayerData:
    """Layer data of an open :class:`tilscore.Slide`: a lazy multiscale RGB image in µm.

    Parameters
    ----------
    slide
        An open slide; it must stay open while the layer is shown (the arrays read from it).
    name
        Layer name (default: the file name).

    Returns
    -------
    tuple
        ``(data, kwargs, "image")``: ``data`` is a list of dask arrays, finest first (one array
        when the slide has one level); ``kwargs["metadata"]["tilscore"]`` holds ``path``, ``mpp``
        (µm/px at level 0), ``mpp_source``, ``dimensions`` (level-0 width, height in px) and
        ``vendor``.
    """
    levels = [slide.to_dask(level) for level in range(slide.level_count)]
    # napari needs strictly shrinking levels; drop any level that is not smaller than the last
    data = [levels[0]]
    for arr in levels[1:]:
        if arr.shape[0] < data[-1].shape[0] and arr.shape[1] < data[-1].shape[1]:
            data.append(arr)
    path = Path(slide.path)
    meta = {
        "path": str(path),
        "mpp": float(slide.mpp),
        "mpp_source": slide.mpp_source,
        "dimensions": tuple(int(v) for v in slide.dimensions),
        "vendor": slide.vendor,
        "slide": slide,
    }
    kwargs = {
        "name": name or path.name,
        "rgb": True,
        "multiscale": len(data) > 1,
        "scale": (float(slide.mpp_y), float(slide.mpp_x)),
        "units": ("um", "um"),
        # uint8 RGB: fixed limits, so napari computes nothing from the pixels
        "contrast_limits": (0, 255),
        "metadata": {META_KEY: meta},
    }
    return (data if len(data) > 1 else data[0], kwargs, "image")


def read_slide(path: str | os.PathLike, mpp: float | None = None) -> list[LayerData]:
    """Open a slide as napari layer data.

    Parameters
    ----------
    path
        SVS, NDPI, OME-TIFF, pyramidal or plain TIFF (anything :func:`tilscore.open_slide`
        reads).
    mpp
        Level-0 pixel size (µm/px) for a file that records none; overrides the file's.

    Raises
    ------
    tilscore.errors.MissingPixelSizeError
        The file records no pixel size and ``mpp`` is None.
    tilscore.errors.SlideReadError
        Missing, corrupt or unsupported file.
    """
    from tilscore.errors import MissingPixelSizeError
    from tilscore.slide import open_slide

    try:
        slide = open_slide(path, mpp=mpp)
    except MissingPixelSizeError as e:
        raise MissingPixelSizeError(e.reason, path=e.path, hint=_MPP_HINT) from e
    return [slide_layer_data(slide)]
