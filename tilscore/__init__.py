"""tilscore: score tumour-infiltrating immune cells in IHC whole-slide images.

The public API is small and imported lazily, so ``import tilscore`` stays fast:

>>> import tilscore
>>> slide = tilscore.open_slide("slide.svs")            # doctest: +SKIP
>>> hdr = tilscore.deconvolve(slide.read_region(0, 0, 512, 512))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    ConfigError,
    MissingPixelSizeError,
    RegionError,
    SlideReadError,
    TilscoreError,
    TilscoreWarning,
    UnsupportedFormatError,
)

# public name -> module that defines it (imported on first use)
_LAZY = {
    "Slide": "slide",
    "open_slide": "slide",
    "StainMatrix": "stain",
    "deconvolve": "stain",
    "reconstruct": "stain",
    "estimate_background": "stain",
    "estimate_stain_vectors": "stain",
    "TissueMask": "tissue",
    "tissue_mask": "tissue",
    "detect_cells": "detect",
    "Config": "config",
    "load_config": "config",
    "RegionSet": "regions",
    "load_regions": "regions",
    "SlideResult": "score",
    "load_result": "results",
    "load_review": "results",
    "Review": "review",
    "iter_score_slide": "score",
    "score_image": "score",
    "score_slide": "score",
    "run_batch": "batch",
    "run_cohort": "cohort",
    "register_slides": "register",
    "BatchReport": "batch",
}

if TYPE_CHECKING:  # pragma: no cover
    from .batch import BatchReport, run_batch
    from .cohort import run_cohort
    from .config import Config, load_config
    from .detect import detect_cells
    from .regions import RegionSet, load_regions
    from .register import register_slides
    from .results import load_result, load_review
    from .review import Review
    from .score import SlideResult, iter_score_slide, score_image, score_slide
    from .slide import Slide, open_slide
    from .stain import (
        StainMatrix,
        deconvolve,
        estimate_background,
        estimate_stain_vectors,
        reconstruct,
    )
    from .tissue import TissueMask, tissue_mask


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tilscore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BatchReport",
    "Config",
    "ConfigError",
    "MissingPixelSizeError",
    "RegionError",
    "RegionSet",
    "Review",
    "Slide",
    "SlideReadError",
    "SlideResult",
    "StainMatrix",
    "TilscoreError",
    "TilscoreWarning",
    "TissueMask",
    "UnsupportedFormatError",
    "__version__",
    "deconvolve",
    "detect_cells",
    "estimate_background",
    "estimate_stain_vectors",
    "iter_score_slide",
    "load_config",
    "load_regions",
    "load_result",
    "load_review",
    "open_slide",
    "reconstruct",
    "register_slides",
    "run_batch",
    "run_cohort",
    "score_image",
    "score_slide",
    "tissue_mask",
]
