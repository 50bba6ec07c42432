"""Synthetic IHC whole-slide images with ground truth: the test bed of every tilscore stage.

A slide is described by a :class:`SyntheticSlideSpec` (marker, size, µm/px, seed, densities,
appearance), laid out by :func:`make_layout` (regions as shapely geometries, one row per cell),
rendered for any box and µm/px by :func:`render_region` (Beer–Lambert H + DAB), and written as a
tiled pyramidal TIFF (:func:`write_slide`, Aperio style or OME-TIFF) with its truth
(:func:`write_truth`: cells CSV, QuPath GeoJSON regions, spec JSON).

>>> from tilscore.synthetic import make_synthetic_slide, synthetic_tile
>>> layout = make_synthetic_slide("cd8.tif", marker="CD8", width_px=4000)  # doctest: +SKIP
>>> rgb, cells = synthetic_tile("CD68", size_px=512, seed=3)  # doctest: +SKIP

Compartments of the truth (``compartment`` column):

==========  =================================================================
tumour      inside a tumour-cell nest
stroma      inside the tumour bed (the tumour's outer border) but not in a nest
margin      inside the invasive-margin band (``margin_width_um``, default 500 µm
            in total, centred on the bed border) and outside the bed
outside     other tissue
==========  =================================================================

Regenerate the example slides with ``python -m tilscore.synthetic examples OUTDIR``.
"""

from __future__ import annotations

from .layout import (
    CELL_TYPES,
    COMPARTMENTS,
    INTENSITY_THRESHOLDS,
    MARKER_TARGETS,
    TRUTH_COLUMNS,
    SyntheticLayout,
    SyntheticSlideSpec,
    compartment_of,
    make_layout,
)
from .render import cells_in_box, concentrations_to_od, od_to_rgb, region_mask, render_region
from .write import (
    EXAMPLES,
    REGION_CLASSES,
    make_example_slides,
    make_synthetic_slide,
    regions_geojson,
    synthetic_tile,
    truth_paths,
    write_slide,
    write_truth,
)

__all__ = [
    "CELL_TYPES",
    "COMPARTMENTS",
    "EXAMPLES",
    "INTENSITY_THRESHOLDS",
    "MARKER_TARGETS",
    "REGION_CLASSES",
    "TRUTH_COLUMNS",
    "SyntheticLayout",
    "SyntheticSlideSpec",
    "cells_in_box",
    "compartment_of",
    "concentrations_to_od",
    "make_example_slides",
    "make_layout",
    "make_synthetic_slide",
    "od_to_rgb",
    "region_mask",
    "regions_geojson",
    "render_region",
    "synthetic_tile",
    "truth_paths",
    "write_slide",
    "write_truth",
]
