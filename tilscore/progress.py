"""Running a progress generator to its end.

Long work in tilscore is one generator that yields progress and returns its result
(:func:`tilscore.detect.iter_detect_cells`, :func:`tilscore.score.iter_score_slide`,
:func:`tilscore.batch.iter_batch`); the API, the CLI and batch drive it with :func:`run_to_end`,
the napari widget steps it itself so that it can stop between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

__all__ = ["run_to_end"]

R = TypeVar("R")


def run_to_end(gen: Generator[Any, Any, R], on_step: Callable[[Any], None] | None = None) -> R:
    """Exhaust ``gen``, passing each yielded value to ``on_step``; return the generator's value.

    The generator is closed when ``on_step`` raises (e.g. KeyboardInterrupt), so that its
    ``finally`` blocks run at once.
    """
    try:
        while True:
            step = next(gen)
            if on_step is not None:
                on_step(step)
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()
