"""Reviewing in the widget: clicks and keys on the cells' Points layer, regions, audit trail,
re-opening a result folder, bad input; the screenshot of a reviewed slide."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

BOX_PX = (1600, 1100, 800, 800)  # the part of the CD8 example that is scored (x, y, w, h)
CENTRE_UM = (750.0, 1000.0)  # its centre, (y, x) µm
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cd8_result():
    """The CD8 example slide scored in BOX_PX, without Qt."""
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
def reviewing(make_napari_viewer, qtbot, cd8_result):
    """A shown viewer with the CD8 slide, the widget docked and the result shown (review on)."""
    from napari_tilscore import model
    from napari_tilscore._sample_data import sample_cd8
    from napari_tilscore._widget import TilscoreWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    data, kwargs, _ = sample_cd8()[0]
    viewer.add_image(data, **kwargs)
    widget = TilscoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="TIL scoring")
    qtbot.waitExposed(viewer.window._qt_window)
    widget.session = model.ScoringSession(source=cd8_result.path, marker="CD8")
    widget.session.set_result(cd8_result)
    widget.show_result()
    viewer.scene.camera.center = CENTRE_UM
    viewer.scene.camera.zoom = viewer.canvas.size[1] / 420.0
    qtbot.wait(50)
    return viewer, widget


def _cells(viewer):
    return next(ly for ly in viewer.layers if ly.metadata.get("tilscore_result") == "cells")


def _notifications(monkeypatch) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"error": [], "warning": [], "info": []}
    for kind in seen:
        monkeypatch.setattr(f"napari.utils.notifications.show_{kind}", seen[kind].append)
    return seen


def _screen(viewer, x_px: float, y_px: float, mpp: float = 0.5):
    """The canvas widget position (Qt logical px) of a level-0 slide point."""
    from qtpy.QtCore import QPoint

    cy, cx = viewer.scene.camera.center[-2:]
    zoom = viewer.scene.camera.zoom
    h, w = viewer.canvas.size
    return QPoint(round((x_px * mpp - cx) * zoom + w / 2), round((y_px * mpp - cy) * zoom + h / 2))


def _click(qtbot, viewer, x_px, y_px, modifier=None):
    from qtpy.QtCore import Qt

    native = viewer.window._qt_viewer.canvas.native
    pos = _screen(viewer, x_px, y_px)
    qtbot.mouseMove(native, pos)
    qtbot.mousePress(native, Qt.MouseButton.LeftButton, modifier or Qt.KeyboardModifier(0), pos)
    qtbot.mouseRelease(native, Qt.MouseButton.LeftButton, modifier or Qt.KeyboardModifier(0), pos)
    qtbot.wait(20)


def _key(qtbot, viewer, key, modifier=None):
    from qtpy.QtCore import Qt

    native = viewer.window._qt_viewer.canvas.native
    native.setFocus()
    qtbot.keyClick(native, key, modifier or Qt.KeyboardModifier.NoModifier)
    qtbot.wait(20)


def _table(widget) -> pd.DataFrame:
    from napari_tilscore import model

    rows = widget.table_values()
    return pd.DataFrame(rows, columns=[h for h, _, _ in model.TABLE_COLUMNS]).set_index(
        "compartment"
    )


def test_clicks_and_keys_on_the_points_layer_edit_and_recount(reviewing, qtbot):
    from qtpy.QtCore import Qt

    viewer, widget = reviewing
    layer = _cells(viewer)
    review = widget.session.review
    tissue0 = int(_table(widget).loc["tissue", "cells"])
    pos0 = int(_table(widget).loc["tissue", "positive"])
    # a click in add mode adds a cell (positive immune, the box's default) where it lands
    viewer.layers.selection.active = layer
    layer.mode = "add"
    _click(qtbot, viewer, 2000, 1500)
    assert [r.action for r in review.records] == ["add_cell"]
    added = review.records[0].after[0]
    assert abs(added["x"] - 2000) < 3
    assert abs(added["y"] - 1500) < 3
    assert added["positive"] is True
    assert int(_table(widget).loc["tissue", "cells"]) == tissue0 + 1
    assert int(_table(widget).loc["tissue", "positive"]) == pos0 + 1
    assert len(layer.data) == len(review.cells)
    # select a negative cell with a click in select mode, flip it with F
    layer.mode = "select"
    cells = review.cells
    neg = cells[~cells["positive"]].iloc[0]
    _click(qtbot, viewer, neg["x"], neg["y"])
    assert layer.selected_data == {int(np.flatnonzero(cells["cell_id"] == neg["cell_id"])[0])}
    _key(qtbot, viewer, Qt.Key.Key_F)
    assert review.records[-1].action == "set_positive"
    assert review.records[-1].ids == (int(neg["cell_id"]),)
    assert int(_table(widget).loc["tissue", "positive"]) == pos0 + 2
    face = np.asarray(layer.border_color)[
        int(np.flatnonzero(review.cells["cell_id"] == neg["cell_id"])[0])
    ]
    from napari_tilscore.model import POSITIVE_RGBA

    assert np.allclose(face, POSITIVE_RGBA, atol=1e-3)  # the colour follows
    # Shift-T makes it a tumour cell; Delete removes it (napari's own key)
    _click(qtbot, viewer, neg["x"], neg["y"])
    _key(qtbot, viewer, Qt.Key.Key_T, Qt.KeyboardModifier.ShiftModifier)
    assert review.records[-1].action == "set_class"
    assert review.records[-1].after == [{"cell_class": "tumour"}]
    _click(qtbot, viewer, neg["x"], neg["y"])
    _key(qtbot, viewer, Qt.Key.Key_Delete)
    assert review.records[-1].action == "delete"
    assert int(_table(widget).loc["tissue", "cells"]) == tissue0
    assert len(layer.data) == len(review.cells) == tissue0
    # Ctrl-Z takes the deletion back
    _key(qtbot, viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert review.records[-1].action == "undo"
    assert int(_table(widget).loc["tissue", "cells"]) == tissue0 + 1
    assert "5 edits" in widget.review_box.counts_label.text()
    assert "1 added" in widget.review_box.counts_label.text()


def _drag(qtbot, viewer, start_px, end_px):
    """A left-button drag on the canvas (Qt mouse events with the button held while moving)."""
    from qtpy.QtCore import QEvent, QPoint, QPointF, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    native = viewer.window._qt_viewer.canvas.native
    a, b = _screen(viewer, *start_px), _screen(viewer, *end_px)
    left, none = Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton

    def send(kind, pos, button, buttons):
        event = QMouseEvent(
            kind,
            QPointF(pos),
            QPointF(native.mapToGlobal(pos)),
            button,
            buttons,
            Qt.KeyboardModifier.NoModifier,
        )
        QApplication.sendEvent(native, event)

    send(QEvent.Type.MouseMove, a, none, none)
    send(QEvent.Type.MouseButtonPress, a, left, left)
    qtbot.wait(10)
    for t in np.linspace(0, 1, 8)[1:]:
        p = QPoint(round(a.x() + (b.x() - a.x()) * t), round(a.y() + (b.y() - a.y()) * t))
        send(QEvent.Type.MouseMove, p, none, left)
        qtbot.wait(10)
    send(QEvent.Type.MouseButtonRelease, b, left, none)
    qtbot.wait(30)


def test_box_selection_edits_many_cells_together(reviewing, qtbot):
    from qtpy.QtCore import Qt

    viewer, widget = reviewing
    layer = _cells(viewer)
    review = widget.session.review
    viewer.layers.selection.active = layer
    layer.mode = "select"
    cells = review.cells
    x, y = cells["x"].to_numpy(), cells["y"].to_numpy()
    # a drag from empty tissue over a 120 x 120 px square selects the cells inside it
    x0, y0 = 1700.0, 1500.0
    while np.hypot(x - x0, y - y0).min() < 12:
        x0 += 5
    x1, y1 = x0 + 120, y0 + 120
    inside = np.flatnonzero((x > x0) & (x < x1) & (y > y0) & (y < y1))
    assert len(inside) >= 3
    _drag(qtbot, viewer, (x0, y0), (x1, y1))
    chosen = np.array(sorted(layer.selected_data))
    assert set(inside.tolist()) <= set(chosen.tolist())
    near = (x > x0 - 10) & (x < x1 + 10) & (y > y0 - 10) & (y < y1 + 10)  # screen px rounding
    assert near[chosen].all()
    inside = chosen
    before = review.cells["positive"].to_numpy()[inside]
    heat_before = float(widget._result_layers["heatmap"].data.sum())
    _key(qtbot, viewer, Qt.Key.Key_F)  # flip them all: one edit
    assert len(review.records[-1].ids) == len(inside)
    assert (review.cells["positive"].to_numpy()[inside] == ~before).all()
    heat = float(widget._result_layers["heatmap"].data.sum())
    assert heat != heat_before  # the density heatmap follows
    layer.selected_data = set(inside.tolist())
    widget.review_box.delete_selected()
    assert review.counts()["removed"] == len(inside)
    assert len(layer.data) == len(review.cells)


def test_region_edit_recomputes_compartments_and_table(reviewing, qtbot):
    _viewer, widget = reviewing
    review = widget.session.review
    before = _table(widget)
    inside = review.cells[review.cells["compartment"] == "stromal"]
    x, y = inside[["x", "y"]].median()
    layer = widget.add_region_layers()["exclude"]
    square = np.array([[y - 80, x - 80], [y - 80, x + 80], [y + 80, x + 80], [y + 80, x - 80]])
    layer.add([square], shape_type="polygon")  # as drawing it does
    assert review.records[-1].action == "edit_regions"
    after = _table(widget)
    assert float(after.loc["tissue", "area mm²"]) < float(before.loc["tissue", "area mm²"])
    assert int(after.loc["tissue", "cells"]) < int(before.loc["tissue", "cells"])
    assert (review.cells["compartment"] == "excluded").sum() > 0
    widget.review_box.undo()
    assert _table(widget).equals(before)
    assert len(layer.data) == 0  # the layer shows the regions again as they were


def test_export_reopen_restores_the_review_and_load_result_agrees(
    reviewing, make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    from napari_tilscore import model

    import tilscore

    viewer, widget = reviewing
    review = widget.session.review
    widget.review_box.user_edit.setText("Dr Who")
    layer = _cells(viewer)
    layer.selected_data = {0, 1, 2}
    widget.review_box.set_positive(None)
    files = widget.export(tmp_path / "out")
    assert files is not None
    layer.selected_data = {5}
    widget.review_box.delete_selected()  # after export: appended at once
    shown = widget.table_values()
    log = (tmp_path / "out" / "review.jsonl").read_text().splitlines()
    assert len(log) == 1 + 2
    assert json.loads(log[-1])["user"] == "Dr Who"
    # what tilscore.load_result gives is what the widget showed
    loaded = tilscore.load_result(tmp_path / "out")
    assert model.table_rows(loaded.summary) == shown
    # a fresh viewer and widget re-open the folder: same cells, same table, the history to undo
    from napari_tilscore._widget import TilscoreWidget

    seen = _notifications(monkeypatch)
    other = TilscoreWidget(make_napari_viewer(show=True))
    reopened = other.open_result(tmp_path / "out")
    assert reopened is not None
    assert other.table_values() == shown
    assert len(reopened.records) == len(review.records)
    assert "2 review edits restored" in seen["info"][-1]
    other.review_box.undo()
    assert other.session.review.records[-1].action == "undo"
    assert len((tmp_path / "out" / "review.jsonl").read_text().splitlines()) == 4


def test_file_open_on_a_result_folder_restores_the_review(
    make_napari_viewer, qtbot, tmp_path, cd8_result
):
    from tilscore.review import Review

    review = Review(cd8_result, user="u")
    review.set_positive([0, 1])
    review.save(tmp_path / "res")
    viewer = make_napari_viewer(show=True)
    qtbot.waitExposed(viewer.window._qt_window)
    viewer.open(str(tmp_path / "res"), plugin="napari-tilscore")
    _, widget = viewer.window.add_plugin_dock_widget("napari-tilscore", "TIL scoring")
    assert widget.session is not None
    assert len(widget.session.review.records) == 1  # the flip of two cells
    assert widget.session.review.counts()["flipped"] == 2
    assert any(ly.metadata.get("tilscore") for ly in viewer.layers)  # the slide was opened


# -- bad input ---------------------------------------------------------------------------------


def test_cells_added_off_the_tissue_or_in_an_exclusion_are_refused(reviewing, qtbot, monkeypatch):
    viewer, widget = reviewing
    seen = _notifications(monkeypatch)
    layer = _cells(viewer)
    review = widget.session.review
    n = len(layer.data)
    viewer.layers.selection.active = layer
    layer.mode = "add"
    layer.add(np.array([[100.0, 100.0]]))  # on the slide, outside the scored box
    assert "outside the scored tissue" in seen["error"][-1]
    layer.add(np.array([[10.0, 5000.0]]))  # off the slide
    assert "outside the slide" in seen["error"][-1]
    assert len(layer.data) == n  # the refused points are gone from the layer
    assert review.records == []
    # an exclusion, then a click inside it
    inside = review.cells[review.cells["compartment"] == "stromal"]
    x, y = inside[["x", "y"]].median()
    excl = widget.add_region_layers()["exclude"]
    excl.add([np.array([[y - 50, x - 50], [y - 50, x + 50], [y + 50, x + 50], [y + 50, x - 50]])])
    viewer.layers.selection.active = layer
    layer.add(np.array([[y, x]]))
    assert "excluded region" in seen["error"][-1]
    assert [r.action for r in review.records] == ["edit_regions"]


def test_edits_wait_while_scoring_and_unsaved_edits_block_a_run(
    reviewing, qtbot, tmp_path, monkeypatch
):
    viewer, widget = reviewing
    seen = _notifications(monkeypatch)
    review = widget.session.review
    _cells(viewer).selected_data = {0}
    widget.review_box.set_positive(True)
    widget.scope_combo.setCurrentText("field of view")
    assert widget.run() is None  # the edit is in no folder yet: not replaced by a new run
    assert "not saved" in seen["error"][-1]
    widget.export(tmp_path / "saved")
    worker = widget.run()
    assert worker is not None
    _cells(viewer).selected_data = {1}
    widget.review_box.set_positive(True)
    assert "scoring is running" in seen["warning"][-1]
    assert len(review.records) == 1
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    # the first review is safe in its folder; the new result starts its own review
    assert len((tmp_path / "saved" / "review.jsonl").read_text().splitlines()) == 2
    assert widget.session.review is not review


def test_bad_result_folders_are_notifications(reviewing, tmp_path, monkeypatch, cd8_result):
    from tilscore.review import Review

    _viewer, widget = reviewing
    seen = _notifications(monkeypatch)
    rv = Review(cd8_result)
    rv.set_positive([0])
    rv.save(tmp_path / "r")
    log = tmp_path / "r" / "review.jsonl"
    text = log.read_text()
    log.write_text(text.replace('"action": "set_positive"', '"action": "nonsense"'))
    assert widget.open_result(tmp_path / "r") is None
    assert "line 2" in seen["error"][-1]
    assert "unknown action" in seen["error"][-1]
    assert "nonsense" in log.read_text()  # the file is left as it was
    log.write_text(text)
    (tmp_path / "r" / "compartments.geojson").unlink()  # an older tilscore's folder
    assert widget.open_result(tmp_path / "r") is None
    assert "no compartments.geojson" in seen["error"][-1]


def test_finetune_button_says_when_tilscore_has_no_finetuning(reviewing, monkeypatch, tmp_path):
    from napari_tilscore import model

    _, widget = reviewing
    seen = _notifications(monkeypatch)
    monkeypatch.setattr(model, "finetune_function", lambda: None)
    assert widget.review_box.finetune(tmp_path / "l", tmp_path / "m") is None
    assert "not available in this version" in seen["error"][-1]
    # the labels still export
    _cells(widget.viewer).selected_data = {0}
    widget.review_box.set_positive(None)
    manifest = widget.review_box.export_labels(tmp_path / "labels")
    assert manifest["slides"][0]["mpp"] == pytest.approx(0.5)
    assert (tmp_path / "labels" / "synthetic_cd8.csv").is_file()


def test_finetune_runs_in_a_worker_with_progress(reviewing, monkeypatch, tmp_path, qtbot):
    from napari_tilscore import model

    _, widget = reviewing
    seen = _notifications(monkeypatch)
    calls = []

    def fake_finetune(images, labels, *, out, mpp, progress, cancel):
        calls.append((len(images), [len(t) for t in labels], mpp, Path(out)))
        for i in range(3):
            progress(i + 1, 3, {})
        return SimpleNamespace(folder=Path(out))

    monkeypatch.setattr(model, "finetune_function", lambda: fake_finetune)
    _cells(widget.viewer).selected_data = {0}
    widget.review_box.set_positive(None)
    worker = widget.review_box.finetune(tmp_path / "labels", tmp_path / "model")
    assert worker is not None
    qtbot.waitUntil(lambda: widget.review_box._ft_worker is None, timeout=10_000)
    ((n, sizes, mpp, out),) = calls
    assert (tmp_path / "labels" / "labels.json").is_file()
    assert n == len(sizes) >= 1  # fields cut around the edit, each with its cells
    assert min(sizes) >= 1
    assert mpp == [0.5] * n
    assert out == tmp_path / "model"
    assert widget.status_label.text() == "fine-tuning: 3/3"
    assert any("fine-tuned model" in m for m in seen["info"])  # offered for the next Score


def test_cancel_stops_the_finetune(reviewing, monkeypatch, tmp_path, qtbot):
    import threading

    from napari_tilscore import model

    _, widget = reviewing
    _notifications(monkeypatch)
    running, stopped = threading.Event(), threading.Event()

    def slow_finetune(images, labels, *, out, mpp, progress, cancel):
        step = 0
        while not cancel():
            step += 1
            progress(step, 10_000, {})
            running.set()
            threading.Event().wait(0.01)
        stopped.set()
        raise RuntimeError("cancelled")  # as tilscore's fit raises Cancelled

    monkeypatch.setattr(model, "finetune_function", lambda: slow_finetune)
    _cells(widget.viewer).selected_data = {0}
    widget.review_box.set_positive(None)
    widget.review_box.finetune(tmp_path / "labels", tmp_path / "model")
    qtbot.waitUntil(running.is_set, timeout=10_000)
    widget.cancel_btn.click()
    qtbot.waitUntil(lambda: widget.review_box._ft_worker is None, timeout=10_000)
    assert stopped.is_set()


def test_screenshot_of_a_reviewed_slide(reviewing, qtbot, tmp_path):
    """A reviewed field with its edit counts (docs/images/napari_review.png is made the same
    way by napari_plugin/examples/review_screenshot.py)."""
    viewer, widget = reviewing
    layer = _cells(viewer)
    review = widget.session.review
    neg = np.flatnonzero(~review.cells["positive"].to_numpy())[:6]
    layer.selected_data = set(neg.tolist())
    widget.review_box.set_positive(True)
    widget.review_box.add_cell(2000, 1500)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.std() > 20
    assert "6 flipped" in widget.review_box.counts_label.text()
