"""napari-tilscore: the napari plugin of tilscore.

Contributions (``napari.yaml``): a reader for whole-slide images (lazy multiscale layers in µm),
the three example slides as sample data, and the "TIL scoring" dock widget
(:class:`~napari_tilscore._widget.TilscoreWidget`), whose state and computations live in the
Qt-free :mod:`napari_tilscore.model`.
"""

from __future__ import annotations

from ._reader import napari_get_reader, read_slide

__version__ = "0.1.0"
__all__ = ["napari_get_reader", "read_slide"]
