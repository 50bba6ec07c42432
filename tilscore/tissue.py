"""Tissue mask: where on the slide there is tissue worth scoring.

:func:`tissue_mask` works on a low-resolution image of the whole slide (about 8 µm/px) and
returns a :class:`TissueMask` that knows its scale, so every query is in level-0 pixels.

The steps, in order (all thresholds are parameters; the defaults are documented there):

1. Glass: the maximum over R, G, B of the optical density against the glass brightness ``I0``
   (from :func:`tilscore.stain.estimate_background`), smoothed (Gaussian, sigma 1 mask px), is
   thresholded at the lower of Otsu's threshold and the glass peak plus six times its noise
   width (at least 0.02 OD; pale stroma lies between glass and Otsu's split of pale from dense
   tissue), clipped to ``[threshold_min_od, threshold_max_od]`` (default 0.03-0.15 OD). The
   clipping keeps the threshold sane when there is no glass (Otsu would then split pale from
   dark tissue) or no tissue (Otsu would split glass noise).
2. Small holes (below ``max_hole_area_um2``) in the tissue are filled: nuclei-free pale
   stroma, fat cells and small lumens count as tissue area.
3. Pen marks and ink are removed, also where they cover tissue (domain.md lists pen marks among
   the excluded areas):

   - blue ink: hue 180-235 degrees, saturation >= 0.55 and value <= 0.85 x glass. Hematoxylin
     absorbs green at least as much as red, so even dense hematoxylin has hue >= 240 degrees
     (Ruifrok's vector renders at about 245); a cyan-blue hematoxylin (hue about 210) is
     diluted by pale surroundings at this scale and stays below the saturation limit;
   - green ink (and green/teal tissue-marking dye): hue 70-170 degrees, saturation >= 0.25
     (nothing in an H-DAB slide is green);
   - black ink and other opaque marks: brightest channel <= 20 % of the glass brightness and
     either nearly grey (saturation <= 0.3) or blue-black (hue 180-235); very dark purple
     (dense hematoxylin, keratin) and dark brown (dense DAB) are saturated and stay tissue.

   Each ink mask is dilated by one pixel to take its anti-aliased rim. Red ink is not removed:
   its hue overlaps DAB.
4. Objects smaller than ``min_tissue_area_um2`` (dust, debris, ink remnants, specks of
   floating tissue) are removed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, MissingPixelSizeError, TilscoreWarning
from .stain import estimate_background, optical_density, row_blocks

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
    """

    mask: np.ndarray
    mpp: float
    downsample: float
    info: dict[str, Any] = field(default_factory=dict)
    _integral: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        m = np.asarray(self.mask)
        if m.ndim != 2:
            raise ConfigError(f"a tissue mask must be 2-D, got shape {m.shape}")
        self.mask = m.astype(bool, copy=False)
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

    def to_dict(self) -> dict[str, Any]:
        """Provenance record (no pixels): scale, area, tissue fraction and what was used."""
        return {
            "mpp": self.mpp,
            "downsample": self.downsample,
            "shape": list(self.mask.shape),
            "area_mm2": self.area_mm2,
            "tissue_fraction": self.tissue_fraction,
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


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def pen_mask(rgb: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Blue, green and black ink (bool (h, w)); the rules are in this module's docstring.

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 RGB at low resolution (several µm/px).
    background
        Glass brightness ``I0`` per channel (8-bit); ``None`` = 255.
    """
    import cv2

    i0 = 255.0 if background is None else float(np.max(background))
    ink = np.zeros(rgb.shape[:2], np.uint8)
    for rows in row_blocks(rgb.shape[0], rgb.shape[1], _BLOCK_PX)[0]:
        hue, sat, val = _hsv(rgb[rows])
        blue = (hue >= 180) & (hue <= 235) & (sat >= 0.55) & (val <= 0.85 * i0)
        green = (hue >= 70) & (hue <= 170) & (sat >= 0.25)
        # black ink is neutral or blue-black; dark purple (dense hematoxylin) and dark brown
        # (dense DAB) at this scale are saturated with other hues and stay tissue
        black = (val <= 0.2 * i0) & ((sat <= 0.3) | ((hue >= 180) & (hue <= 235)))
        ink[rows] = blue | green | black
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


def _read_source(
    source: Any, mpp: float | None, target_mpp: float
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
        factor = max(1.0, target_mpp / mpp)
        if factor > 1.0:
            h, w = rgb.shape[:2]
            size = (max(1, round(w / factor)), max(1, round(h / factor)))
            rgb = cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(rgb), mpp * factor, factor
    # a Slide (duck-typed: dimensions, mpp, read_at_mpp)
    if mpp is not None:
        raise ConfigError("mpp is taken from the slide; pass it to open_slide(path, mpp=...)")
    slide_mpp = float(source.mpp)
    eff = max(target_mpp, slide_mpp)
    w0, h0 = source.dimensions
    rgb = source.read_at_mpp(0, 0, w0, h0, eff)
    return np.ascontiguousarray(rgb[..., :3]), eff, eff / slide_mpp


def _glass_peak(od: np.ndarray) -> tuple[float, float]:
    """OD of the glass peak (the histogram mode among low ODs) and its noise width.

    The width is measured on the peak's left flank, which tissue cannot reach (tissue only adds
    optical density): the root mean square distance of the values below the mode.
    """
    if od.size == 0:
        return 0.0, 0.0
    low = od[od < 0.3]
    if low.size < 16:
        return 0.0, 0.0
    hist, edges = np.histogram(low, bins=300, range=(-0.3, 0.3))
    i = int(np.argmax(hist))
    mode = float(0.5 * (edges[i] + edges[i + 1]))
    left = low[low <= mode]
    sigma = float(np.sqrt(np.mean((left - mode) ** 2))) if left.size else 0.0
    return mode, sigma


def tissue_mask(
    source: Slide | np.ndarray,
    mpp: float | None = None,
    *,
    target_mpp: float = 8.0,
    background: Any = None,
    threshold_min_od: float = 0.03,
    threshold_max_od: float = 0.15,
    min_tissue_area_um2: float = MIN_TISSUE_AREA_UM2,
    max_hole_area_um2: float = MAX_HOLE_AREA_UM2,
    remove_pen: bool = True,
) -> TissueMask:
    """Find the tissue: glass excluded, pen marks, dust and small debris removed, holes filled.

    Parameters
    ----------
    source
        An open :class:`~tilscore.slide.Slide`, or an (H, W, 3) uint8 RGB array whose pixel size
        is ``mpp``; for an array, level 0 is the array itself.
    mpp
        µm/px of an array source (required for arrays; taken from the slide otherwise).
    target_mpp
        µm/px at which the mask is computed (a coarser source is used as it is).
    background
        Glass brightness ``I0`` per channel (8-bit); estimated from the image when ``None``.
    threshold_min_od, threshold_max_od
        Bounds (OD units) of the Otsu threshold on the smoothed maximum channel OD.
    min_tissue_area_um2
        Smaller connected objects are removed (µm²; default 0.02 mm²).
    max_hole_area_um2
        Smaller holes inside tissue are filled (µm²; default 0.02 mm²).
    remove_pen
        Remove blue, green and black ink.

    Returns
    -------
    TissueMask
        With ``info`` holding the background, threshold and parameters used.
    """
    import cv2
    from skimage.filters import threshold_otsu

    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise ConfigError(f"target_mpp must be a positive number of µm/px, got {target_mpp!r}")
    rgb, mask_mpp, downsample = _read_source(source, mpp, target_mpp)
    if background is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TilscoreWarning)
            i0 = estimate_background(rgb)
        background_source = "estimated" if not caught else "default-255"
        for w in caught:
            warnings.warn(str(w.message), TilscoreWarning, stacklevel=2)
    else:
        i0 = np.asarray(background, dtype=np.float64).reshape(-1)
        i0 = np.repeat(i0, 3) if i0.size == 1 else i0
        background_source = "user"

    od = np.empty(rgb.shape[:2], np.float32)  # the largest channel OD, row block by row block
    for rows in row_blocks(rgb.shape[0], rgb.shape[1], _BLOCK_PX)[0]:
        od3 = optical_density(rgb[rows], i0)
        np.maximum(np.maximum(od3[..., 0], od3[..., 1]), od3[..., 2], out=od[rows])
    od = cv2.GaussianBlur(od, (0, 0), 1.0)
    finite_px = np.isfinite(od)
    finite = od.ravel() if finite_px.all() else od[finite_px]
    if finite.size and np.ptp(finite) > 1e-6:
        otsu = float(threshold_otsu(finite))
    else:
        otsu = threshold_max_od
    glass_level, glass_sigma = _glass_peak(finite)
    # Otsu splits dense tissue from everything pale; pale stroma lies between glass and Otsu's
    # threshold. Glass is a narrow peak whose left flank only glass populates (tissue adds OD),
    # so a threshold a few noise widths above that peak keeps pale tissue too.
    glass_cut = glass_level + max(6.0 * glass_sigma, 0.02)
    threshold = float(np.clip(min(otsu, glass_cut), threshold_min_od, threshold_max_od))
    tissue = od > threshold

    px_area = mask_mpp * mask_mpp
    tissue = _fill_small_holes(tissue, max_hole_area_um2 / px_area)
    pen = pen_mask(rgb, i0) if remove_pen else np.zeros_like(tissue)
    tissue &= ~pen
    tissue = _remove_small(tissue, min_tissue_area_um2 / px_area)

    info = {
        "background": [round(float(v), 2) for v in i0],
        "background_source": background_source,
        "od_threshold": round(threshold, 4),
        "otsu_threshold": round(otsu, 4),
        "glass_od": round(glass_level, 4),
        "glass_od_sigma": round(glass_sigma, 4),
        "pen_fraction": round(float(pen.mean()), 5) if pen.size else 0.0,
        "params": {
            "target_mpp": target_mpp,
            "threshold_min_od": threshold_min_od,
            "threshold_max_od": threshold_max_od,
            "min_tissue_area_um2": min_tissue_area_um2,
            "max_hole_area_um2": max_hole_area_um2,
            "remove_pen": remove_pen,
        },
    }
    return TissueMask(tissue, mpp=mask_mpp, downsample=downsample, info=info)


__all__ = ["MAX_HOLE_AREA_UM2", "MIN_TISSUE_AREA_UM2", "TissueMask", "pen_mask", "tissue_mask"]
