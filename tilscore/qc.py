"""Slide-level quality control: metadata summary, thumbnail, tissue mask and stain estimate.

:func:`slide_stain_qc` is what ``tilscore stain-qc`` and ``tilscore demo`` run: it finds the
tissue, estimates the glass brightness ``I0`` from a slide overview and the hematoxylin / DAB
vectors from tissue tiles sampled at detection-like resolution, and :func:`write_stain_qc` writes
the images and the JSON record a user checks before trusting the numbers.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import TilscoreWarning

if TYPE_CHECKING:  # pragma: no cover
    from .slide import Slide
    from .stain import StainMatrix
    from .tissue import TissueMask

#: Largest side (px) of the slide overview used for the background and the QC images.
OVERVIEW_MAX_PX = 2048


def slide_info(slide: Slide) -> dict[str, Any]:
    """A JSON-able summary of a slide: size, levels, pixel size, vendor, associated images."""
    w, h = slide.dimensions
    return {
        "path": str(slide.path),
        "vendor": slide.vendor,
        "width_px": int(w),
        "height_px": int(h),
        "mpp": float(slide.mpp),
        "mpp_x": float(slide.mpp_x),
        "mpp_y": float(slide.mpp_y),
        "mpp_source": slide.mpp_source,
        "width_mm": w * slide.mpp_x / 1000.0,
        "height_mm": h * slide.mpp_y / 1000.0,
        "objective_power": slide.objective_power,
        "associated_images": sorted(slide.associated_images),
        "levels": [
            {
                "level": i,
                "width_px": int(dims[0]),
                "height_px": int(dims[1]),
                "downsample": float(slide.level_downsamples[i]),
                "mpp": float(slide.level_mpp(i)),
            }
            for i, dims in enumerate(slide.level_dimensions)
        ],
    }


def write_thumbnail(slide: Slide, path: str | os.PathLike, max_size: int = 1024) -> Path:
    """Write a PNG thumbnail of the whole slide whose longer side is ``max_size`` px."""
    from .export import write_png

    return write_png(slide.thumbnail(max_size), Path(path))


@dataclass
class StainQC:
    """What :func:`slide_stain_qc` found for one slide.

    Attributes
    ----------
    slide_path, mpp
        The slide and its level-0 pixel size (µm/px).
    background
        (3,) glass brightness ``I0`` (R, G, B, 8-bit) estimated from the overview.
    stains
        The stain matrix to use for this slide (estimated, or the defaults with a warning).
    tissue
        The tissue mask.
    overview, overview_mpp
        The slide overview (RGB uint8) and its pixel size (µm/px).
    sample_tiles
        Tissue tiles (RGB uint8, at ``sample_mpp``) the vectors were estimated from.
    sample_mpp
        Their pixel size (µm/px).
    warnings
        Fallbacks and repairs, as sentences.
    """

    slide_path: Path
    mpp: float
    background: np.ndarray
    stains: StainMatrix
    tissue: TissueMask
    overview: np.ndarray
    overview_mpp: float
    sample_tiles: list[np.ndarray]
    sample_mpp: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (the provenance of the stain and background choice)."""
        h, w = self.overview.shape[:2]
        slide_area_mm2 = w * h * (self.overview_mpp / 1000.0) ** 2
        tissue_mm2 = float(self.tissue.area_mm2)
        return {
            "slide": str(self.slide_path),
            "mpp": self.mpp,
            "background": [float(v) for v in self.background],
            "stains": self.stains.to_dict(),
            "tissue_area_mm2": tissue_mm2,
            "tissue_fraction": tissue_mm2 / slide_area_mm2 if slide_area_mm2 > 0 else 0.0,
            "tissue_mask_mpp": float(self.tissue.mpp),
            "overview_mpp": self.overview_mpp,
            "sample_mpp": self.sample_mpp,
            "n_sample_tiles": len(self.sample_tiles),
            "warnings": list(self.warnings),
        }


def _sample_tissue_boxes(
    slide: Slide, tissue: TissueMask, mpp: float, size_px: int, max_tiles: int, min_fraction: float
) -> list[tuple[float, float, float]]:
    """Level-0 boxes (x, y, side) of up to ``max_tiles`` tissue tiles spread over the slide."""
    side = size_px * mpp / slide.mpp  # level-0 px
    w, h = slide.dimensions
    ys, xs = np.meshgrid(
        np.arange(0, max(h - side, 0) + 1, side),
        np.arange(0, max(w - side, 0) + 1, side),
        indexing="ij",
    )  # row by row, as the scan goes; every box's fraction in one call
    on = np.atleast_1d(tissue.fraction_in(xs.ravel(), ys.ravel(), side, side)) >= min_fraction
    boxes = [(float(x), float(y), float(side)) for x, y in zip(xs.ravel()[on], ys.ravel()[on])]
    if len(boxes) > max_tiles:  # evenly spaced over the scan order: deterministic and spread out
        pick = np.linspace(0, len(boxes) - 1, max_tiles).round().astype(int)
        boxes = [boxes[i] for i in pick]
    return boxes


def slide_stain_qc(
    slide: Slide,
    *,
    tissue: TissueMask | None = None,
    sample_mpp: float = 1.0,
    sample_tile_px: int = 512,
    max_tiles: int = 12,
) -> StainQC:
    """Find the tissue, the glass brightness and the stain vectors of a slide.

    Parameters
    ----------
    slide
        An open slide.
    tissue
        A precomputed tissue mask; computed at 8 µm/px when omitted.
    sample_mpp
        Pixel size (µm/px) of the tissue tiles the stain vectors are estimated from.
    sample_tile_px
        Side of those tiles (px at ``sample_mpp``).
    max_tiles
        At most this many tiles, spread evenly over the tissue.

    Returns
    -------
    StainQC
    """
    from .stain import estimate_background, estimate_stain_vectors
    from .tissue import tissue_mask

    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", TilscoreWarning)
        if tissue is None:
            tissue = tissue_mask(slide)
        w, h = slide.dimensions
        overview_mpp = max(slide.mpp, max(w, h) * slide.mpp / OVERVIEW_MAX_PX)
        overview = slide.read_at_mpp(0, 0, w, h, overview_mpp)
        import cv2

        on_tissue = cv2.resize(
            tissue.mask.astype(np.uint8),
            (overview.shape[1], overview.shape[0]),
            interpolation=cv2.INTER_NEAREST,
        ).astype(bool)
        if tissue.info.get("background_source") == "estimated":
            background = estimate_background(overview, mask=on_tissue)
        else:  # no glass in the image (all tissue): the tissue mask's fallback, said there
            background = np.asarray(tissue.info.get("background", (255.0,) * 3), float)
        sample_mpp = max(sample_mpp, slide.mpp)
        boxes = _sample_tissue_boxes(slide, tissue, sample_mpp, sample_tile_px, max_tiles, 0.5)
        if not boxes:  # small or sparse tissue: take the best tiles there are
            boxes = _sample_tissue_boxes(slide, tissue, sample_mpp, sample_tile_px, max_tiles, 0.05)
        tiles = [slide.read_at_mpp(x, y, s, s, sample_mpp) for x, y, s in boxes]
        if tiles:
            stains = estimate_stain_vectors(np.concatenate(tiles, axis=0), background=background)
        else:
            stains = estimate_stain_vectors(overview, mask=on_tissue, background=background)
    caught = [str(r.message) for r in records if issubclass(r.category, TilscoreWarning)]
    return StainQC(
        slide_path=Path(slide.path),
        mpp=float(slide.mpp),
        background=np.asarray(background, dtype=float),
        stains=stains,
        tissue=tissue,
        overview=overview,
        overview_mpp=float(overview_mpp),
        sample_tiles=tiles,
        sample_mpp=float(sample_mpp),
        warnings=caught,
    )


def _outline(image: np.ndarray, mask: np.ndarray, colour=(0, 200, 0), width: int = 2) -> np.ndarray:
    import cv2

    m = cv2.resize(
        mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST
    )
    contours, _ = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    out = image.copy()
    cv2.drawContours(out, contours, -1, colour, width)
    return out


def write_stain_qc(qc: StainQC, slide: Slide, outdir: str | os.PathLike) -> dict[str, Path]:
    """Write the stain QC of a slide into ``outdir``.

    Files: ``tissue.png`` (overview with the tissue outline), ``hematoxylin.png`` and
    ``dab.png`` (the overview rendered with one stain each), ``stain_tile.png`` (the sampled tile
    with the most DAB: RGB | hematoxylin | DAB side by side, at the sample resolution) and
    ``stain.json`` (background, vectors, warnings).

    Returns
    -------
    dict
        Name -> path of each file written.
    """
    from .export import write_png
    from .stain import deconvolve, reconstruct

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = {"tissue": write_png(_outline(qc.overview, qc.tissue.mask), outdir / "tissue.png")}
    conc = deconvolve(qc.overview, qc.stains, qc.background)
    for name in ("hematoxylin", "dab"):
        rendered = reconstruct(conc, qc.stains, qc.background, channels=(name,))
        files[name] = write_png(rendered, outdir / f"{name}.png")
    if qc.sample_tiles:
        dab = [
            float(deconvolve(t, qc.stains, qc.background)[..., 1].mean()) for t in qc.sample_tiles
        ]
        tile = qc.sample_tiles[int(np.argmax(dab))]
        c = deconvolve(tile, qc.stains, qc.background)
        panel = np.concatenate(
            [
                tile,
                reconstruct(c, qc.stains, qc.background, channels=("hematoxylin",)),
                reconstruct(c, qc.stains, qc.background, channels=("dab",)),
            ],
            axis=1,
        )
        files["stain_tile"] = write_png(panel, outdir / "stain_tile.png")
    from .export import atomic_write

    text = json.dumps(qc.to_dict(), indent=2)
    files["json"] = atomic_write(outdir / "stain.json", lambda tmp: tmp.write_text(text))
    return files
