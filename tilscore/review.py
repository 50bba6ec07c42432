"""Reviewing a result: corrected cells and regions, recounted at once, with an audit trail.

A :class:`Review` holds a scored :class:`~tilscore.score.SlideResult` (the *base*: the detector's
cells at the current marker rule) and the edits a person made to it:

==================  ==========================================================================
add_cell            a cell the detector missed (position, positive or negative, class)
delete              false detections
set_positive        flip positive / negative (a manual call, kept by ``reclassify``)
set_class           tumour / immune / other (positivity follows the marker rule again)
move                a cell's centre moved
edit_regions        the tumour / stroma / exclude / ... polygons replaced; compartments rebuilt
undo, redo          the last edit taken back / put back (recorded as edits of their own)
==================  ==========================================================================

No edit detects anything again: the cells' compartments, positivity and the per-compartment
summary (:func:`tilscore.score.summarise`) are recomputed from the table. Every edit is an
:class:`EditRecord` (time, user, action, cell ids or regions, values before and after); beside a
result folder they are appended to ``review.jsonl`` as they are made (one JSON object a line,
never rewritten), so a crash loses nothing. :func:`tilscore.results.load_result` replays the log
onto the folder's cells and returns the reviewed result.

Cell ids: the row of the cell in the scored table (``cells.parquet``), 0 .. n-1; added cells get
n, n+1, ... in the order they were added.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import TilscoreError, TilscoreWarning
from .review_log import (
    ACTIONS,
    CELL_ACTIONS,
    QUOTED,
    REVIEW_FILE,
    SCHEMA,
    AuditTrailFile,
    EditRecord,
    ReviewError,
    _now,
    cells_fingerprint,
    default_user,
    read_review_log,
)

if TYPE_CHECKING:  # pragma: no cover
    from .regions import RegionSet
    from .score import SlideResult

__all__ = [
    "ACTIONS",
    "REVIEW_FILE",
    "EditRecord",
    "Review",
    "ReviewError",
    "apply_manual_calls",
    "cells_fingerprint",
    "default_user",
    "read_review_log",
]


def apply_manual_calls(cells: pd.DataFrame, rule: Any, keep: bool = True) -> pd.DataFrame:
    """Cells with their manual positive / negative calls (``manual_positive``) over the rule's.

    A manual positive keeps its intensity bin from its DAB OD under ``rule.bins_od`` (at least
    1+; 1+ for an added cell, which has no measurement); a manual negative is bin 0. ``keep``
    False drops the manual calls (the rule decides every cell).
    """
    if "manual_positive" not in cells.columns:
        return cells
    out = cells.copy()
    if not keep:
        out["manual_positive"] = pd.array([pd.NA] * len(out), dtype="boolean")
        return out
    manual = out["manual_positive"].astype("boolean")
    has = manual.notna().to_numpy()
    if not has.any():
        return out
    call = manual.fillna(False).to_numpy(bool)
    pos = out["positive"].to_numpy(bool).copy()
    bins = out["intensity_bin"].to_numpy(np.int64).copy()
    col = getattr(rule, "column", None)
    od = out[col].to_numpy(np.float64) if col in out.columns else np.full(len(out), np.nan)
    od_bins = np.clip(np.digitize(np.nan_to_num(od, nan=-np.inf), rule.bins_od), 1, 3)
    up = has & call & ~pos  # called positive by hand
    bins[up] = np.where(np.isfinite(od[up]), od_bins[up], 1)
    bins[has & ~call] = 0
    pos[has] = call[has]
    out["positive"] = pos
    out["intensity_bin"] = bins.astype(np.int8)
    return out


# -- the review ---------------------------------------------------------------------------------


class Review(AuditTrailFile):
    """The reviewed state of one result: edits, undo / redo, recomputed summary, audit trail.

    Parameters
    ----------
    result
        The scored :class:`~tilscore.score.SlideResult` (not itself reviewed).
    user
        Name recorded with each edit (default: :func:`default_user`); settable at any time.
    folder
        A result folder to append each edit to (``folder/review.jsonl``) as it is made; see
        :meth:`attach`.
    """

    def __init__(self, result: SlideResult, user: str | None = None, folder: Any = None) -> None:
        from .markers import MarkerRule

        if result.provenance.get("review"):
            raise ReviewError(
                "this result is already reviewed",
                hint="Review the result folder (tilscore.results.load_review(DIR)) instead",
            )
        self.base = result
        self.user = user or default_user()
        self.rule = MarkerRule.from_dict(result.provenance["detection"]["marker"])
        cells = result.cells.reset_index(drop=True).copy()
        n = len(cells)
        cells["cell_id"] = np.arange(n, dtype=np.int64)
        cells["added"] = np.zeros(n, bool)
        cells["manual_positive"] = pd.array([pd.NA] * n, dtype="boolean")
        self._table = cells  # every cell ever: deleted ones stay (undo), flagged
        self._deleted = np.zeros(n, bool)
        self._next_id = n
        self.n_scored = n
        self.fingerprint = cells_fingerprint(cells)
        self.regions = result.regions
        self.compartments = result.compartments
        self.scored_area = getattr(result, "scored_area", None)
        self.records: list[EditRecord] = []
        self._undo: list[int] = []
        self._redo: list[int] = []
        self._summary: pd.DataFrame | None = None
        self.folder: Path | None = None
        self._written = 0  # records already in folder/review.jsonl
        if folder is not None:
            self.attach(folder)

    # -- state ------------------------------------------------------------------------------
    @property
    def cells(self) -> pd.DataFrame:
        """The reviewed cells (deleted ones left out), with ``cell_id``, ``added`` and
        ``manual_positive`` beside the measurements."""
        return self._table[~self._deleted].reset_index(drop=True)

    @property
    def summary(self) -> pd.DataFrame:
        """The per-compartment summary of the reviewed cells and compartments."""
        from .score import summarise

        if self._summary is None:
            self._summary = summarise(
                self.cells,
                self.compartments,
                self.base.mpp,
                slide_id=self.base.slide_id,
                marker=self.base.marker,
            )
        return self._summary

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def ids_alive(self) -> np.ndarray:
        return self._table["cell_id"].to_numpy()[~self._deleted]

    def _rows(self, ids: Iterable[int]) -> np.ndarray:
        """Row numbers in the table of existing (not deleted) cell ids; ReviewError otherwise."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size == 0:
            raise ReviewError("no cell selected", hint="Select one or more cells first")
        if len(np.unique(ids)) != len(ids):
            raise ReviewError("a cell id is given twice")
        all_ids = self._table["cell_id"].to_numpy()
        rows = np.searchsorted(all_ids, ids)  # ids are increasing along the table
        ok = (rows < len(all_ids)) & (all_ids[np.minimum(rows, len(all_ids) - 1)] == ids)
        if not ok.all():
            raise ReviewError(f"no cell with id {ids[~ok].tolist()[:5]}")
        if self._deleted[rows].any():
            raise ReviewError(f"cell {ids[self._deleted[rows]].tolist()[:5]} is deleted")
        return rows

    def _cell_values(self, row: int) -> dict[str, Any]:
        t = self._table
        manual = t["manual_positive"].iloc[row]
        return {
            "x": float(t["x"].iat[row]),
            "y": float(t["y"].iat[row]),
            "positive": bool(t["positive"].iat[row]),
            "cell_class": str(t["cell_class"].iat[row]),
            "manual": None if pd.isna(manual) else bool(manual),
        }

    # -- edits ------------------------------------------------------------------------------
    def add_cell(self, x: float, y: float, positive: bool, cell_class: str = "immune") -> int:
        """Add a cell at level-0 px ``(x, y)``; returns its id.

        Raises
        ------
        ReviewError
            Outside the slide, outside the scored tissue or in an excluded region (it would
            not be counted), or an unknown class.
        """
        from .markers import CELL_CLASSES

        x, y = float(x), float(y)
        w, h = self.base.dimensions
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < w and 0 <= y < h):
            raise ReviewError(
                f"({x:.0f}, {y:.0f}) px is outside the slide ({w} x {h} px)",
                hint="Add cells on the slide",
            )
        if cell_class not in CELL_CLASSES:
            raise ReviewError(f"unknown cell class {cell_class!r}", hint=f"one of {CELL_CLASSES}")
        label, _ = self.compartments.assign([x], [y])
        if label[0] == "excluded":
            raise ReviewError(
                f"({x:.0f}, {y:.0f}) px lies in an excluded region; a cell there is not counted",
                hint="Add it elsewhere, or edit the exclude region first",
            )
        if label[0] == "outside":
            raise ReviewError(
                f"({x:.0f}, {y:.0f}) px lies outside the scored tissue; a cell there is not "
                "counted",
                hint="Add cells inside the scored area (the 'tissue' compartment)",
            )
        value = {
            "x": x,
            "y": y,
            "positive": bool(positive),
            "cell_class": cell_class,
            "manual": bool(positive),
        }
        cid = self._next_id
        self._record("add_cell", (cid,), [None], [value])
        return cid

    def delete(self, ids: Sequence[int]) -> None:
        """Delete cells (false detections)."""
        rows = self._rows(ids)
        before = [self._cell_values(r) for r in rows]
        self._record("delete", tuple(int(i) for i in ids), before, [None] * len(rows))

    def set_positive(self, ids: Sequence[int], positive: bool | None = None) -> None:
        """Call cells positive / negative by hand (None: flip each one)."""
        rows = self._rows(ids)
        before = [self._cell_values(r) for r in rows]
        after = []
        for b in before:
            value = (not b["positive"]) if positive is None else bool(positive)
            after.append({"positive": value, "manual": value})
        self._record(
            "set_positive",
            tuple(int(i) for i in ids),
            [{"positive": b["positive"], "manual": b["manual"]} for b in before],
            after,
        )

    def set_class(self, ids: Sequence[int], cell_class: str) -> None:
        """Change cells' class (tumour / immune / other)."""
        from .markers import CELL_CLASSES

        if cell_class not in CELL_CLASSES:
            raise ReviewError(f"unknown cell class {cell_class!r}", hint=f"one of {CELL_CLASSES}")
        rows = self._rows(ids)
        before = [{"cell_class": self._cell_values(r)["cell_class"]} for r in rows]
        after = [{"cell_class": cell_class} for _ in rows]
        self._record("set_class", tuple(int(i) for i in ids), before, after)

    def move(self, ids: Sequence[int], xy: np.ndarray) -> None:
        """Move cells' centres to ``xy`` ((N, 2) level-0 px, x then y)."""
        rows = self._rows(ids)
        xy = np.asarray(xy, float).reshape(-1, 2)
        if len(xy) != len(rows):
            raise ReviewError(f"{len(rows)} cells but {len(xy)} positions")
        w, h = self.base.dimensions
        if not (
            np.isfinite(xy).all()
            and (xy >= 0).all()
            and (xy[:, 0] < w).all()
            and (xy[:, 1] < h).all()
        ):
            raise ReviewError("a cell was moved outside the slide", hint="Move it onto the slide")
        before = [{"x": self._cell_values(r)["x"], "y": self._cell_values(r)["y"]} for r in rows]
        after = [{"x": float(a), "y": float(b)} for a, b in xy]
        self._record("move", tuple(int(i) for i in ids), before, after)

    def set_regions(self, regions: RegionSet) -> None:
        """Replace the regions (tumour / stroma / exclude ...) and rebuild the compartments."""
        from .regions import RegionSet

        if not isinstance(regions, RegionSet):
            raise ReviewError(f"regions must be a RegionSet, got {type(regions).__name__}")
        before = self.regions.to_geojson()
        after = regions.to_geojson()
        if before == after:
            return
        self._record("edit_regions", (), before, after)

    def note_reclassify(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """Record a change of the marker rule (e.g. the threshold) made by :meth:`reclassify`."""
        self._append(
            EditRecord(len(self.records) + 1, _now(), self.user, "reclassify", (), before, after)
        )

    def reclassify(self, keep_manual: bool = True, **overrides: Any) -> None:
        """Apply a new marker rule (``threshold_od=...``) to every cell; manual calls are kept
        unless ``keep_manual`` is False (then they are dropped: a recorded edit)."""
        new_rule = self.rule.with_overrides(**overrides)
        if not keep_manual:
            manual = self._table["manual_positive"].notna().to_numpy() & ~self._deleted
            if manual.any():
                ids = self._table["cell_id"].to_numpy()[manual]
                rows = np.flatnonzero(manual)
                before = [
                    {
                        "positive": self._cell_values(r)["positive"],
                        "manual": self._cell_values(r)["manual"],
                    }
                    for r in rows
                ]
                after = [{"manual": None} for _ in rows]
                self._record("set_positive", tuple(int(i) for i in ids), before, after)
        old = {k: v for k, v in self.rule.to_dict().items() if k in overrides}
        self.rule = new_rule
        self._derive(np.ones(len(self._table), bool), where=False)
        self._summary = None
        self.note_reclassify(old, {k: new_rule.to_dict()[k] for k in overrides})

    def undo(self) -> EditRecord | None:
        """Take back the last edit (recorded as an "undo" edit); None when nothing to undo."""
        return self._again("undo", self._undo)

    def redo(self) -> EditRecord | None:
        """Put back the last edit taken back; None when nothing to redo."""
        return self._again("redo", self._redo)

    def _again(self, action: str, stack: list[int]) -> EditRecord | None:
        """Record ``action`` for the edit on top of ``stack``: its values swapped for an undo,
        as they were for a redo."""
        if not stack:
            return None
        ref = stack[-1]
        orig = self.records[ref - 1]
        before, after = (orig.after, orig.before) if action == "undo" else (orig.before, orig.after)
        return self._append(
            EditRecord(
                len(self.records) + 1, _now(), self.user, action, orig.ids, before, after, ref
            )
        )

    def _record(self, action: str, ids: tuple[int, ...], before: Any, after: Any) -> EditRecord:
        return self._append(
            EditRecord(len(self.records) + 1, _now(), self.user, action, ids, before, after)
        )

    def _append(self, rec: EditRecord, replay: bool = False) -> EditRecord:
        """Apply a record, keep it and write it to the folder's log (when attached)."""
        self._apply(rec, check=replay)
        self.records.append(rec)
        if rec.action == "undo":
            self._redo.append(self._undo.pop())
        elif rec.action == "redo":
            self._undo.append(self._redo.pop())
        elif rec.action != "reclassify":
            self._undo.append(rec.seq)
            self._redo.clear()
        if self.folder is not None and not replay:
            self._flush()
        return rec

    # -- applying -----------------------------------------------------------------------------
    def _apply(self, rec: EditRecord, check: bool) -> None:
        """Set the record's ``after`` values (checking ``before`` against the state on replay)."""
        action = rec.action
        if action in ("undo", "redo"):
            if rec.ref is None or not (1 <= rec.ref < rec.seq):
                raise ReviewError(f"{action} of edit {rec.ref}, which is not an earlier edit")
            stack = self._undo if action == "undo" else self._redo
            if check and (not stack or stack[-1] != rec.ref):
                raise ReviewError(f"{action} of edit {rec.ref} is not the last edit to {action}")
            action = self.records[rec.ref - 1].action
        if action == "reclassify":
            return  # the rule is run.json's; the record is the audit of the change
        if action == "edit_regions":
            self._set_regions_geojson(rec.after)
            return
        self._set_cells(rec.ids, rec.before, rec.after, check)

    def _set_regions_geojson(self, after: Any) -> None:
        from .regions import RegionSet, build_compartments

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TilscoreWarning)
                regions = (
                    RegionSet.from_geojson(after)
                    if after and after.get("features")
                    else RegionSet([], "reviewed")
                )
        except TilscoreError as exc:
            raise ReviewError(f"regions of an edit: {exc.reason}") from None
        regions = RegionSet(regions.regions, "reviewed")
        margin = float(self.base.provenance.get("regions", {}).get("margin_width_um", 500.0))
        comps = build_compartments(regions, self._area(), self.base.mpp, margin)
        comps.sources = {k: "reviewed" for k in comps.sources}
        self.regions, self.compartments = regions, comps
        self._derive(np.ones(len(self._table), bool), where=True)
        self._summary = None

    def _area(self) -> Any:
        """The scored area before exclusions (level-0 px)."""
        import shapely

        if self.scored_area is not None:
            return self.scored_area
        base = self.base.compartments
        # older results: the scored tissue with the excluded parts put back
        return shapely.union_all([base.geometries["tissue"], base.excluded])

    def _set_cells(
        self, ids: Sequence[int], before: list[Any], after: list[Any], check: bool
    ) -> None:
        from .markers import CELL_CLASSES

        t = self._table
        where_rows: list[int] = []
        class_rows: list[int] = []
        for cid, b, a in zip(ids, before, after):
            if b is None:  # a cell comes (back): added, or a deletion undone
                if not isinstance(a, dict) or not {"x", "y", "positive", "cell_class"} <= set(a):
                    raise ReviewError(f"cell {cid} comes back without x, y, positive, cell_class")
                if str(a["cell_class"]) not in CELL_CLASSES:
                    raise ReviewError(f"cell {cid} has unknown class {a['cell_class']!r}")
                all_ids = t["cell_id"].to_numpy()
                hit = np.flatnonzero(all_ids == cid)
                if hit.size == 0:
                    if cid < self.n_scored or (check and cid != self._next_id):
                        raise ReviewError(f"added cell id {cid}, expected {self._next_id}")
                    t = self._append_row(cid, a)
                    self._next_id = max(self._next_id, cid + 1)
                    row = len(t) - 1
                    where_rows.append(row)
                    class_rows.append(row)
                    continue
                row = int(hit[0])
                if check and not self._deleted[row]:
                    raise ReviewError(f"cell {cid} comes back, but it is not deleted")
                self._deleted[row] = False
                b = {}
            else:
                row = int(self._rows([cid])[0])
            if check:
                cur = self._cell_values(row)
                for k, v in b.items():
                    if k not in cur:
                        raise ReviewError(f"cell {cid}: unknown field {k!r}")
                    same = np.isclose(cur[k], v) if k in ("x", "y") else cur[k] == v
                    if not same:
                        raise ReviewError(
                            f"cell {cid}: {k} is {cur[k]!r}, the edit says it was {v!r}"
                        )
            if a is None:
                self._deleted[row] = True
                continue
            for k, v in a.items():
                if k in ("x", "y"):
                    t.loc[row, k] = float(v)
                    where_rows.append(row)
                elif k == "cell_class":
                    if str(v) not in CELL_CLASSES:
                        raise ReviewError(f"cell {cid}: unknown class {v!r}")
                    t.loc[row, "cell_class"] = str(v)
                    class_rows.append(row)
                elif k == "manual":
                    t.loc[row, "manual_positive"] = pd.NA if v is None else bool(v)
                    class_rows.append(row)
                elif k != "positive":
                    raise ReviewError(f"cell {cid}: unknown field {k!r}")
        self._table = t
        for rows, where in ((where_rows, True), (class_rows, False)):
            if rows:
                mask = np.zeros(len(t), bool)
                mask[rows] = True
                self._derive(mask, where=where)
        self._summary = None

    def _append_row(self, cid: int, a: dict[str, Any]) -> pd.DataFrame:
        t = self._table
        row: dict[str, Any] = {c: np.nan for c in t.columns}
        w_um = float(self.base.mpp)
        row.update(
            x=float(a["x"]),
            y=float(a["y"]),
            x_um=float(a["x"]) * w_um,
            y_um=float(a["y"]) * w_um,
            confidence=1.0,
            cell_class=str(a["cell_class"]),
            positive=bool(a["positive"]),
            intensity_bin=1 if a["positive"] else 0,
            cell_id=cid,
            added=True,
            in_margin=False,
            compartment="outside",
        )
        new = pd.DataFrame([row])
        for c in t.columns:  # keep the table's dtypes (categorical compartment, ...)
            with contextlib.suppress(TypeError, ValueError):
                new[c] = new[c].astype(t[c].dtype)
        new["manual_positive"] = pd.array([bool(a.get("manual", a["positive"]))], dtype="boolean")
        self._table = pd.concat([t, new], ignore_index=True)
        self._deleted = np.append(self._deleted, False)
        return self._table

    def _derive(self, rows: np.ndarray, where: bool) -> None:
        """Recompute compartment (``where``) or positivity and bins of the given rows."""
        from .markers import classify_cells

        t = self._table
        idx = np.flatnonzero(rows)
        if idx.size == 0:
            return
        if where:
            label, margin = self.compartments.assign(t["x"].to_numpy()[idx], t["y"].to_numpy()[idx])
            comp = t["compartment"]
            if isinstance(comp.dtype, pd.CategoricalDtype):
                new = sorted(set(label) - set(comp.cat.categories))
                if new:
                    t["compartment"] = comp.cat.add_categories(new)
            t.loc[idx, "compartment"] = label
            t.loc[idx, "in_margin"] = margin
            return
        sub = t.iloc[idx]
        if self.rule.column in sub.columns:
            sub = classify_cells(sub, self.rule)
        sub = apply_manual_calls(sub, self.rule)
        t.loc[idx, "positive"] = sub["positive"].to_numpy(bool)
        t.loc[idx, "intensity_bin"] = sub["intensity_bin"].to_numpy(np.int8)

    # -- counts and results ---------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Net effect of the review: cells added, removed, flipped, re-classed, moved; region and
        total edits."""
        t = self._table
        scored = ~t["added"].to_numpy(bool)
        alive = ~self._deleted
        n0 = self.n_scored
        base = self.base.cells.reset_index(drop=True)
        old_pos = np.zeros(len(t), bool)
        old_pos[:n0] = self._base_positive()
        old_cls = np.full(len(t), "", dtype=object)
        old_cls[:n0] = base["cell_class"].astype(str).to_numpy()
        old_xy = np.zeros((len(t), 2))
        old_xy[:n0, 0] = base["x"].to_numpy(float)
        old_xy[:n0, 1] = base["y"].to_numpy(float)
        keep = scored & alive
        xy = np.stack([t["x"].to_numpy(float), t["y"].to_numpy(float)], axis=1)
        region_edits = 0
        undone = {r.ref for r in self.records if r.action == "undo"}
        redone = {r.ref for r in self.records if r.action == "redo"}
        for r in self.records:
            if r.action == "edit_regions":
                region_edits += 1
        return {
            "added": int((~scored & alive).sum()),
            "removed": int((scored & ~alive).sum()),
            "flipped": int((keep & (t["positive"].to_numpy(bool) != old_pos)).sum()),
            "class_changed": int(
                (keep & (t["cell_class"].astype(str).to_numpy() != old_cls)).sum()
            ),
            "moved": int((keep & ~np.all(np.isclose(xy, old_xy), axis=1)).sum()),
            "region_edits": int(region_edits),
            "edits": len(self.records),
            "undone": len(undone - redone),
        }

    def edited_ids(self) -> set[int]:
        """Ids of the cells any cell edit touched (undone ones included)."""
        return {i for r in self.records if r.action in CELL_ACTIONS for i in r.ids}

    def edited_box(self) -> list[float] | None:
        """Level-0 box ``[x, y, width, height]`` around every edited cell (None: no cell edit)."""
        from .results import edited_box

        return edited_box(self)

    def _base_positive(self) -> np.ndarray:
        """Positivity of the scored cells under the current rule, without manual calls."""
        from .markers import classify_cells

        base = self.base.cells.reset_index(drop=True)
        if self.rule.column not in base.columns:
            return base["positive"].to_numpy(bool)
        return classify_cells(base, self.rule)["positive"].to_numpy(bool)

    def summary_before(self) -> pd.DataFrame:
        """The summary of the scored cells under the current rule (no edit)."""
        from .markers import classify_cells
        from .score import summarise

        base = self.base.cells
        if self.rule.column in base.columns:
            base = classify_cells(base, self.rule)
        return summarise(
            base,
            self.base.compartments,
            self.base.mpp,
            slide_id=self.base.slide_id,
            marker=self.base.marker,
        )

    def provenance(self) -> dict[str, Any]:
        """The ``review`` block of run.json: counts, users, times, the score before and after."""

        def quote(summary: pd.DataFrame) -> dict[str, dict[str, Any]]:
            from .evaluate import to_jsonable

            return {
                str(r["compartment"]): to_jsonable({k: r[k] for k in QUOTED})
                for r in summary.to_dict("records")
            }

        return {
            "schema": SCHEMA,
            "log": REVIEW_FILE,
            "counts": self.counts(),
            "users": sorted({r.user for r in self.records}),
            "first_edit": self.records[0].time if self.records else None,
            "last_edit": self.records[-1].time if self.records else None,
            "summary_before": quote(self.summary_before()),
            "summary_after": quote(self.summary),
        }

    def result(self) -> SlideResult:
        """The reviewed :class:`~tilscore.score.SlideResult` (``provenance["review"]`` set)."""
        prov = json.loads(json.dumps(self.base.provenance, default=str))
        prov["detection"]["marker"] = self.rule.to_dict()
        prov["review"] = self.provenance()
        if self.regions is not self.base.regions:
            prov.setdefault("regions", {})["source"] = "reviewed"
            prov["regions"]["compartment_sources"] = dict(self.compartments.sources)
        return replace(
            self.base,
            cells=self.cells,
            summary=self.summary,
            regions=self.regions,
            compartments=self.compartments,
            provenance=prov,
        )

    def base_result(self) -> SlideResult:
        """The scored result under the current rule, without the edits (what cells.parquet
        and summary.csv hold)."""
        if self.rule.to_dict() == self.base.provenance["detection"]["marker"]:
            return self.base
        return self.base.reclassify(
            **{
                k: v
                for k, v in self.rule.to_dict().items()
                if v != self.base.provenance["detection"]["marker"].get(k)
                and k not in ("name", "description")
            }
        )

    def replay(self, records: Sequence[EditRecord], path: str | os.PathLike = "") -> None:
        """Apply records read from a log (each checked against the state it applies to)."""
        for i, rec in enumerate(records):
            if rec.seq != len(self.records) + 1:
                raise ReviewError(
                    f"record {i + 1} has seq {rec.seq}, expected {len(self.records) + 1}",
                    path=path or None,
                    hint="The file was edited by hand; restore it from a backup",
                )
            try:
                self._append(rec, replay=True)
            except ReviewError as exc:
                raise ReviewError(
                    f"edit {rec.seq} ({rec.action}) does not apply: {exc.reason}",
                    path=path or None,
                    hint="The file was edited by hand or belongs to another result; restore "
                    "it, or move it away to start the review again",
                ) from None

    def save(self, folder: str | os.PathLike, config: Any = None) -> dict[str, Path]:
        """Write the scored outputs, the audit trail and the reviewed outputs into ``folder``.

        ``summary.csv``, ``cells.parquet`` ... are the scored result (at the current rule);
        ``review.jsonl`` the edits; ``summary_reviewed.csv``, ``cells_reviewed.parquet``
        (and ``regions_reviewed.geojson`` after region edits) the reviewed state; run.json and
        report.html say what the review changed (counts, score before and after).
        """
        from .results import save_review

        return save_review(self, folder, config)
