"""Fixtures of the napari plugin's tests.

The tests need napari with a Qt binding, pytest-qt and a real X display: pytest-xvfb starts
Xvfb (the system packages are listed in DEVELOPERS.md). Each test module skips, with the reason,
when one of them is missing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
QT_FREE_MODULES = {"test_napari_model.py"}


def gui_skip_reason() -> str | None:
    """Why the GUI tests cannot run here, or None when they can."""
    for module, what in (
        ("napari", 'napari (pip install "napari[pyqt6]" -e napari_plugin)'),
        ("qtpy", "a Qt binding (napari[pyqt6])"),
        ("pytestqt", "pytest-qt"),
        ("napari_tilscore", "the plugin (pip install -e napari_plugin)"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed"
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display: install xvfb and pytest-xvfb (see DEVELOPERS.md)"
    return None


@pytest.fixture(scope="session")
def wsi_samples() -> Path:
    """The real slide samples beside the clone (../shared/data/wsi-samples); skips when absent."""
    folder = SHARED_DATA / "wsi-samples"
    if not folder.is_dir():
        pytest.skip(f"real slide samples not found at {folder}")
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's GUI tests, with the reason, where napari, Qt or a display is missing.

    ``test_napari_model.py`` needs none of them (it skips itself without the plugin).
    """
    reason = gui_skip_reason()
    if reason is None:
        return
    here = Path(__file__).resolve().parent
    for item in items:
        path = Path(item.fspath).resolve()
        if here in path.parents and path.name not in QT_FREE_MODULES:
            item.add_marker(pytest.mark.skip(reason=reason))
