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

from .errors import ConfigError

__all__ = ["MAX_WORK_PX", "MPP_RANGE", "check_mpp", "check_scoring_work"]

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
