"""Ink, viewer frames and overlays, and black pigment: what is not tissue and not a cell.

:func:`artefact_mask` finds them on a low-resolution image (the tissue mask's, 0.25-8 µm/px) by
colour and shape; the tissue mask removes them from the tissue, and scoring removes them from
every compartment (cells on them are neither counted nor called positive) and reports their area
(``excluded_area_mm2``). Two families of rules:

Broad marks (pen strokes, tissue-marking dye), judged on the image averaged over about 24 µm
and kept where they cover at least 2,500 µm² (so that nuclei and clusters of nuclei cannot
qualify, whatever the image's µm/px):

- blue ink: hue 180-235 degrees, saturation >= 0.55, value <= 0.85 x glass. Hematoxylin absorbs
  green at least as much as red, so even dense hematoxylin has hue >= 240 degrees (Ruifrok's
  vector renders at about 245); a cyan-blue hematoxylin (hue about 210) is diluted by its pale
  surroundings at 8 µm and stays below the saturation limit;
- green ink and dye: hue 70-170 degrees, saturation >= 0.25 (nothing in an H-DAB slide is green);
- black ink: brightest channel <= 20 % of the glass brightness and either nearly grey (saturation
  <= 0.3) or blue-black (hue 180-235); dense hematoxylin (purple) and dense DAB (brown) at this
  scale are saturated with other hues and stay tissue.

Thin and pure marks, judged pixel by pixel (frames and overlays drawn by a viewer or a screenshot
tool, red ink, black pigment):

- pure colours no stain makes: saturation >= 0.8 and brightest channel >= 140 with a red hue
  (<= 12 or >= 330 degrees) or a yellow to green hue (48-160). DAB is brown (hue 15-45 degrees)
  and never both that saturated and that bright. Blue is not among them: real hematoxylin can be
  a pure cyan-blue (about (10, 120, 190) in one of the shared fields), so blue overlays are found
  only by the broad rule;
- black: brightest channel <= 15 % of the glass brightness with saturation <= 0.3 (a black frame,
  black ink lines, anthracotic and other black pigment, black padding). Dense DAB and
  hematoxylin stay coloured even where they are dark.

Pure-colour specks under 20 µm² and black specks under 150 µm² (a dense nucleus is about
50 µm²) are not marks. Each mark is grown by ``grow_um`` (default 5 µm, about a cell's radius)
so that cells sitting on it are excluded too. Brown pigments with DAB's own hue (haemosiderin,
melanin) cannot be told from DAB by colour at this scale and are not removed.
"""

from __future__ import annotations

import numpy as np

#: pixels per row block of the per-pixel rules (bounded float temporaries on large overviews)
_BLOCK_PX = 1 << 18


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation (0-1) and value (0-255) as float32 arrays."""
    f = rgb.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    # element-wise over the three channels: numpy's reductions over a length-3 axis are slower
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    chroma = vmax - vmin
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        vmax == r,
        ((g - b) / safe) % 6.0,
        np.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(chroma > 0, hue * 60.0, 0.0)
    sat = chroma / np.maximum(vmax, 1.0)
    return hue.astype(np.float32), sat.astype(np.float32), vmax


def _rows(h: int, w: int) -> list[slice]:
    from .stain import row_blocks

    return row_blocks(h, w, _BLOCK_PX)[0]


def broad_ink(rgb: np.ndarray, i0: float = 255.0) -> np.ndarray:
    """Blue, green and black ink by the broad rules (the image is taken as it is)."""
    ink = np.zeros(rgb.shape[:2], bool)
    for rows in _rows(*rgb.shape[:2]):
        hue, sat, val = hsv(rgb[rows])
        blue = (hue >= 180) & (hue <= 235) & (sat >= 0.55) & (val <= 0.85 * i0)
        green = (hue >= 70) & (hue <= 170) & (sat >= 0.25)
        black = (val <= 0.2 * i0) & ((sat <= 0.3) | ((hue >= 180) & (hue <= 235)))
        ink[rows] = blue | green | black
    return ink


def pure_marks(rgb: np.ndarray, i0: float = 255.0) -> tuple[np.ndarray, np.ndarray]:
    """Pure overlay colours, and black, pixel by pixel: two bool (h, w) masks."""
    vivid_out = np.zeros(rgb.shape[:2], bool)
    black_out = np.zeros(rgb.shape[:2], bool)
    for rows in _rows(*rgb.shape[:2]):
        hue, sat, val = hsv(rgb[rows])
        vivid = (sat >= 0.8) & (val >= 140)
        red = (hue <= 12) | (hue >= 330)
        yellow_green = (hue >= 48) & (hue <= 160)
        # no blue: real hematoxylin can be a pure cyan-blue (0-20, 120, 190: saturation 0.9-1)
        vivid_out[rows] = vivid & (red | yellow_green)
        black_out[rows] = (val <= 0.15 * i0) & (sat <= 0.3)
    return vivid_out, black_out


def artefact_mask(
    rgb: np.ndarray,
    mpp: float,
    background: np.ndarray | float | None = None,
    *,
    grow_um: float = 5.0,
    broad_um: float = 24.0,
    min_broad_um2: float = 2500.0,
    min_black_um2: float = 150.0,
    min_vivid_um2: float = 20.0,
) -> np.ndarray:
    """Ink, frames, overlays and black pigment on an RGB image at ``mpp`` µm/px (bool (h, w)).

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 RGB, typically the tissue mask's image (0.25-8 µm/px).
    mpp
        Its µm/px.
    background
        Glass brightness ``I0`` (per channel or one value, 8-bit); ``None`` = 255.
    grow_um
        Each mark is grown by this much (µm): cells sitting on a mark are excluded with it.
    broad_um
        The broad rules see the image averaged over this size (µm), and keep marks of at least
    ``min_broad_um2``.
    min_black_um2, min_vivid_um2
        Smaller black or pure-colour specks are not marks (a dense nucleus is about 50 µm²;
        black pigment, frames and ink lines form larger connected marks).
    """
    import cv2

    from .tissue import _remove_small as _large  # components of at least N px

    i0 = 255.0 if background is None else float(np.max(background))
    rgb = np.ascontiguousarray(rgb[..., :3])
    k = round(broad_um / mpp)
    smooth = cv2.blur(rgb, (k, k)) if k >= 2 else rgb
    vivid, black = pure_marks(rgb, i0)
    px = mpp * mpp
    broad = _large(broad_ink(smooth, i0), min_broad_um2 / px)
    if k >= 2 and broad.any():  # the averaging thinned the marks' edges: take them back
        broad = cv2.dilate(broad.view(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    marks = broad | _large(vivid, min_vivid_um2 / px) | _large(black, min_black_um2 / px)
    marks = marks.astype(np.uint8)
    if marks.any():
        r = max(1, round(grow_um / mpp))
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        marks = cv2.dilate(marks, disk)
    return marks.astype(bool)


__all__ = ["artefact_mask", "broad_ink", "hsv", "pure_marks"]
