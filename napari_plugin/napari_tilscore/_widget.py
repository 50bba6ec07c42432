"""The "TIL scoring" dock widget (Qt); its state and computations live in :mod:`.model`.

Every action a button triggers is also a method (``open_slide``, ``set_config``,
``add_region_layers``, ``load_regions``, ``save_regions``, ``run``, ``cancel``, ``set_threshold``,
``export``, ``open_result``; the review box's in :mod:`._review`), so tests and scripts drive the
widget without file dialogs. Errors a user can cause
(unreadable file, slide without µm/px, no tissue, cancelled run) become napari notifications,
never exceptions in the event loop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from . import model
from ._reader import META_KEY, read_slide

if TYPE_CHECKING:  # pragma: no cover
    import napari

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: Region classes whose Shapes layers "Add region layers" creates (others appear on load).
DRAW_CLASSES = ("tumour", "stroma", "exclude")
#: ``layer.metadata`` key that marks a region Shapes layer, its value the region class.
REGION_KEY = "tilscore_region"
#: ``layer.metadata`` key that marks the layers of a result.
RESULT_KEY = "tilscore_result"
CELL_SIZE_UM = 7.0  # drawn diameter of a cell point
_RIGHT = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter


def _notify_errors(func: F) -> F:
    """Run a GUI action; show any error as a napari notification instead of raising it."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as e:  # the GUI boundary: everything is reported, nothing crashes
            _show_exception(e)
            return None

    return wrapper  # type: ignore[return-value]


def _show_exception(e: BaseException) -> None:
    from napari.utils.notifications import show_error

    from tilscore.errors import TilscoreError

    if isinstance(e, TilscoreError):
        show_error(str(e))
    else:
        logger.exception("tilscore widget error", exc_info=e)
        show_error(f"tilscore: {type(e).__name__}: {e}")


class TilscoreWidget(QWidget):
    """Dock widget: choose a slide, marker, detector, scope and regions; score; inspect; export.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it when the widget is opened from the Plugins menu).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: model.ScoringSession | None = None
        self.worker: Any = None
        self.last_status = ""  # what happened to the last run: "done", "cancelled", "error"
        self._progress: Any = None
        self._pending: model.ScoringSession | None = None
        self.config: Any = None  # a tilscore Config (None: the defaults)
        self._result_layers: dict[str, Any] = {}
        self._cancel_extra: Callable[[], Any] | None = None  # stops a fine-tuning worker
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_slides)
        self.viewer.layers.events.removed.connect(self._refresh_slides)
        self._refresh_slides()

    # ---------------------------------------------------------------------------- layout ---
    def _build(self) -> None:
        root = QVBoxLayout(self)

        slide_box = QGroupBox("Slide")
        form = QFormLayout(slide_box)
        self.slide_combo = QComboBox()
        form.addRow("image", self.slide_combo)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSpecialValueText("from the file")
        self.mpp_spin.setToolTip(
            "Level-0 pixel size (µm/px) for a slide whose file records none; "
            "0 = use the file's. Never guessed."
        )
        open_btn = QPushButton("Open slide…")
        open_btn.clicked.connect(self._open_dialog)
        row = QHBoxLayout()
        row.addWidget(self.mpp_spin)
        row.addWidget(open_btn)
        form.addRow("µm/px", row)
        root.addWidget(slide_box)

        run_box = QGroupBox("Scoring")
        form = QFormLayout(run_box)
        self.marker_combo = QComboBox()
        for label, name in model.marker_choices().items():
            self.marker_combo.addItem(label, name)
        form.addRow("marker", self.marker_combo)
        self.detector_combo = QComboBox()
        self.detector_combo.addItems(list(model.DETECTORS))
        form.addRow("detector", self.detector_combo)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(list(model.SCOPES))
        form.addRow("scope", self.scope_combo)
        self.config_label = QLabel("defaults")
        self.config_label.setToolTip("tilscore TOML configuration (every parameter of a run)")
        config_btn = QPushButton("Config…")
        config_btn.clicked.connect(self._config_dialog)
        row = QHBoxLayout()
        row.addWidget(self.config_label, 1)
        row.addWidget(config_btn)
        form.addRow("config", row)
        root.addWidget(run_box)

        reg_box = QGroupBox("Regions (level-0 polygons, one Shapes layer per class)")
        lay = QVBoxLayout(reg_box)
        row = QHBoxLayout()
        add_btn = QPushButton("Add region layers")
        add_btn.setToolTip("Shapes layers to draw in: " + ", ".join(DRAW_CLASSES))
        add_btn.clicked.connect(self._add_region_layers_clicked)
        load_btn = QPushButton("Load GeoJSON…")
        load_btn.clicked.connect(self._load_dialog)
        save_btn = QPushButton("Save GeoJSON…")
        save_btn.clicked.connect(self._save_dialog)
        for b in (add_btn, load_btn, save_btn):
            row.addWidget(b)
        lay.addLayout(row)
        self.auto_check = QCheckBox("automatic compartments (ignore drawn tumour / stroma)")
        lay.addWidget(self.auto_check)
        root.addWidget(reg_box)

        row = QHBoxLayout()
        self.run_btn = QPushButton("Score")
        self.run_btn.clicked.connect(self._run_clicked)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        root.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.progress_bar)
        root.addWidget(self.status_label)

        res_box = QGroupBox("Results")
        lay = QVBoxLayout(res_box)
        row = QHBoxLayout()
        row.addWidget(QLabel("positive at DAB OD ≥"))
        self.threshold_slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0.0, 1.0)
        self.threshold_slider.setSingleStep(0.005)
        self.threshold_slider.setDecimals(3)
        self.threshold_slider.setEnabled(False)
        self.threshold_slider.valueChanged.connect(self._threshold_moved)
        # re-classify once the slider rests for a moment, not at every pixel of a drag
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(60)
        self._threshold_timer.timeout.connect(self._apply_slider_threshold)
        row.addWidget(self.threshold_slider)
        lay.addLayout(row)
        self.table = QTableWidget(0, len(model.TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([h for h, _, _ in model.TABLE_COLUMNS])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(170)
        lay.addWidget(self.table)
        self.export_btn = QPushButton("Export…")
        self.export_btn.setEnabled(False)
        self.export_btn.clicked.connect(self._export_dialog)
        lay.addWidget(self.export_btn)
        root.addWidget(res_box)
        from ._review import ReviewBox  # imports this module: only once it is complete

        self.review_box = ReviewBox(self)
        root.addWidget(self.review_box)
        root.addStretch(1)
        self.marker_combo.currentIndexChanged.connect(self._marker_changed)
        self._marker_changed()

    # ---------------------------------------------------------------------------- slides ---
    def _slide_layers(self) -> list[Any]:
        return [ly for ly in self.viewer.layers if META_KEY in getattr(ly, "metadata", {})]

    def _refresh_slides(self, *_: Any) -> None:
        current = self.slide_combo.currentText()
        names = [ly.name for ly in self._slide_layers()]
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems(names)
        if current in names:
            self.slide_combo.setCurrentText(current)
        self.slide_combo.blockSignals(False)

    def slide_layer(self) -> Any:
        """The image layer of the chosen slide.

        Raises
        ------
        tilscore.errors.SlideReadError
            No slide is open.
        """
        from tilscore.errors import SlideReadError

        layers = {ly.name: ly for ly in self._slide_layers()}
        name = self.slide_combo.currentText()
        if name in layers:
            return layers[name]
        if layers:
            return next(iter(layers.values()))
        raise SlideReadError(
            "no slide is open",
            hint="Open one with File > Open (tilscore reader) or the widget's 'Open slide…'",
        )

    def _slide_meta(self) -> dict[str, Any]:
        return self.slide_layer().metadata[META_KEY]

    @_notify_errors
    def open_slide(self, path: str | Path) -> Any:
        """Open a slide as a lazy multiscale layer, with the µm/px field when it is set."""
        mpp = self.mpp_spin.value() or None
        data, kwargs, _ = read_slide(path, mpp=mpp)[0]
        layer = self.viewer.add_image(data, **kwargs)
        self.slide_combo.setCurrentText(layer.name)
        self.viewer.reset_view()
        return layer

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open slide", "", "Slides (*.svs *.ndpi *.tif *.tiff);;All files (*)"
        )
        if path:
            self.open_slide(path)

    # --------------------------------------------------------------------------- regions ---
    def _layer_px(self, layer: Any) -> tuple[list[np.ndarray], list[str]]:
        """A Shapes layer's shapes in level-0 px of the slide (whatever the layer's scale)."""
        mpp = self._slide_meta()["mpp"]
        scale = np.asarray(layer.scale[-2:], float)
        shift = np.asarray(layer.translate[-2:], float)
        data = [(np.asarray(v, float)[:, -2:] * scale + shift) / mpp for v in layer.data]
        return data, list(layer.shape_type)

    def region_layers(self) -> dict[str, Any]:
        """Region class -> its Shapes layer (marked in metadata, or named after the class)."""
        from napari.layers import Shapes

        from tilscore.regions import REGION_CLASSES

        out: dict[str, Any] = {}
        for ly in self.viewer.layers:
            if not isinstance(ly, Shapes) or RESULT_KEY in ly.metadata:
                continue
            cls = ly.metadata.get(REGION_KEY) or (ly.name if ly.name in REGION_CLASSES else None)
            if cls is not None and cls not in out:
                out[cls] = ly
        return out

    def _region_layer(self, cls: str) -> Any:
        layers = self.region_layers()
        if cls in layers:
            return layers[cls]
        mpp = self._slide_meta()["mpp"]
        colour = model.REGION_COLOURS.get(cls, "#ffffff")
        return self.viewer.add_shapes(
            None,
            ndim=2,
            name=cls,
            shape_type="polygon",
            edge_color=colour,
            face_color=colour + "40",
            edge_width=max(2.0, 4.0 / mpp),
            scale=(mpp, mpp),
            units=("um", "um"),
            metadata={REGION_KEY: cls},
        )

    @_notify_errors
    def add_region_layers(self, classes: tuple[str, ...] = DRAW_CLASSES) -> dict[str, Any]:
        """Empty Shapes layers to draw regions in, one per class (existing ones are kept)."""
        return {cls: self._region_layer(cls) for cls in classes}

    def _add_region_layers_clicked(self) -> None:
        layers = self.add_region_layers()
        if layers:
            self.viewer.layers.selection.active = layers[DRAW_CLASSES[0]]

    def regions(self) -> Any:
        """The drawn regions as a :class:`tilscore.regions.RegionSet` (None when none drawn)."""
        contents = {cls: self._layer_px(ly) for cls, ly in self.region_layers().items()}
        return model.regions_from_shapes(contents)

    @_notify_errors
    def load_regions(self, path: str | Path) -> Any:
        """Load QuPath GeoJSON (or a mask) into the region layers, replacing their shapes."""
        from tilscore.regions import load_regions

        meta = self._slide_meta()
        regions = load_regions(path, slide=meta.get("slide"))
        for cls, polys in regions.to_shapes().items():
            layer = self._region_layer(cls)
            layer.data = []
            layer.add(polys, shape_type="polygon")
        return regions

    @_notify_errors
    def save_regions(self, path: str | Path) -> Path | None:
        """Save the drawn regions as QuPath GeoJSON (level-0 px)."""
        from napari.utils.notifications import show_info

        from tilscore.errors import RegionError

        regions = self.regions()
        if regions is None:
            raise RegionError("no region drawn", hint="Draw in the region layers first")
        out = regions.save(path)
        show_info(f"{len(regions)} regions saved to {out}")
        return out

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load regions", "", "GeoJSON (*.geojson *.json);;All files (*)"
        )
        if path:
            self.load_regions(path)

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save regions", "", "GeoJSON (*.geojson)")
        if path:
            self.save_regions(path)

    # ----------------------------------------------------------------------------- scope ---
    def scope_geometry(self) -> Any:
        """The chosen scope as a level-0 shapely geometry (None: the whole slide).

        Raises
        ------
        tilscore.errors.RegionError
            "selected shapes" with no shape selected, or a view off the slide.
        """
        from tilscore.errors import RegionError

        scope = self.scope_combo.currentText()
        meta = self._slide_meta()
        if scope == "whole slide":
            return None
        if scope == "field of view":
            camera = self.viewer.scene.camera
            box = model.view_box_px(
                camera.center,
                self.viewer.canvas.size,
                camera.zoom,
                meta["mpp"],
                meta["dimensions"],
            )
            return model.box_polygon(box)
        from napari.layers import Shapes

        data: list[np.ndarray] = []
        types: list[str] = []
        for ly in self.viewer.layers:
            if isinstance(ly, Shapes) and RESULT_KEY not in ly.metadata and ly.selected_data:
                shapes, kinds = self._layer_px(ly)
                for i in sorted(ly.selected_data):
                    data.append(shapes[i])
                    types.append(kinds[i])
        geom = model.shapes_to_geometry(data, types) if data else None
        if geom is None:
            raise RegionError(
                "no shape is selected",
                hint="Select shapes with the Shapes layer's select tool, or choose another scope",
            )
        return geom

    @_notify_errors
    def set_config(self, path: str | Path | None) -> Any:
        """Use a tilscore TOML configuration for the next runs (None: the defaults).

        The file is checked now (unknown keys, bad values), not in the middle of a run; the
        detector choice and the marker's threshold follow it.
        """
        from tilscore.config import load_config

        config = load_config(path) if path is not None else None
        self.config = config
        self.config_label.setText(Path(path).name if path is not None else "defaults")
        detector = load_config(config)["detect"]["detector"]
        self.detector_combo.setCurrentText(detector)
        self._marker_changed()
        return config

    def _config_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "tilscore configuration", "", "TOML (*.toml);;All files (*)"
        )
        if path:
            self.set_config(path)

    # ------------------------------------------------------------------------------- run ---
    def _marker_changed(self, *_: Any) -> None:
        if self.session is None or self.session.result is None:
            marker = self.marker_combo.currentData()
            self.threshold_slider.blockSignals(True)
            self.threshold_slider.setValue(model.preset_threshold(marker, self.config))
            self.threshold_slider.blockSignals(False)

    def make_session(self) -> model.ScoringSession:
        """A session from the widget's current choices (raises on bad input)."""
        meta = self._slide_meta()
        return model.ScoringSession(
            source=meta.get("slide") or meta["path"],
            marker=self.marker_combo.currentData(),
            detector=self.detector_combo.currentText(),
            regions=self.regions(),
            scope=self.scope_geometry(),
            automatic=self.auto_check.isChecked(),
            config=self.config,
        )

    def _run_clicked(self) -> None:
        self.run()

    @_notify_errors
    def run(self) -> Any:
        """Start scoring in a background thread; returns the napari worker (None on error)."""
        from napari.qt.threading import create_worker

        from tilscore.errors import TilscoreError

        if self.worker is not None:
            raise RuntimeError("a run is in progress; cancel it first")
        unsaved = self.session.unsaved_edits() if self.session is not None else 0
        if unsaved:
            raise TilscoreError(
                f"the review has {unsaved} edits that are not saved; a new run would replace them",
                hint="Export… the result first: its review.jsonl keeps every edit",
            )
        session = self.make_session()
        worker = create_worker(session.run, _start_thread=False)
        worker.yielded.connect(self._on_progress)
        self._pending = session
        worker.returned.connect(self._on_result)  # a bound QWidget method: runs in the GUI thread
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.last_status = "running"
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress_bar.setRange(0, 0)
        self.status_label.setText(f"scoring {session.marker} …")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the run between tiles (the viewer and earlier results stay), or a fine-tuning."""
        if self.worker is not None:
            self.status_label.setText("cancelling …")
            self.worker.quit()
        elif self._cancel_extra is not None:
            self.status_label.setText("cancelling …")
            self._cancel_extra()

    def _on_progress_text(self, update: tuple[str, int, int]) -> None:
        """Progress of a background job other than scoring (fine-tuning) in the dock."""
        stage, done, total = update
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))
        self.status_label.setText(f"{stage}: {done}/{total}")

    def _on_progress(self, update: tuple[str, int, int]) -> None:
        from napari.utils import progress

        if self.worker is None:  # a late update after the run ended
            return
        stage, done, total = update
        total = max(int(total), 1)
        # the dock first: napari's progress bar processes pending events (even this run's end)
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(int(done))
        self.status_label.setText(f"{stage}: {done}/{total}")
        pbr = self._progress
        if pbr is None:
            self._progress = progress(total=total, desc=f"tilscore: {stage}")
            self._progress.n = int(done)
            return
        if pbr.total != total:
            pbr.total = total
        pbr.n = int(done)
        pbr.set_description(f"tilscore: {stage}")

    def _on_result(self, result: Any) -> None:
        from napari.utils.notifications import show_warning

        try:
            self.session, self._pending = self._pending, None
            self.last_status = "done"
            self.show_result()
            n = int(result.cells.shape[0])
            self.status_label.setText(f"{n} cells scored ({result.marker})")
            for text in result.provenance.get("warnings", []):  # e.g. no tissue found
                show_warning(f"tilscore: {text}")
        except Exception as e:  # drawing the result must not take the viewer down
            self.last_status = "error"
            _show_exception(e)

    def _on_error(self, exc: BaseException) -> None:
        self._pending = None
        self.last_status = "error"
        self.status_label.setText(f"failed: {exc}")
        _show_exception(exc)

    def _on_aborted(self) -> None:
        from napari.utils.notifications import show_warning

        self._pending = None
        self.last_status = "cancelled"
        self.status_label.setText("cancelled; nothing was changed")
        show_warning("tilscore: scoring cancelled")

    def _on_finished(self) -> None:
        self.worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self.last_status == "done" else 0)

    # --------------------------------------------------------------------------- results ---
    def _result_layer(self, key: str, make: Callable[[], Any]) -> Any:
        layer = self._result_layers.get(key)
        if layer is not None and layer in self.viewer.layers:
            return layer
        layer = make()
        layer.metadata[RESULT_KEY] = key
        self._result_layers[key] = layer
        return layer

    def show_result(self) -> None:
        """Draw the current result: compartments, density heatmap, cells; fill the table."""
        session = self.session
        result = session.result
        meta = self._slide_meta()
        mpp = float(result.mpp)
        scale = (mpp, mpp)
        self._draw_compartments()
        self._update_heatmap(meta)
        coords, features, face = model.cell_points(result.cells)
        cells = self._result_layers.get("cells")
        if cells is not None and cells in self.viewer.layers:
            self.viewer.layers.remove(cells)
        self._result_layers["cells"] = self.viewer.add_points(
            coords,
            features=features,
            # napari cannot take an empty colour array: one colour when there is no cell
            face_color=model.translucent(face) if len(face) else "#00000000",
            border_color=face if len(face) else model.hex_colour(model.NEGATIVE_RGBA),
            border_width=0.2,  # a ring: the stained cell stays visible inside
            size=CELL_SIZE_UM / mpp,
            name=f"cells ({result.marker})",
            scale=scale,
            units=("um", "um"),
            metadata={RESULT_KEY: "cells"},
        )
        self.viewer.tooltip.visible = True  # hovering a cell shows its measurements
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(session.threshold_of())
        self.threshold_slider.blockSignals(False)
        self.threshold_slider.setEnabled(True)
        self.export_btn.setEnabled(True)
        self._fill_table()
        self.review_box.start()

    def _draw_compartments(self) -> None:
        """The compartments' outlines as a Shapes layer of paths (replaced at each call)."""
        result = self.session.result
        mpp = float(result.mpp)
        scale = (mpp, mpp)
        shapes, colours, names = [], [], []
        geometries = dict(result.compartments.geometries)
        geometries["excluded"] = result.compartments.excluded
        for name, geom in geometries.items():
            for poly in model.geometry_to_shapes(geom):
                # closed paths: outlines only, no face to triangulate (much faster to add)
                shapes.append(np.vstack([poly, poly[:1]]))
                colours.append(model.COMPARTMENT_COLOURS.get(name, "#ffffff"))
                names.append(name)
        comp = self._result_layers.get("compartments")
        if comp is not None and comp in self.viewer.layers:
            self.viewer.layers.remove(comp)
        if shapes:
            layer = self.viewer.add_shapes(
                shapes,
                shape_type="path",
                edge_color=colours,
                face_color="transparent",
                edge_width=max(2.0, 3.0 / mpp),
                features={"compartment": names},
                name="compartments",
                scale=scale,
                units=("um", "um"),
                metadata={RESULT_KEY: "compartments"},
            )
            layer.editable = False
            self._result_layers["compartments"] = layer
            # below the cells: clicks in the canvas reach the cells layer
            cells = self._result_layers.get("cells")
            if cells is not None and cells in self.viewer.layers:
                self.viewer.layers.move(
                    self.viewer.layers.index(layer), self.viewer.layers.index(cells)
                )

    def _update_heatmap(self, meta: dict[str, Any]) -> None:
        result = self.session.result
        bin_um = float(self.session.effective_config()["output"]["heatmap_cell_um"])
        image, scale, translate = model.density_heatmap(
            result.cells, meta["dimensions"], float(result.mpp), bin_um
        )
        layer = self._result_layers.get("heatmap")
        if layer is not None and layer in self.viewer.layers:
            layer.data = image
            layer.contrast_limits = (0.0, max(float(image.max()), 1.0))
            return
        self._result_layers["heatmap"] = self.viewer.add_image(
            image,
            name=f"{result.marker}+ cells per mm²",
            colormap="inferno",
            opacity=0.45,
            blending="additive",
            contrast_limits=(0.0, max(float(image.max()), 1.0)),
            scale=scale,
            translate=translate,
            units=("um", "um"),
            visible=False,
            metadata={RESULT_KEY: "heatmap"},
        )

    def _fill_table(self) -> None:
        rows = model.table_rows(self.session.result.summary)
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, text in enumerate(row):
                item = QTableWidgetItem(text)
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if j:
                    item.setTextAlignment(_RIGHT)
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()
        width = self.table.horizontalHeader().length() + 2 * self.table.frameWidth() + 4
        self.table.setMinimumWidth(width)  # every column in view: the dock widens

    def table_values(self) -> list[list[str]]:
        """The table's text, row by row (what the dock shows)."""
        return [
            [self.table.item(i, j).text() for j in range(self.table.columnCount())]
            for i in range(self.table.rowCount())
        ]

    def _threshold_moved(self, value: float) -> None:
        self._threshold_timer.start()

    def _apply_slider_threshold(self) -> None:
        self.set_threshold(self.threshold_slider.value())

    @_notify_errors
    def set_threshold(self, threshold_od: float) -> None:
        """Re-classify the cells at a new DAB OD threshold: colours, table and heatmap follow."""
        if self.session is None or self.session.result is None:
            return
        if self.worker is not None and self.session.review is not None:
            raise RuntimeError("scoring is running; the threshold is applied when it ends")
        result = self.session.reclassify(threshold_od)
        if abs(self.threshold_slider.value() - threshold_od) > 1e-9:
            self.threshold_slider.blockSignals(True)
            self.threshold_slider.setValue(threshold_od)
            self.threshold_slider.blockSignals(False)
        if self.session.review is not None:
            self.review_box.refresh(full=False)
            return
        layer = self._result_layers.get("cells")
        if layer is not None and layer in self.viewer.layers:
            _, features, face = model.cell_points(result.cells)
            layer.features = features
            if len(face):
                layer.border_color = face
                layer.face_color = model.translucent(face)
        self._update_heatmap(self._slide_meta())
        self._fill_table()

    @_notify_errors
    def export(self, folder: str | Path) -> dict[str, Path] | None:
        """Write the current result (``SlideResult.save``) into ``folder``."""
        from napari.utils.notifications import show_info

        if self.session is None or self.session.result is None:
            raise RuntimeError("score a slide first")
        files = self.session.export(folder)
        show_info(f"tilscore: {len(files)} files written to {folder}")
        return files

    def open_result(self, folder: str | Path) -> Any:
        """Open a result folder with its review (see :meth:`._review.ReviewBox.open_result`)."""
        return self.review_box.open_result(folder)

    def _export_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export results to")
        if folder:
            self.export(folder)
