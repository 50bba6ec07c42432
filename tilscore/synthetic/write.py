"""Writers of synthetic slides: tiled pyramidal TIFF (Aperio style or OME-TIFF) and truth files.

Every pyramid level is rendered directly at its own µm/px, a strip of tiles at a time, and
handed to tifffile as a tile iterator, so a slide of any size streams to disk in bounded memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely

from .._version import __version__
from ..errors import ConfigError
from .layout import TRUTH_COLUMNS, SyntheticLayout, SyntheticSlideSpec, make_layout
from .render import cells_in_box, render_region

_APERIO = "Aperio Image Library v12.0.15"
#: region name in a layout -> (QuPath class name, colour)
REGION_CLASSES = {
    "tissue": ("Tissue", [80, 80, 80]),
    "tumour_bed": ("Tumor bed", [128, 0, 128]),
    "tumour": ("Tumor", [200, 0, 0]),
    "stroma": ("Stroma", [150, 200, 150]),
    "margin": ("Margin", [255, 200, 0]),
    "nerve": ("Nerve", [0, 150, 255]),
}
_CHUNK_PX = 1024  # width of the strip rendered at once, in output px


def level_shapes(
    width_px: int, height_px: int, downsample: int, min_size_px: int = 512
) -> list[tuple[int, int, int]]:
    """(width, height, downsample) of each pyramid level, down to about ``min_size_px``."""
    levels = [(width_px, height_px, 1)]
    k = 1
    while max(width_px, height_px) // downsample**k >= min_size_px:
        f = downsample**k
        levels.append((max(1, width_px // f), max(1, height_px // f), f))
        k += 1
    return levels


def _tiles(
    layout: SyntheticLayout, width: int, height: int, factor: int, tile: int
) -> Iterator[np.ndarray]:
    """Row-major tiles (tile, tile, 3) of a level rendered at ``factor`` x the level-0 µm/px."""
    mpp = layout.mpp * factor
    ss = 1 if factor == 1 else 2
    per_chunk = max(1, _CHUNK_PX // tile)
    for row in range(math.ceil(height / tile)):
        y = row * tile * factor
        ncols = math.ceil(width / tile)
        for c0 in range(0, ncols, per_chunk):
            n = min(per_chunk, ncols - c0)
            strip = render_region(
                layout, c0 * tile * factor, y, n * tile, tile, mpp, supersample=ss
            )
            for i in range(n):
                yield strip[:, i * tile : (i + 1) * tile]


def _thumbnail(layout: SyntheticLayout, max_size_px: int) -> np.ndarray:
    w, h = layout.width_px, layout.height_px
    factor = max(w, h) / max_size_px
    tw, th = max(1, round(w / factor)), max(1, round(h / factor))
    return render_region(layout, 0, 0, tw, th, layout.mpp * factor, supersample=2)


def _label(layout: SyntheticLayout) -> np.ndarray:
    img = np.full((300, 300, 3), 250, np.uint8)
    spec = layout.spec
    for i, text in enumerate(("tilscore", "synthetic", spec.marker, f"seed {spec.seed}")):
        cv2.putText(img, text, (15, 60 + 60 * i), cv2.FONT_HERSHEY_SIMPLEX, 1.1, (20, 20, 20), 2)
    return img


def write_slide(
    layout: SyntheticLayout,
    path: str | os.PathLike,
    *,
    format: str = "aperio",
    tile_size: int = 256,
    jpeg_quality: int = 80,
    downsample: int | None = None,
    min_level_size_px: int = 512,
) -> Path:
    """Write the slide as a tiled, JPEG-compressed pyramidal TIFF, streaming tile by tile.

    Parameters
    ----------
    layout
        The slide, from :func:`make_layout`.
    path
        Output file (``.tif``/``.svs`` for Aperio, ``.ome.tif`` for OME).
    format
        "aperio": pages baseline, thumbnail, reduced levels, label, macro, with
        ``MPP = ...|AppMag = ...`` in the ImageDescription (as Aperio SVS). "ome": OME-TIFF with
        the pyramid in SubIFDs and ``PhysicalSizeX/Y`` in µm.
    tile_size
        Tile edge in px (a multiple of 16).
    jpeg_quality
        JPEG quality, 1-100.
    downsample
        Factor between pyramid levels (default 4 for Aperio, 2 for OME).
    min_level_size_px
        Levels are added while the longer side is at least this.

    Returns
    -------
    pathlib.Path
        The written file. Both formats also carry TIFF resolution tags (px/cm).
    """
    import tifffile

    fmt = format.lower()
    if fmt not in ("aperio", "ome"):
        raise ConfigError(f"unknown slide format {format!r}", hint="use 'aperio' or 'ome'")
    if tile_size % 16:
        raise ConfigError(f"tile_size {tile_size} is not a multiple of 16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = layout.spec
    w, h = layout.width_px, layout.height_px
    ds = downsample or (4 if fmt == "aperio" else 2)
    levels = level_shapes(w, h, ds, min_level_size_px)
    mag = round(10.0 / spec.mpp)
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": int(jpeg_quality)},
        "dtype": np.uint8,
    }
    bigtiff = w * h * 3 > 2**31
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=(fmt == "ome")) as tif:
        if fmt == "aperio":
            head = (
                f"{_APERIO}\r\n{w}x{h} [0,0 {w}x{h}] ({tile_size}x{tile_size})"
                f" JPEG/RGB Q={jpeg_quality}"
            )
            meta = (
                f"|AppMag = {mag}|MPP = {spec.mpp:.4f}|ScanScope ID = tilscore-synthetic"
                f"|Filename = {path.stem}|Marker = {spec.marker}|Seed = {spec.seed}"
            )
            for i, (lw, lh, f) in enumerate(levels):
                res = (1e4 / (spec.mpp * f), 1e4 / (spec.mpp * f))
                desc = head + meta if i == 0 else f"{head} -> {lw}x{lh} - {meta}"
                tif.write(
                    _tiles(layout, lw, lh, f, tile_size),
                    shape=(lh, lw, 3),
                    tile=(tile_size, tile_size),
                    description=desc,
                    resolution=res,
                    resolutionunit="CENTIMETER",
                    metadata=None,
                    **common,
                )
                if i == 0:  # page 1 of an SVS is the (stripped) thumbnail
                    thumb = _thumbnail(layout, 768)
                    tif.write(
                        thumb,
                        description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} - {meta}",
                        metadata=None,
                        **common,
                    )
            label = _label(layout)
            tif.write(
                label,
                photometric="rgb",
                compression="lzw",
                subfiletype=1,
                description=f"{_APERIO}\r\nlabel {label.shape[1]}x{label.shape[0]}",
                metadata=None,
            )
            macro = _thumbnail(layout, 512)
            macro = np.concatenate([np.full_like(macro[:, :160], 235), macro], axis=1)
            macro[:, :160] = cv2.resize(label, (160, macro.shape[0]))
            tif.write(
                macro,
                subfiletype=9,
                description=f"{_APERIO}\r\nmacro {macro.shape[1]}x{macro.shape[0]}",
                metadata=None,
                **common,
            )
        else:
            metadata = {
                "axes": "YXS",
                "Name": path.name.split(".")[0],
                "PhysicalSizeX": spec.mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": spec.mpp,
                "PhysicalSizeYUnit": "µm",
                "Description": f"tilscore {__version__} synthetic {spec.marker} seed {spec.seed}",
            }
            for i, (lw, lh, f) in enumerate(levels):
                res = (1e4 / (spec.mpp * f), 1e4 / (spec.mpp * f))
                extra: dict[str, Any] = (
                    {"subifds": len(levels) - 1, "metadata": metadata}
                    if i == 0
                    else {"subfiletype": 1, "metadata": None}
                )
                tif.write(
                    _tiles(layout, lw, lh, f, tile_size),
                    shape=(lh, lw, 3),
                    tile=(tile_size, tile_size),
                    resolution=res,
                    resolutionunit="CENTIMETER",
                    **extra,
                    **common,
                )
    os.replace(tmp, path)
    return path


def regions_geojson(layout: SyntheticLayout) -> dict[str, Any]:
    """The regions as a QuPath-compatible GeoJSON FeatureCollection (level-0 px).

    Classes: "Tumor" (nests), "Stroma" (bed minus nests), "Margin" (the compartment "margin":
    the outer half of the band, outside the bed), "Tumor bed", "Tissue", "Nerve". Tumor, Stroma
    and Margin are disjoint and match the ``compartment`` column of the truth.
    """
    features = []
    for name, (cls, colour) in REGION_CLASSES.items():
        geom = layout.regions[name]
        if geom.is_empty:
            continue
        geom = shapely.make_valid(geom)
        polys = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon"]
        if not polys:
            continue
        geom = polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)
        features.append(
            {
                "type": "Feature",
                "id": f"tilscore-synthetic-{name}",
                # on a 0.01 px grid (set_precision keeps it valid): full digits only bloat the file
                "geometry": json.loads(shapely.to_geojson(shapely.set_precision(geom, 0.01))),
                "properties": {
                    "objectType": "annotation",
                    "name": cls,
                    "classification": {"name": cls, "color": colour},
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def truth_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """Paths of the truth files for a slide path or prefix (``<stem>.cells.csv`` ...)."""
    prefix = Path(prefix)
    if prefix.is_dir():
        prefix = prefix / "synthetic"
    name = prefix.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    base = prefix.with_name(name)
    return {
        "cells": base.with_name(name + ".cells.csv"),
        "regions": base.with_name(name + ".regions.geojson"),
        "spec": base.with_name(name + ".spec.json"),
    }


def write_truth(layout: SyntheticLayout, prefix: str | os.PathLike) -> dict[str, Path]:
    """Write ``<prefix>.cells.csv``, ``<prefix>.regions.geojson`` and ``<prefix>.spec.json``.

    Parameters
    ----------
    layout
        The slide.
    prefix
        A slide path (its suffix is dropped), a path prefix, or a folder ("synthetic.*" in it).

    Returns
    -------
    dict
        "cells", "regions", "spec" -> written paths.
    """
    paths = truth_paths(prefix)
    paths["cells"].parent.mkdir(parents=True, exist_ok=True)
    truth = layout.truth()
    for col in ("x", "y", "x_um", "y_um", "nucleus_diameter_um", "nucleus_major_um",
                "nucleus_minor_um", "cell_diameter_um", "cell_x", "cell_y"):  # fmt: skip
        truth[col] = truth[col].round(3)
    truth["intensity"] = truth["intensity"].round(4)
    _atomic_text(paths["cells"], truth.to_csv(index=False, lineterminator="\n"))
    _atomic_text(paths["regions"], json.dumps(regions_geojson(layout)))
    info = {
        "tilscore_version": __version__,
        "spec": layout.spec.to_dict(),
        "compartment_areas_mm2": layout.compartment_areas_mm2(),
        "truth_columns": list(TRUTH_COLUMNS),
    }
    _atomic_text(paths["spec"], json.dumps(info, indent=1))
    return paths


def _atomic_text(path: Path, text: str) -> None:
    from ..export import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def make_synthetic_slide(
    path: str | os.PathLike,
    marker: str = "CD8",
    width_px: int = 4096,
    height_px: int = 4096,
    mpp: float = 0.5,
    seed: int = 0,
    format: str = "aperio",
    *,
    tile_size: int = 256,
    jpeg_quality: int = 80,
    **spec_overrides: Any,
) -> SyntheticLayout:
    """Make a synthetic slide and write it with its truth files beside it.

    Parameters
    ----------
    path
        The slide file to write; truth goes to ``<stem>.cells.csv``, ``<stem>.regions.geojson``
        and ``<stem>.spec.json`` in the same folder.
    marker
        "CD8", "CD68" or "CD56".
    width_px, height_px
        Level-0 size in px.
    mpp
        Level-0 µm/px.
    seed
        Seed of the slide.
    format
        "aperio" or "ome" (see :func:`write_slide`).
    tile_size, jpeg_quality
        TIFF tile edge (px) and JPEG quality.
    **spec_overrides
        Further :class:`SyntheticSlideSpec` fields.

    Returns
    -------
    SyntheticLayout
        The layout written (regions and truth cells).
    """
    spec = SyntheticSlideSpec(
        marker=marker, width_px=width_px, height_px=height_px, mpp=mpp, seed=seed
    )
    layout = make_layout(spec, **spec_overrides)
    write_slide(layout, path, format=format, tile_size=tile_size, jpeg_quality=jpeg_quality)
    write_truth(layout, path)
    return layout


def synthetic_tile(
    marker: str = "CD8", size_px: int = 512, mpp: float = 0.5, seed: int = 0, **overrides: Any
):
    """A quick in-memory synthetic tile and its truth (tissue everywhere, inside a tumour bed).

    Parameters
    ----------
    marker
        "CD8", "CD68" or "CD56".
    size_px
        Edge of the square tile in px.
    mpp
        µm/px of the tile.
    seed
        Seed.
    **overrides
        :class:`SyntheticSlideSpec` fields (defaults here: ``tissue_fraction=1``,
        ``tumour_bed_fraction=1``, one nerve on CD56 tiles, none otherwise).

    Returns
    -------
    rgb : numpy.ndarray
        (size_px, size_px, 3) uint8.
    cells : pandas.DataFrame
        Truth of the cells whose centre lies in the tile (x, y in tile px).
    """
    options: dict[str, Any] = {
        "tissue_fraction": 1.0,
        "tumour_bed_fraction": 1.0,
        "nerve_count": 1 if marker.upper() == "CD56" else 0,
    }
    options.update(overrides)
    spec = SyntheticSlideSpec(
        marker=marker, width_px=size_px, height_px=size_px, mpp=mpp, seed=seed
    )
    layout = make_layout(spec, **options)
    rgb = render_region(layout, 0, 0, size_px, size_px, mpp)
    return rgb, cells_in_box(layout, 0, 0, size_px, size_px)


#: the bundled example slides: name -> (marker, seed)
EXAMPLES = {
    "synthetic_cd8": ("CD8", 11),
    "synthetic_cd68": ("CD68", 12),
    "synthetic_cd56": ("CD56", 13),
}


def make_example_slides(
    outdir: str | os.PathLike,
    width_px: int = 4000,
    height_px: int = 3000,
    mpp: float = 0.5,
    jpeg_quality: int = 75,
) -> dict[str, Path]:
    """(Re)generate the example slides (CD8, CD68, CD56; Aperio-style .tif + truth) in ``outdir``.

    The defaults are those of the bundled ``example_slides/`` (about 2.3 MB per slide with its
    truth).

    Returns
    -------
    dict
        Example name -> slide path.
    """
    outdir = Path(outdir)
    out = {}
    for name, (marker, seed) in EXAMPLES.items():
        path = outdir / f"{name}.tif"
        make_synthetic_slide(
            path,
            marker=marker,
            width_px=width_px,
            height_px=height_px,
            mpp=mpp,
            seed=seed,
            jpeg_quality=jpeg_quality,
        )
        out[name] = path
    return out
