"""Shipped model weights, installed as the package ``tilscore.models``.

Each model is a folder ``<name>/`` holding ``model.safetensors``, ``config.json`` (architecture,
input µm/px and channels, training settings) and a model card ``README.md``. Nothing is ever
downloaded: :func:`model_dir` finds a model in this folder or raises.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent


def available_models() -> list[str]:
    """Names of the shipped models (folders holding a ``model.safetensors``)."""
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/model.safetensors"))


def model_dir(name: str) -> Path:
    """The folder of shipped model ``name``.

    Raises
    ------
    tilscore.errors.ConfigError
        If no such model is shipped; the message lists the known ones.
    """
    from tilscore.errors import ConfigError

    folder = MODELS_DIR / name
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(
            f"unknown model {name!r}",
            hint=f"Shipped models: {', '.join(available_models()) or 'none'}",
        )
    return folder
