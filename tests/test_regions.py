"""Regions: QuPath GeoJSON in and out, napari shapes, masks, compartments, bad input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import shapely

from tilscore.errors import RegionError, TilscoreWarning
from tilscore.regions import (
    RegionSet,
    auto_regions,
    build_compartments,
    classify_name,
    load_regions,
)


def _feature(geom, name=None, otype="annotation"):
    props = {"objectType": otype}
    if name is not None:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geom, "properties": props}


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]}
WITH_HOLE = {
    "type": "Polygon",
    "coordinates": [
        [[200, 0], [400, 0], [400, 200], [200, 200], [200, 0]],
        [[250, 50], [350, 50], [350, 150], [250, 150], [250, 50]],
    ],
}
MULTI = {
    "type": "MultiPolygon",
    "coordinates": [
        [[[0, 300], [50, 300], [50, 350], [0, 350], [0, 300]]],
        [[[100, 300], [150, 300], [150, 350], [100, 350], [100, 300]]],
    ],
}


def test_qupath_feature_collection_classes_holes_multipolygons(tmp_path):
    path = tmp_path / "a.geojson"
    fc = {
        "type": "FeatureCollection",
        "features": [
            _feature(SQUARE, "Tumor"),
            _feature(WITH_HOLE, "Stroma"),
            _feature(MULTI, "Ignore*"),
            _feature({"type": "Point", "coordinates": [5, 5]}, "Tumor", otype="detection"),
        ],
    }
    path.write_text(json.dumps(fc))
    with pytest.warns(TilscoreWarning, match="not area annotations"):
        rs = load_regions(path)
    assert rs.classes == ["tumour", "stroma", "exclude"]
    assert rs.geometry("stroma").area == pytest.approx(200 * 200 - 100 * 100)
    assert rs.geometry("exclude").area == pytest.approx(2 * 50 * 50)


def test_bare_array_old_schema_and_geometry_collection():
    gc = {
        "type": "GeometryCollection",
        "geometries": [SQUARE, {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}],
    }
    feats = [
        {
            "type": "Feature",
            "geometry": gc,
            "properties": {"classification": {"name": "Tumour", "colorRGB": -65536}},
        },
    ]
    rs = RegionSet.from_geojson(feats)
    assert rs.classes == ["tumour"]
    assert rs.geometry("tumour").area == pytest.approx(100 * 100)


def test_round_trip_is_lossless(tmp_path):
    rs = RegionSet.from_geojson(
        [_feature(SQUARE, "Tumor"), _feature(WITH_HOLE, "Tumor bed"), _feature(MULTI, "Necrosis")]
    )
    path = rs.save(tmp_path / "r.geojson")
    data = json.loads(path.read_text())
    assert all(f["properties"]["objectType"] == "annotation" for f in data["features"])
    assert all("color" in f["properties"]["classification"] for f in data["features"])
    back = load_regions(path)
    assert [r.cls for r in back] == [r.cls for r in rs]
    for a, b in zip(rs, back):
        assert a.geometry.equals(b.geometry)
        assert a.name == b.name


def test_class_map_user_and_defaults():
    assert classify_name("Ignore*") == "exclude"
    assert classify_name("TUMOR") == "tumour"
    assert classify_name("Region*") == "roi"
    assert classify_name("") == "roi"
    assert classify_name("Carcinoma cells") is None
    assert classify_name("Carcinoma cells", {"carcinoma*": "tumour"}) == "tumour"
    with pytest.raises(RegionError, match="map names to one of"):
        classify_name("x", {"x": "tumor-ish"})


def test_unknown_classes_are_listed_not_dropped():
    with pytest.warns(TilscoreWarning, match=r"'Lymph node' \(1\).*class_map"):
        rs = RegionSet.from_geojson([_feature(SQUARE, "Lymph node"), _feature(MULTI, "Tumor")])
    assert rs.classes == ["tumour", "other"]
    assert [r.name for r in rs if r.cls == "other"] == ["Lymph node"]


def test_self_intersecting_polygon_is_repaired_with_warning():
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]}
    with pytest.warns(TilscoreWarning, match="repaired"):
        rs = RegionSet.from_geojson([_feature(bowtie, "Tumor")])
    g = rs.geometry("tumour")
    assert g.is_valid
    assert g.area == pytest.approx(5000)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ('{"type": "Point"}', "not a GeoJSON"),
        ('{"type": "FeatureCollection", "features": []}', "no polygon"),
    ],
)
def test_broken_geojson_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(RegionError, match=match) as info:
        load_regions(path)
    assert "bad.geojson" in str(info.value)


def test_missing_file():
    with pytest.raises(RegionError, match="not found"):
        load_regions("/nonexistent/regions.geojson")


def test_clip_warns_and_other_scale_has_a_hint():
    rs = RegionSet.from_geojson([_feature(SQUARE, "Tumor")])
    with pytest.warns(TilscoreWarning, match="clipped"):
        clipped = rs.clip(50, 60)
    assert clipped.geometry("tumour").area == pytest.approx(50 * 60)
    far = RegionSet.from_geojson(
        [
            _feature(
                {
                    "type": "Polygon",
                    "coordinates": [[[2000, 2000], [4000, 2000], [4000, 4000], [2000, 2000]]],
                },
                "Tumor",
            )
        ]
    )
    with pytest.raises(RegionError, match="too large"):
        far.clip(1000, 800)


def test_napari_shapes_round_trip():
    square = np.array([[10, 20], [10, 120], [60, 120], [60, 20]], float)  # (y, x)
    rs = RegionSet.from_shapes([square, square + 200], ["tumour", "exclude"])
    assert rs.geometry("tumour").bounds == (20, 10, 120, 60)
    shapes = rs.to_shapes()
    back = RegionSet.from_shapes(shapes["tumour"], "tumour")
    assert back.geometry("tumour").equals(rs.geometry("tumour"))
    ell = RegionSet.from_shapes([square], "stroma", shape_types="ellipse")
    assert ell.geometry("stroma").area == pytest.approx(np.pi * 50 * 25, rel=0.01)
    with pytest.raises(RegionError, match="unknown region class"):
        RegionSet.from_shapes([square], "kidney")


def test_mask_with_labels_and_scale(tmp_path):
    from PIL import Image

    m = np.zeros((50, 80), np.uint8)
    m[10:20, 10:30] = 1
    m[30:40, 40:70] = 2
    path = tmp_path / "mask.png"
    Image.fromarray(m).save(path)
    rs = RegionSet.from_mask(path, downsample=4, labels={1: "tumour", 2: "stroma"})
    assert rs.geometry("tumour").area == pytest.approx(10 * 20 * 16, rel=0.02)
    x0, y0, _, _ = rs.geometry("stroma").bounds
    assert (x0, y0) == pytest.approx((160, 120), abs=3)
    with pytest.raises(RegionError, match="no labelled pixels"):
        RegionSet.from_mask(np.zeros((5, 5), np.uint8))


def _ring(cx, cy, r):
    return shapely.Point(cx, cy).buffer(r, quad_segs=32)


def test_compartments_from_annotations_margin_and_exclusions():
    tissue = shapely.box(0, 0, 4000, 4000)
    bed = _ring(2000, 2000, 1000)
    nests = _ring(2000, 2000, 400)
    necrosis = shapely.box(1900, 1900, 2100, 2100)
    rs = RegionSet.from_geojson(
        [
            _feature(json.loads(shapely.to_geojson(bed)), "Tumor bed"),
            _feature(json.loads(shapely.to_geojson(nests)), "Tumor"),
            _feature(json.loads(shapely.to_geojson(necrosis)), "Necrosis"),
        ]
    )
    comps = build_compartments(rs, tissue, mpp=0.5, margin_width_um=500)
    g = comps.geometries
    assert g["intratumoral"].area == pytest.approx(nests.area - 200 * 200, rel=1e-3)
    assert g["stromal"].area == pytest.approx(bed.area - nests.area, rel=1e-3)
    # the band is 500 µm = 1000 px wide in all, half each side of the bed border
    expected = _ring(2000, 2000, 1500).difference(_ring(2000, 2000, 500)).area
    assert g["invasive_margin"].area == pytest.approx(expected, rel=0.01)
    assert g["tissue"].area == pytest.approx(4000 * 4000 - 200 * 200)
    assert set(comps.sources.values()) <= {"annotation", "tissue mask"}
    label, in_margin = comps.assign([2000, 2000, 2600, 3400, 100], [2000, 2300, 2000, 2000, 100])
    assert list(label) == ["excluded", "intratumoral", "stromal", "tissue", "tissue"]
    assert list(in_margin) == [False, False, True, True, False]
    assert comps.area_mm2("tissue", 0.5) == pytest.approx((16e6 - 4e4) * 0.25 / 1e6)


def test_auto_regions_from_dense_tumour_nuclei():
    rng = np.random.default_rng(0)
    nest = _ring(1000, 1000, 300)
    # tumour nuclei every ~16 µm (32 px at 0.5 µm/px) inside the nest, sparse stroma cells
    gx, gy = np.meshgrid(np.arange(0, 2000, 32.0), np.arange(0, 2000, 32.0))
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    inside = shapely.contains_xy(nest, pts[:, 0], pts[:, 1])
    stroma = rng.uniform(0, 2000, (600, 2))
    import pandas as pd

    cells = pd.DataFrame(
        {
            "x": np.r_[pts[inside, 0], stroma[:, 0]],
            "y": np.r_[pts[inside, 1], stroma[:, 1]],
            "cell_class": ["tumour"] * int(inside.sum()) + ["other"] * 600,
        }
    )
    rs = auto_regions(cells, 2000, 2000, 0.5)
    got = rs.geometry("tumour")
    assert got.intersection(nest).area / got.union(nest).area > 0.85
    assert rs.geometry("tumour_bed").buffer(8).contains(got)
    assert rs.source == "automatic"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = auto_regions(cells.iloc[:0], 2000, 2000, 0.5)
    assert len(empty) == 0


@pytest.mark.parametrize("seed", range(4))
def test_fill_all_holes_matches_scipy(seed):
    from scipy import ndimage

    from tilscore.tissue import _fill_small_holes

    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.uniform(size=(97, 131)) < 0.55 + 0.05 * seed)
    np.testing.assert_array_equal(
        _fill_small_holes(mask, math.inf), ndimage.binary_fill_holes(mask)
    )


def test_auto_nests_have_no_holes_and_no_specks():
    import pandas as pd

    # a tumour annulus (a nest with stroma inside it) and a speck of four tumour nuclei
    gx, gy = np.meshgrid(np.arange(0, 3000, 24.0), np.arange(0, 3000, 24.0))
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    r = np.hypot(pts[:, 0] - 1500, pts[:, 1] - 1500)
    ring = pts[(r > 250) & (r < 700)]
    speck = np.array([[200.0, 200], [210, 200], [200, 210], [210, 210]])
    xy = np.r_[ring, speck]
    cells = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "cell_class": "tumour"})
    nests = auto_regions(cells, 3000, 3000, 0.5).geometry("tumour")
    assert shapely.contains_xy(nests, 1500, 1500)  # the hole is filled
    assert not shapely.contains_xy(nests, 205, 205)  # the speck is below min_nest_area_um2
    assert nests.geom_type == "Polygon"
    assert len(nests.interiors) == 0
