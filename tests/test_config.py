"""The one configuration: defaults, TOML round trip, validation with clear errors."""

from __future__ import annotations

import pytest

from tilscore.config import DEFAULTS, HELP, Config, default_config_toml, load_config
from tilscore.errors import ConfigError


def test_defaults_toml_reads_back_to_the_defaults(tmp_path):
    text = default_config_toml()
    path = tmp_path / "tilscore.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.to_dict() == DEFAULTS
    assert cfg.hash() == Config().hash()
    assert cfg.source == str(path)
    # every key of the tables is explained in the printed file, except the [output] switches
    for (table, key), help_text in HELP.items():
        assert key in DEFAULTS[table]
        assert f"# {help_text}" in text
    assert '# [markers."CD8"]' in text  # the presets, commented out


def test_overrides_and_marker_tables_round_trip(tmp_path):
    cfg = load_config(
        {
            "detect": {"detector": "classical", "tile_size_px": 512},
            "regions": {"margin_width_um": 400, "class_map": {"Carcinoma": "tumour"}},
            "markers": {"CD8": {"threshold_od": 0.2}, "PD-L1": {
                "measure": "membrane", "expansion_um": 4, "membrane_width_um": 1.5,
                "threshold_od": 0.1, "bins_od": [0.1, 0.2, 0.3], "cell_classes": ["tumour"]}},
        }
    )  # fmt: skip
    assert cfg["detect"]["tile_size_px"] == 512
    assert cfg["regions"]["margin_width_um"] == 400.0
    assert cfg.marker_rule("cd8").threshold_od == 0.2
    assert cfg.marker_rule("CD8", threshold_od=0.3).threshold_od == 0.3  # API wins
    assert cfg.marker_rule("PD-L1").cell_classes == ("tumour",)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again.hash() == cfg.hash()
    assert again.hash() != Config().hash()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"detekt": {}}, "unknown config table"),
        ({"detect": {"tile_size": 1}}, "unknown key"),
        ({"detect": {"tile_size_px": "big"}}, "must be a number"),
        ({"detect": {"tile_size_px": 10.5}}, "whole number"),
        ({"regions": {"margin_width_um": float("nan")}}, "finite"),
        ({"output": {"report": "yes"}}, "true or false"),
        ({"detect": {"detector": "magic"}}, "cnn"),
        ({"markers": {"CD8": {"threshold_od": -1}}}, r"\[markers.CD8\]"),
        ({"markers": {"XYZ": {"threshold_od": 0.1}}}, r"\[markers.XYZ\]"),
    ],
)
def test_bad_values_name_the_table_and_key(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data)


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[detect\nx = 1")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_config(bad)
    assert "bad.toml" in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
