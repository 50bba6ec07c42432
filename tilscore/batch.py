"""Batch scoring of many slides on Dask: resumable, fault-tolerant, local or on a cluster.

:func:`run_batch` (and the ``tilscore batch`` command) finds the slides of any mix of folders,
files and manifest CSVs, tells each slide's marker, and scores each slide as one Dask task with
:func:`tilscore.score.score_slide`, on a :class:`distributed.LocalCluster` sized for the machine
or on an existing cluster (``scheduler=``). Nothing is lost:

- each slide's results are written into ``OUT/.tmp-<slide_id>-<random>/`` and renamed into
  ``OUT/<slide_id>/`` when complete, with ``batch.json`` (the done marker, holding the slide's
  key); a folder named ``OUT/<slide_id>`` is therefore always whole;
- one bad slide (missing, corrupt, no µm/px, unknown marker, a crash of the scorer, a worker
  killed under it) is written to ``OUT/errors.csv`` and the batch goes on;
- the key of a slide is a hash of its input (file size, modification time and the first and last
  MiB, or the whole file with ``input_hash = "full"``), its marker, regions file and µm/px, and
  the effective configuration (:func:`scoring_config_hash`: the config without its ``[batch]``
  table). A re-run skips the slides
  whose folder holds the same key and redoes the others; ``force=True`` redoes all;
- ``OUT/summary.csv`` (one row per slide x compartment, with the manifest's columns; a slide
  reviewed in napari counts with its reviewed summary, column ``summary_from``) and
  ``OUT/cells/<slide_id>.parquet`` are rebuilt from the finished slides at the end of every run,
  interrupted or not. Leftover temporary folders of a killed run are removed on the next one.

:func:`iter_batch` is the same run as a generator of :class:`BatchEvent` (the CLI draws its
progress bar from it); :func:`run_batch` exhausts it and returns a :class:`BatchReport`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, MissingPixelSizeError, TilscoreError, TilscoreWarning
from .progress import run_to_end

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "SLIDE_SUFFIXES",
    "BatchEvent",
    "BatchItem",
    "BatchReport",
    "SlideTimeLimit",
    "assign_slide_ids",
    "batch_settings",
    "default_cluster_size",
    "discover_slides",
    "input_fingerprint",
    "iter_batch",
    "marker_from_name",
    "plan_batch",
    "run_batch",
    "score_one",
    "scoring_config_hash",
    "slide_key",
]

log = logging.getLogger(__name__)

#: File suffixes a folder search takes as slides (lower case). Plain PNG/JPEG images carry no
#: µm/px and are taken only when named on the command line or in a manifest, or when the batch
#: is given a default µm/px (:data:`IMAGE_SUFFIXES`). A folder holding ``.dcm`` files is one
#: DICOM slide.
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".scn",
    ".bif",
    ".mrxs",
    ".vms",
    ".vmu",
    ".svslide",
)

#: Plain images a folder search takes too when the batch has a default µm/px (``--mpp``).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: Names in OUT that a slide folder may not take.
_RESERVED = {"cells", "summary.csv", "errors.csv", "config.toml", "batch.json"}
_DONE = "batch.json"
_LOCK = ".batch.lock"
_MIB = 1 << 20


# ----------------------------------------------------------------------------------------------
# what to score


@dataclass
class BatchItem:
    """One slide to score.

    Attributes
    ----------
    path
        The slide file (or DICOM folder), absolute.
    slide_id
        Unique, filesystem-safe name of its output folder ``OUT/<slide_id>``.
    marker
        Marker name (canonical, e.g. "CD8"), None when it could not be told.
    marker_source
        "manifest", "file name" or "--marker".
    regions
        Regions file (QuPath GeoJSON), or None for automatic regions.
    mpp
        Level-0 µm/px overriding the file's (from the manifest), or None.
    mpp_default
        Level-0 µm/px for a file that records none (PNG, JPEG, a TIFF without resolution),
        from ``--mpp``; None: such a file is an error.
    meta
        The manifest's other columns (patient, timepoint, extras), carried into the summary.
    error
        (error type, message) when the slide cannot be scored (unknown marker, missing file);
        such items are reported, not submitted.
    source
        Where it was named: "argument", the folder searched, or "manifest.csv:ROW".
    """

    path: Path
    slide_id: str = ""
    marker: str | None = None
    marker_source: str | None = None
    regions: Path | None = None
    mpp: float | None = None
    mpp_default: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None
    source: str = "argument"


def _is_manifest(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def _slide_stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() or path.suffix else name


def _walk_slides(
    folder: Path, skip: Path | None, suffixes: tuple[str, ...] = SLIDE_SUFFIXES
) -> Iterator[Path]:
    """Slides under ``folder`` (recursive, sorted, hidden entries and ``skip`` left out)."""
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and (skip is None or (here / d).resolve() != skip)
        )
        if any(f.lower().endswith(".dcm") for f in files):
            yield here  # a DICOM WSI: the folder is the slide
            dirs[:] = []
            continue
        for f in sorted(files):
            if not f.startswith(".") and f.lower().endswith(suffixes):
                yield here / f


def _read_manifest(path: Path) -> list[BatchItem]:
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the manifest: {e}", path=path) from e
    table.columns = [str(c).strip() for c in table.columns]
    lower = {c.lower(): c for c in table.columns}
    if "path" not in lower:
        raise ConfigError(
            "the manifest has no 'path' column",
            path=path,
            hint="A manifest is a CSV with a column path (required) and optionally marker, "
            "regions, patient, timepoint, mpp and any others",
        )
    table = table.rename(
        columns={lower[k]: k for k in ("path", "marker", "regions", "mpp") if k in lower}
    )
    base = path.parent
    items = []
    for row_no, row in enumerate(table.to_dict("records"), start=2):
        rel = str(row.pop("path")).strip()
        if not rel:
            continue
        slide = Path(rel).expanduser()
        slide = (slide if slide.is_absolute() else base / slide).resolve()
        item = BatchItem(path=slide, source=f"{path.name}:{row_no}")
        marker = str(row.pop("marker", "") or "").strip()
        if marker:
            item.marker, item.marker_source = marker, "manifest"
        regions = str(row.pop("regions", "") or "").strip()
        if regions:
            r = Path(regions).expanduser()
            item.regions = (r if r.is_absolute() else base / r).resolve()
        mpp = str(row.pop("mpp", "") or "").strip()
        if mpp:
            try:
                item.mpp = float(mpp)
                if not item.mpp > 0 or item.mpp == float("inf"):
                    raise ValueError(mpp)
            except ValueError:
                item.error = (
                    "ConfigError",
                    f"{path}: row {row_no}: mpp {mpp!r} is not a positive number of µm/px",
                )
        item.meta = {k: (v if v != "" else None) for k, v in row.items()}
        items.append(item)
    return items


def discover_slides(
    inputs: Iterable[str | os.PathLike],
    *,
    exclude: str | os.PathLike | None = None,
    mpp: float | None = None,
) -> list[BatchItem]:
    """The slides named by any mix of folders, files and manifest CSVs.

    Parameters
    ----------
    inputs
        Folders (searched recursively for :data:`SLIDE_SUFFIXES`; a folder of ``.dcm`` files is
        one slide), slide files, and manifest CSVs (column ``path`` required; ``marker``,
        ``regions``, ``mpp`` and every other column such as ``patient`` and ``timepoint``
        optional; relative paths are resolved against the manifest's folder).
    exclude
        A folder not to search (the batch's output folder when it lies inside an input).
    mpp
        Default µm/px for files that record none (``mpp_default`` of every item); with it a
        folder search also takes PNG and JPEG images (:data:`IMAGE_SUFFIXES`).

    Returns
    -------
    list of BatchItem
        One per distinct slide, in input order, without slide ids yet; a slide named twice is
        listed once (a manifest row wins over a folder search, which carries no metadata).

    Raises
    ------
    ConfigError
        An input does not exist, or a manifest cannot be read or has no ``path`` column.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    suffixes = SLIDE_SUFFIXES + (IMAGE_SUFFIXES if mpp is not None else ())
    items: list[BatchItem] = []
    seen: dict[Path, int] = {}
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError("no such file or folder", path=path, hint="Check the path")
        if path.is_dir() and not any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
            found = [
                BatchItem(path=p.resolve(), source=str(path))
                for p in _walk_slides(path, skip, suffixes)
            ]
        elif path.is_file() and _is_manifest(path):
            found = _read_manifest(path)
        else:
            found = [BatchItem(path=path.resolve(), source="argument")]
        for item in found:
            prev = seen.get(item.path)
            if prev is None:
                seen[item.path] = len(items)
                items.append(item)
            elif items[prev].source != "argument" and ":" not in items[prev].source:
                items[prev] = item  # a manifest row replaces a folder hit
            elif ":" in item.source and ":" in items[prev].source:
                warnings.warn(
                    f"{item.path}: listed twice ({items[prev].source} and {item.source}); "
                    "scored once, as first listed",
                    TilscoreWarning,
                    stacklevel=2,
                )
    for item in items:
        item.mpp_default = mpp
    return items


def _safe(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return text[:120] or "slide"


def assign_slide_ids(items: Sequence[BatchItem]) -> None:
    """Give every item a unique, filesystem-safe ``slide_id`` (in place).

    The id is the file name without its suffix, with characters other than letters, digits,
    ``.``, ``_`` and ``-`` replaced by ``_``. Slides whose ids collide (the same file name in
    two folders; compared case-insensitively, as macOS and Windows file systems do) all get
    ``-`` and 8 hex digits of a hash of their absolute path, so an id does not depend on the
    order of the inputs. A manifest column ``slide_id`` is used as given (made safe).
    """
    wanted = []
    for item in items:
        given = item.meta.pop("slide_id", None) if item.meta else None
        sid = _safe(str(given)) if given else _safe(_slide_stem(item.path))
        if sid.lower() in _RESERVED:
            sid = f"{sid}-slide"
        wanted.append(sid)
    counts: dict[str, int] = {}
    for sid in wanted:
        counts[sid.lower()] = counts.get(sid.lower(), 0) + 1
    for item, sid in zip(items, wanted):
        if counts[sid.lower()] > 1:
            digest = hashlib.sha1(str(item.path).encode()).hexdigest()[:8]
            sid = f"{sid}-{digest}"
        item.slide_id = sid


def marker_from_name(name: str, pattern: str | None = None) -> str | None:
    """The marker named in a file name, by the ``[batch] marker_pattern`` regular expression.

    Returns the matched name (e.g. "cd8", "Ki-67"), or None when the name matches nowhere.

    Raises
    ------
    ConfigError
        The name matches two different markers ("CD3_CD8.svs"): ambiguous, not guessed.
    """
    if pattern is None:
        from .config import DEFAULTS

        pattern = DEFAULTS["batch"]["marker_pattern"]
    rx = re.compile(pattern, re.IGNORECASE)
    found = []
    for m in rx.finditer(name):
        value = m.groupdict().get("marker") or (m.group(1) if m.groups() else m.group(0))
        if value and value.replace("-", "").upper() not in [
            f.replace("-", "").upper() for f in found
        ]:
            found.append(value)
    if len(found) > 1:
        raise ConfigError(
            f"the file name names several markers ({', '.join(found)})",
            hint="Give the marker in a manifest (column marker)",
        )
    return found[0] if found else None


def _canonical_marker(config: Any, name: str) -> str:
    """The marker's name as the presets or the config's tables spell it ("ki-67" -> "Ki67")."""
    try:
        return config.marker_rule(name).name
    except ConfigError:
        if "-" not in name:
            raise
        return config.marker_rule(name.replace("-", "")).name


def _resolve_markers(items: Sequence[BatchItem], config: Any, fallback: str | None) -> None:
    settings = batch_settings(config)
    for item in items:
        if item.error is not None:
            continue
        try:
            if item.marker is None:
                name = marker_from_name(_slide_stem(item.path), settings["marker_pattern"])
                if name is not None:
                    item.marker, item.marker_source = name, "file name"
                elif fallback:
                    item.marker, item.marker_source = fallback, "--marker"
        except ConfigError as e:
            item.error = ("UnknownMarker", f"{item.path}: {e}")
            continue
        if item.marker is None:
            item.error = (
                "UnknownMarker",
                f"{item.path}: no marker in the manifest or the file name, and no --marker",
            )
            continue
        try:
            item.marker = _canonical_marker(config, item.marker)
        except ConfigError as e:
            item.error = (
                "UnknownMarker",
                f"{item.path}: marker {item.marker!r} (from the {item.marker_source}): "
                f"{e.reason}; {e.hint or ''}".rstrip("; "),
            )


def _find_regions(items: Sequence[BatchItem], config: Any) -> None:
    text = batch_settings(config)["regions_beside"]
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    for item in items:
        if item.regions is not None or item.error is not None:
            continue
        for pattern in patterns:
            candidate = item.path.parent / pattern.format(stem=_slide_stem(item.path))
            if candidate.is_file() and candidate != item.path:
                item.regions = candidate
                break


def plan_batch(
    inputs: Iterable[str | os.PathLike],
    *,
    config: Any = None,
    marker: str | None = None,
    exclude: str | os.PathLike | None = None,
    mpp: float | None = None,
) -> list[BatchItem]:
    """Discover the slides, give them ids, markers and regions files (see :func:`run_batch`).

    Items that cannot be scored carry ``error``; nothing is read beyond file names here.
    """
    cfg = _load_config(config)
    if marker is not None:
        marker = _canonical_marker(cfg, marker)  # a wrong --marker is a usage error
    items = discover_slides(inputs, exclude=exclude, mpp=mpp)
    assign_slide_ids(items)
    for item in items:
        if item.error is None and not item.path.exists():
            item.error = ("SlideReadError", f"{item.path}: no such file")
        if item.error is None and item.regions is not None and not item.regions.is_file():
            item.error = ("RegionError", f"{item.regions}: regions file not found")
    _resolve_markers(items, cfg, marker)
    _find_regions(items, cfg)
    return items


# ----------------------------------------------------------------------------------------------
# configuration and keys


def _load_config(config: Any) -> Any:
    from .config import load_config

    return load_config(config)


def batch_settings(config: Any) -> dict[str, Any]:
    """The ``[batch]`` table of a config (see :data:`tilscore.config.DEFAULTS`), checked."""
    out = dict(_load_config(config)["batch"])
    if out["input_hash"] not in ("fast", "full"):
        raise ConfigError(f"[batch] input_hash must be 'fast' or 'full', got {out['input_hash']!r}")
    try:
        re.compile(out["marker_pattern"])
    except re.error as e:
        raise ConfigError(f"[batch] marker_pattern is not a regular expression: {e}") from e
    try:
        out["regions_beside"].format(stem="slide")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"[batch] regions_beside: {out['regions_beside']!r} may hold only {{stem}} ({e})"
        ) from e
    return out


def scoring_config_hash(config: Any) -> str:
    """sha256 of the config without its ``[batch]`` table, which does not change a result.

    (The marker pattern and regions files it selects enter a slide's key on their own.)
    """
    data = _load_config(config).to_dict()
    data.pop("batch", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _file_fingerprint(path: Path, mode: str) -> dict[str, Any]:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a pipe or device would block or never end
        raise OSError("not a regular file (a pipe, device or socket)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if mode == "full":
            for block in iter(lambda: f.read(8 * _MIB), b""):
                h.update(block)
            return {"size": st.st_size, "sha256": h.hexdigest()}
        h.update(f.read(_MIB))
        if st.st_size > 2 * _MIB:
            f.seek(st.st_size - _MIB)
            h.update(f.read(_MIB))
        elif st.st_size > _MIB:
            h.update(f.read())
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_head_tail": h.hexdigest()}


def input_fingerprint(path: str | os.PathLike, mode: str = "fast") -> dict[str, Any]:
    """What identifies a slide's content: size, mtime and a hash (``[batch] input_hash``).

    A folder (DICOM) is fingerprinted file by file.
    """
    path = Path(path)
    if path.is_dir():
        return {
            str(p.relative_to(path)): _file_fingerprint(p, mode)
            for p in sorted(path.rglob("*"))
            if p.is_file()
        }
    return _file_fingerprint(path, mode)


def slide_key(item: BatchItem, config_hash: str, mode: str = "fast") -> str:
    """sha256 over the slide's input, marker, regions, µm/px and the config hash."""
    record = {
        "input": input_fingerprint(item.path, mode),
        "marker": item.marker,
        "regions": input_fingerprint(item.regions, "full") if item.regions else None,
        "mpp": item.mpp,
        "config": config_hash,
    }
    if item.mpp_default is not None:  # a run without --mpp keeps its earlier keys
        record["mpp_default"] = item.mpp_default
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _done_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / _DONE).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _done_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / _DONE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "key" in record else None


def _done_path(folder: Path, path: Path) -> str | None:
    """The slide a finished ``folder`` holds, when it is not ``path`` (else None)."""
    record = _done_record(folder)
    if record is None or not record.get("path"):
        return None
    other = str(record["path"])
    return None if other == str(path) else other


def _earlier_slides(out: Path, ids: set[str]) -> list[BatchItem]:
    """The finished slide folders of ``out`` that this run does not name (earlier runs)."""
    found = []
    for folder in sorted(out.iterdir()):
        if folder.name.startswith(".") or folder.name in ids or not folder.is_dir():
            continue
        record = _done_record(folder)
        if record is None:
            continue
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        found.append(
            BatchItem(
                path=Path(str(record.get("path") or folder)),
                slide_id=folder.name,
                marker=record.get("marker"),
                meta=meta,
                source="earlier run",
            )
        )
    return found


# ----------------------------------------------------------------------------------------------
# one slide (runs on a worker)


def _set_threads(n: int | None) -> None:
    """Use ``n`` threads for torch and OpenCV in this (worker) process; None leaves them."""
    if not n:
        return
    import cv2
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if cv2.getNumThreads() != n:
        cv2.setNumThreads(n)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` folder to ``final``, replacing an older one."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}")
        if (final / "review.jsonl").is_file():  # a person's review is never deleted
            old = final.with_name(f"{final.name}.reviewed-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("%s was reviewed; the review is kept in %s", final, old)
            os.replace(final, old)
            os.replace(tmp, final)
            return
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class SlideTimeLimit(TilscoreError):
    """A slide of a batch took longer than ``[batch] slide_time_limit_s``."""


class _Overtime(Exception):
    """Raised asynchronously in a scoring thread by the time-limit watchdog."""


@contextlib.contextmanager
def _time_limit(limit_s: float, path: Path) -> Iterator[Callable[[Any], None]]:
    """A step callback raising :class:`SlideTimeLimit` once ``limit_s`` seconds have passed.

    Scoring yields a step per tile, where the limit is checked. A stage that yields nothing
    for long (one huge read) is interrupted too: a watchdog raises the error asynchronously
    in the scoring thread (it takes effect at the thread's next Python instruction).
    0 = no limit.
    """

    def error() -> SlideTimeLimit:
        return SlideTimeLimit(
            f"still scoring after the time limit of {limit_s:g} s; stopped",
            path=path,
            hint="Check its pixel size and size, or raise [batch] slide_time_limit_s",
        )

    if not limit_s or limit_s <= 0:
        yield lambda step: None
        return
    deadline = time.monotonic() + limit_s

    def check(step: Any) -> None:
        if time.monotonic() > deadline:
            raise error()

    import ctypes

    tid = threading.get_ident()
    finished = threading.Event()
    fired: list[bool] = []

    def watchdog() -> None:
        grace = min(60.0, max(1.0, 0.1 * limit_s))  # the per-step check first
        if not finished.wait(limit_s + grace):
            fired.append(True)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(tid), ctypes.py_object(_Overtime)
            )

    dog = threading.Thread(target=watchdog, name="tilscore-time-limit", daemon=True)
    dog.start()
    try:
        yield check
    except _Overtime:
        raise error() from None
    finally:
        finished.set()
        if fired:  # an asynchronous exception not yet delivered must not hit later code
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)


def _score_gen(item: BatchItem, config: Any, mpp: float | None):
    from .score import iter_score_slide

    return iter_score_slide(
        item.path,
        marker=item.marker,
        regions=item.regions,
        config=config,
        mpp=mpp,
        slide_id=item.slide_id,
    )


def score_one(
    item: BatchItem,
    out: str | os.PathLike,
    config: Any,
    key: str,
    threads: int | None = None,
) -> dict[str, Any]:
    """Score one slide into ``out/<slide_id>/`` atomically; never raises for a bad slide.

    Returns a record: ``status`` "done" with ``seconds``, or "failed" with ``error_type``,
    ``message`` and, for errors that are not a :class:`~tilscore.errors.TilscoreError`, the
    ``traceback``. This is the Dask task of :func:`run_batch`. ``threads``: torch and OpenCV
    threads of the worker process (a local cluster passes its cores per running slide; None
    leaves the process's settings, e.g. on a cluster whose workers set them).
    """
    from .failsafe import kept_logs

    out = Path(out)
    logs = None
    t0 = time.perf_counter()
    tmp = out / f".tmp-{item.slide_id}-{secrets.token_hex(4)}"
    record: dict[str, Any] = {"slide_id": item.slide_id, "path": str(item.path)}
    try:
        _set_threads(threads)
        limit = float(batch_settings(config).get("slide_time_limit_s") or 0)
        with _time_limit(limit, item.path) as check, kept_logs() as logs:
            try:
                result = run_to_end(_score_gen(item, config, item.mpp), check)
            except MissingPixelSizeError:
                if item.mpp is not None or item.mpp_default is None:
                    raise
                result = run_to_end(_score_gen(item, config, item.mpp_default), check)
        tmp.mkdir(parents=True)
        result.save(tmp, config=config)
        seconds = time.perf_counter() - t0
        done = {
            "key": key,
            "slide_id": item.slide_id,
            "path": str(item.path),
            "marker": item.marker,
            "marker_source": item.marker_source,
            "regions": str(item.regions) if item.regions else None,
            "mpp": result.mpp,
            "mpp_source": result.provenance["slide"].get("mpp_source"),
            "meta": item.meta,
            "seconds": round(seconds, 3),
            "host": socket.gethostname(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / _DONE).write_text(json.dumps(done, indent=2, default=str))
        _replace_dir(tmp, out / item.slide_id)
        record.update(status="done", seconds=seconds)
    except Exception as e:  # the fault barrier: one bad slide never stops the batch
        record.update(
            status="failed",
            error_type=type(e).__name__,
            message=str(e),
            seconds=time.perf_counter() - t0,
        )
        if not isinstance(e, TilscoreError):
            record["traceback"] = traceback.format_exc()
        if logs is not None and logs.lines:  # third-party log lines: kept, not printed
            record["log"] = list(logs.lines)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return record


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class BatchEvent:
    """Progress of a batch: ``kind`` is "start", "done", "failed" or "skipped".

    ``done``, ``failed``, ``skipped`` count the slides so far; ``total`` counts all slides of
    the run (errors found before scoring included). ``record`` is the slide's record.
    """

    kind: str
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    slide_id: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    dashboard: str | None = None
    message: str = ""


@dataclass
class BatchReport:
    """What a batch run did.

    Attributes
    ----------
    out
        The output folder.
    done, skipped
        Slide ids scored in this run, and found already done with the same key.
    kept
        Slide ids finished by earlier runs into ``out`` that this run did not name: kept, and
        in ``summary.csv`` too.
    failed
        One record per failed slide (``slide_id``, ``path``, ``error_type``, ``message``).
    summary_path, errors_path, cells_dir
        ``OUT/summary.csv``, ``OUT/errors.csv``, ``OUT/cells``.
    dashboard
        The Dask dashboard address, if there was one.
    seconds
        Wall time of the run (s).
    """

    out: Path
    done: list[str]
    skipped: list[str]
    failed: list[dict[str, Any]]
    summary_path: Path
    errors_path: Path
    cells_dir: Path
    dashboard: str | None = None
    seconds: float = 0.0
    kept: list[str] = field(default_factory=list)

    @property
    def n_done(self) -> int:
        return len(self.done)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def n_failed(self) -> int:
        return len(self.failed)

    @property
    def ok(self) -> bool:
        """True when no slide failed."""
        return not self.failed


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_cluster_size(cpus: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) of the default LocalCluster for ``cpus`` cores.

    One single-threaded worker process per core: each scores one slide at a time on one core.
    On this project's 2-core machine, when nothing else ran, 2 x 1 was the fastest shape (1.07x
    two slides in one process, 1.3x one slide on both cores); on the same machine loaded by
    other jobs, one slide at a time did better. docs/scaling.md has the figures.
    """
    if cpus is None:
        cpus = _cpus()
    return max(1, int(cpus or 1)), 1


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run ends cleanly."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """One batch at a time per output folder (a lock file holding host and pid)."""
    from .outdir import output_lock

    return output_lock(out, _LOCK, "batch")


def _clean_leftovers(out: Path) -> list[Path]:
    """Remove the temporary folders and files of killed runs."""
    removed = []
    for p in out.iterdir():
        if p.name.startswith((".tmp-", ".old-")) or (
            p.name.startswith(".") and p.name.endswith(".tmp")
        ):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _dashboard(client: Any) -> str | None:
    """The dashboard's address, or None when the scheduler serves none (bokeh not installed)."""
    try:
        services = client.scheduler_info().get("services", {})
    except (OSError, TimeoutError):
        return None
    return client.dashboard_link if "dashboard" in services else None


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (inherited through exec).

    Ctrl-C in a terminal reaches the whole process group; this process then stops the cluster
    in order, instead of every worker dying with a traceback of its own.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _client(
    scheduler: Any,
    workers: int,
    threads: int,
    memory_limit: str | int | float,
    processes: bool,
) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if scheduler is not None:
        if isinstance(scheduler, Client):
            client = scheduler
        elif Path(str(scheduler)).is_file():  # a scheduler file (dask scheduler --scheduler-file)
            client = Client(scheduler_file=str(scheduler))
        else:
            client = Client(scheduler)
        try:
            yield client
        finally:
            if client is not scheduler:
                client.close()
        return
    with _workers_ignore_sigint():
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=processes,
            memory_limit=memory_limit,
            # everything of a local cluster listens on this machine only, where the printed
            # addresses say (":0" would open the dashboard on every interface)
            host="127.0.0.1" if processes else None,
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
            # errors of a slide are caught and recorded by the batch itself; what dask would log
            # at ERROR here is its own shutdown noise (a worker's heartbeat racing the
            # scheduler's close after Ctrl-C printed a traceback), so only CRITICAL gets through
            silence_logs=logging.CRITICAL,
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def iter_batch(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    config: Any = None,
    marker: str | None = None,
    scheduler: Any = None,
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = True,
    force: bool = False,
    mpp: float | None = None,
) -> Generator[BatchEvent, None, BatchReport]:
    """Run a batch, yielding a :class:`BatchEvent` per slide; returns the :class:`BatchReport`.

    Parameters are those of :func:`run_batch`. Interrupting it (KeyboardInterrupt, SIGTERM in
    the main thread, or closing the generator) cancels the slides in flight, keeps the finished
    ones, rewrites ``summary.csv`` and ``errors.csv`` from them and re-raises.
    """
    t0 = time.perf_counter()
    if scheduler is not None and (workers or threads_per_worker):
        raise ConfigError(
            "workers and threads per worker size a local cluster",
            hint="With a scheduler, the cluster's own workers run the slides; drop --workers "
            "and --threads-per-worker",
        )
    cfg = _load_config(config)
    settings = batch_settings(cfg)
    from .outdir import check_output_dir, refuse_other_kind

    out = Path(out).expanduser().resolve()
    check_output_dir(out, "batch output folder")
    out.mkdir(parents=True, exist_ok=True)
    refuse_other_kind(out, "batch")
    items = plan_batch(inputs, config=cfg, marker=marker, exclude=out, mpp=mpp)
    if not items:
        raise ConfigError(
            "no slides found",
            hint=f"Name slide files, folders holding {', '.join(SLIDE_SUFFIXES)} files, or a "
            "manifest CSV with a path column",
        )
    config_hash = scoring_config_hash(cfg)
    total = len(items)
    failed: list[dict[str, Any]] = []
    done: list[str] = []
    skipped: list[str] = []
    to_run: list[tuple[BatchItem, str]] = []
    keys: dict[str, str] = {}
    with _lock(out):
        _clean_leftovers(out)
        _write_config(out, cfg)
        for item in items:
            if item.error is not None:
                failed.append(_failure(item, *item.error))
                continue
            try:
                key = slide_key(item, config_hash, settings["input_hash"])
            except OSError as e:
                failed.append(_failure(item, "SlideReadError", f"{item.path}: {e}"))
                continue
            keys[item.slide_id] = key
            if not force and _done_key(out / item.slide_id) == key:
                skipped.append(item.slide_id)
            elif not force and (other := _done_path(out / item.slide_id, item.path)):
                failed.append(
                    _failure(
                        item,
                        "OutputTaken",
                        f"{item.path}: {out / item.slide_id} holds the finished result of "
                        f"another slide ({other}); it is kept. Give this slide another "
                        "slide_id (manifest column), another -o, or --force to replace it",
                    )
                )
                keys.pop(item.slide_id)
            else:
                to_run.append((item, key))
        early = list(failed)  # reported as events once the run starts; in errors.csv anyway
        counts = {"done": 0, "failed": 0, "skipped": 0}

        def event(kind: str, **kw: Any) -> BatchEvent:
            return BatchEvent(kind=kind, total=total, **counts, **kw)

        def reported() -> Iterator[BatchEvent]:
            """The failures found before scoring and the slides already done."""
            for record in early:
                counts["failed"] += 1
                yield event("failed", slide_id=record["slide_id"], record=record)
            for sid in skipped:
                counts["skipped"] += 1
                yield event("skipped", slide_id=sid)

        dashboard = None
        try:
            if not to_run:
                yield event(
                    "start",
                    message=f"nothing to score: {len(skipped)} slides done with the same input "
                    "and config (--force redoes them)",
                )
                yield from reported()
            else:
                n_workers, n_threads = _cluster_size(workers, threads_per_worker, settings)
                threads = (
                    max(1, _cpus() // (n_workers * n_threads))
                    if scheduler is None and processes
                    else None
                )
                with (
                    _sigterm_as_interrupt(),
                    _client(
                        scheduler, n_workers, n_threads, settings["memory_limit"], processes
                    ) as client,
                ):
                    dashboard = _dashboard(client)
                    yield event(
                        "start",
                        dashboard=dashboard,
                        message=_start_message(client, scheduler, len(to_run), len(skipped)),
                    )
                    yield from reported()
                    by_key = {}
                    futures = []
                    for item, key in to_run:
                        fut = client.submit(
                            score_one,
                            item,
                            str(out),
                            cfg,
                            key,
                            threads,
                            key=f"score-{item.slide_id}-{key[:12]}",
                            pure=False,
                        )
                        by_key[fut.key] = item
                        futures.append(fut)
                    yield from _collect(futures, by_key, counts, failed, done, event)
        finally:
            if scheduler is None:  # the local workers are gone: nothing writes here any more
                _clean_leftovers(out)
            # from the disk, not from the futures seen: a slide may have finished on its worker
            # just before an interrupt reached this process
            failed_ids = {r["slide_id"] for r in failed}
            finished = [
                it
                for it in items
                if it.slide_id in keys
                and it.slide_id not in failed_ids
                and _done_key(out / it.slide_id) == keys[it.slide_id]
            ]
            summary_path, errors_path, cells_dir, kept = _write_outputs(
                out, items, finished, failed
            )
    return BatchReport(
        out=out,
        done=done,
        skipped=skipped,
        kept=kept,
        failed=failed,
        summary_path=summary_path,
        errors_path=errors_path,
        cells_dir=cells_dir,
        dashboard=dashboard,
        seconds=time.perf_counter() - t0,
    )


def _collect(futures, by_key, counts, failed, done, event):
    from distributed import as_completed

    try:
        for fut in as_completed(futures):
            item = by_key[fut.key]
            if fut.status == "finished":
                record = fut.result()
            elif fut.status == "cancelled":  # by the cluster (shut down, restarted)
                record = _failure(item, "Cancelled", "the cluster cancelled the task")
            else:  # the worker died under it (memory limit, crash) or the task was lost
                exc = fut.exception()
                record = _failure(item, type(exc).__name__, f"{item.path}: {exc}")
            fut.release()
            record.setdefault("marker", item.marker)
            if record["status"] == "done":
                counts["done"] += 1
                done.append(item.slide_id)
                yield event("done", slide_id=item.slide_id, record=record)
            else:
                counts["failed"] += 1
                failed.append(record)
                yield event("failed", slide_id=item.slide_id, record=record)
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            futures[0].client.cancel(pending)


def _cluster_size(workers, threads, settings) -> tuple[int, int]:
    w0, t0 = default_cluster_size()
    w = workers or int(settings.get("workers") or 0) or w0
    t = threads or int(settings.get("threads_per_worker") or 0) or t0
    if w < 1 or t < 1:
        raise ConfigError(f"workers and threads per worker must be >= 1, got {w} x {t}")
    return w, t


def _start_message(client: Any, scheduler: Any, n_run: int, n_skipped: int) -> str:
    info = client.scheduler_info()
    ws = info.get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in ws.values())
    where = f"the scheduler {scheduler}" if scheduler is not None else "a local cluster"
    skipped = f", {n_skipped} already done" if n_skipped else ""

    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    return (
        f"scoring {n(n_run, 'slide')} on {where} ({n(len(ws), 'worker')}, "
        f"{n(threads, 'thread')}){skipped}"
    )


def _failure(item: BatchItem, error_type: str, message: str) -> dict[str, Any]:
    return {
        "slide_id": item.slide_id,
        "path": str(item.path),
        "marker": item.marker,
        "status": "failed",
        "error_type": error_type,
        "message": message,
    }


def _write_config(out: Path, cfg: Any) -> None:
    from .export import atomic_write

    text = cfg.to_toml()
    atomic_write(out / "config.toml", lambda p: p.write_text(text))


_ERROR_COLUMNS = ["slide_id", "path", "marker", "error_type", "message", "traceback"]


def _write_outputs(
    out: Path, items: Sequence[BatchItem], finished: Sequence[BatchItem], failed: list[dict]
) -> tuple[Path, Path, Path, list[str]]:
    """Rebuild summary.csv, cells/ and errors.csv from the finished slides of ``out``.

    Those of this run come first, in its order; then those of earlier runs that this run did
    not name (their folders are whole results, kept; ``source`` "earlier run").
    """
    import pandas as pd

    from .export import atomic_write

    order = {item.slide_id: i for i, item in enumerate(items)}
    finished = sorted(finished, key=lambda it: order[it.slide_id])
    # the summary covers every finished slide of the folder, not only those named this time
    tried = {it.slide_id for it in finished} | {
        it.slide_id for it in items if _done_path(out / it.slide_id, it.path) is None
    }
    earlier = _earlier_slides(out, tried)
    finished = finished + earlier
    tables = []
    cells_dir = out / "cells"
    cells_dir.mkdir(exist_ok=True)
    keep = set()
    for item in finished:
        folder = out / item.slide_id
        # a result reviewed in napari counts as reviewed; the column summary_from says which
        reviewed = (folder / "summary_reviewed.csv").is_file()
        try:
            summary = pd.read_csv(folder / ("summary_reviewed.csv" if reviewed else "summary.csv"))
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read its summary: %s", folder, e)
            continue
        summary["summary_from"] = "reviewed" if reviewed else "scored"
        tables.append(_with_meta(summary, item))
        cells = folder / "cells.parquet"
        if cells.is_file():
            target = cells_dir / f"{item.slide_id}.parquet"
            _link_or_copy(cells, target)
            keep.add(target.name)
    for stale in cells_dir.glob("*.parquet"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    if tables:
        summary = pd.concat(tables, ignore_index=True)
    else:
        from .score import SUMMARY_COLUMNS

        summary = pd.DataFrame(columns=["slide_id", "path", *SUMMARY_COLUMNS[1:]])
    summary_path = atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    errors = (
        pd.DataFrame(failed, columns=_ERROR_COLUMNS)
        if failed
        else pd.DataFrame(columns=_ERROR_COLUMNS)
    )
    errors = errors.reindex(columns=_ERROR_COLUMNS)
    errors_path = atomic_write(out / "errors.csv", lambda p: errors.to_csv(p, index=False))
    return summary_path, errors_path, cells_dir, [it.slide_id for it in earlier]


def _with_meta(summary: pd.DataFrame, item: BatchItem) -> pd.DataFrame:
    summary = summary.copy()
    summary["slide_id"] = item.slide_id
    front = {"slide_id": item.slide_id, "path": str(item.path)}
    front.update({k: v for k, v in item.meta.items() if k not in summary.columns})
    for i, (name, value) in enumerate(front.items()):
        if name in summary.columns:
            summary.pop(name)
        summary.insert(i, name, value)
    return summary


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to (or, across file systems, a copy of) ``src``, atomically."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    tmp.unlink(missing_ok=True)  # rename() of two links to one file leaves both


def run_batch(
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    config: Any = None,
    marker: str | None = None,
    scheduler: Any = None,
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = True,
    force: bool = False,
    mpp: float | None = None,
    on_event: Callable[[BatchEvent], None] | None = None,
) -> BatchReport:
    """Score every slide of folders, files and manifests on Dask; resumable and fault-tolerant.

    Parameters
    ----------
    inputs
        Folders (searched recursively), slide files and manifest CSVs, in any mix (see
        :func:`discover_slides`).
    out
        Output folder: ``OUT/<slide_id>/`` per slide, ``OUT/summary.csv``, ``OUT/cells/``,
        ``OUT/errors.csv``, ``OUT/config.toml`` (the effective config).
    config
        A :class:`tilscore.config.Config`, a dict or a TOML path (see
        :func:`tilscore.config.load_config`); its ``[batch]`` section holds the marker pattern,
        the regions files looked for beside a slide, the input hash and the cluster size.
    marker
        Marker of the slides whose marker neither a manifest nor the file name gives.
    scheduler
        An existing Dask cluster: its scheduler's address ("tcp://host:8786"), its scheduler
        file (``dask scheduler --scheduler-file``) or a ``distributed.Client``; None starts a
        LocalCluster. Its workers must see the slides and ``out`` at the same paths.
    workers, threads_per_worker
        LocalCluster size; default from the config, else :func:`default_cluster_size`.
    processes
        LocalCluster workers as processes (True) or threads of this process.
    force
        Score every slide again, even those done with the same key.
    mpp
        Level-0 µm/px of the files that record none (PNG and JPEG fields, a TIFF without
        resolution) and that no manifest ``mpp`` gives; with it a folder search also takes
        ``.png``, ``.jpg`` and ``.jpeg``. A file's own µm/px is kept.
    on_event
        Called with each :class:`BatchEvent` (progress).

    Returns
    -------
    BatchReport
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    gen = iter_batch(
        inputs,
        out,
        config,
        marker,
        scheduler,
        workers=workers,
        threads_per_worker=threads_per_worker,
        processes=processes,
        force=force,
        mpp=mpp,
    )
    return run_to_end(gen, on_event)
