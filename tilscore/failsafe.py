"""How the command line fails: one line and exit status 2, never a traceback, never noise.

:func:`run_command` runs one CLI command with these promises:

- an expected failure (a :class:`~tilscore.errors.TilscoreError`, a file-system error such as a
  missing, unreadable or full place, memory running out, input nested too deeply to parse,
  broken geometry) prints ``tilscore COMMAND: error: ...`` as one line on stderr and returns
  :data:`EXIT_BAD_INPUT` (2);
- an unexpected one (a bug) prints one line naming the error and the file where the full
  traceback (and the log lines recorded until then) was saved, and returns
  :data:`EXIT_INTERNAL` (3);
- third-party log lines and warnings (tifffile, dask, numpy ...) do not reach the terminal:
  they are kept in memory and written to that file only when something goes wrong;
  :class:`~tilscore.errors.TilscoreWarning` messages are printed as one line each
  (``tilscore COMMAND: warning: ...``), once.

:class:`OneLineParser` makes argparse's usage errors one line too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import TilscoreError, TilscoreWarning

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "OneLineParser",
    "expected_failure",
    "kept_logs",
    "run_command",
    "shown_warnings",
]

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3

#: TilscoreWarning messages already printed on stderr by this process (print_summary skips them)
shown_warnings: set[str] = set()


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``PROG: error: ...; see PROG --help``), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _geos_error() -> tuple[type[BaseException], ...]:
    try:
        from shapely.errors import GEOSException
    except ImportError:  # pragma: no cover
        return ()
    return (GEOSException,)


def expected_failure(exc: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for an unexpected one (a bug)."""
    if isinstance(exc, TilscoreError):
        return str(exc)
    if isinstance(exc, (TimeoutError, ConnectionError)) and exc.filename is None:
        return f"{exc}. Check the address (e.g. --scheduler) and that the server is running"
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else None
        what = exc.strerror or str(exc) or type(exc).__name__
        if where is not None:
            text = f"{where}: {what}"
            if exc.filename2 is not None:
                text = f"{where} -> {exc.filename2}: {what}"
        else:
            text = what
        return f"{text}. {_os_hint(exc)}"
    if isinstance(exc, MemoryError):
        return (
            "not enough memory for this input. Check that it is what it claims to be (size, "
            "pixel size), or use a machine with more memory"
        )
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read (a crafted or broken JSON/TOML file?)"
    if isinstance(exc, UnicodeDecodeError):
        return f"a text file is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    if isinstance(exc, _geos_error()):
        return (
            f"a geometry cannot be used ({exc}). Check the regions for non-finite or broken "
            "coordinates"
        )
    return None


def _os_hint(exc: OSError) -> str:
    import errno

    if isinstance(exc, IsADirectoryError):
        return "It is a folder; name a file"
    if isinstance(exc, NotADirectoryError):
        return "A part of the path is a file, not a folder"
    if isinstance(exc, FileNotFoundError):
        return "Check the path and spelling"
    if isinstance(exc, PermissionError):
        return "Check its permissions, or choose another place"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free some space or choose another place"
    if isinstance(exc, FileExistsError):
        return "Something of that name is in the way; choose another name"
    return "Check the path, its permissions and the free space"


class _Recorder(logging.Handler):
    """Keeps the last log records (third-party ones included) for the error file."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines.append(self.format(record))


class _OwnLines(logging.Handler):
    """tilscore's own warnings and errors, one line each on stderr."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            text = " ".join(record.getMessage().split())
            print(f"{self.command}: {record.levelname.lower()}: {text}", file=sys.stderr)


@contextlib.contextmanager
def _quiet(command: str) -> Iterator[_Recorder]:
    recorder = _Recorder()
    root = logging.getLogger()
    own = logging.getLogger("tilscore")
    own_handler = _OwnLines(command)
    saved_handlers, saved_level, saved_last = root.handlers[:], root.level, logging.lastResort
    root.handlers = [recorder]
    root.setLevel(logging.INFO)
    own.addHandler(own_handler)
    logging.lastResort = None  # type: ignore[assignment]
    previous_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if issubclass(category, TilscoreWarning):
            if text not in shown_warnings:
                shown_warnings.add(text)
                print(f"{command}: warning: {text}", file=sys.stderr)
        else:
            recorder.lines.append(f"{filename}:{lineno}: {category.__name__}: {text}")

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.simplefilter("always", TilscoreWarning)
            warnings.showwarning = show
            yield recorder
    finally:
        warnings.showwarning = previous_show
        own.removeHandler(own_handler)
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        logging.lastResort = saved_last


def _save_error(command: str, argv: list[str] | None, exc: BaseException, log: list[str]) -> Path:
    """Write the traceback and the recorded log lines to a file; its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = "".join(
        [
            f"tilscore {command} failed at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n",
            f"arguments: {argv if argv is not None else sys.argv[1:]}\n",
            f"python {sys.version.split()[0]}, {sys.platform}\n\n",
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "\nlog:\n" + "\n".join(log) + "\n" if log else "",
        ]
    )
    for folder in (Path(tempfile.gettempdir()), Path.cwd()):
        path = folder / f"tilscore-error-{stamp}-{os.getpid()}.txt"
        try:
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    raise OSError("no place to save the traceback")


def run_command(command: str, fn: Callable[[], int], argv: list[str] | None = None) -> int:
    """Run ``fn`` (one CLI command) with the failure promises of this module."""
    name = f"tilscore {command}"
    with _quiet(name) as recorder:
        try:
            return int(fn() or 0)
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            message = expected_failure(exc)
            if message is not None:
                print(f"{name}: error: {' '.join(message.split())}", file=sys.stderr)
                return EXIT_BAD_INPUT
            first = " ".join(str(exc).split())[:300]
            try:
                saved = _save_error(command, argv, exc, list(recorder.lines))
                where = f"the full traceback is in {saved}"
            except OSError:
                where = "the traceback could not be saved"
            print(
                f"{name}: internal error: {type(exc).__name__}: {first} ({where}; please report "
                "it with that file)",
                file=sys.stderr,
            )
            return EXIT_INTERNAL


_kept_lock = threading.Lock()
_kept_depth = 0
_kept_saved: list = []


@contextlib.contextmanager
def kept_logs() -> Iterator[_Recorder]:
    """Keep log lines that no handler takes (third-party warnings) off stderr, in a recorder.

    For the scoring of a batch's slide on a worker: Python's last-resort handler would print
    e.g. tifffile's warnings on the terminal of the batch. Nestable and thread-safe (the
    last-resort handler is given back when the last user leaves).
    """
    global _kept_depth
    recorder = _Recorder(capacity=200)
    recorder.setLevel(logging.WARNING)
    root = logging.getLogger()
    with _kept_lock:
        if _kept_depth == 0:
            _kept_saved[:] = [logging.lastResort]
            logging.lastResort = None  # type: ignore[assignment]
        _kept_depth += 1
        root.addHandler(recorder)
    try:
        yield recorder
    finally:
        with _kept_lock:
            root.removeHandler(recorder)
            _kept_depth -= 1
            if _kept_depth == 0 and _kept_saved:
                logging.lastResort = _kept_saved.pop()
