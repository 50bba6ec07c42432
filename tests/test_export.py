"""Writers of cells tables and images (tilscore.export)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tilscore.errors import ConfigError
from tilscore.export import (
    _features,
    _features_json,
    cells_to_geojson,
    encode_png,
    write_cells,
    write_cells_geojson,
    write_png,
)


def _cells(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.uniform(0, 5000, n),
            "y": rng.uniform(0, 5000, n),
            "confidence": rng.uniform(0, 1, n).astype(np.float32),
            "cell_class": pd.Categorical(rng.choice(["tumour", "immune", "other"], n)),
            "nucleus_area_um2": rng.uniform(10, 80, n).astype(np.float32),
            "dab_od_membrane": rng.uniform(0, 2, n).astype(np.float32),
            "positive": rng.uniform(0, 1, n) > 0.7,
            "intensity_bin": rng.integers(0, 4, n).astype(np.int8),
        }
    )


def test_geojson_holds_every_cell_with_rounded_values_and_null_for_nan(tmp_path):
    cells = _cells(57)
    cells.loc[3, "dab_od_membrane"] = np.nan
    cells.loc[4, "confidence"] = np.inf
    path = write_cells(cells, tmp_path / "c.geojson")
    doc = json.loads(path.read_text(encoding="utf-8"))  # strict JSON: no NaN tokens
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    assert len(feats) == len(cells)
    for i, f in enumerate(feats):
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["name"] == cells["cell_class"].iloc[i]
        want = "Positive" if cells["positive"].iloc[i] else "Negative"
        assert props["classification"]["name"] == want
        x, y = f["geometry"]["coordinates"]
        assert x == pytest.approx(cells["x"].iloc[i], abs=0.005)
        assert y == pytest.approx(cells["y"].iloc[i], abs=0.005)
        m = props["measurements"]
        assert m["Intensity bin"] == int(cells["intensity_bin"].iloc[i])
        if i not in (3, 4):
            assert m["Membrane: DAB OD mean"] == pytest.approx(
                float(cells["dab_od_membrane"].iloc[i]), abs=5e-6
            )
    assert feats[3]["properties"]["measurements"]["Membrane: DAB OD mean"] is None
    assert feats[4]["properties"]["measurements"]["Detection: confidence"] is None
    assert "Cell: DAB OD mean" not in feats[0]["properties"]["measurements"]  # column absent


def test_geojson_takes_nullable_and_object_columns(tmp_path):
    cells = _cells(3)
    cells["intensity_bin"] = pd.array([1, None, 3], dtype="Int64")  # e.g. read back from CSV
    cells["dab_od_membrane"] = pd.Series([0.5, None, "0.25"], dtype=object).astype(float)
    feats = json.loads(write_cells(cells, tmp_path / "c.geojson").read_text())["features"]
    assert [f["properties"]["measurements"]["Intensity bin"] for f in feats] == [1, None, 3]
    assert [f["properties"]["measurements"]["Membrane: DAB OD mean"] for f in feats] == [
        0.5,
        None,
        0.25,
    ]


@pytest.mark.parametrize("n", [0, 1, 6, 7, 20])
def test_geojson_in_chunks_is_the_same_document(tmp_path, n):
    cells = _cells(n, seed=n)
    path = write_cells_geojson(cells, tmp_path / "c.geojson", chunk=3)
    assert json.loads(path.read_text(encoding="utf-8")) == cells_to_geojson(cells)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed


def test_unknown_cells_suffix_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cells\.txt"):
        write_cells(_cells(3), tmp_path / "cells.txt")


@pytest.mark.parametrize("channels", [None, 3, 4])
def test_png_round_trips_the_pixels(tmp_path, channels):
    rng = np.random.default_rng(1)
    shape = (37, 53) if channels is None else (37, 53, channels)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    path = write_png(image[:, ::-1], tmp_path / "a.png")  # a strided view is fine
    back = np.asarray(Image.open(path))
    np.testing.assert_array_equal(back, image[:, ::-1])
    # bytes from encode_png are written as they are
    data = encode_png(image)
    assert write_png(data, tmp_path / "b.png").read_bytes() == data


@pytest.mark.parametrize("seed", range(3))
def test_geojson_text_is_what_json_dumps_writes(seed):
    cells = _cells(25, seed=seed)
    cells["cell_class"] = cells["cell_class"].cat.rename_categories(
        {"tumour": 'tu"mour', "immune": "ïmmune %s", "other": "other"}
    )
    cells.loc[[2, 7], "dab_od_membrane"] = [np.nan, -0.0]
    cells["intensity_bin"] = pd.array([None] + [1] * 24, dtype="Int64")
    want = json.dumps(list(_features(cells)), separators=(",", ":"))[1:-1]
    assert _features_json(cells) == want
    assert (
        _features_json(cells.drop(columns=["cell_class", "nucleus_area_um2"]))
        == json.dumps(
            list(_features(cells.drop(columns=["cell_class", "nucleus_area_um2"]))),
            separators=(",", ":"),
        )[1:-1]
    )
    assert _features_json(cells.iloc[:0]) == ""
