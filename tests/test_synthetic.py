"""Synthetic IHC slides: determinism, tiling independence, optics, truth and writers."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile

from tilscore.synthetic import (
    INTENSITY_THRESHOLDS,
    TRUTH_COLUMNS,
    SyntheticSlideSpec,
    concentrations_to_od,
    make_layout,
    make_synthetic_slide,
    od_to_rgb,
    render_region,
    synthetic_tile,
    write_slide,
    write_truth,
)


@pytest.fixture(scope="module")
def cd8():
    return make_layout(marker="CD8", width_px=2400, height_px=2000, seed=5)


@pytest.fixture(scope="module")
def cd56():
    return make_layout(marker="CD56", width_px=2400, height_px=2000, seed=6)


def _dab_od(rgb, spec):
    """DAB concentration by inverting the slide's own (known) stain matrix."""
    od = -np.log10(np.maximum(rgb.astype(float), 1) / np.asarray(spec.background))
    m = np.asarray(spec.stain_vectors, float)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    resid = np.cross(m[0], m[1])
    inv = np.linalg.inv(np.vstack([m, resid / np.linalg.norm(resid)]))
    return (od @ inv)[..., 1]


def test_same_seed_same_slide_other_seed_differs():
    a = make_layout(marker="CD68", width_px=800, height_px=700, seed=1)
    b = make_layout(marker="CD68", width_px=800, height_px=700, seed=1)
    c = make_layout(marker="CD68", width_px=800, height_px=700, seed=2)
    pd.testing.assert_frame_equal(a.cells, b.cells)
    assert a.spec == b.spec
    ra, rb = render_region(a, 0, 0, 800, 700), render_region(b, 0, 0, 800, 700)
    assert np.array_equal(ra, rb)
    assert not np.array_equal(ra, render_region(c, 0, 0, 800, 700))
    assert len(a.cells) != len(c.cells) or not np.allclose(a.cells["x"], c.cells["x"])


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_box_equals_crop_of_larger_render(cd8, mpp):
    big = render_region(cd8, 600, 500, 400, 360, mpp)
    ds = mpp / cd8.mpp
    small = render_region(cd8, 600 + 130 * ds, 500 + 70 * ds, 150, 120, mpp)
    crop = big[70:190, 130:280]
    assert np.abs(small.astype(int) - crop.astype(int)).max() <= 1


def test_beer_lambert_pure_dab_and_glass():
    spec = SyntheticSlideSpec(seed=3).resolved()
    amp = 0.45
    h = np.zeros((8, 8), np.float32)
    dab = np.full((8, 8), amp, np.float32)
    dab[:, :4] = 0  # left half glass
    rgb = od_to_rgb(concentrations_to_od(h, dab, spec), spec)
    assert np.abs(rgb[:, :4].astype(float) - np.rint(spec.background)).max() <= 0.5
    assert _dab_od(rgb[:, 4:], spec) == pytest.approx(amp, abs=0.01)
    # per-slide backgrounds and stain hues vary, and are recorded
    other = SyntheticSlideSpec(seed=4).resolved()
    assert other.background != spec.background
    assert other.stain_vectors != spec.stain_vectors


def test_positive_cells_are_darker_in_dab(cd8):
    rgb = render_region(cd8, 0, 0, cd8.width_px, cd8.height_px)
    dab = _dab_od(rgb, cd8.spec)
    cells = cd8.cells
    lymph = cells[cells["cell_type"] == "lymphocyte"]

    def ring_mean(rows):
        out = []
        for x, y, r in zip(rows["x"], rows["y"], rows["cell_diameter_um"] / 2 / cd8.mpp):
            i, j = int(y), int(x)
            k = int(np.ceil(r))
            out.append(dab[max(i - k, 0) : i + k + 1, max(j - k, 0) : j + k + 1].mean())
        return np.array(out)

    pos = ring_mean(lymph[lymph["positive"]])
    neg = ring_mean(lymph[~lymph["positive"]])
    assert len(pos) > 50
    assert len(neg) > 50
    assert pos.mean() > neg.mean() + 0.1
    # stronger bins measure darker on average
    pos_rows = lymph[lymph["positive"]]
    by_bin = pd.Series(pos).groupby(pos_rows["intensity_bin"].to_numpy()).mean()
    assert by_bin.is_monotonic_increasing


def test_truth_columns_and_intensity_bins(cd8):
    cells = cd8.cells
    assert cells["cell_id"].is_unique
    assert np.allclose(cells["x_um"], cells["x"] * cd8.mpp)
    pos = cells[cells["positive"]]
    assert set(pos["cell_type"]) == {"lymphocyte"}
    assert pos["intensity_bin"].between(1, 3).all()
    strong = pos["intensity"] >= INTENSITY_THRESHOLDS[2]
    assert (pos.loc[strong, "intensity_bin"] == 3).all()
    assert (cells.loc[~cells["positive"], "intensity_bin"] == 0).all()
    tumour = cells[cells["cell_type"] == "tumour"]
    d = tumour["nucleus_diameter_um"]
    assert d.between(10, 20).all()
    assert (tumour["intensity"] == 0).all()
    lymph_d = cells.loc[cells["cell_type"] == "lymphocyte", "nucleus_diameter_um"]
    assert lymph_d.between(5, 8).all()


def test_compartments_follow_the_regions(cd8):
    cells = cd8.cells
    nests = cd8.regions["tumour"]
    t = cells[cells["compartment"] == "tumour"]
    assert shapely.contains_xy(nests, t["x"], t["y"]).all()
    s = cells[cells["compartment"] == "stroma"]
    assert not shapely.contains_xy(nests, s["x"], s["y"]).any()
    assert shapely.contains_xy(cd8.regions["tumour_bed"], s["x"], s["y"]).all()
    m = cells[cells["compartment"] == "margin"]
    assert not shapely.contains_xy(cd8.regions["tumour_bed"], m["x"], m["y"]).any()
    assert shapely.contains_xy(cd8.regions["margin_band"].buffer(1), m["x"], m["y"]).all()
    assert cells["compartment"].notna().all()


def test_target_density_per_compartment_matches_request():
    density = {"tumour": 200.0, "stroma": 900.0, "margin": 500.0, "outside": 100.0}
    layout = make_layout(
        marker="CD68",
        width_px=4000,
        height_px=3600,
        seed=9,
        target_density_per_mm2=density,
        immune_clustering=0.0,
    )
    areas = layout.compartment_areas_mm2()
    macro = layout.cells[layout.cells["cell_type"] == "macrophage"]
    counts = macro.groupby("compartment", observed=False).size()
    for comp, want in density.items():
        expected = want * areas[comp]
        assert expected > 50
        assert abs(counts[comp] - expected) < 4 * np.sqrt(expected) + 2, comp
    positive = macro["positive"].mean()
    assert positive == pytest.approx(layout.spec.positive_fraction, abs=0.05)


def test_cd56_nerves_stain_but_are_not_nk_cells(cd56):
    cells = cd56.cells
    nerve = cells[cells["cell_type"] == "nerve"]
    assert len(nerve) > 10
    assert not nerve["positive"].any()
    assert (nerve["intensity"] > 0.2).all()  # the bundle is DAB positive
    pos = cells[cells["positive"]]
    assert set(pos["cell_type"]) == {"nk"}
    # the nerve bundle really is brown in the pixels
    x, y = nerve.iloc[len(nerve) // 2][["x", "y"]].astype(int)
    rgb = render_region(cd56, x - 20, y - 20, 40, 40)
    assert np.median(_dab_od(rgb, cd56.spec)) > 0.15


def test_synthetic_tile_has_cells_of_each_kind():
    rgb, cells = synthetic_tile("CD68", size_px=384, seed=2)
    assert rgb.shape == (384, 384, 3)
    assert rgb.dtype == np.uint8
    assert cells["x"].between(0, 384).all()
    assert cells["y"].between(0, 384).all()
    assert {"macrophage", "lymphocyte"} <= set(cells["cell_type"])
    assert rgb.std() > 10  # not blank


def test_aperio_file_reads_back(tmp_path, cd8):
    path = write_slide(cd8, tmp_path / "s.tif", format="aperio", jpeg_quality=90)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs
        page = tif.pages[0]
        assert page.description.startswith("Aperio Image Library")
        assert "MPP = 0.5000" in page.description
        assert "AppMag = 20" in page.description
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.is_tiled
        base = tif.series[0]
        assert [lvl.shape[:2] for lvl in base.levels] == [(2000, 2400), (500, 600)]
        region = page.asarray()[800:1056, 1000:1256]
        names = [s.name for s in tif.series]
        assert {"Thumbnail", "Label", "Macro"} <= set(names)
    want = render_region(cd8, 1000, 800, 256, 256)
    diff = np.abs(region.astype(float) - want)
    assert diff.mean() < 3
    assert np.percentile(diff, 99) < 20


def test_ome_tiff_has_physical_size_and_subifds(tmp_path):
    layout = make_layout(marker="CD56", width_px=1100, height_px=900, seed=1)
    path = write_slide(layout, tmp_path / "s.ome.tif", format="ome")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
        series = tif.series[0]
        assert [lvl.shape[:2] for lvl in series.levels] == [(900, 1100), (450, 550)]
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG


def test_large_slide_streams_in_bounded_memory(tmp_path):
    layout = make_layout(marker="CD8", width_px=6000, height_px=6000, seed=2, tissue_fraction=0.05)
    full_bytes = 6000 * 6000 * 3
    for mpp in (0.5, 1.0, 2.0, 4.0):  # build the per-slide caches (textures, region rasters)
        render_region(layout, 2900, 2900, 32, 32, mpp)
    tracemalloc.start()
    try:
        write_slide(layout, tmp_path / "big.tif", tile_size=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_bytes / 3  # about 25 MB for this 108 MB image, constant per strip
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.pages[0].shape == (6000, 6000, 3)


def test_truth_files_round_trip(tmp_path, cd8):
    paths = write_truth(cd8, tmp_path / "slide.tif")
    assert paths["cells"].name == "slide.cells.csv"
    table = pd.read_csv(paths["cells"])
    assert len(table) == len(cd8.cells)
    assert set(TRUTH_COLUMNS) <= set(table.columns)
    assert table["positive"].dtype == bool
    gj = json.loads(paths["regions"].read_text())
    assert gj["type"] == "FeatureCollection"
    names = {f["properties"]["classification"]["name"] for f in gj["features"]}
    assert {"Tumor", "Stroma", "Margin", "Tumor bed", "Tissue"} <= names
    for feature in gj["features"]:
        assert feature["properties"]["objectType"] == "annotation"
        geom = shapely.geometry.shape(feature["geometry"])
        assert geom.is_valid
        assert not geom.is_empty
    tumor = next(f for f in gj["features"] if f["properties"]["classification"]["name"] == "Tumor")
    t = table[table["compartment"] == "tumour"]
    assert (
        shapely.contains_xy(shapely.geometry.shape(tumor["geometry"]), t["x"], t["y"]).mean() > 0.99
    )
    spec = json.loads(paths["spec"].read_text())["spec"]
    assert SyntheticSlideSpec.from_dict(spec) == cd8.spec


def test_make_synthetic_slide_writes_slide_and_truth(tmp_path):
    layout = make_synthetic_slide(tmp_path / "x.tif", marker="CD8", width_px=600, height_px=500)
    assert (tmp_path / "x.tif").is_file()
    assert (tmp_path / "x.cells.csv").is_file()
    assert (tmp_path / "x.regions.geojson").is_file()
    assert layout.spec.width_px == 600


@pytest.mark.parametrize("fmt", ["aperio", "ome"])
def test_open_slide_reads_what_the_generator_wrote(tmp_path, fmt):
    """The reader and the generator agree: pixel size, pyramid, associated images and pixels."""
    from tilscore import open_slide

    path = tmp_path / f"s.{'ome.tif' if fmt == 'ome' else 'tif'}"
    layout = make_synthetic_slide(
        path, marker="CD68", width_px=2400, height_px=1000, seed=9, format=fmt
    )
    with open_slide(path) as slide:
        assert slide.dimensions == (2400, 1000)
        assert slide.mpp == pytest.approx(0.5, rel=1e-4)
        assert slide.vendor == ("ome" if fmt == "ome" else "aperio")
        assert slide.level_count >= 2
        assert slide.level_downsamples[0] == 1.0
        got = slide.read_region(300, 200, 400, 300).astype(float)
        coarse = slide.read_at_mpp(0, 0, 2400, 1000, 2.0)
    want = render_region(layout, 300, 200, 400, 300, 0.5).astype(float)
    assert np.abs(got - want).mean() < 4  # JPEG quality 80
    assert coarse.shape == (250, 600, 3)


def test_truth_positions_are_nucleus_centres():
    """x, y mark the nucleus (what detectors find); macrophage nuclei sit off the cell centre."""
    layout = make_layout(marker="CD68", width_px=1200, height_px=1000, mpp=0.5, seed=3)
    t = layout.truth()
    shift_um = np.hypot(t.x - t.cell_x, t.y - t.cell_y) * 0.5
    macro = (t.cell_type == "macrophage").to_numpy()
    assert shift_um[~macro].max() < 1e-9
    assert shift_um[macro].max() > 2.0
    # the rendered hematoxylin is darker at the truth point than at the cell-body centre
    rgb = render_region(layout, 0, 0, 1200, 1000, 0.5).astype(float)
    far = t[macro & (shift_um > 3)]
    assert len(far) > 3
    xi, yi = far.x.astype(int).clip(0, 1199), far.y.astype(int).clip(0, 999)
    cx, cy = far.cell_x.astype(int).clip(0, 1199), far.cell_y.astype(int).clip(0, 999)
    # hematoxylin absorbs red: the nucleus is redder-darker (lower R) than the cell centre
    assert rgb[yi, xi, 0].mean() < rgb[cy, cx, 0].mean()


@pytest.mark.parametrize("seed", range(12))
def test_small_cd56_tiles_always_render(seed):
    """Tiles too small to hold a nerve bundle simply have none (was an IndexError)."""
    rgb, cells = synthetic_tile("CD56", size_px=256, seed=seed)
    assert rgb.shape == (256, 256, 3)
    assert set(cells.cell_type) <= {
        "tumour",
        "fibroblast",
        "lymphocyte",
        "macrophage",
        "nk",
        "nerve",
    }


def test_some_cd8_positives_are_solid_brown():
    """Strongly stained T cells: DAB fills the cell and hides the nucleus, on part of them."""
    from tilscore.stain import deconvolve
    from tilscore.synthetic.layout import _position_hash

    layout = make_layout(marker="CD8", width_px=1600, height_px=1600, mpp=0.5, seed=41)
    cells = layout.cells[layout.cells.positive]
    solid = _position_hash(cells[["x", "y"]].to_numpy()) < layout.spec.solid_positive_fraction
    assert 0.2 < solid.mean() < 0.8
    od = deconvolve(render_region(layout, 0, 0, 1600, 1600, 0.5))
    xi = cells.x.to_numpy().astype(int).clip(0, 1599)
    yi = cells.y.to_numpy().astype(int).clip(0, 1599)
    centre_dab = od[yi, xi, 1]
    # DAB over the nucleus centre: high in solid cells, low in ring cells
    assert np.median(centre_dab[solid]) > 2 * np.median(centre_dab[~solid])
    none = make_layout(
        marker="CD8", width_px=1600, height_px=1600, mpp=0.5, seed=41, solid_positive_fraction=0
    )
    assert none.cells.x.equals(layout.cells.x)  # the layout does not depend on the share
