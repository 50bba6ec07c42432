"""One configuration for every stage: a TOML file, a dict, or the defaults.

The same :class:`Config` is accepted by the API (:func:`tilscore.score_slide`), the CLI
(``--config``), batch runs and the napari widget, and is recorded with every result. Unknown
tables and keys are errors (a misspelt key must not be silently ignored); every value is
checked against the default's type.

``tilscore config --show`` prints :func:`default_config_toml`, the effective defaults.

Tables
------
``[detect]``   detector, CNN model and device, tile and halo size.
``[stain]``    stain vectors and glass brightness: estimated per slide or fixed.
``[markers.NAME]``  overrides of a marker preset (any :class:`tilscore.markers.MarkerRule` field),
               or a new marker with every field.
``[regions]``  invasive-margin width, class-name mapping, automatic segmentation parameters.
``[output]``   which files :meth:`tilscore.score.SlideResult.save` writes, heatmap cell size.
``[batch]``    batch options (see :mod:`tilscore.batch`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["DEFAULTS", "Config", "default_config_toml", "load_config"]

#: Every table and key with its default value (and so its type).
DEFAULTS: dict[str, dict[str, Any]] = {
    "detect": {
        "detector": "cnn",
        "model": "default",
        "device": "auto",
        "tile_size_px": 1024,
        "halo_px": 48,
        "tile_workers": 0,
    },
    "stain": {
        "vectors": "estimate",
        "background": "estimate",
        "check": "refuse",
    },
    "regions": {
        "margin_width_um": 500.0,
        "class_map": {},
        "auto_grid_um": 8.0,
        "auto_sigma_um": 16.0,
        "auto_min_tumour_fraction": 0.5,
        "auto_min_density_per_mm2": 1500.0,
        "auto_min_nest_area_um2": 2000.0,
        "auto_bed_margin_um": 300.0,
        "exclude_artefacts": True,
        "max_annotation_removed": 0.05,
    },
    "output": {
        "cells_parquet": True,
        "cells_geojson": True,
        "regions_geojson": True,
        "overlay": True,
        "heatmap": True,
        "report": True,
        "heatmap_cell_um": 100.0,
    },
    "batch": {
        "marker_pattern": r"(?<![A-Za-z0-9])(CD8|CD68|CD56|CD3|CD4|CD20|FOXP3|KI-?67)(?![0-9])",
        "regions_beside": "{stem}.regions.geojson, {stem}.geojson",
        "input_hash": "fast",
        "workers": 0,
        "threads_per_worker": 0,
        "memory_limit": "auto",
        "slide_time_limit_s": 0.0,
    },
}

#: What each key means, written above it by :func:`default_config_toml`.
HELP: dict[tuple[str, str], str] = {
    ("detect", "detector"): '"cnn" or "classical"',
    ("detect", "model"): (
        'a shipped model ("default", "synthetic") or a model folder (tilscore finetune)'
    ),
    ("detect", "device"): '"auto" (CUDA when present), "cpu", "cuda"',
    ("detect", "tile_size_px"): "tile core at the detector's µm/px",
    ("detect", "halo_px"): "context around each tile (px)",
    ("detect", "tile_workers"): "tiles processed at once in threads; 0 = min(2, CPU count)",
    ("stain", "vectors"): '"estimate" per slide, or "ruifrok" (Ruifrok-Johnston H-DAB)',
    ("stain", "background"): '"estimate" glass I0 per slide, or "white" (255, 255, 255)',
    ("stain", "check"): "an image that is clearly not DAB IHC (H&E, fluorescence, greyscale): "
    '"refuse" it, or "warn" and score it (--force-stain)',
    ("regions", "margin_width_um"): "invasive margin band in all, half each side of the border",
    (
        "regions",
        "class_map",
    ): 'annotation class name -> region class, e.g. {"Carcinoma" = "tumour"}',
    ("regions", "auto_grid_um"): "automatic segmentation: density grid cell (µm)",
    ("regions", "auto_sigma_um"): "smoothing of the tumour-nucleus density (µm)",
    ("regions", "auto_min_tumour_fraction"): "share of tumour nuclei among all nuclei in a nest",
    ("regions", "auto_min_density_per_mm2"): "tumour nuclei per mm² in a nest",
    ("regions", "auto_min_nest_area_um2"): "smaller blobs are not nests",
    ("regions", "auto_bed_margin_um"): "nests closer than twice this share one tumour bed",
    ("regions", "exclude_artefacts"): (
        "ink, viewer frames and overlays and black pigment are excluded (counted in "
        "excluded_area_mm2)"
    ),
    ("regions", "max_annotation_removed"): (
        "share of an annotation the tissue mask may remove as glass; above it the annotation "
        "is scored as drawn, with a warning"
    ),
    (
        "output",
        "cells_parquet",
    ): "which files SlideResult.save writes (summary.csv and run.json always)",
    ("output", "heatmap_cell_um"): "density heatmap bin (µm)",
    ("batch", "marker_pattern"): (
        "marker from the file name when a manifest gives none (case-insensitive regex; its "
        "first group is the marker)"
    ),
    ("batch", "regions_beside"): (
        "regions files looked for beside a slide when a manifest names none, comma-separated "
        "({stem}: the file name without its suffix); the first that exists is used"
    ),
    ("batch", "input_hash"): (
        'what a re-run compares to skip a done slide: "fast" (size, mtime, sha256 of the first '
        'and last MiB) or "full" (sha256 of the whole file)'
    ),
    ("batch", "workers"): "local cluster: worker processes, threads per worker; 0 = chosen for "
    "the machine (docs/scaling.md)",
    ("batch", "memory_limit"): 'per local worker: "auto" (machine memory / workers) or "8GB"',
    ("batch", "slide_time_limit_s"): "a slide still scoring after this many seconds is recorded "
    "as failed (SlideTimeLimit) and the batch moves on; 0 = no limit",
}


def _check_value(table: str, key: str, value: Any, default: Any, where: str | None) -> Any:
    """``value`` coerced to the default's type, or a ConfigError naming table.key."""
    name = f"[{table}] {key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}", path=where)
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}", path=where)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}", path=where)
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"{name} must be a whole number, got {value!r}", path=where)
        return type(default)(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}", path=where)
        return value
    if isinstance(default, dict):
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{name} must be a table of strings, got {value!r}", path=where)
        return {str(k): v for k, v in value.items()}
    raise AssertionError(f"no check for {name}")  # pragma: no cover


@dataclass(frozen=True)
class Config:
    """The effective configuration: defaults updated by a file or dict (validated).

    Attributes
    ----------
    values
        Table -> key -> value for every table of :data:`DEFAULTS`.
    markers
        Marker name (as written) -> overrides of its preset or a full new marker.
    source
        Where it came from (a file path, "dict" or "defaults").
    """

    values: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULTS))
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "defaults"

    def __getitem__(self, table: str) -> dict[str, Any]:
        return self.values[table]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> Config:
        """Defaults updated by ``data`` (tables as nested mappings)."""
        where = source if source not in (None, "dict") else None
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a table, got {type(data).__name__}", path=where)
        values = copy.deepcopy(DEFAULTS)
        known = [*DEFAULTS, "markers"]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown config table(s) {unknown}", path=where, hint=f"known tables: {known}"
            )
        for table, entries in data.items():
            if table == "markers":
                continue
            if not isinstance(entries, Mapping):
                raise ConfigError(f"[{table}] must be a table", path=where)
            bad = sorted(set(entries) - set(DEFAULTS[table]))
            if bad:
                raise ConfigError(
                    f"unknown key(s) {bad} in [{table}]",
                    path=where,
                    hint=f"known keys: {sorted(DEFAULTS[table])}",
                )
            for key, value in entries.items():
                values[table][key] = _check_value(table, key, value, DEFAULTS[table][key], where)
        markers = data.get("markers", {}) or {}
        if not isinstance(markers, Mapping) or not all(
            isinstance(v, Mapping) for v in markers.values()
        ):
            raise ConfigError("`markers` must hold [markers.NAME] tables", path=where)
        cfg = cls(
            values=values,
            markers={str(k): dict(v) for k, v in markers.items()},
            source=source or "dict",
        )
        for name in cfg.markers:  # validate now, not mid-run
            try:
                cfg.marker_rule(name)
            except ConfigError as exc:
                raise ConfigError(
                    f"[markers.{name}]: {exc.reason}", path=where, hint=exc.hint
                ) from None
        if values["detect"]["detector"] not in ("cnn", "classical"):
            raise ConfigError(
                f"[detect] detector must be 'cnn' or 'classical', got "
                f"{values['detect']['detector']!r}",
                path=where,
            )
        if values["stain"]["vectors"] not in ("estimate", "ruifrok"):
            raise ConfigError("[stain] vectors must be 'estimate' or 'ruifrok'", path=where)
        if values["stain"]["background"] not in ("estimate", "white"):
            raise ConfigError("[stain] background must be 'estimate' or 'white'", path=where)
        if values["stain"]["check"] not in ("refuse", "warn"):
            raise ConfigError("[stain] check must be 'refuse' or 'warn'", path=where)
        return cfg

    def marker_rule(self, marker: Any, **overrides: Any):
        """The :class:`~tilscore.markers.MarkerRule` for a marker with this config's overrides.

        ``overrides`` (from the API or ``--set``) win over the config's ``[markers.NAME]``.
        """
        from .markers import MARKERS, MarkerRule, get_marker

        if isinstance(marker, MarkerRule):
            key = marker.name.strip().upper()
            base = marker
        else:
            key = str(marker).strip().upper()
            base = None
        table = next((v for k, v in self.markers.items() if k.strip().upper() == key), None)
        if base is None:
            if key in MARKERS or table is None:
                base = get_marker(marker)  # unknown without a table: the error lists the known
            else:
                try:
                    return MarkerRule.from_dict({"name": str(marker), **table, **overrides})
                except TypeError as exc:  # a new marker lacks a field without a default
                    raise ConfigError(
                        f"a new marker needs every field: {exc}",
                        hint=f"{key} is not a preset; give measure, expansion_um, "
                        "membrane_width_um, threshold_od, bins_od and cell_classes",
                    ) from None
        values = {**(table or {}), **overrides}
        return base.with_overrides(**values) if values else base

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON and TOML-able), markers included."""
        out = copy.deepcopy(self.values)
        if self.markers:
            out["markers"] = copy.deepcopy(self.markers)
        return out

    def hash(self) -> str:
        """SHA-256 of the canonical effective configuration (not of where it came from)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_toml(self) -> str:
        """The configuration as TOML text that :func:`load_config` reads back."""
        return _to_toml(self.to_dict())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is JSON-compatible for these values
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = (f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items())
        return "{" + ", ".join(items) + "}"
    raise ConfigError(f"cannot write {v!r} as TOML")


def _to_toml(data: Mapping[str, Any]) -> str:
    lines: list[str] = []
    for table, entries in data.items():
        if table == "markers":
            for name, values in entries.items():
                lines.append(f"[markers.{json.dumps(name)}]")
                # None (an unset option) has no TOML form: omitted means the preset's value
                lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
                lines.append("")
            continue
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in entries.items()]
        lines.append("")
    return "\n".join(lines)


def default_config_toml() -> str:
    """The defaults as TOML, with the marker presets (what ``tilscore config --show`` prints)."""
    from .markers import MARKERS

    text = "# tilscore configuration: the effective defaults. Copy, edit, pass with --config.\n"
    for table, entries in DEFAULTS.items():
        text += f"[{table}]\n"
        for key, value in entries.items():
            if (table, key) in HELP:
                text += f"# {HELP[table, key]}\n"
            text += f"{key} = {_toml_value(value)}\n"
        text += "\n"
    text += "# Marker presets; a [markers.NAME] table overrides any of these fields.\n"
    presets = {
        r.name: {k: v for k, v in r.to_dict().items() if k != "name"} for r in MARKERS.values()
    }
    body = _to_toml({"markers": presets})
    return text + "\n".join(("# " + ln) if ln else "" for ln in body.splitlines()) + "\n"


def load_config(config: str | os.PathLike | Mapping[str, Any] | Config | None = None) -> Config:
    """The effective configuration from a TOML path, a dict, a :class:`Config` or None.

    Raises
    ------
    ConfigError
        Unreadable file, invalid TOML, unknown table or key, or a value of the wrong kind (the
        message names the file, the table and the key).
    """
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return Config.from_dict(config, source="dict")
    from .markers import _load_toml

    path = os.fspath(config)
    return Config.from_dict(_load_toml(path), source=path)
