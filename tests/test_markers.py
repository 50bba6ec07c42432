"""Marker rules: presets, overrides, TOML configs and the positivity call."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tilscore.errors import ConfigError
from tilscore.markers import MARKERS, MarkerRule, classify_cells, get_marker, load_marker_config


def test_presets_cover_the_required_markers_with_the_right_compartments():
    for name in ("CD8", "CD56", "CD68", "CD3", "CD4", "CD20", "FOXP3", "Ki67"):
        assert get_marker(name).name.upper() == name.upper()
    assert get_marker("CD8").measure == "membrane"
    assert get_marker("CD56").measure == "membrane"
    assert get_marker("CD68").measure == "cytoplasm"
    assert get_marker("Ki67").measure == "nucleus"
    assert get_marker("FOXP3").measure == "nucleus"
    assert get_marker("CD68").expansion_um > get_marker("CD8").expansion_um
    assert get_marker("CD56").cell_classes == ("immune",)
    assert "tumour" not in get_marker("CD68").cell_classes
    assert "tumour" in get_marker("Ki67").cell_classes


def test_get_marker_is_case_insensitive_and_unknown_names_list_the_known_ones():
    assert get_marker("cd8") is MARKERS["CD8"]
    assert get_marker(" ki67 ") is MARKERS["KI67"]
    with pytest.raises(ConfigError) as info:
        get_marker("CD999")
    msg = str(info.value)
    assert "CD999" in msg
    for known in ("CD8", "CD56", "CD68", "Ki67"):
        assert known in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold_od", math.nan),
        ("threshold_od", -0.1),
        ("expansion_um", math.inf),
        ("membrane_width_um", "wide"),
        ("bins_od", (0.1, math.nan, 0.3)),
        ("bins_od", (0.5, 0.2, 0.3)),
        ("measure", "halo"),
        ("cell_classes", ("macrophage",)),
        ("max_surround_ratio", math.nan),
        ("min_ring_coverage", -0.1),
        ("min_ring_coverage", 1.5),
        ("min_ring_coverage", "most"),
    ],
)
def test_bad_overrides_raise_config_errors_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        get_marker("CD8", **{field: value})


def test_unknown_override_names_the_field():
    with pytest.raises(ConfigError, match="threshold"):
        get_marker("CD8").with_overrides(threshhold=0.3)


def test_overrides_apply_and_round_trip_through_dict():
    rule = get_marker("CD8", threshold_od=0.25, bins_od=[0.25, 0.5, 0.7])
    assert rule.threshold_od == 0.25
    assert rule.bins_od == (0.25, 0.5, 0.7)
    assert MARKERS["CD8"].threshold_od != 0.25  # the preset is untouched
    assert MarkerRule.from_dict(rule.to_dict()) == rule


def test_toml_config_overrides_presets_and_defines_new_markers(tmp_path):
    path = tmp_path / "markers.toml"
    path.write_text(
        "[markers.CD8]\nthreshold_od = 0.25\n\n"
        "[markers.PDL1]\nmeasure = 'membrane'\nexpansion_um = 4.0\nmembrane_width_um = 1.5\n"
        "threshold_od = 0.1\nbins_od = [0.1, 0.2, 0.3]\ncell_classes = ['tumour', 'immune']\n"
    )
    rules = load_marker_config(path)
    assert rules["CD8"].threshold_od == 0.25
    assert rules["CD8"].measure == "membrane"
    assert rules["PDL1"].cell_classes == ("tumour", "immune")
    assert rules["CD68"] == MARKERS["CD68"]


@pytest.mark.parametrize(
    "text",
    ["[markers.CD8]\nthreshold_od = nan\n", "[markers.CD8]\nthreshhold = 1\n", "[markers.CD8\n"],
)
def test_bad_toml_configs_raise_config_errors_naming_the_file(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_marker_config(path)


def _table(**cols):
    n = len(next(iter(cols.values())))
    base = {
        "cell_class": ["immune"] * n,
        "nucleus_area_um2": [40.0] * n,
        "dab_od_membrane": [0.0] * n,
        "dab_od_cytoplasm": [0.0] * n,
        "dab_od_nucleus": [0.0] * n,
    }
    base.update(cols)
    return pd.DataFrame(base)


def test_classify_cells_uses_class_threshold_area_and_bins():
    rule = get_marker("CD8", cell_classes=("immune",))
    _, b2, b3 = rule.bins_od
    cells = _table(
        dab_od_membrane=[0.0, rule.threshold_od, (b2 + b3) / 2, 2.0, 2.0, 2.0],
        cell_class=["immune", "immune", "immune", "immune", "tumour", "immune"],
        nucleus_area_um2=[40.0, 40.0, 40.0, 40.0, 40.0, 250.0],
    )
    out = classify_cells(cells, rule)
    assert out["positive"].tolist() == [False, True, True, True, False, False]
    assert out["intensity_bin"].tolist() == [0, 1, 2, 3, 0, 0]
    assert out["intensity_bin"].dtype == np.int8
    assert "positive" not in cells.columns  # input untouched


def test_cd56_rejects_cells_in_brown_surroundings():
    rule = get_marker("CD56")
    cells = _table(dab_od_membrane=[0.3, 0.3], dab_od_surround=[0.02, 0.28])
    assert classify_cells(cells, rule)["positive"].tolist() == [True, False]


def test_min_ring_coverage_rejects_one_sided_rings_and_round_trips():
    rule = get_marker("CD8", min_ring_coverage=0.5)
    assert rule.min_ring_coverage == 0.5
    assert MarkerRule.from_dict(rule.to_dict()) == rule
    cells = _table(dab_od_membrane=[0.3, 0.3, 0.3], dab_ring_coverage=[0.95, 0.3, np.nan])
    assert classify_cells(cells, rule)["positive"].tolist() == [True, False, False]
    off = get_marker("CD8", min_ring_coverage=None)
    assert classify_cells(cells, off)["positive"].tolist() == [True, True, True]
    # a table measured before the column existed is classified without the check
    old = cells.drop(columns="dab_ring_coverage")
    assert classify_cells(old, rule)["positive"].tolist() == [True, True, True]


def test_min_ring_coverage_can_be_set_in_toml(tmp_path):
    path = tmp_path / "markers.toml"
    path.write_text("[markers.CD8]\nmin_ring_coverage = 0.4\n")
    assert load_marker_config(path)["CD8"].min_ring_coverage == 0.4


def test_classify_cells_needs_the_measured_column():
    with pytest.raises(ConfigError, match="dab_od_cytoplasm"):
        classify_cells(pd.DataFrame({"cell_class": ["immune"]}), get_marker("CD68"))


def test_ki67_counts_tumour_cells():
    out = classify_cells(
        _table(dab_od_nucleus=[0.5], cell_class=["tumour"], nucleus_area_um2=[150.0]), "Ki67"
    )
    assert out["positive"].tolist() == [True]
