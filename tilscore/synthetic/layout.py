"""Layout of a synthetic IHC slide: tissue, tumour bed, nests, margin, nerves and every cell.

Everything here is cheap and global (no pixels): shapely geometries in level-0 px and one cells
table. :mod:`tilscore.synthetic.render` turns a layout into pixels for any box and µm/px.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import shapely
from scipy.spatial import cKDTree
from shapely.geometry import LineString, Polygon, box

from ..errors import ConfigError

#: marker -> the cell type it stains
MARKER_TARGETS = {"CD8": "lymphocyte", "CD68": "macrophage", "CD56": "nk"}
COMPARTMENTS = ("tumour", "stroma", "margin", "outside")
CELL_TYPES = ("tumour", "fibroblast", "lymphocyte", "macrophage", "nk", "nerve")
#: DAB OD amplitude thresholds of intensity bins 1+/2+/3+ (QuPath's defaults)
INTENSITY_THRESHOLDS = (0.2, 0.4, 0.6)
#: unit OD vectors (R, G, B), domain.md (Ruifrok & Johnston)
H_VECTOR = (0.651, 0.701, 0.290)
DAB_VECTOR = (0.269, 0.568, 0.778)

# cells/mm² of the marker's target cells (positive and negative) per compartment
_TARGET_DENSITY = {
    "CD8": {"tumour": 120.0, "stroma": 500.0, "margin": 350.0, "outside": 40.0},
    "CD68": {"tumour": 100.0, "stroma": 300.0, "margin": 250.0, "outside": 40.0},
    "CD56": {"tumour": 25.0, "stroma": 90.0, "margin": 60.0, "outside": 10.0},
}
# marker-negative lymphocytes (CD4 T, B cells, ...) and unstained macrophages
_LYMPHOCYTE_DENSITY = {"tumour": 80.0, "stroma": 600.0, "margin": 450.0, "outside": 60.0}
_MACROPHAGE_DENSITY = {"tumour": 40.0, "stroma": 120.0, "margin": 100.0, "outside": 25.0}
_POSITIVE_FRACTION = {"CD8": 0.92, "CD68": 0.9, "CD56": 0.85}

#: columns of the truth table (written to CSV), in order
TRUTH_COLUMNS = (
    "cell_id",
    "x",
    "y",
    "x_um",
    "y_um",
    "cell_type",
    "positive",
    "intensity",
    "intensity_bin",
    "compartment",
    "nucleus_diameter_um",
    "nucleus_major_um",
    "nucleus_minor_um",
    "cell_diameter_um",
    "cell_x",
    "cell_y",
)


@dataclass
class SyntheticSlideSpec:
    """Everything that defines a synthetic slide; the same spec and seed give the same slide.

    Fields left ``None`` are filled by :meth:`resolved` (per-marker defaults, or per-slide random
    draws from ``seed`` when ``randomize_appearance``); the resolved spec is what
    :func:`make_layout` records, so every number used is in ``to_dict()``.

    Parameters
    ----------
    marker
        "CD8", "CD68" or "CD56".
    width_px, height_px
        Level-0 size in px.
    mpp
        Level-0 µm/px.
    seed
        Seed of everything random (layout and appearance).
    tissue_fraction
        Share of the slide covered by tissue (1.0: the whole slide is tissue).
    tumour_bed_fraction
        Share of the tissue inside the tumour's outer border (the tumour bed).
    nest_fraction
        Share of the tumour bed covered by tumour-cell nests.
    margin_width_um
        Total width of the invasive-margin band in µm, half on each side of the bed border.
    target_density_per_mm2
        Cells/mm² of the marker's target cells (CD8 T cells, CD68 macrophages, CD56 NK cells),
        positive and negative, per compartment ("tumour", "stroma", "margin", "outside").
    lymphocyte_density_per_mm2
        Cells/mm² of marker-negative lymphocytes per compartment.
    macrophage_density_per_mm2
        Cells/mm² of unstained macrophages per compartment (unused for CD68, whose macrophages
        are the target).
    fibroblast_density_per_mm2
        Fibroblasts per mm² of non-nest tissue.
    tumour_cell_spacing_um
        Centre spacing of the packed tumour cells in µm.
    positive_fraction
        Share of target cells that stain (the rest are antigen-negative, ``positive`` False).
    intensity_mix
        Shares of weak / moderate / strong positives (bins 1+ / 2+ / 3+ at nominal stain).
    immune_clustering
        Standard deviation of the log of a smooth random field (scale ~150 µm) that modulates
        immune-cell density inside each compartment (0: homogeneous).
    nerve_count
        Number of nerve bundles (default 3 for CD56, where they stain, 1 otherwise).
    randomize_appearance
        Draw the appearance fields left ``None`` per slide from the seed; else use nominal values.
    h_scale, dab_scale
        Stain strength multipliers of hematoxylin and DAB (nominal 1).
    hue_jitter_deg
        Maximum rotation of each stain's OD vector away from domain.md's vector, in degrees.
    stain_vectors
        ((3,), (3,)) unit OD vectors of H and DAB as used (resolved from ``hue_jitter_deg``).
    background
        (R, G, B) glass intensity I0 (nominal 240 each; random 225-250 per slide).
    blur_sigma_um
        Optical blur, Gaussian sigma in µm.
    noise_sigma
        Gaussian pixel noise, sigma in grey levels.
    thickness_um
        Section thickness in µm; every OD scales with ``thickness_um / 4``.
    nerve_dab
        DAB OD amplitude of CD56-stained nerve bundles (nominal, before dab_scale and thickness).
    solid_positive_fraction
        Share of positive T lymphocytes (CD8 slides) whose DAB fills the whole (slightly larger)
        cell and covers the nucleus, as strongly stained CD3/CD8 T cells look, instead of a
        ring around a visible blue nucleus. Chosen per cell from its position (no random
        draw), so layouts do not change with it.
    """

    marker: str = "CD8"
    width_px: int = 4096
    height_px: int = 4096
    mpp: float = 0.5
    seed: int = 0
    tissue_fraction: float = 0.5
    tumour_bed_fraction: float = 0.45
    nest_fraction: float = 0.45
    margin_width_um: float = 500.0
    target_density_per_mm2: dict[str, float] | None = None
    lymphocyte_density_per_mm2: dict[str, float] | None = None
    macrophage_density_per_mm2: dict[str, float] | None = None
    fibroblast_density_per_mm2: float = 1200.0
    tumour_cell_spacing_um: float = 16.0
    positive_fraction: float | None = None
    intensity_mix: tuple[float, float, float] = (0.3, 0.4, 0.3)
    immune_clustering: float = 0.7
    nerve_count: int | None = None
    randomize_appearance: bool = True
    h_scale: float | None = None
    dab_scale: float | None = None
    hue_jitter_deg: float = 4.0
    stain_vectors: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    background: tuple[float, float, float] | None = None
    blur_sigma_um: float | None = None
    noise_sigma: float | None = None
    thickness_um: float | None = None
    nerve_dab: float = 0.5
    solid_positive_fraction: float = 0.5

    def resolved(self) -> SyntheticSlideSpec:
        """A copy with every ``None`` filled (defaults per marker, appearance per seed)."""
        marker = self.marker.upper()
        if marker not in MARKER_TARGETS:
            raise ConfigError(
                f"unknown marker {self.marker!r}", hint=f"use one of {sorted(MARKER_TARGETS)}"
            )
        if self.width_px < 16 or self.height_px < 16 or self.mpp <= 0:
            raise ConfigError(
                f"slide size {self.width_px}x{self.height_px} px at {self.mpp} µm/px is invalid",
                hint="use at least 16 px a side and a positive mpp",
            )
        rng = np.random.default_rng([self.seed, 1])
        rnd = self.randomize_appearance

        def pick(value: Any, nominal: Any, draw: Any) -> Any:
            drawn = draw()  # always draw, so the stream does not depend on which are given
            if value is not None:
                return value
            return drawn if rnd else nominal

        def dens(value: dict | None, default: dict) -> dict[str, float]:
            out = dict(default)
            out.update(value or {})
            unknown = set(out) - set(COMPARTMENTS)
            if unknown:
                raise ConfigError(
                    f"unknown compartment(s) {sorted(unknown)} in a density",
                    hint=f"use {COMPARTMENTS}",
                )
            return {k: float(out[k]) for k in COMPARTMENTS}

        def jitter(vec: tuple[float, ...]) -> tuple[float, ...]:
            v = np.asarray(vec, float)
            v /= np.linalg.norm(v)
            d = rng.normal(size=3)
            d -= d.dot(v) * v
            d /= np.linalg.norm(d)
            ang = math.radians(self.hue_jitter_deg) * rng.uniform(-1, 1)
            out = v * math.cos(ang) + d * math.sin(ang)
            out = np.abs(out) / np.linalg.norm(out)
            return tuple(round(float(c), 6) for c in out)

        h_vec, dab_vec = jitter(H_VECTOR), jitter(DAB_VECTOR)
        vectors = self.stain_vectors
        if vectors is None:
            vectors = (h_vec, dab_vec) if rnd else (H_VECTOR, DAB_VECTOR)
        base = rng.uniform(228, 248)
        bg = tuple(round(float(np.clip(base + rng.uniform(-5, 5), 220, 252)), 2) for _ in range(3))
        return dataclasses.replace(
            self,
            marker=marker,
            target_density_per_mm2=dens(self.target_density_per_mm2, _TARGET_DENSITY[marker]),
            lymphocyte_density_per_mm2=dens(self.lymphocyte_density_per_mm2, _LYMPHOCYTE_DENSITY),
            macrophage_density_per_mm2=dens(self.macrophage_density_per_mm2, _MACROPHAGE_DENSITY),
            positive_fraction=(
                _POSITIVE_FRACTION[marker]
                if self.positive_fraction is None
                else float(self.positive_fraction)
            ),
            nerve_count=(3 if marker == "CD56" else 1)
            if self.nerve_count is None
            else self.nerve_count,
            h_scale=pick(self.h_scale, 1.0, lambda: round(rng.uniform(0.8, 1.2), 4)),
            dab_scale=pick(self.dab_scale, 1.0, lambda: round(rng.uniform(0.85, 1.2), 4)),
            stain_vectors=(tuple(vectors[0]), tuple(vectors[1])),
            background=tuple(
                float(c) for c in pick(self.background, (240.0, 240.0, 240.0), lambda: bg)
            ),
            blur_sigma_um=pick(self.blur_sigma_um, 0.5, lambda: round(rng.uniform(0.35, 0.7), 4)),
            noise_sigma=pick(self.noise_sigma, 2.0, lambda: round(rng.uniform(1.0, 3.0), 4)),
            thickness_um=pick(self.thickness_um, 4.0, lambda: round(rng.uniform(3.5, 5.0), 4)),
            intensity_mix=tuple(float(v) for v in self.intensity_mix),
        )

    @property
    def thickness_factor(self) -> float:
        """OD multiplier of the section thickness (1 at 4 µm)."""
        return (self.thickness_um or 4.0) / 4.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticSlideSpec:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        for key in ("intensity_mix", "background"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        if data.get("stain_vectors") is not None:
            data["stain_vectors"] = tuple(tuple(v) for v in data["stain_vectors"])
        return cls(**data)


@dataclass
class SyntheticLayout:
    """Regions and cells of one synthetic slide (all coordinates level-0 px).

    Compartments (the ``compartment`` column of ``cells`` and the keys of ``regions``):

    ==========  =================================================================
    tumour      inside a tumour-cell nest (``regions["tumour"]``)
    stroma      inside the tumour bed but not in a nest (bed minus nests)
    margin      inside the invasive-margin band (``margin_width_um`` wide, centred
                on the bed border) but outside the bed, within tissue
    outside     tissue elsewhere (neither bed nor margin band)
    ==========  =================================================================

    ``regions`` also holds "tissue", "tumour_bed", "margin_band" (the full band within tissue,
    half of it inside the bed, as Immunoscore draws it) and "nerve" (nerve bundles).

    Cell types: "tumour", "fibroblast", "lymphocyte", "macrophage", "nk", "nerve" (Schwann-cell
    nuclei of nerve bundles). ``positive`` is True only for marker-positive immune cells of the
    slide's target type; on CD56 slides nerve bundles are DAB-positive but their cells are
    ``positive`` False, since they are not NK cells (their ``intensity`` records the bundle's DAB
    OD, with ``intensity_bin`` 0). ``intensity`` is the DAB OD amplitude of the stained part
    (membrane ring or cytoplasm) after stain strength and thickness, before blur;
    ``intensity_bin`` is 1/2/3 for positives by :data:`INTENSITY_THRESHOLDS` (at least 1), 0 for
    all others. x, y are continuous level-0 px (pixel (0, 0) spans [0, 1)).
    """

    spec: SyntheticSlideSpec
    regions: dict[str, shapely.Geometry]
    cells: pd.DataFrame
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def width_px(self) -> int:
        return self.spec.width_px

    @property
    def height_px(self) -> int:
        return self.spec.height_px

    @property
    def mpp(self) -> float:
        return self.spec.mpp

    def compartment_areas_mm2(self) -> dict[str, float]:
        """Area of each compartment in mm²."""
        px2 = (self.mpp * 1e-3) ** 2
        return {c: float(self.regions[c].area * px2) for c in COMPARTMENTS}

    def truth(self) -> pd.DataFrame:
        """The truth table: :data:`TRUTH_COLUMNS`.

        ``x, y`` (and ``x_um, y_um``) are the centre of the cell's NUCLEUS, what a nucleus
        detector finds and what a pathologist clicks; ``cell_x, cell_y`` are the centre of the
        cell body. They differ for macrophages, whose nucleus sits off-centre in a large cell
        (by up to about 6 µm); for other cells they coincide.
        """
        c = self.cells
        t = c.loc[:, [k for k in TRUTH_COLUMNS if k not in ("cell_x", "cell_y")]].copy()
        t["cell_x"], t["cell_y"] = c["x"].to_numpy(), c["y"].to_numpy()
        theta, ox, oy = (c[k].to_numpy(float) for k in ("theta", "ox", "oy"))
        # the renderer draws the nucleus at (ox, oy) µm in the cell's frame rotated by theta
        dx_um = ox * np.cos(theta) - oy * np.sin(theta)
        dy_um = ox * np.sin(theta) + oy * np.cos(theta)
        t["x"] = c["x"].to_numpy() + dx_um / self.mpp
        t["y"] = c["y"].to_numpy() + dy_um / self.mpp
        t["x_um"] = t["x"] * self.mpp
        t["y_um"] = t["y"] * self.mpp
        return t.loc[:, list(TRUTH_COLUMNS)]


# ----------------------------------------------------------------------------- geometry


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float, rough: float = 0.25):
    """A smooth random star-shaped polygon of mean radius ``radius`` (px)."""
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    logr = np.zeros_like(theta)
    for k in range(2, 9):
        logr += rng.normal(0, rough / k**1.2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.exp(logr)
    return Polygon(np.column_stack([cx + r * np.cos(theta), cy + r * np.sin(theta)]))


def _random_walk(rng, x, y, length, step, turn_sd):
    n = max(2, int(length / step))
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, turn_sd, n))
    xs = x + np.concatenate([[0], np.cumsum(step * np.cos(heading))])
    ys = y + np.concatenate([[0], np.cumsum(step * np.sin(heading))])
    return LineString(np.column_stack([xs, ys]))


def _points_in(geom, n: int, rng: np.random.Generator, weight=None) -> np.ndarray:
    """``n`` uniform (or ``weight``-thinned) random points inside ``geom``; (n, 2) px."""
    if n <= 0 or geom.is_empty:
        return np.zeros((0, 2))
    shapely.prepare(geom)
    x0, y0, x1, y1 = geom.bounds
    frac = max(geom.area / max((x1 - x0) * (y1 - y0), 1e-9), 1e-3)
    out: list[np.ndarray] = []
    have = 0
    for _ in range(200):
        m = int((n - have) / frac * 1.3) + 16
        pts = np.column_stack([rng.uniform(x0, x1, m), rng.uniform(y0, y1, m)])
        keep = shapely.contains_xy(geom, pts[:, 0], pts[:, 1])
        if weight is not None:
            keep &= rng.random(m) < weight(pts[:, 0], pts[:, 1])
        pts = pts[keep][: n - have]
        out.append(pts)
        have += len(pts)
        if have >= n:
            break
    return np.concatenate(out)


def _fit_scale(make, target_area: float, clip) -> shapely.Geometry:
    """Scale factor s such that ``make(s) ∩ clip`` has ``target_area`` (bisection)."""
    lo, hi = 0.05, 4.0
    geom = make(hi).intersection(clip)
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        geom = make(mid).intersection(clip)
        if geom.area < target_area:
            lo = mid
        else:
            hi = mid
    return make(hi).intersection(clip)


def _make_regions(spec: SyntheticSlideSpec, rng: np.random.Generator) -> dict[str, Any]:
    um = 1.0 / spec.mpp  # px per µm
    w, h = spec.width_px, spec.height_px
    frame = box(0, 0, w, h)
    inner = box(0.02 * w, 0.02 * h, 0.98 * w, 0.98 * h)
    if spec.tissue_fraction >= 0.98:
        tissue = frame
    else:
        n_pieces = 1 if rng.random() < 0.6 else 2
        seeds = [(rng.uniform(0.42, 0.58) * w, rng.uniform(0.42, 0.58) * h, 1.0)]
        if n_pieces == 2:
            seeds = [
                (rng.uniform(0.32, 0.42) * w, rng.uniform(0.4, 0.6) * h, 1.0),
                (rng.uniform(0.7, 0.78) * w, rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6)),
            ]
        shapes = [(_blob(rng, 0, 0, 1.0, 0.3), cx, cy, f) for cx, cy, f in seeds]
        base = min(w, h) / 2

        def make(s):
            parts = [
                shapely.affinity.scale(p, s * base * f, s * base * f, origin=(0, 0))
                for p, _, _, f in shapes
            ]
            parts = [
                shapely.affinity.translate(p, cx, cy) for p, (_, cx, cy, _) in zip(parts, shapes)
            ]
            return shapely.unary_union(parts)

        tissue = _fit_scale(make, spec.tissue_fraction * w * h, inner)
    # tumour bed: a blob inside the tissue, centred on a point well inside it
    core = tissue.buffer(-0.15 * math.sqrt(tissue.area))
    if core.is_empty:
        core = tissue
    cx, cy = _points_in(core, 1, rng)[0]
    if spec.tumour_bed_fraction >= 0.98:
        bed = tissue
    else:
        bed_shape = _blob(rng, 0, 0, 1.0, 0.2)

        def make_bed(s):
            return shapely.affinity.translate(
                shapely.affinity.scale(bed_shape, s * base_r, s * base_r, origin=(0, 0)), cx, cy
            )

        base_r = math.sqrt(tissue.area / math.pi)
        bed = _fit_scale(make_bed, spec.tumour_bed_fraction * tissue.area, tissue)
    bed = shapely.make_valid(bed)
    # nests: blobs and cords until they cover nest_fraction of the bed
    target = spec.nest_fraction * bed.area
    pieces: list[Any] = []
    nests = Polygon()
    for _ in range(60):
        if nests.area >= target or spec.nest_fraction <= 0:
            break
        centres = _points_in(bed, 12, rng)
        for x, y in centres:
            if rng.random() < 0.7:
                r = float(np.clip(rng.lognormal(math.log(90), 0.5), 35, 300)) * um
                pieces.append(_blob(rng, x, y, r, 0.3))
            else:
                line = _random_walk(rng, x, y, rng.uniform(150, 600) * um, 20 * um, 0.35)
                pieces.append(line.buffer(rng.uniform(15, 35) * um, quad_segs=4))
        nests = shapely.unary_union(pieces).intersection(bed)
    if not nests.is_empty:
        smooth = 6 * um
        nests = nests.buffer(smooth).buffer(-smooth).intersection(bed)
        nests = shapely.make_valid(nests)
    band = bed.boundary.buffer(spec.margin_width_um / 2 * um, quad_segs=8).intersection(tissue)
    stroma = bed.difference(nests)
    margin = band.difference(bed)
    outside = tissue.difference(bed).difference(band)
    # nerve bundles in non-nest tissue
    nerves = []
    non_nest = tissue.difference(nests.buffer(15 * um))
    # nerves start well inside non-nest tissue; a small tile may have no room for one
    room = non_nest.buffer(-30 * um)
    if room.is_empty:
        room = non_nest
    n_nerves = 0 if room.is_empty else (spec.nerve_count or 0)
    for _ in range(n_nerves):
        found = _points_in(room, 1, rng)
        if len(found) == 0:
            break
        x, y = found[0]
        length = rng.uniform(300, 900) * um
        heading = rng.uniform(0, np.pi)
        s = np.linspace(-length / 2, length / 2, 80)
        wave = rng.uniform(5, 15) * um * np.sin(2 * np.pi * s / (rng.uniform(60, 140) * um))
        xs = x + s * np.cos(heading) - wave * np.sin(heading)
        ys = y + s * np.sin(heading) + wave * np.cos(heading)
        line = LineString(np.column_stack([xs, ys]))
        poly = line.buffer(rng.uniform(12, 30) * um, quad_segs=6).intersection(non_nest)
        if not poly.is_empty:
            nerves.append((poly, line))
    return {
        "tissue": tissue,
        "tumour_bed": bed,
        "tumour": nests,
        "stroma": stroma,
        "margin": margin,
        "outside": outside,
        "margin_band": band,
        "nerve": shapely.unary_union([p for p, _ in nerves]) if nerves else Polygon(),
        "_nerve_lines": nerves,
    }


# ----------------------------------------------------------------------------- cells


class _Occupancy:
    """Placed cell centres and exclusion radii, for rejecting overlaps (vectorised)."""

    def __init__(self) -> None:
        self.xy = np.zeros((0, 2))
        self.r = np.zeros(0)
        self._tree: cKDTree | None = None

    def add(self, xy: np.ndarray, r: np.ndarray) -> None:
        self.xy = np.concatenate([self.xy, xy])
        self.r = np.concatenate([self.r, r])
        self._tree = None

    def free(self, xy: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Mask of candidates that overlap neither placed cells nor earlier candidates."""
        ok = np.ones(len(xy), bool)
        if len(xy) == 0:
            return ok
        cand = cKDTree(xy)
        if len(self.xy):
            if self._tree is None:
                self._tree = cKDTree(self.xy)
            pairs = cand.sparse_distance_matrix(
                self._tree, r.max() + self.r.max(), output_type="ndarray"
            )
            bad = pairs["v"] < r[pairs["i"]] + self.r[pairs["j"]]
            ok[pairs["i"][bad]] = False
        pairs = cand.query_pairs(2 * r.max(), output_type="ndarray")
        if len(pairs):
            d = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
            bad = d < r[pairs[:, 0]] + r[pairs[:, 1]]
            ok[np.maximum(pairs[bad, 0], pairs[bad, 1])] = False
        return ok


def _cluster_weight(spec: SyntheticSlideSpec, rng: np.random.Generator):
    """Smooth random density modulation in (0, 1], a function of level-0 px."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    cell_px = 50.0 / spec.mpp  # 50 µm grid
    gw, gh = int(spec.width_px / cell_px) + 3, int(spec.height_px / cell_px) + 3
    field_ = gaussian_filter(rng.normal(size=(gh, gw)), 3.0, mode="wrap")
    field_ *= spec.immune_clustering / max(field_.std(), 1e-9)
    field_ = np.exp(field_ - field_.max())

    def weight(x, y):
        return map_coordinates(field_, [y / cell_px, x / cell_px], order=1, mode="nearest")

    return weight


def _attrs(kind: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random morphology of ``n`` cells of one kind (µm, radians, OD)."""
    u = rng.uniform
    z = np.zeros(n)
    a = {k: z.copy() for k in ("ox", "oy", "bend", "eps", "notch", "nuc_u", "nuc_v", "nuc_amp")}
    a["theta"] = u(0, np.pi, n)
    a["k"] = rng.integers(3, 6, n).astype(float)
    a["phase"] = u(0, 2 * np.pi, n)
    a["rim"] = z.copy()
    a["ch"] = z.copy()
    if kind in ("lymphocyte", "nk"):
        d = u(5.0, 8.0, n) if kind == "lymphocyte" else u(6.0, 9.0, n)
        asp = u(1.0, 1.15, n)
        a["a"], a["b"] = d / 2 * np.sqrt(asp), d / 2 / np.sqrt(asp)
        rim = u(0.8, 1.4, n) if kind == "lymphocyte" else u(1.5, 2.5, n)
        a["rca"], a["rcb"] = a["a"] + rim, a["b"] + rim
        a["h"] = u(0.8, 1.1, n)
        a["tex"] = u(0.1, 0.2, n)
        a["eps"] = u(0.0, 0.05, n)
        a["ch"] = np.full(n, 0.03)
    elif kind == "macrophage":
        d = u(15.0, 30.0, n)
        asp = u(1.0, 1.5, n)
        a["rca"], a["rcb"] = d / 2 * np.sqrt(asp), d / 2 / np.sqrt(asp)
        nd = u(7.0, 11.0, n)
        nasp = u(1.2, 1.7, n)
        a["a"], a["b"] = nd / 2 * np.sqrt(nasp), nd / 2 / np.sqrt(nasp)
        a["a"] = np.minimum(a["a"], a["rca"] * 0.7)
        a["ox"] = u(-1, 1, n) * np.maximum(a["rca"] - a["a"] - 1.0, 0)
        a["oy"] = u(-1, 1, n) * np.maximum(a["rcb"] - a["b"] - 1.0, 0) * 0.5
        a["notch"] = np.where(rng.random(n) < 0.5, u(0.35, 0.6, n), 0.0)
        a["h"] = u(0.35, 0.55, n)
        a["tex"] = u(0.25, 0.4, n)
        a["eps"] = u(0.02, 0.08, n)
        a["ch"] = np.full(n, 0.04)
    elif kind == "tumour":
        d = np.clip(rng.lognormal(math.log(13.0), 0.18, n), 10.0, 20.0)
        asp = u(1.0, 1.4, n)
        a["a"], a["b"] = d / 2 * np.sqrt(asp), d / 2 / np.sqrt(asp)
        a["rca"], a["rcb"] = a["a"] * 1.3, a["b"] * 1.3
        a["h"] = u(0.4, 0.75, n)
        a["tex"] = u(0.35, 0.55, n)
        a["eps"] = u(0.04, 0.12, n)
        a["rim"] = u(0.15, 0.35, n)
        ang = u(0, 2 * np.pi, n)
        rad = u(0, 0.4, n)
        a["nuc_u"], a["nuc_v"] = rad * a["a"] * np.cos(ang), rad * a["b"] * np.sin(ang)
        a["nuc_amp"] = np.where(rng.random(n) < 0.7, u(0.3, 0.7, n), 0.0)
    elif kind in ("fibroblast", "nerve"):
        length = u(9.0, 17.0, n) if kind == "fibroblast" else u(10.0, 16.0, n)
        width = u(2.0, 3.8, n) if kind == "fibroblast" else u(2.5, 4.0, n)
        a["a"], a["b"] = length / 2, width / 2
        a["rca"], a["rcb"] = a["a"], a["b"]
        a["bend"] = rng.normal(0, 0.12 if kind == "fibroblast" else 0.3, n)
        a["h"] = u(0.55, 0.85, n) if kind == "fibroblast" else u(0.45, 0.7, n)
        a["tex"] = u(0.1, 0.2, n)
        a["eps"] = u(0.0, 0.04, n)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    a["md"] = z.copy()
    a["mw"] = np.full(n, 0.55)
    a["nd"] = z.copy()
    a["cd"] = z.copy()
    return a


def _stain(
    kind: str, a: dict[str, np.ndarray], amp: np.ndarray, solid: np.ndarray | None = None
) -> None:
    """Set the DAB parameters of cells of ``kind`` with final amplitudes ``amp`` (0: none).

    ``solid`` (bool per cell) marks ring-type cells whose DAB fills the cell and covers the
    nucleus; their cell body is 30 % wider.
    """
    if kind == "macrophage":  # granular cytoplasm, a little membrane accent
        a["cd"] = amp.copy()
        a["md"] = 0.3 * amp
        a["nd"] = 0.1 * amp
    else:  # membranous ring and a thin rim of cytoplasm; some over the nucleus
        a["md"] = amp.copy()
        a["cd"] = 0.45 * amp
        a["nd"] = 0.18 * amp
        if solid is not None and solid.any():  # dense DAB over cytoplasm and nucleus alike
            for key, factor in (("md", 1.3), ("cd", 1.5), ("nd", 2.0)):
                a[key] = np.where(solid, factor * amp, a[key])
            a["h"] = np.where(solid, 0.6 * a["h"], a["h"])  # the precipitate hides the nucleus
            for key in ("rca", "rcb"):
                a[key] = np.where(solid, a[key] * 1.3, a[key])


def _position_hash(xy: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per position, without drawing from a random generator."""
    v = np.sin(xy[:, 0] * 12.9898 + xy[:, 1] * 78.233) * 43758.5453
    return v - np.floor(v)


def _exclusion_radius(kind: str, a: dict[str, np.ndarray]) -> np.ndarray:
    if kind in ("fibroblast", "nerve"):
        return 0.5 * a["a"] + 0.5 * a["b"]
    if kind == "tumour":
        return 0.45 * (a["a"] + a["b"])
    return 0.45 * (a["rca"] + a["rcb"])


def _intensities(spec: SyntheticSlideSpec, n: int, rng: np.random.Generator):
    mix = np.asarray(spec.intensity_mix, float)
    mix = mix / mix.sum()
    grade = rng.choice(3, size=n, p=mix)
    lo = np.array([0.22, 0.42, 0.62])[grade]
    hi = np.array([0.38, 0.58, 0.95])[grade]
    return rng.uniform(lo, hi) * spec.dab_scale * spec.thickness_factor


def _intensity_bin(intensity: np.ndarray, positive: np.ndarray) -> np.ndarray:
    b = np.digitize(intensity, INTENSITY_THRESHOLDS)
    return np.where(positive, np.clip(b, 1, 3), 0).astype(np.int8)


def _place(kind, geom, n, rng, occ: _Occupancy, px_per_um, weight_fn):
    """Dart-throw ``n`` cells of ``kind`` into ``geom`` without overlapping ``occ``."""
    xy_out, a_out = [], []
    have = 0
    for _ in range(12):
        m = int((n - have) * 1.25) + 8
        xy = _points_in(geom, m, rng, weight_fn)
        a = _attrs(kind, len(xy), rng)
        rad = _exclusion_radius(kind, a) * px_per_um
        ok = occ.free(xy, rad)
        idx = np.flatnonzero(ok)[: n - have]
        occ.add(xy[idx], rad[idx])
        xy_out.append(xy[idx])
        a_out.append({k: v[idx] for k, v in a.items()})
        have += len(idx)
        if have >= n:
            break
    xy = np.concatenate(xy_out) if xy_out else np.zeros((0, 2))
    a = (
        {k: np.concatenate([d[k] for d in a_out]) for k in a_out[0]}
        if a_out
        else _attrs(kind, 0, rng)
    )
    return xy, a


def make_layout(spec: SyntheticSlideSpec | None = None, **overrides: Any) -> SyntheticLayout:
    """Build the regions and cells of a synthetic slide (deterministic from ``spec.seed``).

    Parameters
    ----------
    spec
        The slide description; ``None`` uses :class:`SyntheticSlideSpec` defaults.
    **overrides
        Fields of ``spec`` to replace.

    Returns
    -------
    SyntheticLayout
        Regions (shapely, level-0 px) and the cells table.
    """
    spec = spec or SyntheticSlideSpec()
    if overrides:
        try:
            spec = dataclasses.replace(spec, **overrides)
        except TypeError as exc:
            raise ConfigError(f"invalid synthetic slide option: {exc}") from None
    spec = spec.resolved()
    ss = np.random.SeedSequence([spec.seed, 2])
    r_geom, r_imm, r_nerve, r_tum, r_fib = (np.random.default_rng(s) for s in ss.spawn(5))
    regions = _make_regions(spec, r_geom)
    nerve_lines = regions.pop("_nerve_lines")
    px_per_um = 1.0 / spec.mpp
    mm2_per_px = (spec.mpp * 1e-3) ** 2
    occ = _Occupancy()
    parts: list[dict[str, np.ndarray]] = []

    def add(kind, xy, a, comp, positive, intensity):
        n = len(xy)
        a = dict(a)
        a.update(
            x=xy[:, 0],
            y=xy[:, 1],
            cell_type=np.full(n, kind, dtype=object),
            compartment=np.asarray(comp, dtype=object) if n else np.zeros(0, object),
            positive=np.asarray(positive, bool),
            intensity=np.asarray(intensity, float),
        )
        parts.append(a)

    # 1. immune cells, target first, per compartment, exact Poisson counts, clustered
    weight_fn = _cluster_weight(spec, r_imm) if spec.immune_clustering > 0 else None
    target = MARKER_TARGETS[spec.marker]
    groups = [(target, spec.target_density_per_mm2, True)]
    groups.append(("lymphocyte", spec.lymphocyte_density_per_mm2, False))
    if target != "macrophage":
        groups.append(("macrophage", spec.macrophage_density_per_mm2, False))
    for kind, dens, is_target in groups:
        for comp in COMPARTMENTS:
            geom = regions[comp]
            n = int(r_imm.poisson(dens[comp] * geom.area * mm2_per_px)) if not geom.is_empty else 0
            if n == 0:
                continue
            xy, a = _place(kind, geom, n, r_imm, occ, px_per_um, weight_fn)
            m = len(xy)
            pos = (r_imm.random(m) < spec.positive_fraction) if is_target else np.zeros(m, bool)
            amp = np.where(pos, _intensities(spec, m, r_imm), 0.0)
            solid = None  # T cells only: NK cells (CD56) keep their ring
            if m and kind == "lymphocyte":
                solid = pos & (_position_hash(xy) < spec.solid_positive_fraction)
            _stain(kind, a, amp, solid)
            add(kind, xy, a, [comp] * m, pos, amp)

    # 2. nerve bundles: Schwann-cell nuclei along the bundle axis
    for poly, line in nerve_lines:
        n = int(poly.area * mm2_per_px * 3500)
        s = r_nerve.uniform(0, line.length, n)
        pts = shapely.get_coordinates(shapely.line_interpolate_point(line, s))
        ahead = shapely.get_coordinates(
            shapely.line_interpolate_point(line, np.minimum(s + 2 * px_per_um, line.length))
        )
        behind = shapely.get_coordinates(
            shapely.line_interpolate_point(line, np.maximum(s - 2 * px_per_um, 0))
        )
        tang = np.arctan2(ahead[:, 1] - behind[:, 1], ahead[:, 0] - behind[:, 0])
        half = math.sqrt(poly.area / max(line.length, 1)) * 0.45
        off = r_nerve.uniform(-1, 1, n) * half
        xy = pts + off[:, None] * np.column_stack([-np.sin(tang), np.cos(tang)])
        a = _attrs("nerve", n, r_nerve)
        a["theta"] = tang + r_nerve.normal(0, 0.15, n)
        inside = shapely.contains_xy(poly, xy[:, 0], xy[:, 1])
        rad = _exclusion_radius("nerve", a) * px_per_um
        keep = inside & occ.free(xy, rad)
        xy, a, rad = xy[keep], {k: v[keep] for k, v in a.items()}, rad[keep]
        occ.add(xy, rad)
        amp = np.full(len(xy), spec.nerve_dab * spec.dab_scale * spec.thickness_factor)
        amp = amp if spec.marker == "CD56" else np.zeros(len(xy))
        add("nerve", xy, a, [None] * len(xy), np.zeros(len(xy), bool), amp)

    # 3. tumour cells packed on a jittered hexagonal grid inside the nests
    nests = regions["tumour"]
    if not nests.is_empty:
        sp = spec.tumour_cell_spacing_um * px_per_um
        x0, y0, x1, y1 = nests.bounds
        ys = np.arange(y0, y1 + sp, sp * math.sqrt(3) / 2)
        xs = np.arange(x0, x1 + sp, sp)
        gx = xs[None, :] + (np.arange(len(ys)) % 2)[:, None] * sp / 2
        gy = np.broadcast_to(ys[:, None], gx.shape)
        xy = np.column_stack([gx.ravel(), gy.ravel()])
        xy += r_tum.uniform(-0.18, 0.18, xy.shape) * sp
        shapely.prepare(nests)
        xy = xy[shapely.contains_xy(nests, xy[:, 0], xy[:, 1])]
        a = _attrs("tumour", len(xy), r_tum)
        # exclusion against immune cells and nerves only (tumour cells may touch each other)
        rad = _exclusion_radius("tumour", a) * px_per_um * 0.8
        if len(occ.xy):
            tree = cKDTree(occ.xy)
            pairs = cKDTree(xy).sparse_distance_matrix(
                tree, rad.max() + occ.r.max(), output_type="ndarray"
            )
            bad = pairs["v"] < rad[pairs["i"]] + occ.r[pairs["j"]]
            keep = np.ones(len(xy), bool)
            keep[pairs["i"][bad]] = False
        else:
            keep = np.ones(len(xy), bool)
        xy, a = xy[keep], {k: v[keep] for k, v in a.items()}
        occ.add(xy, rad[keep])
        add("tumour", xy, a, ["tumour"] * len(xy), np.zeros(len(xy), bool), np.zeros(len(xy)))

    # 4. fibroblasts in non-nest, non-nerve tissue
    fib_geom = regions["tissue"].difference(nests).difference(regions["nerve"])
    n = int(r_fib.poisson(spec.fibroblast_density_per_mm2 * fib_geom.area * mm2_per_px))
    xy, a = _place("fibroblast", fib_geom, n, r_fib, occ, px_per_um, None)
    add("fibroblast", xy, a, [None] * len(xy), np.zeros(len(xy), bool), np.zeros(len(xy)))

    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    df = pd.DataFrame(cols)
    # compartments of the cells placed without one (nerve, fibroblast)
    todo = df["compartment"].isna().to_numpy()
    if todo.any():
        comp = compartment_of(regions, df["x"][todo], df["y"][todo])
        df.loc[todo, "compartment"] = np.where(comp == None, "outside", comp)  # noqa: E711
    # deterministic order and ids: by position (row-major in 64-px bands), then x
    order = np.lexsort((df["x"].to_numpy(), (df["y"].to_numpy() // 64)))
    df = df.iloc[order].reset_index(drop=True)
    df.insert(0, "cell_id", np.arange(len(df), dtype=np.int64))
    df["x_um"] = df["x"] * spec.mpp
    df["y_um"] = df["y"] * spec.mpp
    df["intensity_bin"] = _intensity_bin(df["intensity"].to_numpy(), df["positive"].to_numpy())
    df["nucleus_major_um"] = 2 * df["a"]
    df["nucleus_minor_um"] = 2 * df["b"]
    df["nucleus_diameter_um"] = 2 * np.sqrt(df["a"] * df["b"])
    df["cell_diameter_um"] = 2 * np.sqrt(df["rca"] * df["rcb"])
    df["cell_type"] = pd.Categorical(df["cell_type"], categories=CELL_TYPES)
    df["compartment"] = pd.Categorical(df["compartment"], categories=(*COMPARTMENTS,))
    front = [c for c in TRUTH_COLUMNS if c in df.columns]  # cell_x/y: derived by truth()
    df = df[front + [c for c in df.columns if c not in front]]
    return SyntheticLayout(spec=spec, regions=regions, cells=df)


def compartment_of(regions: dict[str, Any], x, y) -> np.ndarray:
    """Compartment name of level-0 points (x, y) px; None where not in tissue."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    out = np.full(len(x), None, dtype=object)
    for name in ("outside", "margin", "stroma", "tumour"):  # later ones win
        geom = regions[name]
        if geom.is_empty:
            continue
        out[shapely.contains_xy(geom, x, y)] = name
    return out
