"""The widget's "Review" box: correct cells and regions, recount at once, keep an audit trail.

Edits go through napari's own tools on the cells' Points layer: in *add* mode (P) a click adds a
cell (positive or negative, of the class chosen in the box); in *select* mode (S) click or drag a
box to select cells, then Delete removes them, **F** flips them, **Shift-T / Shift-I / Shift-O**
make them tumour / immune / other; dragging selected cells moves them; **Ctrl-Z / Ctrl-Shift-Z**
(or the buttons) undo / redo. Drawing, moving or deleting polygons in the region Shapes layers
(tumour, stroma, exclude, ...) rebuilds the compartments. After each edit the colours, symbols
(diamonds: cells touched by the review), heatmap and table follow from
:class:`tilscore.review.Review`, without detecting again.

Every edit is recorded (time, user, action, cells or regions, before and after). Once the result
is exported (or when it was opened from a result folder) each edit is appended to the folder's
``review.jsonl`` as it is made.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
)

from . import model
from ._widget import _notify_errors, _show_exception

if TYPE_CHECKING:  # pragma: no cover
    from ._widget import TilscoreWidget

logger = logging.getLogger(__name__)
_EDIT_ACTIONS = ("added", "removed", "changed")


class ReviewBox(QGroupBox):
    """The review controls of a :class:`~napari_tilscore._widget.TilscoreWidget`."""

    def __init__(self, owner: TilscoreWidget) -> None:
        super().__init__("Review (edits are recorded in review.jsonl)")
        from tilscore.review import default_user

        self.owner = owner
        self._syncing = False  # True while the plugin itself sets layer data
        self._cells_layer: Any = None
        self._region_layers: list[Any] = []
        self._watching_inserts = False
        self._ft_worker: Any = None
        form = QFormLayout(self)
        self.user_edit = QLineEdit(default_user())
        self.user_edit.setToolTip("Name recorded with each edit (from the OS; change it here)")
        self.user_edit.textChanged.connect(self._user_changed)
        form.addRow("user", self.user_edit)
        self.new_positive = QComboBox()
        self.new_positive.addItems(["positive", "negative"])
        self.new_class = QComboBox()
        self.new_class.addItems(list(model.NEW_CELL_CLASSES))
        row = QHBoxLayout()
        row.addWidget(self.new_positive)
        row.addWidget(self.new_class)
        form.addRow("new cells", row)
        row = QHBoxLayout()
        buttons = {}
        for text, tip, slot in (
            ("Positive", "selected cells positive", lambda: self.set_positive(True)),
            ("Negative", "selected cells negative", lambda: self.set_positive(False)),
            ("Flip (F)", "flip the selected cells", lambda: self.set_positive(None)),
            ("Delete", "delete the selected cells", self.delete_selected),
        ):
            b = QPushButton(text)
            b.setToolTip(tip)
            b.clicked.connect(slot)
            row.addWidget(b)
            buttons[text] = b
        form.addRow("selected", row)
        row = QHBoxLayout()
        self.class_combo = QComboBox()
        self.class_combo.addItems(list(model.NEW_CELL_CLASSES))
        class_btn = QPushButton("Set class")
        class_btn.clicked.connect(lambda: self.set_class(self.class_combo.currentText()))
        self.undo_btn = QPushButton("Undo")
        self.undo_btn.clicked.connect(self.undo)
        self.redo_btn = QPushButton("Redo")
        self.redo_btn.clicked.connect(self.redo)
        for b in (self.class_combo, class_btn, self.undo_btn, self.redo_btn):
            row.addWidget(b)
        form.addRow("class", row)
        row = QHBoxLayout()
        open_btn = QPushButton("Open result folder…")
        open_btn.setToolTip("A folder written by tilscore score or Export…: cells and review")
        open_btn.clicked.connect(self._open_dialog)
        labels_btn = QPushButton("Export labels…")
        labels_btn.setToolTip(
            "The corrected cells as fine-tuning labels (CSV x, y, positive, "
            "cell_class in level-0 px, labels.json with the µm/px)"
        )
        labels_btn.clicked.connect(self._labels_dialog)
        self.finetune_btn = QPushButton("Fine-tune on my corrections")
        self.finetune_btn.clicked.connect(self._finetune_dialog)
        for b in (open_btn, labels_btn, self.finetune_btn):
            row.addWidget(b)
        form.addRow(row)
        self.counts_label = QLabel("no edits")
        self.counts_label.setWordWrap(True)
        form.addRow(self.counts_label)
        self._edit_widgets = [*buttons.values(), class_btn, self.undo_btn, self.redo_btn]
        self.setEnabled(False)

    # ------------------------------------------------------------------------------ state ---
    @property
    def review(self) -> Any:
        session = self.owner.session
        return None if session is None else session.review

    def _user_changed(self, text: str) -> None:
        if self.review is not None:
            self.review.user = text.strip() or "unknown"

    def start(self) -> None:
        """Begin (or go on with) the review of the shown result; called by ``show_result``."""
        session = self.owner.session
        review = session.start_review(self.user_edit.text().strip() or None)
        review.user = self.user_edit.text().strip() or review.user
        self._cells_layer = self.owner._result_layers.get("cells")
        layer = self._cells_layer
        if layer is not None:
            layer.events.data.connect(self._on_points_data)
            for key, func in (
                ("f", lambda _ly: self.set_positive(None)),
                ("Shift-T", lambda _ly: self.set_class("tumour")),
                ("Shift-I", lambda _ly: self.set_class("immune")),
                ("Shift-O", lambda _ly: self.set_class("other")),
                ("Control-Z", lambda _ly: self.undo()),
                ("Control-Shift-Z", lambda _ly: self.redo()),
            ):
                layer.bind_key(key, func, overwrite=True)
        self._fill_region_layers()
        layers = self.owner.viewer.layers
        if layer is not None and layer in layers:  # the cells over the region fills
            layers.move(layers.index(layer), len(layers))
            layers.selection.active = layer
        self.setEnabled(True)
        self.refresh(full=True)

    def _fill_region_layers(self) -> None:
        """The result's regions in the region Shapes layers (one per class), watched for edits."""
        for ly in self._region_layers:
            ly.events.data.disconnect(self._on_regions_data)
        self._region_layers = []
        from ._widget import DRAW_CLASSES

        review = self.review
        self._syncing = True
        try:
            shapes = review.regions.to_shapes()
            for cls in set(shapes) | set(self.owner.region_layers()) | set(DRAW_CLASSES):
                layer = self.owner._region_layer(cls)
                layer.data = []
                if shapes.get(cls):
                    layer.add(shapes[cls], shape_type="polygon")
                self._region_layers.append(layer)
        finally:
            self._syncing = False
        for ly in self._region_layers:
            ly.events.data.connect(self._on_regions_data)
        if not self._watching_inserts:
            self.owner.viewer.layers.events.inserted.connect(self._on_layer_inserted)
            self._watching_inserts = True

    def _on_layer_inserted(self, event: Any) -> None:
        """A region layer made later (a GeoJSON loaded, a class added) is watched too."""
        layer = event.value
        if self.review is None or layer in self._region_layers:
            return
        if layer in self.owner.region_layers().values():
            self._region_layers.append(layer)
            layer.events.data.connect(self._on_regions_data)
            if len(layer.data):
                self.apply_regions()

    def _busy(self) -> bool:
        """A scoring run is in flight: edits wait (a notification says so)."""
        from napari.utils.notifications import show_warning

        if self.owner.worker is not None:
            show_warning("tilscore: scoring is running; edits are not taken until it ends")
            return True
        return False

    # ------------------------------------------------------------------------- cell edits ---
    def selected_ids(self) -> list[int]:
        layer = self._cells_layer
        if layer is None or layer not in self.owner.viewer.layers:
            return []
        rows = sorted(layer.selected_data)
        return [int(v) for v in layer.features["cell_id"].to_numpy()[rows]]

    def _edit(self, func: Any, *args: Any) -> Any:
        if self.review is None or self._busy():
            return None
        try:
            return func(*args)
        finally:  # an edit applied but not written (disk full) is still shown
            self.refresh(full=False)

    @_notify_errors
    def set_positive(self, positive: bool | None) -> None:
        """Call the selected cells positive (True), negative (False) or flip them (None)."""
        self._edit(self.review.set_positive, self.selected_ids(), positive)

    @_notify_errors
    def set_class(self, cell_class: str) -> None:
        """Give the selected cells a class (tumour / immune / other)."""
        self._edit(self.review.set_class, self.selected_ids(), cell_class)

    @_notify_errors
    def delete_selected(self) -> None:
        """Delete the selected cells (as the layer's Delete key does)."""
        ids = self.selected_ids()
        if self.review is None or self._busy():
            return
        self.review.delete(ids)
        self.refresh(full=True)

    @_notify_errors
    def undo(self) -> None:
        if self.review is not None and not self._busy() and self.review.undo() is not None:
            self._after_structural()

    @_notify_errors
    def redo(self) -> None:
        if self.review is not None and not self._busy() and self.review.redo() is not None:
            self._after_structural()

    def _after_structural(self) -> None:
        rec = self.review.records[-1]
        ref = self.review.records[rec.ref - 1] if rec.ref else rec
        if ref.action == "edit_regions":
            self._fill_region_layers()
        self.refresh(full=True)

    def add_cell(self, x: float, y: float) -> int | None:
        """Add a cell at level-0 ``(x, y)`` with the box's positive / class choice."""
        return self._edit(
            self.review.add_cell,
            x,
            y,
            self.new_positive.currentText() == "positive",
            self.new_class.currentText(),
        )

    def _on_points_data(self, event: Any) -> None:
        """The user added, deleted or moved points with napari's tools: record it."""
        action = str(getattr(event, "action", ""))
        if (
            self._syncing
            or self.review is None
            or action.split(".")[-1].lower() not in (_EDIT_ACTIONS)
        ):
            return
        layer = self._cells_layer
        review = self.review
        try:
            if self._busy():
                return
            cells = review.cells
            deleted, added, (moved, moved_xy) = model.points_changes(
                cells["cell_id"].to_numpy(),
                cells[["x", "y"]].to_numpy(float),
                layer.features["cell_id"].to_numpy(),
                self._points_px(layer),
            )
            if deleted:
                review.delete(deleted)
            if moved:
                review.move(moved, moved_xy)
            for x, y in added:
                review.add_cell(
                    x,
                    y,
                    self.new_positive.currentText() == "positive",
                    self.new_class.currentText(),
                )
        except Exception as e:  # refused edits (outside the tissue, ...) are notifications
            _show_exception(e)
        finally:
            self.refresh(full=True)  # the layer shows the review's cells again

    def _on_regions_data(self, event: Any) -> None:
        action = str(getattr(event, "action", ""))
        if (
            self._syncing
            or self.review is None
            or action.split(".")[-1].lower() not in (_EDIT_ACTIONS)
        ):
            return
        self.apply_regions()

    @_notify_errors
    def apply_regions(self) -> None:
        """Use the region layers' polygons as the review's regions; compartments follow."""
        if self.review is None:
            return
        if self._busy():
            self._fill_region_layers()
            return
        layers = {cls: self.owner._layer_px(ly) for cls, ly in self.owner.region_layers().items()}
        self.review.set_regions(model.merge_region_edits(self.review.regions, layers))
        self.refresh(full=False)

    # ------------------------------------------------------------------------------ views ---
    def refresh(self, full: bool) -> None:
        """Draw the review's state: cells (all of them when ``full``), compartments, heatmap,
        table and the edit counts."""
        owner = self.owner
        session = owner.session
        if session is None or session.review is None:
            return
        active = owner.viewer.layers.selection.active
        session.sync_review()
        cells = model.review_cells(session.review)
        layer = self._cells_layer
        if layer is not None and layer in owner.viewer.layers:
            coords, features, face = model.cell_points(cells)
            self._syncing = True
            try:
                if full or len(layer.data) != len(coords):
                    layer.selected_data = set()
                    layer.data = coords
                layer.features = features
                if len(face):
                    layer.border_color = face
                    layer.face_color = model.translucent(face)
                    layer.symbol = model.cell_symbols(cells)
                defaults = features.iloc[:1].copy() if len(features) else None
                if defaults is not None:
                    defaults["cell_id"] = -1
                    defaults["edited"] = True
                    layer.feature_defaults = defaults
            finally:
                self._syncing = False
        owner._draw_compartments()
        owner._update_heatmap(owner._slide_meta())
        owner._fill_table()
        if active is not None and active in owner.viewer.layers:  # adding layers moved it
            owner.viewer.layers.selection.active = active
        review = session.review
        self.counts_label.setText(model.counts_text(review))
        self.undo_btn.setEnabled(review.can_undo)
        self.redo_btn.setEnabled(review.can_redo)

    # ----------------------------------------------------------------------------- folders ---
    @_notify_errors
    def open_result(self, folder: str | Path) -> Any:
        """Open a result folder (``tilscore score -o DIR`` or Export…) with its review: the
        slide (from run.json, unless it is open), cells, compartments, table and every edit of
        its review.jsonl; further edits are appended to it. Returns the review."""
        from napari.utils.notifications import show_info

        from tilscore.errors import SlideReadError, TilscoreError
        from tilscore.results import load_review

        from ._reader import META_KEY, read_slide

        if self.owner.worker is not None:
            raise RuntimeError("a run is in progress; cancel it first")
        unsaved = self.owner.session.unsaved_edits() if self.owner.session is not None else 0
        if unsaved:
            raise TilscoreError(
                f"the review has {unsaved} edits that are not saved; opening another result "
                "would replace them",
                hint="Export… the result first: its review.jsonl keeps every edit",
            )
        user = self.user_edit.text().strip() or None
        review = load_review(folder, user=user)
        path = review.base.path
        layer = None
        for ly in self.owner._slide_layers():
            p = ly.metadata[META_KEY].get("path")
            if path and p and Path(p).resolve() == Path(path).resolve():
                layer = ly
        if layer is None:
            if not path or not Path(path).is_file():
                raise SlideReadError(
                    "the slide of this result is not where its run.json says",
                    path=path or folder,
                    hint="Open the slide first (File > Open), then open the result folder",
                )
            data, kwargs, _ = read_slide(path, mpp=review.base.mpp)[0]
            layer = self.owner.viewer.add_image(data, **kwargs)
            self.owner.viewer.reset_view()
        self.owner.slide_combo.setCurrentText(layer.name)
        index = self.owner.marker_combo.findData(review.base.marker)
        if index >= 0:
            self.owner.marker_combo.setCurrentIndex(index)
        session = model.ScoringSession(
            source=layer.metadata[META_KEY].get("slide") or path, marker=review.base.marker
        )
        session.adopt_review(review)
        self.owner.session = session
        self.owner.show_result()
        self.owner.status_label.setText(f"{len(review.cells)} cells from {folder}")
        show_info(f"tilscore: {len(review.records)} review edits restored from {folder}")
        return review

    def _points_px(self, layer: Any) -> np.ndarray:
        """A Points layer's (y, x) in level-0 px of the slide (whatever the layer's scale)."""
        mpp = self.owner._slide_meta()["mpp"]
        data = np.asarray(layer.data, float).reshape(-1, layer.ndim)[:, -2:]
        scale = np.asarray(layer.scale[-2:], float)
        shift = np.asarray(layer.translate[-2:], float)
        return (data * scale + shift) / mpp

    def _open_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a tilscore result folder")
        if folder:
            self.owner.open_result(folder)

    @_notify_errors
    def export_labels(self, folder: str | Path) -> Any:
        """Write the review's corrected cells as fine-tuning labels into ``folder``."""
        from napari.utils.notifications import show_info

        from tilscore.results import export_labels

        if self.review is None:
            raise RuntimeError("score a slide or open a result folder first")
        manifest = export_labels([self.review], folder)
        show_info(f"tilscore: labels of {len(manifest['slides'])} slide(s) written to {folder}")
        return manifest

    def _labels_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Write the labels to")
        if folder:
            self.export_labels(folder)

    @_notify_errors
    def finetune(self, labels_dir: str | Path, model_dir: str | Path) -> Any:
        """Fine-tune the detector on this review's corrections in a background worker
        (progress in the dock, *Cancel* stops it); None with a notification where this
        tilscore has no fine-tuning (:func:`napari_tilscore.model.finetune_function`)."""
        from napari.qt.threading import create_worker

        from tilscore.errors import TilscoreError

        if self.review is None:
            raise RuntimeError("score a slide or open a result folder first")
        if model.finetune_function() is None:
            raise TilscoreError(
                "fine-tuning is not available in this version of tilscore",
                hint="Export labels… writes the corrections for `tilscore finetune` once it is "
                "installed",
            )
        if self._ft_worker is not None or self.owner.worker is not None:
            raise RuntimeError("a run is in progress; cancel it first")
        stop = threading.Event()
        worker = create_worker(
            model.finetune_corrections,
            [self.review],
            labels_dir,
            model_dir,
            stop=stop,
            _start_thread=False,
        )
        worker.yielded.connect(self.owner._on_progress_text)
        worker.returned.connect(lambda out: out is not None and self._use_model(out))
        worker.errored.connect(_show_exception)
        worker.finished.connect(self._ft_finished)
        self._ft_worker = worker
        self.owner.cancel_btn.setEnabled(True)
        self.owner._cancel_extra = lambda: (stop.set(), worker.quit())
        worker.start()
        return worker

    def _use_model(self, model_path: Any) -> None:
        """Offer the fine-tuned model: the next *Score* uses it (``[detect] model``)."""
        from napari.utils.notifications import show_info

        from tilscore.config import Config, load_config
        from tilscore.errors import TilscoreError

        values = load_config(self.owner.config).to_dict()
        values.setdefault("detect", {})["model"] = str(model_path)
        try:
            self.owner.config = Config.from_dict(values, source="fine-tuned model")
        except TilscoreError as e:  # this tilscore cannot load a model from a path
            show_info(f"tilscore: fine-tuned model written to {model_path} ({e.reason})")
            return
        self.owner.detector_combo.setCurrentText("cnn")
        self.owner.config_label.setText(f"fine-tuned: {Path(str(model_path)).name}")
        show_info(
            f"tilscore: fine-tuned model {model_path} is selected; Score again to rescore "
            "the slide with it"
        )

    def _ft_finished(self) -> None:
        self._ft_worker = None
        self.owner._cancel_extra = None
        self.owner.cancel_btn.setEnabled(self.owner.worker is not None)

    def _finetune_dialog(self) -> None:
        if model.finetune_function() is None:
            self.finetune("", "")  # the notification says it is not available
            return
        folder = QFileDialog.getExistingDirectory(self, "Write the fine-tuned model to")
        if folder:
            self.finetune(Path(folder) / "labels", Path(folder) / "model")
