"""Regenerate docs/images/napari_widget.png: the CD8 example slide scored in the dock widget.

Run on a desktop, or headless under a virtual display::

    xvfb-run -a -s "-screen 0 1920x1200x24" python napari_plugin/examples/screenshot.py

It opens the example slide, zooms onto a field of tumour nests and stroma, scores that field of
view with the CNN detector (about half a minute on 2 cores) and saves the whole window.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[2] / "docs" / "images" / "napari_widget.png"
CENTRE_UM = (760.0, 1050.0)  # (y, x) on the CD8 example slide
WIDTH_UM = 520.0


def save_png(rgba: np.ndarray, out: Path) -> None:
    """Save a screenshot as a 256-colour PNG (a few hundred kB instead of 1.5 MB)."""
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main(out: Path = OUT) -> Path:
    import napari
    from napari_tilscore._sample_data import sample_cd8
    from napari_tilscore._widget import TilscoreWidget
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-tilscore")
    viewer.window._qt_window.resize(1700, 1000)
    data, kwargs, _ = sample_cd8()[0]
    viewer.add_image(data, **kwargs)
    viewer.scale_bar.visible = True  # in µm: the layers carry µm scale and units
    widget = TilscoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="TIL scoring", area="right")
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    viewer.scene.camera.center = CENTRE_UM
    viewer.scene.camera.zoom = viewer.canvas.size[1] / WIDTH_UM
    widget.scope_combo.setCurrentText("field of view")
    if widget.run() is None:
        raise SystemExit("scoring did not start (see the notification above)")
    while widget.worker is not None:
        app.processEvents()
        time.sleep(0.05)
    if widget.last_status != "done":
        raise SystemExit(f"scoring ended: {widget.last_status}")
    viewer.layers.selection.active = viewer.layers[-1]  # the cells: their controls on the left
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    viewer.close()
    save_png(shot, out)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
