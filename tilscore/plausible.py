"""Checks that an input is plausible before hours of work are spent on it.

A pixel size typed wrong (``--mpp 40``, a magnification, or ``1e9``) does not fail: the
detector resamples the slide to 0.5 µm/px, so a 1024 px field "at 40 µm/px" becomes 6.7
gigapixels and runs for hours. :func:`check_mpp` bounds the level-0 pixel size to what
brightfield scanners and microscope cameras record, and :func:`check_scoring_work` bounds the
pixels the detector would read; both raise a :class:`~tilscore.errors.ConfigError` naming the
slide and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

__all__ = [
    "MAX_WORK_PX",
    "MPP_RANGE",
    "check_mpp",
    "check_scoring_work",
    "regions_scale_mismatch",
]

#: Plausible level-0 pixel sizes (µm/px): a 100x oil objective gives about 0.05, a 2.5x scan
#: about 4. Scanners record 0.1-0.5 (40x about 0.25, 20x about 0.5).
MPP_RANGE = (0.05, 4.0)

#: The most pixels the detector may read at its 0.5 µm/px (slide area, tissue or not): a whole
#: 25 x 75 mm glass slide at 0.5 µm/px.
MAX_WORK_PX = 7.5e9

#: The detector's pixel size (µm/px).
DETECT_MPP = 0.5


def check_mpp(mpp: float, where: object = None, source: str | None = None) -> float:
    """``mpp`` when it is a plausible level-0 pixel size, else a clear ConfigError.

    ``where`` (a path) is named in the message; ``source`` says where the value came from
    ("user" for ``--mpp`` / ``mpp=``, else the file's metadata).
    """
    lo, hi = MPP_RANGE
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise ConfigError(f"the pixel size must be a number, got {mpp!r}", path=where) from None
    if math.isfinite(value) and lo <= value <= hi:
        return value
    if source in (None, "user"):
        what = f"a pixel size of {mpp!r} µm/px is not plausible (expected {lo}-{hi} µm/px)"
        hint = (
            "--mpp (mpp=) is the size of one level-0 pixel in µm, not a magnification: "
            "about 0.25 for a 40x scan and 0.5 for a 20x scan"
        )
    else:
        what = (
            f"the file records {value:.4g} µm/px ({source}), which is not a plausible "
            f"pixel size (expected {lo}-{hi} µm/px)"
        )
        hint = "Pass the true pixel size with --mpp (mpp=), e.g. 0.25 for a 40x scan"
    raise ConfigError(what, path=where, hint=hint)


def check_scoring_work(width_px: int, height_px: int, mpp: float, where: object = None) -> None:
    """Refuse a slide whose area, resampled to the detector's 0.5 µm/px, is implausibly large.

    This bounds the work before it starts: with a wrong pixel size a small image becomes
    billions of pixels.
    """
    scale = float(mpp) / DETECT_MPP
    work = float(width_px) * float(height_px) * scale * scale
    if work > MAX_WORK_PX:
        area_mm2 = float(width_px) * float(height_px) * float(mpp) ** 2 / 1e6
        raise ConfigError(
            f"{width_px} x {height_px} px at {mpp:.4g} µm/px is {area_mm2:.0f} mm² of slide, "
            f"{work / 1e9:.0f} gigapixels at the detector's {DETECT_MPP} µm/px, more than a "
            "whole 25 x 75 mm glass slide",
            path=where,
            hint="Check the pixel size (--mpp, the file's metadata); a section is at most "
            "smaller than 25 x 75 mm",
        )


def regions_scale_mismatch(regions: Any, tissue: Any) -> str | None:
    """Say so when annotations look drawn in another scale than the slide (else None).

    Regions in µm on a px slide, or in the coordinates of a pyramid level, often still fall
    inside the slide, and would be scored without a word (a quarter of the tissue). The test:
    the regions' bounding box, scaled about the origin by the ratio of the two boxes' sizes,
    matches the tissue's bounding box (intersection over union >= 0.85), while as given it
    does not (< 0.5), and the ratio is not close to 1. ``regions`` is a sequence of shapely
    geometries (or a RegionSet), ``tissue`` the tissue geometry.
    """
    import shapely
    from shapely import affinity

    geoms = [getattr(r, "geometry", r) for r in regions]
    geoms = [g for g in geoms if g is not None and not g.is_empty and g.area > 0]
    if not geoms or tissue is None or tissue.is_empty or tissue.area <= 0:
        return None
    r_box = shapely.box(*shapely.union_all([shapely.box(*g.bounds) for g in geoms]).bounds)
    t_box = shapely.box(*tissue.bounds)

    def iou(a: Any, b: Any) -> float:
        union = a.union(b).area
        return a.intersection(b).area / union if union > 0 else 0.0

    as_given = iou(r_box, t_box)
    if as_given >= 0.5:
        return None
    scale = math.sqrt(t_box.area / r_box.area)
    if not math.isfinite(scale) or 0.8 < scale < 1.25:
        return None
    scaled = iou(affinity.scale(r_box, scale, scale, origin=(0, 0)), t_box)
    if scaled < 0.85:
        return None
    return (
        f"the regions do not fit the tissue (their extent overlaps the tissue's by "
        f"{100 * as_given:.0f}%), but multiplied by {scale:.3g} they would ({100 * scaled:.0f}%): "
        "are they in another unit (µm instead of level-0 px) or from another pyramid level?"
    )
