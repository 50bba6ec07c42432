"""Output locations: checked before the work, locked while written, replaced only when whole.

``tilscore score -o DIR`` (and the other commands' ``-o``) meet the same hazards: ``-o`` naming
a file or an impossible place, an unwritable folder, a full disk, two runs writing into one
folder, a re-score that fails half way. This module holds the answers, so that each command
checks its output *before* minutes of work and never leaves a mix of old and new files:

- :func:`check_output_dir` / :func:`check_output_file`: the place can be created and written
  (a probe file is written and removed), else a :class:`~tilscore.errors.ConfigError` naming it;
- :func:`output_lock`: one writer per folder (a lock file holding host and pid; the lock of a
  process that is gone is taken over);
- :func:`staged_save`: the new files are written into a hidden folder inside the output folder
  and moved into place only once every one of them is written; a failure (disk full, a crash
  while drawing the report) leaves the old files as they were.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import ConfigError

__all__ = [
    "SCORE_OUTPUTS",
    "check_output_dir",
    "check_output_file",
    "output_lock",
    "refuse_other_kind",
    "staged_save",
]

#: The files ``SlideResult.save`` writes: the ones a re-score may replace or remove.
SCORE_OUTPUTS = (
    "summary.csv",
    "cells.parquet",
    "cells.geojson",
    "regions.geojson",
    "overlay.png",
    "heatmap.png",
    "run.json",
    "report.html",
)

#: Below this much free space an output folder is refused before the work (bytes).
MIN_FREE_BYTES = 20 << 20


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if os.path.lexists(parent):
            return parent
    return Path(path.anchor or ".")


def _probe(folder: Path, what: str, shown: Path) -> None:
    """Write and remove a small file in ``folder``; a clear error if that is not possible."""
    probe = folder / f".tilscore-probe-{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(
            f"cannot write the {what} here ({e.strerror or e})",
            path=shown,
            hint="Choose a place you can write to (-o)",
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            f"only {free / 2**20:.1f} MB free on its disk",
            path=shown,
            hint="Free some space or choose another place (-o)",
        )


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Make sure ``path`` is, or can become, a writable folder (nothing is created).

    Raises a :class:`~tilscore.errors.ConfigError` naming the path when it is a file (or
    another non-folder), when a part of it is a file, when it (or, while it does not exist,
    its nearest existing parent) cannot be written, or when its disk is (nearly) full.
    """
    path = Path(path).expanduser()
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(
            f"the {what} is a file, not a folder",
            path=path,
            hint="Name a folder (it is created when missing), e.g. -o results/",
        )
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(
            f"cannot create the {what}: {base} is a file, not a folder",
            path=path,
            hint="Name a folder under an existing folder",
        )
    _probe(base, what, path)
    return path


def refuse_other_kind(folder: Path, kind: str) -> None:
    """Refuse a ``score`` into a batch's output folder, and a ``batch`` into a score's.

    Each would overwrite the other's ``summary.csv`` (results lost without a word).
    """
    folder = Path(folder)
    if kind == "score":
        batch = (folder / ".batch.lock").exists() or (folder / "errors.csv").is_file()
        if not batch:
            with contextlib.suppress(OSError):
                batch = any((p / "batch.json").is_file() for p in folder.iterdir() if p.is_dir())
        if batch:
            raise ConfigError(
                "this folder holds the results of a batch; a single score would overwrite its "
                "summary.csv",
                path=folder,
                hint="Choose another output folder (-o)",
            )
    elif kind == "batch" and (folder / "run.json").is_file():
        raise ConfigError(
            "this folder holds the result of `tilscore score`; a batch would overwrite its "
            "summary.csv",
            path=folder,
            hint="Choose another output folder (-o)",
        )


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Make sure the file ``path`` can be written (its folder exists or can be made)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"the {what} is a folder", path=path, hint="Name a file, e.g. -o cells.csv"
        )
    if os.path.lexists(path) and not path.is_file():
        raise ConfigError(
            f"the {what} exists and is not a regular file",
            path=path,
            hint="Name a new file",
        )
    check_output_dir(path.parent if str(path.parent) else Path("."), f"folder of the {what}")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(folder: Path, name: str, what: str) -> Iterator[None]:
    """One writer at a time per folder: ``folder/name`` holds "host pid" while held.

    A second writer gets a :class:`~tilscore.errors.ConfigError` ("another ``what`` ... is
    writing here"); a lock left by a process of this host that is gone is taken over.
    """
    path = Path(folder) / name
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = path.read_text().split()
                alive = host != socket.gethostname() or _pid_alive(int(pid))
            except (OSError, ValueError):
                alive = False
            if alive:
                try:
                    holder = path.read_text().strip()
                except OSError:
                    holder = "?"
                raise ConfigError(
                    f"another {what} ({holder}) is writing here",
                    path=folder,
                    hint=f"Wait for it, or remove {path} if it is gone",
                ) from None
            path.unlink(missing_ok=True)  # left by a run that was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == me:
                path.unlink()


def staged_save(
    folder: Path,
    write: Callable[[Path], dict[str, Path]],
    replaces: tuple[str, ...] = SCORE_OUTPUTS,
) -> dict[str, Path]:
    """``write(stage)`` into a hidden folder of ``folder``, then move its files into place.

    Nothing in ``folder`` changes until ``write`` has returned: a failure removes the stage and
    leaves the old files. Then each new file replaces its namesake (a rename, on one file
    system), and the files named in ``replaces`` that the new run did not write are removed,
    so that no old file stays beside the new ones. Other files in ``folder`` are left alone.
    Returns ``write``'s mapping with the final paths.
    """
    folder = Path(folder)
    stage = folder / f".tmp-save-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        try:
            written = write(stage)
        except OSError as e:
            raise ConfigError(
                f"writing the results failed ({e.strerror or e}); the folder was left as it was",
                path=folder,
                hint="Free some space or choose another place (-o)",
            ) from e
        names = {p.name for p in stage.iterdir()}
        for name in sorted(names, key=lambda n: (n == "run.json", n)):  # run.json last
            os.replace(stage / name, folder / name)
        for name in replaces:
            if name not in names:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {k: folder / Path(p).name for k, p in written.items()}


@contextlib.contextmanager
def score_output(path: str | os.PathLike) -> Iterator[Path]:
    """The output folder of one ``tilscore score``: checked, refused when a batch's, locked.

    Use before the work; a folder this call created is removed again when the work fails.
    """
    folder = check_output_dir(path)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the output folder ({e.strerror or e})",
            path=folder,
            hint="Choose a place you can write to (-o)",
        ) from None
    try:
        refuse_other_kind(folder, "score")
        with output_lock(folder, ".score.lock", "`tilscore score`"):
            yield folder
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when still empty
        raise
