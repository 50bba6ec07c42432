"""Regenerate docs/images/napari_review.png: a reviewed field of the CD8 example slide.

Run on a desktop, or headless under a virtual display::

    xvfb-run -a -s "-screen 0 1920x1200x24" python napari_plugin/examples/review_screenshot.py

It scores a 400 µm field of the example slide (a few seconds), then reviews it as a person would
in the widget: six negative cells called positive, two false detections deleted, one missed
T cell added, one cell made a tumour cell, and an exclusion drawn over a fold; the cells touched
are diamonds, and the review box shows the edit counts. The whole window is saved.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshot import save_png

OUT = Path(__file__).resolve().parents[2] / "docs" / "images" / "napari_review.png"
BOX_PX = (1600, 1100, 800, 800)
CENTRE_UM = (750.0, 1000.0)
WIDTH_UM = 430.0


def main(out: Path = OUT) -> Path:
    import napari
    from napari_tilscore import model
    from napari_tilscore._sample_data import example_slide_path, sample_cd8
    from napari_tilscore._widget import TilscoreWidget
    from qtpy.QtWidgets import QApplication

    session = model.ScoringSession(
        source=example_slide_path("CD8"), marker="CD8", scope=model.box_polygon(BOX_PX)
    )
    gen = session.run()
    while True:
        try:
            next(gen)
        except StopIteration:
            break
    viewer = napari.Viewer(show=True, title="napari-tilscore: review")
    viewer.window._qt_window.resize(1750, 1150)
    data, kwargs, _ = sample_cd8()[0]
    viewer.add_image(data, **kwargs)
    viewer.scale_bar.visible = True
    widget = TilscoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="TIL scoring", area="right")
    widget.session = session
    widget.show_result()
    box = widget.review_box
    box.user_edit.setText("Dr A. Pathologist")
    review = session.review
    layer = widget._result_layers["cells"]
    cells = review.cells
    in_view = (abs(cells["x"] * 0.5 - CENTRE_UM[1]) < 180) & (
        abs(cells["y"] * 0.5 - CENTRE_UM[0]) < 180
    )
    neg = np.flatnonzero(
        (~cells["positive"] & in_view & (cells["compartment"] == "stromal")).to_numpy()
    )
    layer.selected_data = set(neg[:6].tolist())
    box.set_positive(True)
    pos = np.flatnonzero((cells["positive"] & in_view).to_numpy())
    layer.selected_data = set(pos[-2:].tolist())
    box.delete_selected()
    cells = review.cells  # rows moved up after the deletion
    in_view = (abs(cells["x"] * 0.5 - CENTRE_UM[1]) < 180) & (
        abs(cells["y"] * 0.5 - CENTRE_UM[0]) < 180
    )
    layer.selected_data = {
        int(np.flatnonzero((in_view & (cells["cell_class"] != "tumour")).to_numpy())[0])
    }
    box.set_class("tumour")
    x, y = cells.loc[cells["cell_id"] == neg[6], ["x", "y"]].iloc[0]
    box.add_cell(float(x) + 12, float(y) + 12)
    excl = widget.add_region_layers()["exclude"]
    ex, ey = 2150.0, 1700.0
    excl.add(
        [np.array([[ey - 40, ex - 60], [ey - 50, ex + 50], [ey + 45, ex + 60], [ey + 40, ex - 50]])]
    )
    layer.selected_data = set()
    viewer.layers.selection.active = layer
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    viewer.scene.camera.center = CENTRE_UM
    viewer.scene.camera.zoom = viewer.canvas.size[1] / WIDTH_UM
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    print(model.counts_text(review))
    shot = viewer.screenshot(canvas_only=False, flash=False)
    viewer.close()
    save_png(shot, out)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
