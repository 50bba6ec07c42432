"""Tissue mask: where on the slide there is tissue worth scoring.

:func:`tissue_mask` works on a low-resolution image of the whole slide (about 8 µm/px) and
returns a :class:`TissueMask` that knows its scale, so every query is in level-0 pixels.

The steps, in order (all thresholds are parameters; the defaults are documented there):

1. Scale: the mask is computed at ``target_mpp``; by default about 8 µm/px for a slide, and
   finer for a field or a small image (its longer side at 512 mask px, never finer than the
   image), so that a 61 µm patch and a 20 mm slide both get a usable mask.
2. Glass (:func:`find_glass`): glass is found positively, as flat, bright, nearly grey areas at
   least 10 µm across (an opening removes the bright gaps between cells), at least as bright as
   ``min_glass_brightness`` (scanners render glass at 230-255; a pale tissue or a tinted field
   without glass is darker), covering at least 2,500 µm² (or 5 % of a smaller image). ``I0`` is
   the median of the brighter half of those pixels. Where there is no such glass (a field that
   is all tissue, a small patch, a TMA core with no margin), ``I0`` falls back to the given
   background, else 255, and the provenance says so (``background_source``); **tissue is never
   dropped because the glass could not be measured**: without glass, the whole image is tissue.
3. Tissue, where there is glass: the maximum over R, G, B of the optical density against ``I0``,
   smoothed (Gaussian, sigma 1 mask px), above the lower of Otsu's threshold and the glass level
   plus four times its noise width (median and MAD of the glass pixels' OD; at least 0.02 OD),
   clipped to ``[threshold_min_od, threshold_max_od]`` (default 0.03-0.15 OD). Pale stroma lies
   between glass and Otsu's split of pale from dense tissue, so the glass-based cut keeps it.
   Fragments of loose tissue closer than 20 µm are joined (a closing, ``close_um``).
4. Small holes (below ``max_hole_area_um2``) in the tissue are filled: nuclei-free pale
   stroma, fat cells and small lumens count as tissue area.
5. Ink, viewer frames and overlays and black pigment (:mod:`tilscore.artefacts`) are removed
   from the tissue, also where they cover it, and kept as ``TissueMask.artefacts`` so that
   scoring can exclude the cells on them and report their area.
6. Objects smaller than ``min_tissue_area_um2`` (dust, debris, ink remnants, specks of
   floating tissue; at most 0.2 % of the image's area, so that a small field keeps its tissue)
   are removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, MissingPixelSizeError
from .stain import optical_density, row_blocks

if TYPE_CHECKING:  # pragma: no cover
    import shapely

    from .slide import Slide

#: Defaults (µm²): 0.02 mm², a square of about 140 µm: larger than dust and debris at this
#: scale, smaller than any tissue fragment a pathologist would score.
MIN_TISSUE_AREA_UM2 = 20_000.0
#: Holes up to 0.02 mm² are filled; larger holes (tears, big vessels, lumens) stay holes.
MAX_HOLE_AREA_UM2 = 20_000.0
#: pixels per row block of the per-pixel rules on the overview (bounded float temporaries on
#: large slides: a 16-gigapixel slide's 8 µm/px overview has 15.7 M pixels)
_BLOCK_PX = 1 << 18


@dataclass(eq=False)
class TissueMask:
    """A binary tissue mask with its scale.

    Parameters
    ----------
    mask
        bool (h, w), True = tissue; mask pixel (r, c) covers the level-0 box
        ``[c * downsample, (c + 1) * downsample) x [r * downsample, (r + 1) * downsample)``.
    mpp
        µm per mask pixel.
    downsample
        Level-0 pixels per mask pixel.
    info
        What was used (glass brightness, OD threshold, parameters), for provenance.
    artefacts
        Optional bool (h, w) on the same grid: ink, frames, overlays and black pigment removed
        from the tissue (:mod:`tilscore.artefacts`; those on glass are not kept); ``None`` = none
        looked for.
    """

    mask: np.ndarray
    mpp: float
    downsample: float
    info: dict[str, Any] = field(default_factory=dict)
    artefacts: np.ndarray | None = None
    _integral: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        m = np.asarray(self.mask)
        if m.ndim != 2:
            raise ConfigError(f"a tissue mask must be 2-D, got shape {m.shape}")
        self.mask = m.astype(bool, copy=False)
        if self.artefacts is not None:
            a = np.asarray(self.artefacts, dtype=bool)
            if a.shape != m.shape:
                raise ConfigError(f"artefact mask {a.shape} does not match the mask {m.shape}")
            self.artefacts = a
        if not (self.mpp > 0 and self.downsample > 0):
            raise ConfigError(
                f"mask mpp ({self.mpp}) and downsample ({self.downsample}) must be positive"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the mask in mask pixels."""
        return self.mask.shape  # type: ignore[return-value]

    @property
    def area_mm2(self) -> float:
        """Tissue area in mm²."""
        return float(np.count_nonzero(self.mask)) * (self.mpp * 1e-3) ** 2

    @property
    def tissue_fraction(self) -> float:
        """Share of the mask (the whole slide) that is tissue, 0-1."""
        return float(np.count_nonzero(self.mask)) / max(1, self.mask.size)

    def _summed_area(self) -> np.ndarray:
        if self._integral is None:
            # pixel counts: whole numbers, exact in int32 (half a float64 table's memory: 60 MB
            # less on a 16-gigapixel slide), read as float64 by _area_below
            h, w = self.mask.shape
            dtype = np.int32 if (h + 1) * (w + 1) < 2**31 else np.int64
            s = np.zeros((h + 1, w + 1), dtype=dtype)
            np.cumsum(np.cumsum(self.mask, axis=0, dtype=dtype), axis=1, out=s[1:, 1:])
            self._integral = s
        return self._integral

    def release_cache(self) -> None:
        """Free the summed-area table that :meth:`fraction_in` builds (4 bytes per mask pixel:
        141 MB on a 36-gigapixel slide); the next call builds it again."""
        self._integral = None

    def _area_below(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (mask px²) in [0, u) x [0, v): the summed-area table is bilinear inside
        each pixel, so interpolating it is exact for boxes that cut pixels."""
        s = self._summed_area()
        h, w = self.mask.shape
        u = np.clip(u, 0.0, w)
        v = np.clip(v, 0.0, h)
        i = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
        j = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
        fu, fv = u - i, v - j
        return (
            s[j, i] * (1 - fu) * (1 - fv)
            + s[j, i + 1] * fu * (1 - fv)
            + s[j + 1, i] * (1 - fu) * fv
            + s[j + 1, i + 1] * fu * fv
        )

    def fraction_in(self, x: float, y: float, width: float, height: float) -> float | np.ndarray:
        """Share of a level-0 box that is tissue (0-1); parts outside the slide count as glass.

        Parameters
        ----------
        x, y
            Top-left corner (level-0 px); scalars or arrays of the same shape.
        width, height
            Box size (level-0 px).

        Returns
        -------
        float or numpy.ndarray
            Area-weighted fraction, exact for boxes that cut mask pixels.
        """
        ds = self.downsample
        x0 = np.asarray(x, dtype=np.float64) / ds
        y0 = np.asarray(y, dtype=np.float64) / ds
        x1 = x0 + np.asarray(width, dtype=np.float64) / ds
        y1 = y0 + np.asarray(height, dtype=np.float64) / ds
        area = (x1 - x0) * (y1 - y0)
        if self.mask.size == 0:
            inside = np.zeros(np.broadcast(x0, y0, x1, y1).shape)
        else:
            inside = (
                self._area_below(x1, y1)
                - self._area_below(x0, y1)
                - self._area_below(x1, y0)
                + self._area_below(x0, y0)
            )
        frac = np.where(area > 0, np.clip(inside / np.where(area > 0, area, 1.0), 0.0, 1.0), 0.0)
        return float(frac) if frac.ndim == 0 else frac

    def contains(self, x: Any, y: Any) -> np.ndarray:
        """Whether level-0 points (x = column, y = row, px) lie on tissue; False off the slide."""
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
        c = np.floor(xa / self.downsample)
        r = np.floor(ya / self.downsample)
        h, w = self.mask.shape
        ok = (c >= 0) & (c < w) & (r >= 0) & (r < h)
        out = np.zeros(np.broadcast(c, r).shape, dtype=bool)
        ci, ri = np.broadcast_arrays(c, r)
        out[ok] = self.mask[ri[ok].astype(np.int64), ci[ok].astype(np.int64)]
        return out

    def polygons(self, simplify_px: float = 0.0) -> shapely.MultiPolygon:
        """The mask as polygons with holes, in level-0 pixel coordinates.

        Outlines follow the pixel edges (marching squares at 0.5, so each corner is cut by a
        diagonal; the area differs from the pixel count by less than 1/8 px² per corner).

        Parameters
        ----------
        simplify_px
            Optional simplification tolerance in mask pixels (0 = none).

        Returns
        -------
        shapely.MultiPolygon
            Valid; empty when there is no tissue.
        """
        import shapely
        from skimage.measure import find_contours

        rows = np.flatnonzero(self.mask.any(axis=1))
        if not len(rows):
            return shapely.MultiPolygon()
        cols = np.flatnonzero(self.mask.any(axis=0))
        r0, c0 = int(rows[0]), int(cols[0])
        # the mask's bounding box only (the same contours, moved): automatic nests on a large
        # slide may cover a small part of its grid; find_contours makes a float64 copy of what
        # it is given, so it gets the bool mask (1 byte per pixel) rather than a float one
        box = self.mask[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1]
        padded = np.pad(box.astype(bool, copy=False), 1)
        rings = [r for r in find_contours(padded, 0.5, fully_connected="high") if len(r) >= 4]
        # (row, col) in padded box px -> (x, y) level-0 px: edge at index + 0.5 lies at
        # (index + 0.5 - 1 + 0.5 + box corner) * downsample
        ds = self.downsample
        coords = [
            np.column_stack([(r[:, 1] - 0.5 + c0) * ds, (r[:, 0] - 0.5 + r0) * ds]) for r in rings
        ]
        polys = [shapely.Polygon(c) for c in coords]
        areas = np.array([p.area for p in polys])
        tree = shapely.STRtree(polys)
        probes = shapely.points([c[0] for c in coords])
        src, dst = tree.query(probes, predicate="within")
        keep = src != dst
        src, dst = src[keep], dst[keep]
        depth = np.bincount(src, minlength=len(polys))
        parent = np.full(len(polys), -1)
        for s, d in sorted(zip(src.tolist(), dst.tolist()), key=lambda t: -areas[t[1]]):
            parent[s] = d  # ends with the smallest container
        holes: dict[int, list[np.ndarray]] = {}
        for i in range(len(polys)):
            if depth[i] % 2 == 1:
                holes.setdefault(int(parent[i]), []).append(coords[i])
        shells = [
            shapely.Polygon(coords[i], holes.get(i, []))
            for i in range(len(polys))
            if depth[i] % 2 == 0
        ]
        geom = shapely.MultiPolygon(shells)
        if not geom.is_valid:
            geom = _as_multipolygon(shapely.make_valid(geom))
        if simplify_px > 0:
            geom = _as_multipolygon(
                shapely.simplify(geom, simplify_px * ds, preserve_topology=True)
            )
        return geom

    def polygons_with_artefacts(self) -> shapely.MultiPolygon:
        """The tissue and the artefacts on it, as polygons (what scoring starts from: the
        artefacts are then excluded, and their area reported)."""
        if self.artefacts is None or not self.artefacts.any():
            return self.polygons()
        return TissueMask(self.mask | self.artefacts, self.mpp, self.downsample).polygons()

    def artefact_polygons(self) -> shapely.MultiPolygon:
        """The artefacts (ink, frames, pigment) as polygons in level-0 px (empty when none)."""
        import shapely

        if self.artefacts is None or not self.artefacts.any():
            return shapely.MultiPolygon()
        return TissueMask(self.artefacts, self.mpp, self.downsample).polygons()

    @property
    def artefact_area_mm2(self) -> float:
        """Area of the artefacts in mm² (0 when none were looked for)."""
        if self.artefacts is None:
            return 0.0
        return float(np.count_nonzero(self.artefacts)) * (self.mpp * 1e-3) ** 2

    def to_dict(self) -> dict[str, Any]:
        """Provenance record (no pixels): scale, area, tissue fraction and what was used."""
        return {
            "mpp": self.mpp,
            "downsample": self.downsample,
            "shape": list(self.mask.shape),
            "area_mm2": self.area_mm2,
            "tissue_fraction": self.tissue_fraction,
            "artefact_area_mm2": self.artefact_area_mm2,
            **self.info,
        }


def _as_multipolygon(geom: Any) -> shapely.MultiPolygon:
    import shapely

    parts: list[Any] = []
    stack = [geom]
    while stack:
        g = stack.pop()
        if isinstance(g, shapely.Polygon):
            if not g.is_empty and g.area > 0:
                parts.append(g)
        elif hasattr(g, "geoms"):
            stack.extend(g.geoms)
    return shapely.MultiPolygon(parts)


# ------------------------------------------------------------------------------------------------
# computing the mask


def pen_mask(rgb: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Blue, green and black ink by the broad rules of :mod:`tilscore.artefacts` (bool (h, w)).

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 RGB at low resolution (several µm/px), taken as it is.
    background
        Glass brightness ``I0`` per channel (8-bit); ``None`` = 255.
    """
    import cv2

    from .artefacts import broad_ink

    i0 = 255.0 if background is None else float(np.max(background))
    ink = broad_ink(rgb, i0).astype(np.uint8)
    if ink.any():
        ink = cv2.dilate(ink, np.ones((3, 3), np.uint8))
    return ink.astype(bool)


def _remove_small(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    import cv2

    if min_area_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    import cv2

    if max_area_px < 1:
        return mask
    holes = ~mask
    # holes are 4-connected background components that do not touch the border
    _, labels, stats, _ = cv2.connectedComponentsWithStats(holes.astype(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    inner = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    fill = inner & (stats[:, cv2.CC_STAT_AREA] <= max_area_px)
    fill[0] = False  # label 0 = tissue
    return mask | fill[labels]


#: the longer side of a field's or small image's mask (mask px) when target_mpp is not given
FIELD_MASK_PX = 512
#: the coarsest default mask scale (µm/px): whole slides
SLIDE_MASK_MPP = 8.0


def default_mask_mpp(width_px: float, height_px: float, mpp: float) -> float:
    """The default mask scale: 8 µm/px for a slide, finer for a field (512 px on its longer
    side), never finer than the image itself."""
    return float(min(SLIDE_MASK_MPP, max(mpp, max(width_px, height_px) * mpp / FIELD_MASK_PX)))


def _read_source(
    source: Any, mpp: float | None, target_mpp: float | None
) -> tuple[np.ndarray, float, float]:
    """(rgb at about target_mpp, its µm/px, level-0 px per pixel)."""
    import cv2

    if isinstance(source, np.ndarray):
        if mpp is None:
            raise MissingPixelSizeError(
                "tissue_mask needs the pixel size of an array",
                hint="pass mpp=<µm per pixel> (e.g. 0.5 for a 20x scan)",
            )
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ConfigError(f"mpp must be a positive number of µm/px, got {mpp!r}")
        rgb = np.asarray(source)
        if rgb.ndim == 3 and rgb.shape[2] == 4:
            rgb = rgb[..., :3]
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ConfigError(
                f"tissue_mask needs an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}"
            )
        h, w = rgb.shape[:2]
        if target_mpp is None:
            target_mpp = default_mask_mpp(w, h, mpp)
        factor = max(1.0, target_mpp / mpp)
        if factor > 1.0:
            size = (max(1, round(w / factor)), max(1, round(h / factor)))
            rgb = cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(rgb), mpp * factor, factor
    # a Slide (duck-typed: dimensions, mpp, read_at_mpp)
    if mpp is not None:
        raise ConfigError("mpp is taken from the slide; pass it to open_slide(path, mpp=...)")
    slide_mpp = float(source.mpp)
    w0, h0 = source.dimensions
    if target_mpp is None:
        target_mpp = default_mask_mpp(w0, h0, slide_mpp)
    eff = max(target_mpp, slide_mpp)
    rgb = source.read_at_mpp(0, 0, w0, h0, eff)
    return np.ascontiguousarray(rgb[..., :3]), eff, eff / slide_mpp


@dataclass
class Glass:
    """What :func:`find_glass` found: ``i0`` (per channel, or None: no glass), the glass pixels
    (bool, the image's grid) and their share of the image."""

    i0: np.ndarray | None
    pixels: np.ndarray
    fraction: float


def find_glass(
    rgb: np.ndarray,
    mpp: float,
    *,
    max_saturation: float = 0.12,
    max_std: float = 6.0,
    min_width_um: float = 10.0,
    min_area_um2: float = 2500.0,
    min_glass_brightness: float = 220.0,
) -> Glass:
    """Find clear glass in an RGB image at ``mpp`` µm/px (see the module docstring, step 2).

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 RGB.
    mpp
        Its µm/px.
    max_saturation
        Largest chroma / brightness of a glass pixel.
    max_std
        Largest local standard deviation of the grey level (5 x 5 px) of a glass pixel: glass
        is flat, tissue is textured.
    min_width_um
        Glass areas narrower than this (the bright gaps between cells) do not count.
    min_area_um2
        Less glass than this (or than 5 % of a smaller image) is no glass.
    min_glass_brightness
        The glass found must be at least this bright (mean of R, G, B, 8-bit).
    """
    import cv2

    from .artefacts import hsv
    from .stain import BACKGROUND_RANGE

    h, w = rgb.shape[:2]
    none = Glass(None, np.zeros((h, w), bool), 0.0)
    if h < 3 or w < 3:
        return none
    vmax = np.max(rgb, axis=2)  # uint8: a byte per pixel on a large slide's overview
    step = max(1, vmax.size // 2_000_000)
    bright_ref = float(np.percentile(vmax.ravel()[::step], 99.5))
    min_value = max(0.9 * bright_ref, BACKGROUND_RANGE[0], min_glass_brightness - 10)
    cand = np.zeros((h, w), np.uint8)
    # row blocks with a 2-row halo for the 5 x 5 local deviation: bounded float temporaries
    rows_per_block = max(8, _BLOCK_PX // max(w, 1))
    for r0 in range(0, h, rows_per_block):
        r1 = min(h, r0 + rows_per_block)
        a0, a1 = max(0, r0 - 2), min(h, r1 + 2)
        block = rgb[a0:a1]
        _, sat, val = hsv(block)
        grey = block.astype(np.float32).mean(axis=2)
        mean = cv2.blur(grey, (5, 5))
        var = cv2.blur(grey * grey, (5, 5)) - mean * mean
        flat = var <= max_std * max_std
        ok = (sat <= max_saturation) & (val >= min_value) & flat
        cand[r0:r1] = ok[r0 - a0 : r0 - a0 + (r1 - r0)]
    r = round(min_width_um / 2 / mpp)
    if r >= 1 and cand.any():
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        # the border counts as glass-like for the opening: glass at the image's edge stays
        padded = cv2.copyMakeBorder(cand, r, r, r, r, cv2.BORDER_REPLICATE)
        cand = cv2.morphologyEx(padded, cv2.MORPH_OPEN, disk)[r:-r, r:-r]
    cand = cand.astype(bool)
    min_px = max(16.0, min(min_area_um2, 0.05 * h * w * mpp * mpp) / (mpp * mpp))
    n = int(np.count_nonzero(cand))
    if n < min_px:
        return none
    idx = np.flatnonzero(cand.ravel())
    idx = idx[:: max(1, idx.size // 1_000_000)]  # at most about a million glass pixels
    glass = rgb.reshape(-1, 3)[idx].astype(np.float64)
    brightness = glass.mean(axis=1)
    upper = glass[brightness >= np.median(brightness)]
    i0 = np.median(upper, axis=0)
    if float(i0.mean()) < min_glass_brightness:
        return none
    return Glass(np.clip(i0, *BACKGROUND_RANGE), cand, n / (h * w))


def tissue_mask(
    source: Slide | np.ndarray,
    mpp: float | None = None,
    *,
    target_mpp: float | None = None,
    background: Any = None,
    threshold_min_od: float = 0.03,
    threshold_max_od: float = 0.15,
    min_tissue_area_um2: float = MIN_TISSUE_AREA_UM2,
    max_hole_area_um2: float = MAX_HOLE_AREA_UM2,
    remove_pen: bool = True,
    min_glass_brightness: float = 220.0,
    close_um: float = 10.0,
) -> TissueMask:
    """Find the tissue: glass excluded, ink and pigment removed, debris removed, holes filled.

    Parameters
    ----------
    source
        An open :class:`~tilscore.slide.Slide`, or an (H, W, 3) uint8 RGB array whose pixel size
        is ``mpp``; for an array, level 0 is the array itself.
    mpp
        µm/px of an array source (required for arrays; taken from the slide otherwise).
    target_mpp
        µm/px at which the mask is computed (a coarser source is used as it is); default: 8 for
        a slide, finer for a field (:func:`default_mask_mpp`).
    background
        Glass brightness ``I0`` per channel (8-bit); estimated from the glass when ``None``
        (and 255 where there is no glass).
    threshold_min_od, threshold_max_od
        Bounds (OD units) of the tissue threshold on the smoothed maximum channel OD.
    min_tissue_area_um2
        Smaller connected objects are removed (µm²; default 0.02 mm², at most 0.2 % of the image).
    max_hole_area_um2
        Smaller holes inside tissue are filled (µm²; default 0.02 mm²).
    remove_pen
        Remove ink, viewer frames and overlays and black pigment (:mod:`tilscore.artefacts`).
    min_glass_brightness
        Glass darker than this (mean of R, G, B) is not glass: see :func:`find_glass`.
    close_um
        Tissue fragments closer than twice this (µm) are joined (morphological closing).

    Returns
    -------
    TissueMask
        With ``info`` holding the background and its source, the glass share, the threshold
        and the parameters used, and ``artefacts`` the marks removed.
    """
    import cv2
    from skimage.filters import threshold_otsu

    from .artefacts import artefact_mask

    if target_mpp is not None and not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise ConfigError(f"target_mpp must be a positive number of µm/px, got {target_mpp!r}")
    rgb, mask_mpp, downsample = _read_source(source, mpp, target_mpp)
    glass = find_glass(rgb, mask_mpp, min_glass_brightness=min_glass_brightness)
    if background is not None:
        i0 = np.asarray(background, dtype=np.float64).reshape(-1)
        i0 = np.repeat(i0, 3) if i0.size == 1 else i0
        background_source = "user"
    elif glass.i0 is not None:
        i0, background_source = glass.i0, "estimated"
    else:
        i0, background_source = np.full(3, 255.0), "default 255 (no glass in the image)"

    px_area = mask_mpp * mask_mpp
    otsu = glass_level = glass_sigma = threshold = float("nan")
    if glass.i0 is None:
        # no glass to measure against: the whole image is tissue (never dropped because the
        # estimate failed); ink, frames and pigment are still removed below
        tissue = np.ones(rgb.shape[:2], bool)
    else:
        od = np.empty(rgb.shape[:2], np.float32)  # the largest channel OD, row block by row block
        for rows in row_blocks(rgb.shape[0], rgb.shape[1], _BLOCK_PX)[0]:
            od3 = optical_density(rgb[rows], i0)
            np.maximum(np.maximum(od3[..., 0], od3[..., 1]), od3[..., 2], out=od[rows])
        od = cv2.GaussianBlur(od, (0, 0), 1.0)
        finite_px = np.isfinite(od)
        finite = od.ravel() if finite_px.all() else od[finite_px]
        otsu = float(threshold_otsu(finite)) if np.ptp(finite) > 1e-6 else threshold_max_od
        on_glass = od[glass.pixels & finite_px]
        glass_level = float(np.median(on_glass))
        glass_sigma = float(1.4826 * np.median(np.abs(on_glass - glass_level)))
        glass_cut = glass_level + max(4.0 * glass_sigma, 0.02)
        threshold = float(np.clip(min(otsu, glass_cut), threshold_min_od, threshold_max_od))
        tissue = od > threshold
        # loose and pale tissue breaks into fragments at the threshold: join those closer than
        # twice close_um (nuclei in pale stroma, fibres), then fill the small holes
        r = round(close_um / mask_mpp)
        if r >= 1 and tissue.any():
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            padded = cv2.copyMakeBorder(tissue.view(np.uint8), r, r, r, r, cv2.BORDER_CONSTANT)
            tissue = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk)[r:-r, r:-r].astype(bool)
        tissue = _fill_small_holes(tissue, max_hole_area_um2 / px_area)
    art = artefact_mask(rgb, mask_mpp, i0) if remove_pen else np.zeros(rgb.shape[:2], bool)
    art &= tissue  # the marks that cover tissue (those on glass take nothing from it)
    tissue &= ~art
    image_area_um2 = rgb.shape[0] * rgb.shape[1] * px_area
    min_area = min(min_tissue_area_um2, 0.002 * image_area_um2)
    tissue = _remove_small(tissue, min_area / px_area)

    def r4(v: float) -> float | None:
        return round(v, 4) if math.isfinite(v) else None

    info = {
        "background": [round(float(v), 2) for v in i0],
        "background_source": background_source,
        "glass_fraction": round(glass.fraction, 5),
        "od_threshold": r4(threshold),
        "otsu_threshold": r4(otsu),
        "glass_od": r4(glass_level),
        "glass_od_sigma": r4(glass_sigma),
        "pen_fraction": round(float(art.mean()), 5) if art.size else 0.0,
        "params": {
            "target_mpp": target_mpp,
            "threshold_min_od": threshold_min_od,
            "threshold_max_od": threshold_max_od,
            "min_tissue_area_um2": min_tissue_area_um2,
            "max_hole_area_um2": max_hole_area_um2,
            "remove_pen": remove_pen,
            "min_glass_brightness": min_glass_brightness,
            "close_um": close_um,
        },
    }
    return TissueMask(
        tissue,
        mpp=mask_mpp,
        downsample=downsample,
        info=info,
        artefacts=art if remove_pen else None,
    )


__all__ = [
    "MAX_HOLE_AREA_UM2",
    "MIN_TISSUE_AREA_UM2",
    "Glass",
    "TissueMask",
    "default_mask_mpp",
    "find_glass",
    "pen_mask",
    "tissue_mask",
]
