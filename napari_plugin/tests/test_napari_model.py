"""The widget's Qt-free model: view box, scope as roi, heatmap, table (no napari needed)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import shapely

model = pytest.importorskip(
    "napari_tilscore.model", reason="the plugin is not installed (pip install -e napari_plugin)"
)


def test_view_box_is_the_visible_part_of_the_slide_in_level0_px():
    # 800 x 600 screen px at 2 screen px per µm: 400 x 300 µm around (y=500, x=1000) µm
    box = model.view_box_px((500.0, 1000.0), (600, 800), 2.0, 0.5, (4000, 3000))
    assert box == (1600, 700, 800, 600)
    # clipped at the slide's edges
    assert model.view_box_px((0.0, 0.0), (600, 800), 2.0, 0.5, (4000, 3000)) == (0, 0, 400, 300)
    from tilscore.errors import RegionError

    with pytest.raises(RegionError, match="field of view"):
        model.view_box_px((-5000.0, -5000.0), (600, 800), 2.0, 0.5, (4000, 3000))


def test_scope_becomes_the_runs_roi():
    import shapely

    from tilscore.errors import RegionError
    from tilscore.regions import Region, RegionSet

    tumour = Region("tumour", shapely.box(0, 0, 100, 100), "Tumor")
    roi = Region("roi", shapely.box(50, 50, 300, 300), "Region*")
    drawn = RegionSet([tumour, roi], "napari")
    scope = model.box_polygon((0, 0, 200, 200))
    out = model.regions_for_run(drawn, scope)
    assert out.geometry("roi").equals(shapely.box(50, 50, 200, 200))  # drawn roi within scope
    assert out.geometry("tumour").equals(tumour.geometry)
    only_scope = model.regions_for_run(None, scope)
    assert only_scope.classes == ["roi"]
    assert only_scope.geometry("roi").area == 200 * 200
    # automatic compartments: drawn tumour dropped, roi kept
    auto = model.regions_for_run(drawn, None, automatic=True)
    assert auto.classes == ["roi"]
    assert model.regions_for_run(None, None) is None
    with pytest.raises(RegionError, match="does not overlap"):
        model.regions_for_run(drawn, model.box_polygon((1000, 1000, 10, 10)))


def test_selected_shapes_union_skips_lines():
    square = np.array([[0.0, 0.0], [0.0, 10.0], [10.0, 10.0], [10.0, 0.0]])  # (y, x)
    other = square + np.array([0.0, 20.0])
    line = np.array([[0.0, 0.0], [50.0, 50.0]])
    geom = model.shapes_to_geometry([square, other, line], ["rectangle", "polygon", "line"])
    assert geom.area == pytest.approx(200.0)
    assert geom.bounds == (0.0, 0.0, 30.0, 10.0)  # x, y order
    assert model.shapes_to_geometry([line], ["line"]) is None


def test_density_heatmap_counts_positive_cells_per_mm2():
    cells = pd.DataFrame(
        {
            "x": [10.0, 20.0, 150.0, 390.0, 390.0],
            "y": [10.0, 15.0, 10.0, 290.0, 295.0],
            "positive": [True, True, False, True, True],
        }
    )
    # 400 x 300 px at 0.5 µm/px, 50 µm bins = 100 px: a 3 x 4 grid of 0.0025 mm² squares
    image, scale, translate = model.density_heatmap(cells, (400, 300), 0.5, 50.0)
    assert image.shape == (3, 4)
    assert scale == (50.0, 50.0)
    assert translate == (25.0, 25.0)
    assert image[0, 0] == pytest.approx(2 / 0.0025)
    assert image[2, 3] == pytest.approx(2 / 0.0025)
    assert image[0, 1] == 0  # the negative cell is not counted
    assert image.sum() * 0.0025 == pytest.approx(4)


def test_table_rows_and_cell_points():
    summary = pd.DataFrame(
        {
            "compartment": ["intratumoral", "stromal"],
            "n_cells": [10, 0],
            "n_positive": [3, 0],
            "density_per_mm2": [12.345, 0.0],
            "pct_positive": [30.0, float("nan")],
            "area_mm2": [0.5, 0.25],
            "area_fraction_pct": [1.25, 0.0],
        }
    )
    assert model.table_rows(summary) == [
        ["intratumoral", "10", "3", "12.3", "30.0", "0.500", "1.2"],
        ["stromal", "0", "0", "0.0", "–", "0.250", "0.0"],
    ]
    cells = pd.DataFrame(
        {"x": [1.0, 2.0], "y": [5.0, 6.0], "positive": [True, False], "dab_od_membrane": [0.3, 0]}
    )
    coords, features, colours = model.cell_points(cells)
    np.testing.assert_array_equal(coords, [[5.0, 1.0], [6.0, 2.0]])  # (y, x)
    assert list(features.columns) == ["x", "y", "positive", "dab_od_membrane"]
    np.testing.assert_allclose(colours, [model.POSITIVE_RGBA, model.NEGATIVE_RGBA])
    assert model.hex_colour((1.0, 0.0, 0.0, 1.0)) == "#ff0000ff"


def test_marker_choices_show_the_preset_thresholds():
    from tilscore.markers import MARKERS

    choices = model.marker_choices()
    for name in ("CD8", "CD68", "CD56"):
        rule = MARKERS[name]
        assert choices[f"{name}: {rule.measure} DAB ≥ {rule.threshold_od:g} OD"] == name
        assert model.preset_threshold(name) == pytest.approx(rule.threshold_od)
    assert model.preset_threshold("CD8", {"markers": {"CD8": {"threshold_od": 0.2}}}) == 0.2


def test_points_changes_tell_deleted_added_and_moved_cells():
    ids = np.array([0, 1, 2, 3])
    xy = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [70.0, 80.0]])
    # the layer after: cell 1 deleted, cell 3 moved, one point added (id -1), in (y, x)
    layer_ids = np.array([0, 2, 3, -1])
    layer_yx = np.array([[20.0, 10.0], [60.0, 50.0], [85.0, 75.0], [5.0, 6.0]])
    deleted, added, (moved, moved_xy) = model.points_changes(ids, xy, layer_ids, layer_yx)
    assert deleted == [1]
    assert added.tolist() == [[6.0, 5.0]]
    assert moved == [3]
    assert moved_xy.tolist() == [[75.0, 85.0]]
    none = model.points_changes(ids, xy, ids, xy[:, ::-1])
    assert none[0] == [] and len(none[1]) == 0 and none[2][0] == []  # noqa: PT018


def test_region_edits_keep_the_holes_of_classes_not_edited():
    import shapely

    from tilscore.regions import Region, RegionSet

    ring = shapely.box(0, 0, 100, 100).difference(shapely.box(40, 40, 60, 60))  # a hole
    current = RegionSet(
        [Region("tumour", ring, "Tumor"), Region("exclude", shapely.box(200, 0, 220, 20))]
    )
    shown = current.to_shapes()
    layers = {cls: (polys, ["polygon"] * len(polys)) for cls, polys in shown.items()}
    # nothing edited: the same regions, hole included
    same = model.merge_region_edits(current, layers)
    assert same.geometry("tumour").area == pytest.approx(ring.area)
    # a stroma polygon drawn, the exclusion deleted: tumour untouched (its hole stays)
    stroma = np.array([[0.0, 100.0], [0.0, 150.0], [50.0, 150.0], [50.0, 100.0]])
    layers["stroma"] = ([stroma], ["polygon"])
    layers["exclude"] = ([], [])
    merged = model.merge_region_edits(current, layers)
    assert merged.geometry("tumour").area == pytest.approx(ring.area)
    assert merged.geometry("stroma").area == pytest.approx(50 * 50)
    assert not merged.has("exclude")


def test_finetune_corrections_exports_labels_then_calls_finetune(tmp_path, monkeypatch):
    from napari_tilscore._sample_data import example_slide_path

    import tilscore
    from tilscore.errors import TilscoreError, TilscoreWarning
    from tilscore.regions import Region, RegionSet
    from tilscore.review import Review

    monkeypatch.setattr(model, "finetune_function", lambda: None)
    with pytest.raises(TilscoreError, match="not available in this version"):
        next(model.finetune_corrections([], tmp_path / "l", tmp_path / "m"))
    rgb = tilscore.open_slide(example_slide_path("CD8")).read_region(1600, 1100, 400, 400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)  # a small crop: no tissue mask
        review = Review(tilscore.score_image(rgb, mpp=0.5, marker="CD8"))
    review.set_positive([0])
    seen = []

    def fake(images, labels, *, out, mpp, progress, cancel):
        seen.append((len(images), out))
        progress(1, 1, {})
        return SimpleNamespace(folder=out)

    monkeypatch.setattr(model, "finetune_function", lambda: fake)
    gen = model.finetune_corrections([review], tmp_path / "l", tmp_path / "m")
    # an image scored in memory has no file to cut fields from: said before any training
    with pytest.raises(TilscoreError, match="no slide file"):
        list(gen)
    assert (tmp_path / "l" / "image.csv").is_file()
    assert seen == []
    # a slide file: fields around the edit, then finetune with progress
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)
        scored = tilscore.score_slide(
            example_slide_path("CD8"),
            "CD8",
            regions=RegionSet([Region("roi", shapely.box(1600, 1100, 2000, 1500), "ROI")], "t"),
        )
    review = Review(scored)
    review.set_positive([0])
    gen = model.finetune_corrections([review], tmp_path / "l2", tmp_path / "m")
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            value = stop.value
            break
    assert value == tmp_path / "m"
    assert steps == [("labels", 0, 1), ("labels", 1, 1), ("fine-tuning", 1, 1)]
    assert seen[0][0] >= 1
    assert "1 edits by" in model.counts_text(review)
