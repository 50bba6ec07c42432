"""Sample data contribution: the repository's three synthetic example slides.

They are found where :mod:`tilscore.demo` finds them (``example_slides/`` beside the installed
``tilscore`` package, i.e. in a clone with an editable install). Each sample opens the slide as a
lazy multiscale image in µm (as the reader does).
"""

from __future__ import annotations

from pathlib import Path

from ._reader import LayerData, read_slide


def example_slide_path(marker: str) -> Path:
    """The example slide of a marker ("CD8", "CD68", "CD56").

    Raises
    ------
    tilscore.errors.SlideReadError
        The example slides are not where tilscore keeps them (not a clone).
    """
    from tilscore.demo import REPO_EXAMPLES, find_example_slides
    from tilscore.errors import SlideReadError

    wanted = f"synthetic_{marker.lower()}"
    for path in find_example_slides():
        if path.name.split(".")[0] == wanted:
            return path
    raise SlideReadError(
        f"no example slide for {marker}",
        path=REPO_EXAMPLES,
        hint="Regenerate them with `python -m tilscore.synthetic examples example_slides`",
    )


def _sample(marker: str) -> list[LayerData]:
    return read_slide(example_slide_path(marker))


def sample_cd8() -> list[LayerData]:
    """The CD8 example slide (T cells with a brown membrane ring)."""
    return _sample("CD8")


def sample_cd68() -> list[LayerData]:
    """The CD68 example slide (macrophages with brown granular cytoplasm)."""
    return _sample("CD68")


def sample_cd56() -> list[LayerData]:
    """The CD56 example slide (NK cells, and brown nerves that are not NK cells)."""
    return _sample("CD56")
