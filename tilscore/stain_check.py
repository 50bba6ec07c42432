"""Is this a brightfield DAB IHC image at all? A check before cells are counted as positive.

tilscore separates hematoxylin from DAB; an H&E slide, a fluorescence image or a greyscale
image scored as if it were DAB IHC gives numbers (68 % "CD8-positive" cells on H&E) that mean
nothing. :func:`check_stains` looks at what the stain QC already read (the overview and the
tissue tiles the stain vectors came from) and answers:

- ``"refuse"``: clearly not brightfield DAB IHC: a dark background (fluorescence, dark field),
  no colour at all (greyscale), or tissue dominated by a pink, eosin-like stain (H&E);
- ``"doubt"``: a large share of eosin-like tissue; scored, with a warning;
- ``"ok"``.

:func:`apply_stain_check` turns the answer into a :class:`StainCheckError` (refused unless
``[stain] check = "warn"``, the CLI's ``--force-stain``) or a
:class:`~tilscore.errors.TilscoreWarning` that reaches the console, ``run.json``, the report,
and the ``stain_check`` column of the summary (and so a batch's summary).

The thresholds were set on this project's data (``../shared/data``, run through
:func:`tilscore.qc.slide_stain_qc`): the share of eosin-like stained pixels was 0.85 on the
H&E slide CMU-1-Small-Region, at most 0.043 on 278 real DAB IHC images (DeepLIIF 3, EndoNuke
247, NuClick 14, unlabeled-ihc 3, ki67-net 6, Ki67 Dlubak 5) and 0.34 on the synthetic CD68
example; the overview's
median brightness (pure black left out) was 4 and 9 on the two fluorescence slides, at least 86
on the IHC images (and 200-234 on Ki67 fields masked to black outside the tissue).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import TilscoreError, TilscoreWarning

__all__ = ["StainCheck", "StainCheckError", "apply_stain_check", "check_stains"]

#: share of eosin-like stained tissue pixels above which the slide is refused / doubted
PINK_REFUSE = 0.65
PINK_DOUBT = 0.45
#: median brightness (0-255) of the overview below which the background is dark
DARK_MEDIAN = 40.0
#: share of grey (R = G = B within 3) among the non-glass pixels above which it is greyscale
GREY_SHARE = 0.95
#: fewest stained pixels needed to judge the colour
MIN_PIXELS = 500


class StainCheckError(TilscoreError):
    """The image is clearly not brightfield DAB IHC (refused unless forced)."""


@dataclass
class StainCheck:
    """The answer of :func:`check_stains`: ``verdict`` "ok", "doubt" or "refuse"."""

    verdict: str
    reason: str = ""
    measures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reason": self.reason, "measures": dict(self.measures)}


#: Most pixels each measure looks at (a regular subsample beyond it: the shares do not change,
#: the time does; 3 MP of overview and 3 MP of stain tiles took a second).
MAX_PIXELS = 300_000


def _thin(px: np.ndarray) -> np.ndarray:
    step = -(-len(px) // MAX_PIXELS)
    return px[::step] if step > 1 else px


def _pixels(qc: Any) -> np.ndarray:
    tiles = [np.asarray(t)[..., :3].reshape(-1, 3) for t in (qc.sample_tiles or [])]
    if tiles:
        return _thin(np.concatenate(tiles))
    return _thin(np.asarray(qc.overview)[..., :3].reshape(-1, 3))


def check_stains(qc: Any) -> StainCheck:
    """Judge whether the slide of a :func:`tilscore.qc.slide_stain_qc` result is DAB IHC."""
    overview = _thin(np.asarray(qc.overview)[..., :3].reshape(-1, 3)).astype(np.int16)
    if overview.size == 0:
        return StainCheck("ok")
    lum = overview.mean(axis=1)
    # pure black pixels are left out: brightfield fields masked to black outside the tissue
    # (real Ki67 fragments in ../shared/data) are not dark-field images
    lit = lum[overview.max(axis=1) > 0]
    if lit.size < MIN_PIXELS:  # all black: nothing to judge (scored as it is: no tissue)
        return StainCheck("ok", "the image is black", {"lit_pixels": float(lit.size)})
    measures: dict[str, float] = {"overview_median_brightness": float(np.median(lit))}
    if measures["overview_median_brightness"] < DARK_MEDIAN:
        return StainCheck(
            "refuse",
            "the background is dark (median brightness "
            f"{measures['overview_median_brightness']:.0f} of 255): a fluorescence or dark-field "
            "image, not brightfield IHC",
            measures,
        )
    not_glass = lum < 220
    if np.count_nonzero(not_glass) >= MIN_PIXELS:
        spread = overview[not_glass].max(axis=1) - overview[not_glass].min(axis=1)
        measures["grey_share"] = float(np.mean(spread <= 3))
        if measures["grey_share"] >= GREY_SHARE:
            return StainCheck(
                "refuse",
                "the image is greyscale: hematoxylin and DAB cannot be told apart without colour",
                measures,
            )
    px = _pixels(qc).astype(np.float32)
    i0 = np.asarray(qc.background, dtype=np.float32)[:3]
    od = -np.log(np.clip((px + 1.0) / (i0 + 1.0), 1e-4, 1.0))
    norm = np.linalg.norm(od, axis=1)
    stained = norm > 0.15
    measures["pixels_judged"] = float(len(px))
    measures["stained_pixels"] = float(np.count_nonzero(stained))
    if measures["stained_pixels"] < MIN_PIXELS:
        return StainCheck("ok", "too little stained tissue to judge the stains", measures)
    u = od[stained] / norm[stained, None]
    pink = (u[:, 1] > u[:, 0] + 0.15) & (u[:, 1] > u[:, 2] + 0.15)
    measures["eosin_like_share"] = float(pink.mean())
    share = measures["eosin_like_share"]
    if share >= PINK_REFUSE:
        return StainCheck(
            "refuse",
            f"{100 * share:.0f}% of the stained tissue is pink (eosin-like): this looks like "
            "H&E, not DAB IHC, and its 'positive' cells would be meaningless",
            measures,
        )
    if share >= PINK_DOUBT:
        return StainCheck(
            "doubt",
            f"{100 * share:.0f}% of the stained tissue is pink (eosin-like); if this is H&E or "
            "another stain than DAB IHC, the positive cells mean nothing",
            measures,
        )
    return StainCheck("ok", "", measures)


def apply_stain_check(check: StainCheck, mode: str, where: object) -> str:
    """Refuse (``mode`` "refuse") or warn; returns the summary's ``stain_check`` value.

    "ok", "doubt" (scored with a warning) or "forced" (refused, but scored because
    ``[stain] check = "warn"``).
    """
    if check.verdict == "ok":
        return "ok"
    if check.verdict == "refuse" and mode != "warn":
        raise StainCheckError(
            f"not scored: {check.reason}",
            path=where,
            hint="If it is DAB IHC all the same, score it with --force-stain "
            '(config: [stain] check = "warn")',
        )
    prefix = "scored although " if check.verdict == "refuse" else "stain doubt: "
    warnings.warn(f"{where}: {prefix}{check.reason}", TilscoreWarning, stacklevel=2)
    return "forced" if check.verdict == "refuse" else "doubt"
