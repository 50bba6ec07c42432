"""The "TIL scoring" dock widget: scoring, threshold, regions, cancel, errors, export, pixels."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

#: A 400 x 400 µm box of the CD8 example slide with tumour nests, stroma and positive cells
#: (level-0 px: x, y, width, height).
BOX_PX = (1600, 1100, 800, 800)
CENTRE_UM = (750.0, 1000.0)  # (y, x) of the same part of the slide, µm


@pytest.fixture(scope="module")
def cd8_result():
    """The CD8 example slide scored in BOX_PX, without Qt (as a script would)."""
    from napari_tilscore import model
    from napari_tilscore._sample_data import example_slide_path

    session = model.ScoringSession(
        source=example_slide_path("CD8"), marker="CD8", scope=model.box_polygon(BOX_PX)
    )
    gen = session.run()
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


@pytest.fixture
def viewer_widget(make_napari_viewer, qtbot):
    """A shown viewer with the CD8 example slide and the docked widget."""
    from napari_tilscore._sample_data import sample_cd8
    from napari_tilscore._widget import TilscoreWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    data, kwargs, _ = sample_cd8()[0]
    viewer.add_image(data, **kwargs)
    widget = TilscoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="TIL scoring")
    qtbot.waitExposed(viewer.window._qt_window)
    qtbot.wait(50)  # let the canvas take its size
    return viewer, widget


def _zoom(viewer, centre_um, width_um: float) -> None:
    viewer.scene.camera.center = centre_um
    viewer.scene.camera.zoom = viewer.canvas.size[1] / width_um


def _show(widget, result) -> None:
    from napari_tilscore import model

    widget.session = model.ScoringSession(source=result.path, marker=result.marker)
    widget.session.set_result(result)
    widget.show_result()


def _cells_layer(viewer):
    return next(ly for ly in viewer.layers if ly.metadata.get("tilscore_result") == "cells")


def _red_count(face: np.ndarray) -> int:
    from napari_tilscore.model import POSITIVE_RGBA

    return int(np.all(np.isclose(face, POSITIVE_RGBA, atol=1e-3), axis=1).sum())


def _notifications(monkeypatch) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"error": [], "warning": [], "info": []}
    for kind in seen:
        monkeypatch.setattr(f"napari.utils.notifications.show_{kind}", seen[kind].append)
    return seen


@pytest.mark.slow
def test_widget_scores_the_field_of_view(viewer_widget, qtbot, monkeypatch):
    from napari_tilscore import model

    viewer, widget = viewer_widget
    seen = _notifications(monkeypatch)
    _zoom(viewer, CENTRE_UM, 300.0)
    widget.scope_combo.setCurrentText("field of view")
    widget.marker_combo.setCurrentIndex(widget.marker_combo.findData("CD8"))
    x0, y0, x1, y1 = widget.scope_geometry().bounds  # level-0 px in view
    assert (x1 - x0) * 0.5 == pytest.approx(300.0, abs=1.0)
    assert (x0 + x1) / 2 * 0.5 == pytest.approx(CENTRE_UM[1], abs=1.0)
    worker = widget.run()
    assert worker is not None
    assert not widget.run_btn.isEnabled()
    assert widget.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    assert widget.last_status == "done", seen
    assert seen["error"] == []
    result = widget.session.result
    # cells: only in the field of view, coloured by positivity, measurements as features
    cells = _cells_layer(viewer)
    assert len(cells.data) == len(result.cells) > 50
    assert cells.data[:, 1].min() >= x0 - 1
    assert cells.data[:, 1].max() <= x1 + 1
    assert cells.data[:, 0].min() >= y0 - 1
    assert cells.data[:, 0].max() <= y1 + 1
    assert tuple(cells.scale) == pytest.approx((0.5, 0.5))
    for col in ("dab_od_membrane", "positive", "compartment", "cell_class"):
        assert col in cells.features.columns
    assert _red_count(cells.border_color) == int(result.cells["positive"].sum()) > 0
    # compartments, heatmap and the table
    names = [ly.name for ly in viewer.layers]
    assert "compartments" in names
    assert "CD8+ cells per mm²" in names
    assert widget.table_values() == model.table_rows(result.summary)
    assert widget.table.rowCount() == len(result.summary) >= 4
    assert "cells scored" in widget.status_label.text()
    assert widget.threshold_slider.value() == pytest.approx(model.preset_threshold("CD8"))
    assert widget.run_btn.isEnabled()
    assert widget.export_btn.isEnabled()


def test_threshold_slider_reclassifies_without_detecting(viewer_widget, cd8_result, qtbot):
    viewer, widget = viewer_widget
    _show(widget, cd8_result)
    cells = _cells_layer(viewer)
    coords_before = np.array(cells.data)
    pos_before = cd8_result.cells["positive"].to_numpy(bool)
    od = cd8_result.cells["dab_od_membrane"].to_numpy(float)
    table_before = widget.table_values()
    # hovering a cell shows its measurements (status bar and tooltip)
    status = cells.get_status(tuple(coords_before[0] * 0.5), world=True)
    assert "dab_od_membrane" in status["value"]
    assert viewer.tooltip.visible

    preset = widget.session.threshold()
    higher = round(preset + 0.1, 3)
    widget.threshold_slider.setValue(higher)  # as a user drags it; applied when it rests
    qtbot.waitUntil(lambda: abs(widget.session.threshold() - higher) < 1e-6, timeout=5000)
    higher = widget.session.threshold()

    result = widget.session.result
    expected = pos_before & (od >= higher)  # same rule, higher threshold
    np.testing.assert_array_equal(result.cells["positive"].to_numpy(bool), expected)
    assert expected.sum() < pos_before.sum()
    np.testing.assert_array_equal(cells.data, coords_before)  # same cells: no re-detection
    assert _red_count(cells.border_color) == int(expected.sum())
    np.testing.assert_array_equal(cells.features["positive"].to_numpy(bool), expected)
    table_after = widget.table_values()
    assert table_after != table_before
    tissue = next(r for r in table_after if r[0] == "tissue")
    in_tissue = result.cells["compartment"].isin(["intratumoral", "stromal", "tissue"])
    assert int(tissue[2]) == int((expected & in_tissue.to_numpy()).sum())
    # and back
    widget.set_threshold(preset)
    assert widget.table_values() == table_before
    assert _red_count(cells.border_color) == int(pos_before.sum())


@pytest.mark.slow
def test_export_writes_what_tilscore_score_writes(viewer_widget, cd8_result, tmp_path):
    _, widget = viewer_widget
    _show(widget, cd8_result)
    widget.set_threshold(0.321)
    files = widget.export(tmp_path / "out")
    assert files is not None
    for name in ("summary.csv", "run.json", "report.html"):
        assert (tmp_path / "out" / name).is_file()
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    expected = widget.session.result.summary
    assert summary["n_positive"].tolist() == expected["n_positive"].tolist()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "0.321" in json.dumps(run)  # the threshold used is recorded


@pytest.mark.slow
def test_geojson_round_trip_through_shapes_layers(viewer_widget, tmp_path):
    from napari_tilscore._sample_data import example_slide_path

    from tilscore.regions import RegionSet, load_regions

    viewer, widget = viewer_widget
    layers = widget.add_region_layers()
    assert set(layers) == {"tumour", "stroma", "exclude"}
    tumour = np.array([[100.0, 200.0], [100.0, 900.0], [700.0, 900.0], [700.0, 200.0]])
    stroma = np.array([[1000.0, 1000.0], [1000.0, 1600.0], [1500.0, 1300.0]])
    layers["tumour"].add(tumour, shape_type="polygon")
    layers["stroma"].add(stroma, shape_type="polygon")
    layers["exclude"].add(
        np.array([[50.0, 50.0], [50.0, 90.0], [90.0, 90.0], [90.0, 50.0]]), shape_type="ellipse"
    )

    out = widget.save_regions(tmp_path / "drawn.geojson")
    assert out is not None
    saved = load_regions(out)
    assert saved.classes == ["tumour", "stroma", "exclude"]
    assert saved.geometry("tumour").area == pytest.approx(600 * 700)  # level-0 px²
    assert saved.geometry("stroma").area == pytest.approx(0.5 * 600 * 500)
    assert saved.geometry("exclude").area == pytest.approx(np.pi * 20 * 20, rel=0.02)

    for layer in layers.values():
        viewer.layers.remove(layer)
    widget.load_regions(out)
    back = widget.region_layers()
    assert set(back) == {"tumour", "stroma", "exclude"}
    again = widget.regions()
    for cls in ("tumour", "stroma", "exclude"):
        # the same polygons, up to the GeoJSON's coordinate rounding
        assert again.geometry(cls).symmetric_difference(saved.geometry(cls)).area < 0.01

    # QuPath's export of the example slide: every class becomes its own layer
    example = example_slide_path("CD8").with_name("synthetic_cd8.regions.geojson")
    widget.load_regions(example)
    want = RegionSet.from_geojson(example).to_shapes()
    layers = widget.region_layers()
    for cls, polys in want.items():
        assert len(layers[cls].data) == len(polys)


@pytest.mark.slow
def test_cancel_stops_the_run_and_leaves_the_viewer_usable(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    seen = _notifications(monkeypatch)
    widget.scope_combo.setCurrentText("whole slide")
    stages: list[str] = []
    worker = widget.run()
    assert worker is not None

    def cancel_on_first(update):
        stages.append(update[0])
        widget.cancel()

    worker.yielded.connect(cancel_on_first)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    assert widget.last_status == "cancelled"
    assert stages
    assert "score" not in stages  # stopped before the last stage
    assert any("cancelled" in w for w in seen["warning"])
    assert seen["error"] == []
    assert not any(ly.metadata.get("tilscore_result") for ly in viewer.layers)
    assert widget.run_btn.isEnabled()
    assert not widget.cancel_btn.isEnabled()
    assert not widget.export_btn.isEnabled()


def test_bad_input_is_a_notification_not_a_crash(make_napari_viewer, viewer_widget, monkeypatch):
    from napari_tilscore._widget import TilscoreWidget

    seen = _notifications(monkeypatch)
    # no slide open
    empty = TilscoreWidget(make_napari_viewer())
    assert empty.run() is None
    assert "no slide is open" in seen["error"][-1]
    # "selected shapes" with nothing selected
    _, widget = viewer_widget
    widget.scope_combo.setCurrentText("selected shapes")
    assert widget.run() is None
    assert "no shape is selected" in seen["error"][-1]
    assert widget.worker is None
    # export before scoring
    assert widget.export("nowhere") is None
    assert "score a slide first" in seen["error"][-1]


def test_screenshot_shows_the_slide_and_both_cell_colours(viewer_widget, cd8_result):
    from napari_tilscore.model import NEGATIVE_RGBA, POSITIVE_RGBA

    viewer, widget = viewer_widget
    _show(widget, cd8_result)
    _zoom(viewer, CENTRE_UM, 400.0)
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    assert shot.std() > 20  # not a blank or flat canvas

    def near(rgba, tol=40):
        target = np.array(rgba[:3]) * 255
        return int((np.abs(shot - target).max(axis=-1) < tol).sum())

    assert near(POSITIVE_RGBA) > 30  # positive cells drawn
    assert near(NEGATIVE_RGBA) > 30  # negative cells drawn
    # the slide itself: pale stained tissue (not only markers on black)
    assert int((shot.min(axis=-1) > 150).sum()) > shot.shape[0] * shot.shape[1] // 10


@pytest.mark.slow
def test_slide_without_tissue_scores_zero_with_a_warning(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    import tifffile
    from napari_tilscore._widget import TilscoreWidget

    path = tmp_path / "glass.tif"
    glass = np.full((600, 800, 3), 245, np.uint8)
    tifffile.imwrite(
        path, glass, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", photometric="rgb"
    )
    seen = _notifications(monkeypatch)
    viewer = make_napari_viewer()
    widget = TilscoreWidget(viewer)
    assert widget.open_slide(path) is not None
    widget.scope_combo.setCurrentText("whole slide")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.last_status == "done", seen
    assert any("no tissue" in w for w in seen["warning"])
    assert seen["error"] == []
    assert len(_cells_layer(viewer).data) == 0
    assert all(row[1] == "0" for row in widget.table_values())


def test_selected_shapes_scope_is_in_level0_px(viewer_widget):
    viewer, widget = viewer_widget
    layers = widget.add_region_layers(("tumour",))
    rect = np.array([[100.0, 200.0], [100.0, 600.0], [400.0, 600.0], [400.0, 200.0]])  # (y, x)
    layers["tumour"].add(rect, shape_type="rectangle")
    layers["tumour"].selected_data = {0}
    # a Shapes layer the user made in world µm (scale 1) counts too, converted to level-0 px
    world = viewer.add_shapes(np.array([[0.0, 0.0], [0.0, 50.0], [25.0, 50.0], [25.0, 0.0]]))
    world.selected_data = {0}
    widget.scope_combo.setCurrentText("selected shapes")
    geom = widget.scope_geometry()
    assert geom.area == pytest.approx(400 * 300 + 100 * 50)
    assert geom.bounds == (0.0, 0.0, 600.0, 400.0)


def test_config_file_sets_detector_and_threshold(viewer_widget, tmp_path, monkeypatch):
    _, widget = viewer_widget
    seen = _notifications(monkeypatch)
    good = tmp_path / "run.toml"
    good.write_text('[detect]\ndetector = "classical"\n\n[markers.CD8]\nthreshold_od = 0.3\n')
    widget.marker_combo.setCurrentIndex(widget.marker_combo.findData("CD8"))
    assert widget.set_config(good) is not None
    assert widget.detector_combo.currentText() == "classical"
    assert widget.threshold_slider.value() == pytest.approx(0.3)
    session = widget.make_session()
    assert session.effective_config()["detect"]["detector"] == "classical"
    assert session.threshold() == pytest.approx(0.3)
    bad = tmp_path / "bad.toml"
    bad.write_text("[detect]\ndetektor = 1\n")
    assert widget.set_config(bad) is None
    assert "detektor" in seen["error"][-1]
    assert widget.config_label.text() == "run.toml"  # the good one stays
