"""Tissue mask: glass, pen, dust, holes; scale to level 0; polygons; real slide."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from tilscore.errors import ConfigError, MissingPixelSizeError, TilscoreWarning
from tilscore.stain import RUIFROK_HDAB
from tilscore.tissue import TissueMask, tissue_mask

GLASS = (238.0, 236.0, 243.0)
MPP = 8.0  # µm/px of the synthetic scenes


def _smooth_noise(shape, rng, sigma=3.0):
    n = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), sigma)
    return n / (n.std() + 1e-9)


def make_scene(seed: int = 0):
    """A 400 x 500 px slide at 8 µm/px with known tissue, pen, dust, dots and holes."""
    rng = np.random.default_rng(seed)
    h, w = 400, 500
    yy, xx = np.mgrid[:h, :w]
    blob1 = ((yy - 150) / 110) ** 2 + ((xx - 160) / 90) ** 2 < 1
    blob2 = ((yy - 270) / 80) ** 2 + ((xx - 360) / 100) ** 2 < 1
    big_hole = (yy - 150) ** 2 + (xx - 160) ** 2 < 18**2  # 1018 px = 65,000 µm²: kept
    small_hole = (yy - 270) ** 2 + (xx - 330) ** 2 < 3**2  # 29 px = 1,800 µm²: filled
    tissue = (blob1 | blob2) & ~big_hole
    conc = np.zeros((h, w, 3), dtype=np.float32)
    texture = _smooth_noise((h, w), rng)
    conc[..., 0] = np.clip(0.35 + 0.12 * texture, 0.12, None)  # pale to moderate hematoxylin
    conc[..., 1] = np.clip(0.15 * _smooth_noise((h, w), rng, 6.0), 0, None)  # patchy DAB
    conc[~(tissue & ~small_hole)] = 0
    od = conc @ RUIFROK_HDAB.vectors.astype(np.float32)
    rgb = np.asarray(GLASS, dtype=np.float32) * 10.0 ** (-od)
    rgb += rng.normal(0, 1.5, rgb.shape)
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    pen = np.zeros((h, w), dtype=np.uint8)
    blue_pen = cv2.line(pen.copy(), (20, 380), (480, 330), 1, 6).astype(bool)  # crosses blob2
    green_pen = cv2.line(pen.copy(), (300, 20), (470, 120), 1, 5).astype(bool)  # on glass
    rgb[blue_pen] = (40, 70, 170)
    rgb[green_pen] = (50, 150, 80)
    dots = [(30, 30), (470, 200), (60, 250)]  # black dots on glass, radius 5
    black = np.zeros((h, w), dtype=bool)
    for x, y in dots:
        black |= (yy - y) ** 2 + (xx - x) ** 2 < 25
    rgb[black] = (25, 25, 30)
    dust_centres = [(280, 60), (420, 40), (330, 170), (60, 360), (480, 390)]
    dust = np.zeros((h, w), dtype=bool)
    for x, y in dust_centres:
        dust |= (yy - y) ** 2 + (xx - x) ** 2 <= 4  # a few px: 13 px = 830 µm²
    rgb[dust] = (150, 135, 125)
    truth = tissue & ~blue_pen & ~green_pen
    return {
        "rgb": rgb,
        "truth": truth,
        "blob_union": blob1 | blob2,
        "pen": blue_pen | green_pen,
        "black": black,
        "dust": dust,
        "dust_centres": dust_centres,
        "big_hole_centre": (160, 150),
        "small_hole_centre": (330, 270),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def scene():
    return make_scene()


@pytest.fixture(scope="module")
def scene_mask(scene):
    return tissue_mask(scene["rgb"], MPP, target_mpp=MPP)


def test_mask_keeps_the_tissue(scene, scene_mask):
    m = scene_mask
    assert m.mask.shape == scene["truth"].shape
    assert m.downsample == 1.0
    assert m.mpp == MPP
    assert iou(m.mask, scene["truth"]) > 0.95


def test_mask_drops_pen_dots_and_dust(scene, scene_mask):
    m = scene_mask.mask
    assert m[scene["pen"]].mean() < 0.01  # also where the blue pen crosses tissue
    assert not m[scene["black"]].any()
    assert not m[scene["dust"]].any()
    for x, y in scene["dust_centres"]:
        assert not m[y, x]


def test_mask_is_the_same_computed_in_row_blocks(scene, scene_mask, monkeypatch):
    # large overviews are processed a block of rows at a time (bounded memory); the blocks
    # must not change the mask, pen marks included
    import tilscore.tissue as tissue_mod
    from tilscore.stain import row_blocks

    h, w = scene["rgb"].shape[:2]
    real = tissue_mod._BLOCK_PX
    monkeypatch.setattr(tissue_mod, "_BLOCK_PX", 7 * w)
    assert len(row_blocks(h, w, tissue_mod._BLOCK_PX)[0]) > 10
    blocked = tissue_mask(scene["rgb"], MPP, target_mpp=MPP)
    np.testing.assert_array_equal(blocked.mask, scene_mask.mask)
    assert blocked.info == scene_mask.info
    pen = tissue_mod.pen_mask(scene["rgb"])
    monkeypatch.setattr(tissue_mod, "_BLOCK_PX", real)
    np.testing.assert_array_equal(pen, tissue_mod.pen_mask(scene["rgb"]))
    assert pen[scene["pen"]].mean() > 0.9


def test_small_holes_filled_large_holes_kept(scene, scene_mask):
    x, y = scene["small_hole_centre"]
    assert scene_mask.mask[y, x]
    x, y = scene["big_hole_centre"]
    assert not scene_mask.mask[y, x]


def test_mask_records_what_it_used(scene_mask):
    info = scene_mask.to_dict()
    np.testing.assert_allclose(info["background"], GLASS, atol=2)
    assert info["background_source"] == "estimated"
    assert 0.03 <= info["od_threshold"] <= 0.15
    assert info["params"]["min_tissue_area_um2"] == 20_000
    assert info["area_mm2"] == pytest.approx(scene_mask.area_mm2)


def test_area_mm2_matches_pixel_count(scene, scene_mask):
    expected = scene["truth"].sum() * (MPP / 1000) ** 2
    assert scene_mask.area_mm2 == pytest.approx(expected, rel=0.05)


def test_polygons_match_the_mask(scene_mask):
    import shapely

    poly = scene_mask.polygons()
    assert isinstance(poly, shapely.MultiPolygon)
    assert poly.is_valid
    assert len(poly.geoms) == 2  # the two blobs (the blue pen does not cut blob 2 in two)
    n_holes = sum(len(p.interiors) for p in poly.geoms)
    assert n_holes >= 1  # the big hole is an interior ring
    pixel_area = scene_mask.mask.sum() * scene_mask.downsample**2
    assert poly.area == pytest.approx(pixel_area, rel=0.02)
    # the hole centre is outside the polygon, the tissue inside
    x, y = 160, 150
    assert not poly.contains(shapely.Point(x + 0.5, y + 0.5))
    assert poly.contains(shapely.Point(160.5, 80.5))
    simple = scene_mask.polygons(simplify_px=1.0)
    assert simple.is_valid
    assert shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(poly)
    assert simple.area == pytest.approx(poly.area, rel=0.02)


def test_polygons_of_nested_islands():
    """An island inside a hole inside tissue: even-odd nesting, all three levels right."""
    m = np.zeros((60, 60), dtype=bool)
    m[5:55, 5:55] = True
    m[15:45, 15:45] = False
    m[25:35, 25:35] = True
    m[0, 59] = True  # a single pixel in a corner
    tm = TissueMask(m, mpp=2.0, downsample=4.0)
    poly = tm.polygons()
    assert poly.is_valid
    assert len(poly.geoms) == 3
    assert poly.area == pytest.approx(m.sum() * 16, rel=0.01, abs=16)
    import shapely

    assert poly.contains(shapely.Point(30 * 4, 30 * 4))  # island
    assert not poly.contains(shapely.Point(20 * 4, 20 * 4))  # hole
    assert poly.contains(shapely.Point(10 * 4, 10 * 4))  # frame
    minx, miny, maxx, maxy = poly.bounds
    assert (minx, miny) == pytest.approx((5 * 4, 0), abs=2)
    assert (maxx, maxy) == pytest.approx((60 * 4, 55 * 4), abs=2)


def test_polygons_do_not_depend_on_empty_space_around_the_mask():
    """The outline of a mask placed at an offset in a larger empty grid is the same outline,
    moved by the offset (polygons works on the mask's bounding box)."""
    import shapely

    rng = np.random.default_rng(7)
    m = cv2.morphologyEx(
        (rng.uniform(size=(40, 50)) < 0.6).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3))
    ).astype(bool)
    m[0, :] = True  # touches the small grid's border
    big = np.zeros((100, 120), dtype=bool)
    big[23:63, 31:81] = m
    ds = 4.0
    small = TissueMask(m, mpp=2.0, downsample=ds).polygons()
    moved = shapely.affinity.translate(small, xoff=31 * ds, yoff=23 * ds)
    got = TissueMask(big, mpp=2.0, downsample=ds).polygons()
    assert got.equals(moved)
    assert got.area == pytest.approx(small.area)


def test_level0_scaling_from_a_finer_image(scene):
    """The same scene scanned at 2 µm/px: the mask is at 8 µm/px and answers in level-0 px."""
    fine = cv2.resize(scene["rgb"], None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)
    m = tissue_mask(fine, 2.0, target_mpp=8.0)
    assert m.downsample == pytest.approx(4.0)
    assert m.mpp == pytest.approx(8.0)
    assert m.mask.shape == scene["truth"].shape
    assert iou(m.mask, scene["truth"]) > 0.95
    # points: blob 1 at mask (x 160, y 80) -> level 0 (640, 320); glass at mask (450, 50)
    got = m.contains(np.array([642.0, 1800.0, -5.0, 1e6]), np.array([322.0, 200.0, 10.0, 10.0]))
    np.testing.assert_array_equal(got, [True, False, False, False])
    # boxes (level-0 px): inside tissue, on glass, off the slide
    assert m.fraction_in(560, 240, 160, 40) == 1.0
    assert m.fraction_in(1760, 160, 80, 80) == 0.0
    assert m.fraction_in(5000, 5000, 100, 100) == 0.0
    # a box half over the slide's right edge, all on glass inside: 0; whole slide: tissue share
    assert m.fraction_in(1900, 1000, 400, 400) == 0.0
    assert m.fraction_in(0, 0, 2000, 1600) == pytest.approx(m.tissue_fraction)
    # polygons are in level-0 px
    poly = m.polygons()
    assert poly.area == pytest.approx(m.mask.sum() * 16, rel=0.02)
    minx, miny, maxx, maxy = poly.bounds
    assert minx >= 0
    assert miny >= 0
    assert maxx <= 2000
    assert maxy <= 1600
    assert m.area_mm2 == pytest.approx(scene["truth"].sum() * 0.008**2, rel=0.05)


def test_fraction_in_is_exact_for_partial_pixels():
    rng = np.random.default_rng(5)
    m = rng.random((13, 17)) > 0.5
    tm = TissueMask(m, mpp=4.0, downsample=3.0)
    up = np.kron(m, np.ones((30, 30), dtype=bool))  # 0.1 level-0 px per fine px
    for _ in range(40):
        x, y = rng.uniform(-6, 52), rng.uniform(-6, 40)
        w, h = rng.uniform(0.5, 20), rng.uniform(0.5, 20)
        fx0, fy0 = round(x * 10), round(y * 10)
        fx1, fy1 = round((x + w) * 10), round((y + h) * 10)
        x, y, w, h = fx0 / 10, fy0 / 10, (fx1 - fx0) / 10, (fy1 - fy0) / 10
        sub = up[max(fy0, 0) : max(fy1, 0), max(fx0, 0) : max(fx1, 0)]
        expected = sub.sum() / ((fx1 - fx0) * (fy1 - fy0))
        assert tm.fraction_in(x, y, w, h) == pytest.approx(expected, abs=1e-9)
    # vectorised over many boxes at once
    xs = np.array([0.0, 3.0, 48.0])
    np.testing.assert_allclose(
        tm.fraction_in(xs, 0.0, 3.0, 3.0), [tm.fraction_in(v, 0.0, 3.0, 3.0) for v in xs]
    )
    assert tm.fraction_in(0, 0, 0, 10) == 0.0
    # the summed-area table is a cache: freed, it is built again with the same answers
    before = tm.fraction_in(xs, 1.5, 7.0, 4.0)
    tm.release_cache()
    assert tm._integral is None
    np.testing.assert_array_equal(tm.fraction_in(xs, 1.5, 7.0, 4.0), before)


def test_blank_slide_gives_empty_mask():
    white = np.full((200, 300, 3), 245, dtype=np.uint8)
    white += np.random.default_rng(0).integers(0, 3, white.shape, dtype=np.uint8)
    m = tissue_mask(white, MPP)
    assert not m.mask.any()
    assert m.area_mm2 == 0.0
    assert m.polygons().is_empty
    assert m.fraction_in(0, 0, 100, 100) == 0.0


def test_all_tissue_gives_full_mask():
    rng = np.random.default_rng(1)
    conc = np.zeros((150, 150, 3), dtype=np.float32)
    # hematoxylin from pale (0.3) to dense (1.0 OD, renders deep blue), with DAB patches
    conc[..., 0] = np.clip(0.65 + 0.15 * _smooth_noise((150, 150), rng), 0.3, 1.0)
    conc[..., 1] = np.clip(0.4 * _smooth_noise((150, 150), rng), 0, None)
    assert conc[..., 0].max() == pytest.approx(1.0)
    rgb = np.clip(255 * 10.0 ** (-(conc @ RUIFROK_HDAB.vectors)), 0, 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)  # no glass to estimate I0 from
        m = tissue_mask(rgb, MPP)
    assert m.mask.mean() > 0.99
    assert m.polygons().area == pytest.approx(150 * 150, rel=0.01)


class FakeSlide:
    """The part of the Slide interface tissue_mask uses."""

    def __init__(self, rgb: np.ndarray, mpp: float):
        self.image = rgb
        self.mpp = mpp
        self.dimensions = (rgb.shape[1], rgb.shape[0])
        self.calls: list[tuple] = []

    def read_at_mpp(self, x, y, width, height, mpp):
        self.calls.append((x, y, width, height, mpp))
        scale = self.mpp / mpp
        size = (round(width * scale), round(height * scale))
        return cv2.resize(self.image, size, interpolation=cv2.INTER_AREA)


def test_slide_source_is_read_at_the_target_resolution(scene):
    fine = cv2.resize(scene["rgb"], None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)
    slide = FakeSlide(fine, mpp=2.0)
    m = tissue_mask(slide, target_mpp=8.0)
    assert slide.calls == [(0, 0, 2000, 1600, 8.0)]
    assert m.downsample == pytest.approx(4.0)
    assert iou(m.mask, scene["truth"]) > 0.95
    with pytest.raises(ConfigError):
        tissue_mask(slide, 0.5)  # the slide knows its own µm/px


def test_coarse_source_is_not_upsampled(scene):
    coarse = cv2.resize(scene["rgb"], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    m = tissue_mask(coarse, 16.0, target_mpp=8.0)
    assert m.mask.shape == coarse.shape[:2]
    assert m.downsample == 1.0
    assert m.mpp == 16.0


def test_array_without_pixel_size_is_refused(scene):
    with pytest.raises(MissingPixelSizeError, match="mpp"):
        tissue_mask(scene["rgb"])
    with pytest.raises(ConfigError):
        tissue_mask(scene["rgb"].astype(np.float32), 8.0)


@pytest.mark.shared_data
def test_real_svs_tissue(shared_data):
    """CMU-1-Small-Region (H&E, 0.499 µm/px): a skin strip over roughly 35-45 % of the field."""
    import tifffile

    path = shared_data / "wsi-samples" / "aperio-svs" / "CMU-1-Small-Region.svs"
    with tifffile.TiffFile(path) as tif:
        full = tif.pages[0].asarray()  # 2220 x 2967 level 0
        thumb = tif.pages[1].asarray()  # 574 x 768 thumbnail
    m = tissue_mask(full, 0.499, target_mpp=8.0)
    assert m.downsample == pytest.approx(8.0 / 0.499)
    assert 0.25 < m.tissue_fraction < 0.55
    # one main piece of tissue holds almost all of the area
    poly = m.polygons()
    assert poly.is_valid
    largest = max(p.area for p in poly.geoms)
    assert largest > 0.9 * poly.area
    assert poly.area * (0.499e-3) ** 2 == pytest.approx(m.area_mm2, rel=0.03)
    assert 0.4 < m.area_mm2 < 0.9
    # glass in the corner, tissue in the strip's middle (level-0 px)
    assert m.fraction_in(0, 2400, 300, 300) == pytest.approx(0.0, abs=1e-9)
    assert m.fraction_in(800, 2000, 300, 300) > 0.9
    # the thumbnail (about 1.93 µm/px) gives the same mask within a few percent
    thumb_mpp = 0.499 * full.shape[1] / thumb.shape[1]
    m2 = tissue_mask(thumb, thumb_mpp, target_mpp=8.0)
    assert m2.area_mm2 == pytest.approx(m.area_mm2, rel=0.1)


def test_pale_stroma_counts_as_tissue():
    """Collagen-rich stroma is much paler than tumour nests; it is tissue all the same."""
    from tilscore.synthetic import make_layout, region_mask, render_region

    layout = make_layout(marker="CD8", width_px=2400, height_px=1800, mpp=0.5, seed=21)
    rgb = render_region(layout, 0, 0, 600, 450, 2.0)  # whole slide at 2 µm/px
    m = tissue_mask(rgb, 2.0, target_mpp=8.0)
    h, w = m.mask.shape
    assert w == 150
    assert abs(h - 1800 * 0.5 / 8.0) < 1
    truth = region_mask(layout, "tissue", 0, 0, w, h, 8.0)
    iou = (truth & m.mask).sum() / (truth | m.mask).sum()
    assert iou > 0.9
    # the stroma alone (tumour bed minus nests) is almost entirely inside the mask
    stroma = region_mask(layout, "stroma", 0, 0, w, h, 8.0)
    assert (stroma & m.mask).sum() > 0.9 * stroma.sum()
