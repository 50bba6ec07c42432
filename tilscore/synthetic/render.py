"""Beer–Lambert rendering of a synthetic layout, for any box and any µm/px.

Per pixel we build hematoxylin and DAB concentrations (OD units along each stain's unit vector),
blur them optically, and turn them into light: ``OD = c_H * v_H + c_DAB * v_DAB`` and
``I = I0 * 10**(-OD)`` plus sensor noise. Every random texture is a fixed function of level-0 µm
(periodic textures drawn once per slide from the seed) and every cell is drawn from its own
parameters, so the pixels of a box never depend on how the slide is tiled.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import shapely

from ..errors import RegionError
from .layout import SyntheticLayout, SyntheticSlideSpec

# background concentrations (OD, nominal stain, 4 µm section)
_STROMA_H = 0.035  # pale collagen, hematoxylin only (no eosin in IHC)
_NEST_H = 0.11  # tumour-cell cytoplasm
_TISSUE_DAB = 0.02  # non-specific DAB background
_NERVE_H = 0.05
_BLOCK_PX = 384  # largest box rendered at once (canvas px a side)
_MAX_CELL_UM = 17.0  # largest cell radius + membrane tail (macrophage 15 µm)

# ----------------------------------------------------------------------------- textures


def _periodic_noise(rng, size: int, sigma_px, angle: float = 0.0) -> np.ndarray:
    """Zero-mean unit-std periodic noise (size, size) filtered by an (anisotropic) Gaussian."""
    white = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    sa, sb = (sigma_px, sigma_px) if np.isscalar(sigma_px) else sigma_px
    c, s = math.cos(angle), math.sin(angle)
    fu, fv = fx * c + fy * s, -fx * s + fy * c
    transfer = np.exp(-2 * np.pi**2 * ((fu * sa) ** 2 + (fv * sb) ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(white) * transfer))
    out -= out.mean()
    out /= max(out.std(), 1e-12)
    return out.astype(np.float32)


# name: (period px, texel µm, sigma µm (along, across), angle)
_TEXTURES = {
    "chromatin": (512, 0.25, (0.45, 0.45), 0.0),
    "granule": (512, 0.25, (0.3, 0.3), 0.0),
    "fibre_a": (512, 0.5, (10.0, 0.9), 0.5),
    "fibre_b": (512, 0.5, (10.0, 0.9), 2.1),
    "coarse": (256, 2.0, (4.0, 4.0), 0.0),
    "blend": (128, 16.0, (120.0, 120.0), 0.0),
}


def _texture(layout: SyntheticLayout, name: str, pix_um: float) -> tuple[np.ndarray, float]:
    """Periodic texture ``name`` pre-filtered for sampling at ``pix_um``; (array, texel µm)."""
    cache = layout._cache
    size, texel, sigma_um, angle = _TEXTURES[name]
    base_key = ("tex", name)
    if base_key not in cache:
        index = list(_TEXTURES).index(name)
        rng = np.random.default_rng([layout.spec.seed, 3, index])
        sig = (sigma_um[0] / texel, sigma_um[1] / texel)
        cache[base_key] = _periodic_noise(rng, size, sig, angle)
    level = max(0, math.ceil(math.log2(max(pix_um / texel, 1.0)) * 2) / 2)
    key = ("tex", name, level)
    if key not in cache:
        tex = cache[base_key]
        if level > 0:  # anti-alias: blur by about half the sampling step, renormalise the mean
            sig = 0.5 * 2**level
            from scipy.ndimage import gaussian_filter

            tex = gaussian_filter(tex, sig, mode="wrap")
        cache[key] = tex
    return cache[key], texel


def _sample(layout, name, xs_um, ys_um, pix_um) -> np.ndarray:
    tex, texel = _texture(layout, name, pix_um)
    n = tex.shape[0]
    mx = np.mod(xs_um / texel - 0.5, n).astype(np.float32)
    my = np.mod(ys_um / texel - 0.5, n).astype(np.float32)
    mapx = np.broadcast_to(mx[None, :], (len(ys_um), len(xs_um)))
    mapy = np.broadcast_to(my[:, None], (len(ys_um), len(xs_um)))
    return cv2.remap(
        tex,
        np.ascontiguousarray(mapx),
        np.ascontiguousarray(mapy),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_WRAP,
    )


# ----------------------------------------------------------------------------- region fields


def _fill(mask: np.ndarray, geom, scale: float, offset=(0.0, 0.0)) -> None:
    shift = 4
    f = float(1 << shift)
    for poly in getattr(geom, "geoms", [geom]):
        if poly.is_empty or poly.geom_type != "Polygon":
            if hasattr(poly, "geoms"):
                _fill(mask, poly, scale, offset)
            continue
        rings = [poly.exterior, *poly.interiors]
        pts = [
            np.round((np.asarray(r.coords)[:, :2] * scale - offset) * f).astype(np.int32)
            for r in rings
        ]
        x0, y0 = (pts[0].min(axis=0) >> shift) - 1
        x1, y1 = (pts[0].max(axis=0) >> shift) + 2
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, mask.shape[1]), min(y1, mask.shape[0])
        if x1 <= x0 or y1 <= y0:
            continue
        tmp = np.zeros((y1 - y0, x1 - x0), np.uint8)
        local = [p - np.array([x0, y0], np.int32) * int(f) for p in pts]
        cv2.fillPoly(tmp, local, 1, lineType=cv2.LINE_8, shift=shift)
        mask[y0:y1, x0:x1] |= tmp


def _region_rasters(layout: SyntheticLayout) -> tuple[dict[str, np.ndarray], float]:
    """Coverage rasters of tissue, nests and nerves on a coarse global grid; (rasters, grid µm)."""
    cache = layout._cache
    if "regions" not in cache:
        spec = layout.spec
        extent_um = max(spec.width_px, spec.height_px) * spec.mpp
        grid_um = max(2.0, extent_um / 4000)
        scale = spec.mpp / grid_um
        shape = (math.ceil(spec.height_px * scale) + 1, math.ceil(spec.width_px * scale) + 1)
        out = {}
        for name in ("tissue", "tumour", "nerve"):
            mask = np.zeros(shape, np.uint8)
            geom = layout.regions[name]
            if not geom.is_empty:
                _fill(mask, geom, scale, offset=(0.5, 0.5))
            mask *= 255
            out[name] = cv2.GaussianBlur(mask, (5, 5), 0.8)  # uint8 coverage
        cache["regions"] = (out, grid_um)
    return cache["regions"]


def _region_field(layout, name, xs_um, ys_um, edge) -> np.ndarray:
    rasters, grid_um = _region_rasters(layout)
    mx = (xs_um / grid_um - 0.5).astype(np.float32)
    my = (ys_um / grid_um - 0.5).astype(np.float32)
    mapx = np.ascontiguousarray(np.broadcast_to(mx[None, :], (len(ys_um), len(xs_um))))
    mapy = np.ascontiguousarray(np.broadcast_to(my[:, None], (len(ys_um), len(xs_um))))
    cov = cv2.remap(rasters[name], mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    cov = cov.astype(np.float32) * np.float32(1 / 255)
    return np.clip((cov - 0.5) * 3.0 + 0.5 + 0.25 * edge, 0.0, 1.0)


# ----------------------------------------------------------------------------- cells


def _select_cells(layout: SyntheticLayout, x0, y0, x1, y1) -> np.ndarray:
    """Row indices of cells whose centre lies in the level-0 box [x0, x1) x [y0, y1)."""
    cache = layout._cache
    if "bands" not in cache:
        cells = layout.cells
        cache["xy"] = (cells["x"].to_numpy(float), cells["y"].to_numpy(float))
        cache["bands"] = (cache["xy"][1] // 64).astype(np.int64)
        bands = cache["bands"]
        if np.any(np.diff(bands) < 0):  # cells re-ordered by the user: sort a view
            cache["order"] = np.argsort(bands, kind="stable")
            cache["bands"] = bands[cache["order"]]
    bands = cache["bands"]
    lo = np.searchsorted(bands, math.floor(y0 / 64), "left")
    hi = np.searchsorted(bands, math.floor(y1 / 64), "right")
    idx = np.arange(lo, hi)
    if "order" in cache:
        idx = np.sort(cache["order"][idx])
    x, y = cache["xy"]
    keep = (x[idx] >= x0) & (x[idx] < x1) & (y[idx] >= y0) & (y[idx] < y1)
    return idx[keep]


_PARAMS = (
    "x", "y", "theta", "rca", "rcb", "a", "b", "ox", "oy", "bend", "eps", "k", "phase", "notch",
    "nuc_u", "nuc_v", "nuc_amp", "h", "tex", "rim", "ch", "md", "mw", "nd", "cd",
)  # fmt: skip


def _cell_params(layout: SyntheticLayout) -> dict[str, np.ndarray]:
    cache = layout._cache
    if "params" not in cache:
        cells = layout.cells
        cache["params"] = {k: cells[k].to_numpy(np.float64) for k in _PARAMS}
    return cache["params"]


def _draw_cells(layout, idx, ox_px, oy_px, ds, shape, maps) -> None:
    """Accumulate the cells ``idx`` into ``maps`` (Hs, Ht, Ds, Dg), canvas origin level-0 px."""
    if len(idx) == 0:
        return
    p = {k: v[idx] for k, v in _cell_params(layout).items()}
    mpp0 = layout.spec.mpp
    pix = ds * mpp0  # µm per canvas px
    hc, wc = shape
    ext = np.maximum.reduce([p["rca"], p["rcb"], p["a"] * 1.3 + np.abs(p["ox"]), p["b"] + 2])
    size = np.ceil(2 * (ext + 1.5) / pix) + 2
    size = (np.ceil(size / 4) * 4).astype(int)
    uc = (p["x"] - ox_px) / ds - 0.5
    vc = (p["y"] - oy_px) / ds - 0.5
    for psize in np.unique(size):
        sel = np.flatnonzero(size == psize)
        chunk = max(1, 65_536 // (psize * psize))
        for start in range(0, len(sel), chunk):
            s = sel[start : start + chunk]
            _draw_chunk({k: v[s] for k, v in p.items()}, uc[s], vc[s], psize, pix, hc, wc, maps)


def _draw_chunk(p, uc, vc, psize, pix, hc, wc, maps) -> None:
    r = np.arange(psize)
    j0 = np.floor(uc).astype(np.int64) - psize // 2 + 1
    i0 = np.floor(vc).astype(np.int64) - psize // 2 + 1
    jj = j0[:, None] + r[None, :]  # (n, P)
    ii = i0[:, None] + r[None, :]
    dx = ((jj - uc[:, None]) * pix).astype(np.float32)[:, None, :]
    dy = ((ii - vc[:, None]) * pix).astype(np.float32)[:, :, None]

    def col(name):
        return p[name].astype(np.float32)[:, None, None]

    c, s = np.cos(col("theta")), np.sin(col("theta"))
    u = dx * c + dy * s
    v = -dx * s + dy * c
    inv_pix = np.float32(1.0 / pix)

    # cell body (ellipse) and its membrane
    rca, rcb = col("rca"), col("rcb")
    rho = np.sqrt((u / rca) ** 2 + (v / rcb) ** 2)
    grad = np.sqrt((u / rca**2) ** 2 + (v / rcb**2) ** 2) / np.maximum(rho, 1e-3)
    d_c = (rho - 1) / np.maximum(grad, 1e-3)
    cov_c = np.clip(0.5 - d_c * inv_pix, 0, 1)
    mw = col("mw")
    mw_eff = np.sqrt(mw**2 + np.float32(0.16 * pix * pix))
    memb = np.exp(-0.5 * (d_c / mw_eff) ** 2) * (mw / mw_eff)

    # nucleus: offset, bent, irregular ellipse
    a, b = col("a"), col("b")
    un = u - col("ox")
    vn = v - col("oy") - col("bend") * un * un / a
    rho = np.sqrt((un / a) ** 2 + (vn / b) ** 2)
    phi = np.arctan2(vn * a, un * b)
    rho = rho * (1 + col("eps") * np.cos(col("k") * phi + col("phase")))
    grad = np.sqrt((un / a**2) ** 2 + (vn / b**2) ** 2) / np.maximum(rho, 1e-3)
    d_n = (rho - 1) / np.maximum(grad, 1e-3)
    cov_n = np.clip(0.5 - d_n * inv_pix, 0, 1)
    notch = col("notch")
    if np.any(notch > 0):  # kidney-shaped macrophage nuclei: a bite from one long side
        d_k = np.sqrt(un**2 + (vn - 1.2 * b) ** 2) - notch * b * 1.2
        cov_n = cov_n * (1 - np.clip(0.5 - d_k * inv_pix, 0, 1) * (notch > 0))
    rim_w = np.sqrt(np.float32(0.2 + 0.16 * pix * pix))
    rim = col("rim") * np.exp(-0.5 * (d_n / rim_w) ** 2) * cov_n
    nuc = col("nuc_amp") * np.exp(
        -((un - col("nuc_u")) ** 2 + (vn - col("nuc_v")) ** 2) / np.float32(2 * 0.6**2 + pix * pix)
    )
    h = col("h")
    tex = col("tex")
    cyto = cov_c * (1 - cov_n)
    hs = h * (1 - tex) * cov_n + rim + nuc * cov_n + col("ch") * cyto
    ht = h * tex * cov_n
    dsm = col("md") * memb + col("nd") * cov_n
    dg = col("cd") * cyto

    ii3 = np.broadcast_to(ii[:, :, None], hs.shape)
    jj3 = np.broadcast_to(jj[:, None, :], hs.shape)
    ok = (ii3 >= 0) & (ii3 < hc) & (jj3 >= 0) & (jj3 < wc)
    if not ok.any():
        return
    r0, r1 = max(int(ii.min()), 0), min(int(ii.max()) + 1, hc)
    c0, c1 = max(int(jj.min()), 0), min(int(jj.max()) + 1, wc)
    bw = c1 - c0
    flat = ((ii3 - r0) * bw + (jj3 - c0))[ok]
    for target, val in zip(maps, (hs, ht, dsm, dg)):
        acc = np.bincount(flat, weights=val[ok], minlength=(r1 - r0) * bw)
        target[r0:r1, c0:c1] += acc.reshape(r1 - r0, bw)


# ----------------------------------------------------------------------------- composition


def _pixel_noise(layout: SyntheticLayout, row0: int, col0: int, h: int, w: int) -> np.ndarray:
    cache = layout._cache
    if "pixnoise" not in cache:
        rng = np.random.default_rng([layout.spec.seed, 4])
        cache["pixnoise"] = rng.standard_normal((1021, 1019)).astype(np.float32)
    tab = cache["pixnoise"]
    rows = np.mod(np.arange(row0, row0 + h), tab.shape[0])
    cols = np.mod(np.arange(col0, col0 + w), tab.shape[1])
    return tab[rows[:, None], cols[None, :]]


def _render_od(layout: SyntheticLayout, x: float, y: float, w: int, h: int, mpp: float):
    """Optical density (h, w, 3) float32 of the box: level-0 top-left (x, y), w x h px at mpp."""
    spec = layout.spec
    ds = mpp / spec.mpp  # level-0 px per output px
    sigma_px = (spec.blur_sigma_um or 0.0) / mpp
    halo = math.ceil(3 * sigma_px) + 2
    hc, wc = h + 2 * halo, w + 2 * halo
    ox, oy = x - halo * ds, y - halo * ds
    xs_um = ((ox + (np.arange(wc) + 0.5) * ds) * spec.mpp).astype(np.float64)
    ys_um = ((oy + (np.arange(hc) + 0.5) * ds) * spec.mpp).astype(np.float64)

    # cells
    maps = [np.zeros((hc, wc), np.float32) for _ in range(4)]
    margin = _MAX_CELL_UM / spec.mpp + ds
    idx = _select_cells(
        layout, ox - margin, oy - margin, ox + wc * ds + margin, oy + hc * ds + margin
    )
    _draw_cells(layout, idx, ox, oy, ds, (hc, wc), maps)
    hs, ht, dsm, dg = (m.astype(np.float32) for m in maps)

    # regions and textures
    edge = _sample(layout, "coarse", xs_um, ys_um, mpp)
    tissue = _region_field(layout, "tissue", xs_um, ys_um, edge)
    if len(idx) == 0 and not tissue.any():  # glass only
        return np.zeros((h, w, 3), np.float32)
    nest = _region_field(layout, "tumour", xs_um, ys_um, edge) * tissue
    nerve = _region_field(layout, "nerve", xs_um, ys_um, edge) * tissue
    blend = 1 / (1 + np.exp(-2.5 * _sample(layout, "blend", xs_um, ys_um, mpp)))
    fibre = blend * _sample(layout, "fibre_a", xs_um, ys_um, mpp)
    fibre += (1 - blend) * _sample(layout, "fibre_b", xs_um, ys_um, mpp)
    collagen = np.clip(1 + 0.45 * fibre + 0.25 * edge, 0.2, 2.2)
    chrom = np.clip(1 + 0.9 * _sample(layout, "chromatin", xs_um, ys_um, mpp), 0.1, 2.2)
    gran = _sample(layout, "granule", xs_um, ys_um, mpp)
    gran = np.clip(gran + 0.4, 0, None) * 1.45  # speckles, mean about 1

    stroma = tissue - nest - nerve
    h_map = hs + ht * chrom
    h_map += np.clip(stroma, 0, 1) * _STROMA_H * collagen
    h_map += nest * _NEST_H * (1 + 0.25 * edge)
    h_map += nerve * _NERVE_H * collagen
    dab_bg = tissue * _TISSUE_DAB
    if spec.marker == "CD56":  # nerve bundles stain (fibrillar neuropil), they are not NK cells
        dab_bg = dab_bg + nerve * spec.nerve_dab * np.clip(0.8 + 0.3 * fibre, 0.3, 1.5)
    d_map = (
        dsm * np.clip(0.55 + 0.35 * gran, 0.2, 1.6)
        + dg * gran
        + dab_bg * (spec.dab_scale * spec.thickness_factor)
    )
    h_map *= spec.h_scale * spec.thickness_factor

    if sigma_px > 0.05:
        k = 2 * math.ceil(3 * sigma_px) + 1
        h_map = cv2.GaussianBlur(h_map, (k, k), sigma_px, borderType=cv2.BORDER_REFLECT)
        d_map = cv2.GaussianBlur(d_map, (k, k), sigma_px, borderType=cv2.BORDER_REFLECT)
    h_map = h_map[halo : halo + h, halo : halo + w]
    d_map = d_map[halo : halo + h, halo : halo + w]
    return concentrations_to_od(h_map, d_map, spec)


def concentrations_to_od(h_map: np.ndarray, dab_map: np.ndarray, spec: SyntheticSlideSpec):
    """OD (..., 3) float32 from hematoxylin and DAB concentrations (OD units along each vector)."""
    vectors = np.asarray(spec.stain_vectors, np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return h_map[..., None] * vectors[0] + dab_map[..., None] * vectors[1]


def od_to_rgb(od: np.ndarray, spec: SyntheticSlideSpec, noise: np.ndarray | None = None):
    """Beer–Lambert: uint8 RGB = I0 * 10**(-OD) (+ noise, grey levels), rounded and clipped."""
    i0 = np.asarray(spec.background, np.float32)
    light = i0 * np.power(np.float32(10.0), -od)
    if noise is not None:
        light += noise[..., None]
    return np.clip(np.rint(light), 0, 255).astype(np.uint8)


def render_region(
    layout: SyntheticLayout,
    x: float,
    y: float,
    width: int,
    height: int,
    mpp: float | None = None,
    *,
    supersample: int = 1,
) -> np.ndarray:
    """Render a box of the synthetic slide as RGB.

    Parameters
    ----------
    layout
        The slide, from :func:`make_layout`.
    x, y
        Level-0 px of the box's top-left corner.
    width, height
        Size of the output in px at ``mpp`` (OpenSlide's ``read_region`` convention).
    mpp
        Output µm/px (default: the level-0 µm/px).
    supersample
        Render at ``mpp / supersample`` and average (area) down: use 2 or more for coarse levels.

    Returns
    -------
    numpy.ndarray
        (height, width, 3) uint8 RGB. Independent of how a slide is tiled: the pixels of a box
        equal the same box cut from any larger render (up to float rounding, ≤ 1 grey level).
    """
    spec = layout.spec
    mpp = spec.mpp if mpp is None else float(mpp)
    if width <= 0 or height <= 0 or mpp <= 0:
        raise RegionError(f"empty render box {width}x{height} px at {mpp} µm/px")
    ss = max(1, int(supersample))
    block = max(64, _BLOCK_PX // ss)
    if width > block or height > block:  # bounded memory: render blocks (tiling-independent)
        ds = mpp / spec.mpp
        out = np.empty((height, width, 3), np.uint8)
        for by in range(0, height, block):
            for bx in range(0, width, block):
                bw, bh = min(block, width - bx), min(block, height - by)
                out[by : by + bh, bx : bx + bw] = render_region(
                    layout, x + bx * ds, y + by * ds, bw, bh, mpp, supersample=ss
                )
        return out
    od = _render_od(layout, x, y, width * ss, height * ss, mpp / ss)
    ds = mpp / spec.mpp
    noise = _pixel_noise(
        layout, math.floor(y / ds + 0.5), math.floor(x / ds + 0.5), height, width
    ) * np.float32(spec.noise_sigma or 0.0)
    if ss == 1:
        return od_to_rgb(od, spec, noise)
    i0 = np.asarray(spec.background, np.float32)
    light = i0 * np.power(np.float32(10.0), -od)
    light = cv2.resize(light, (width, height), interpolation=cv2.INTER_AREA) + noise[..., None]
    return np.clip(np.rint(light), 0, 255).astype(np.uint8)


def cells_in_box(layout: SyntheticLayout, x: float, y: float, width: float, height: float):
    """Truth rows of the cells whose centre lies in a level-0 box (width, height in level-0 px)."""
    idx = _select_cells(layout, x, y, x + width, y + height)
    out = layout.truth().iloc[idx].reset_index(drop=True)
    return out


def region_mask(layout: SyntheticLayout, name: str, x, y, width, height, mpp=None) -> np.ndarray:
    """Boolean mask (height, width) of region ``name`` at ``mpp`` for a box (pixel centres)."""
    spec = layout.spec
    mpp = spec.mpp if mpp is None else mpp
    ds = mpp / spec.mpp
    xs = x + (np.arange(width) + 0.5) * ds
    ys = y + (np.arange(height) + 0.5) * ds
    gx, gy = np.meshgrid(xs, ys)
    return shapely.contains_xy(layout.regions[name], gx, gy)
