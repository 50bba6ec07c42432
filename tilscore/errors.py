"""The error hierarchy of tilscore.

Every error a user can cause (a bad path, a corrupt file, a slide without a pixel size, a region
outside the slide) is a :class:`TilscoreError`. Messages say what was wrong, in which file, and
what to do about it; the CLI prints them as one line and exits with status 2.
"""

from __future__ import annotations

import math
import os


class TilscoreError(Exception):
    """Base class of every error tilscore raises on bad input.

    Parameters
    ----------
    message
        What was wrong.
    path
        The file concerned, if any; it is named at the start of the message.
    hint
        What the user can do about it; appended to the message.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike | None = None, hint: str | None = None
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.reason = message
        self.hint = hint
        text = message
        if self.path is not None:
            text = f"{self.path}: {text}"
        if hint:
            text = f"{text}. {hint}" if not text.endswith(".") else f"{text} {hint}"
        super().__init__(text)


class SlideReadError(TilscoreError):
    """A slide or image file could not be opened or decoded (missing, corrupt, truncated)."""


class UnsupportedFormatError(SlideReadError):
    """The file is readable but its format or compression is not supported."""


class MissingPixelSizeError(TilscoreError):
    """The slide carries no µm/px; pass ``mpp=`` (API) or ``--mpp`` (CLI)."""


class RegionError(TilscoreError):
    """A region is invalid, empty, or lies outside the slide."""


class ConfigError(TilscoreError):
    """A parameter or configuration value is invalid."""


def check_positive(value: object, name: str) -> float:
    """``value`` as a positive finite float, else a :class:`ConfigError` naming ``name``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be a number, got {value!r}") from e
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return number


class TilscoreWarning(UserWarning):
    """Something was repaired or a fallback was used; the result records it."""


__all__ = [
    "ConfigError",
    "MissingPixelSizeError",
    "RegionError",
    "SlideReadError",
    "TilscoreError",
    "TilscoreWarning",
    "UnsupportedFormatError",
    "check_positive",
]
