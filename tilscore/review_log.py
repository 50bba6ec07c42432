"""The audit trail of a review: ``review.jsonl`` records, read back and checked.

One JSON object a line: a header (``"type": "review"``: format version, tilscore version, the
slide, and the identity of the scored cells: their number and a hash of their x, y), then one
:class:`EditRecord` per edit (``"type": "edit"``). The file is only ever appended to.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import TilscoreError, TilscoreWarning

__all__ = [
    "ACTIONS",
    "REVIEW_FILE",
    "AuditTrailFile",
    "EditRecord",
    "ReviewError",
    "cells_fingerprint",
    "default_user",
    "read_review_log",
]

#: The audit trail beside a result folder's files (append-only JSON lines).
REVIEW_FILE = "review.jsonl"
#: The reviewed per-compartment summary, cells and regions (rewritten at each save).
REVIEWED_SUMMARY = "summary_reviewed.csv"
REVIEWED_CELLS = "cells_reviewed.parquet"
REVIEWED_REGIONS = "regions_reviewed.geojson"
#: Version of the review.jsonl format; a newer one is refused with a clear message.
SCHEMA = 1
CELL_ACTIONS = ("add_cell", "delete", "set_positive", "set_class", "move")
ACTIONS = (*CELL_ACTIONS, "edit_regions", "reclassify", "undo", "redo")
#: Columns the review adds to the cells table.
REVIEW_COLUMNS = ("cell_id", "added", "manual_positive")
#: Summary columns quoted before / after review in run.json and the report.
QUOTED = ("n_cells", "n_positive", "density_per_mm2", "pct_positive")


class ReviewError(TilscoreError):
    """A review edit or a review.jsonl cannot be applied (named file, line and fix)."""


def default_user() -> str:
    """The OS user name (``getpass.getuser``), or "unknown" where the OS gives none."""
    try:
        return getpass.getuser() or "unknown"
    except Exception:  # no login name (containers without a passwd entry)
        return "unknown"


def cells_fingerprint(cells: pd.DataFrame) -> str:
    """SHA-256 of the cells' x and y (float64): the identity of a scored table whatever its
    positivity (a threshold change keeps it; a new detection changes it)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(cells["x"].to_numpy(np.float64)).tobytes())
    h.update(np.ascontiguousarray(cells["y"].to_numpy(np.float64)).tobytes())
    return h.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass(frozen=True)
class EditRecord:
    """One line of the audit trail.

    Attributes
    ----------
    seq
        1, 2, ... in the order the edits were made.
    time, user
        When (ISO 8601, local time with offset) and who.
    action
        One of :data:`ACTIONS`.
    ids
        The cell ids concerned (empty for region and rule records).
    before, after
        Per id, the cell's values before and after (None: the cell did not exist / was deleted);
        for ``edit_regions`` the regions as GeoJSON; for ``reclassify`` the marker rule values.
    ref
        For undo / redo: the ``seq`` of the edit taken back or put back.
    """

    seq: int
    time: str
    user: str
    action: str
    ids: tuple[int, ...] = ()
    before: Any = None
    after: Any = None
    ref: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "type": "edit",
            "seq": self.seq,
            "time": self.time,
            "user": self.user,
            "action": self.action,
            "ids": list(self.ids),
            "before": self.before,
            "after": self.after,
        }
        if self.ref is not None:
            out["ref"] = self.ref
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> EditRecord:
        """A record from its JSON form; :class:`ReviewError` naming ``where`` when malformed."""
        if not isinstance(data, dict) or data.get("type") != "edit":
            raise ReviewError(f"{where}not an edit record")
        try:
            seq = int(data["seq"])
            action = str(data["action"])
            ids = tuple(int(i) for i in data.get("ids") or ())
            user = str(data["user"])
            stamp = str(data["time"])
            ref = None if data.get("ref") is None else int(data["ref"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReviewError(f"{where}missing or malformed field ({exc})") from None
        if action not in ACTIONS:
            raise ReviewError(f"{where}unknown action {action!r}", hint=f"one of {ACTIONS}")
        before, after = data.get("before"), data.get("after")
        if action in CELL_ACTIONS:
            if not (isinstance(before, list) and isinstance(after, list)):
                raise ReviewError(f"{where}before/after must be lists, one value per cell id")
            if not (len(before) == len(after) == len(ids)):
                raise ReviewError(f"{where}{len(ids)} ids but {len(before)}/{len(after)} values")
        if action in ("undo", "redo") and ref is None:
            raise ReviewError(f"{where}{action} without 'ref'")
        return cls(seq, stamp, user, action, ids, before, after, ref)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON: {type(v).__name__}")


def _jsonable(v: Any) -> Any:
    from .evaluate import to_jsonable

    return to_jsonable(v)


def read_review_log(path: str | os.PathLike) -> tuple[dict[str, Any], list[EditRecord]]:
    """The header and edit records of a review.jsonl, checked line by line.

    A last line cut short (a crash while writing) is left out with a warning; any other bad
    line is an error naming the line.

    Raises
    ------
    ReviewError
        Unreadable file, not JSON, no header, a newer format, a malformed record.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReviewError(f"cannot read the review log: {exc}", path=path) from None
    lines = text.split("\n")
    complete = text.endswith("\n")
    if complete:
        lines = lines[:-1]
    hint = "The audit trail was edited by hand or damaged; restore it from a backup"
    parsed = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            if n == len(lines) and not complete:
                warnings.warn(
                    f"{path}: line {n} was cut short (a crash while writing?) and is left out",
                    TilscoreWarning,
                    stacklevel=2,
                )
                continue
            raise ReviewError(f"line {n} is not JSON ({exc.msg})", path=path, hint=hint) from None
    if not parsed:
        raise ReviewError("the review log is empty", path=path, hint=hint)
    n0, header = parsed[0]
    if not isinstance(header, dict) or header.get("type") != "review":
        raise ReviewError(f"line {n0} is not a review header", path=path, hint=hint)
    schema = header.get("schema")
    if not isinstance(schema, int) or schema > SCHEMA:
        raise ReviewError(
            f"review format {schema!r} is newer than this tilscore reads ({SCHEMA})",
            path=path,
            hint="Update tilscore to open this review",
        )
    records = []
    for n, data in parsed[1:]:
        records.append(EditRecord.from_dict(data, where=f"{path}: line {n}: "))
    return header, records


class AuditTrailFile:
    """The part of :class:`~tilscore.review.Review` that keeps ``review.jsonl`` in step with
    its edits (attach, append and flush, pending edits). Expects ``base``, ``records``,
    ``n_scored``, ``fingerprint``, ``folder`` and ``_written`` on the instance."""

    def header(self) -> dict[str, Any]:
        from . import __version__

        return {
            "type": "review",
            "schema": SCHEMA,
            "tilscore_version": __version__,
            "slide_id": self.base.slide_id,
            "marker": self.base.marker,
            "n_cells": self.n_scored,
            "cells_xy_sha256": self.fingerprint,
            "created": _now(),
        }

    def attach(self, folder: str | os.PathLike) -> None:
        """Append every edit to ``folder/review.jsonl`` from now on (records so far included).

        Raises
        ------
        ReviewError
            The folder's review.jsonl belongs to other cells, or holds edits this review does
            not (they would be lost): load the folder's review instead.
        """
        folder = Path(folder)
        path = folder / REVIEW_FILE
        if path.exists():
            header, records = read_review_log(path)
            self._check_header(header, path)
            mine = [r.to_dict() for r in self.records[: len(records)]]
            if [r.to_dict() for r in records] != mine:
                raise ReviewError(
                    f"holds {len(records)} edits that are not this review's",
                    path=path,
                    hint="Open the folder's review (File > Open the result folder, or "
                    "tilscore.results.load_review) to continue it; nothing was overwritten",
                )
            self._written = len(records)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self._written = -1  # header first
        self.folder = folder
        self._flush()

    def _flush(self) -> None:
        """Append the records not yet in ``folder/review.jsonl`` (the header first on a new
        file), flushed to disk. A failure leaves them pending for the next edit or save.

        Raises
        ------
        ReviewError
            The log cannot be written (disk full, no permission...): the edit is applied and
            kept in memory, not yet on disk.
        """
        from .results import cut_partial_line

        path = self.folder / REVIEW_FILE
        header = self._written < 0
        done = max(self._written, 0)
        lines = [json.dumps(self.header())] if header else []
        lines += [json.dumps(r.to_dict(), default=_json_default) for r in self.records[done:]]
        if not lines:
            return
        try:
            if path.is_file():
                cut_partial_line(path)  # a line cut short by an earlier failure stays apart
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise ReviewError(
                f"the edit is applied but could not be written to the audit trail ({exc})",
                path=path,
                hint="Free disk space or fix the folder's permissions; pending edits are written "
                "with the next edit, or Export… to another folder",
            ) from None
        self._written = len(self.records)

    @property
    def pending(self) -> int:
        """Edits in no folder's review.jsonl yet (all of them when no folder is attached)."""
        if self.folder is None:
            return len(self.records)
        return len(self.records) - max(self._written, 0)

    def _check_header(self, header: dict[str, Any], path: Path) -> None:
        if (
            header.get("n_cells") != self.n_scored
            or header.get("cells_xy_sha256") != self.fingerprint
        ):
            raise ReviewError(
                "was written for other cells than the folder's cells.parquet (the slide was "
                "scored again after the review?)",
                path=path,
                hint="Move review.jsonl away to start a new review of these cells, or restore "
                "the cells it was made on",
            )
