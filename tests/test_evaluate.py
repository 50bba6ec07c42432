"""Evaluation: one-to-one point matching and the metrics a user reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import shapely

from tilscore.errors import ConfigError
from tilscore.evaluate import evaluate_cells, format_table, match_points, to_jsonable


def _cells(xy, positive=None):
    xy = np.asarray(xy, float).reshape(-1, 2)
    pos = [True] * len(xy) if positive is None else positive
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "positive": pos})


def test_two_predictions_near_one_truth_give_one_match():
    pairs = match_points([[10, 10], [11, 10]], [[10.5, 10]], radius_px=3)
    assert len(pairs) == 1
    m = evaluate_cells(_cells([[10, 10], [11, 10]]), _cells([[10.5, 10]]), 3)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)


def test_matching_maximises_matches_not_greedy_nearest():
    # greedy nearest would pair p0-t1 (distance 1) and leave t0 and p1 unmatched
    pred = [[0, 0], [2.5, 0]]
    truth = [[-2.5, 0], [1, 0]]
    pairs = match_points(pred, truth, radius_px=3)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (1, 1)]


def test_pairs_beyond_the_radius_are_never_matched():
    assert len(match_points([[0, 0]], [[5, 0]], radius_px=4.9)) == 0
    assert len(match_points([[0, 0]], [[5, 0]], radius_px=5.0)) == 1


def test_empty_inputs():
    assert match_points(np.zeros((0, 2)), [[1, 1]], 4).shape == (0, 2)
    assert match_points([[1, 1]], [], 4).shape == (0, 2)
    m = evaluate_cells(_cells([]), _cells([[1, 1]]), 4)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 1)
    assert m["recall"] == 0.0
    assert math.isnan(m["precision"])
    json.dumps(to_jsonable(m))


def test_exact_counts_on_a_hand_made_scene():
    truth = _cells([[0, 0], [20, 0], [40, 0], [60, 0]], positive=[True, True, False, False])
    pred = _cells(
        [[1, 0], [21, 1], [41, 0], [100, 100], [60.5, 0]],
        positive=[True, False, True, True, False],
    )
    m = evaluate_cells(pred, truth, radius_px=3)
    assert (m["n_pred"], m["n_truth"], m["tp"], m["fp"], m["fn"]) == (5, 4, 4, 1, 0)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * 0.8 / 1.8)
    # positives: pred at (1,0), (41,0), (100,100); truth at (0,0), (20,0)
    assert (m["pos_tp"], m["pos_fp"], m["pos_fn"]) == (1, 2, 1)
    assert m["pct_positive_pred"] == pytest.approx(60.0)
    assert m["pct_positive_truth"] == pytest.approx(50.0)
    assert m["pct_positive_error"] == pytest.approx(10.0)


def test_positives_only_truth_skips_all_cell_metrics():
    truth = _cells([[0, 0], [20, 0]])
    pred = _cells([[0, 0], [20, 0], [50, 50]], positive=[True, False, False])
    m = evaluate_cells(pred, truth, 3, truth_positive_only=True)
    assert m["f1"] is None
    assert m["pct_positive_truth"] is None
    assert (m["pos_tp"], m["pos_fp"], m["pos_fn"]) == (1, 0, 1)
    assert m["pos_recall"] == pytest.approx(0.5)


def test_roi_mask_and_geometry_restrict_both_tables():
    truth = _cells([[5, 5], [50, 50]])
    pred = _cells([[5, 6], [80, 80]])
    mask = np.zeros((40, 40), bool)
    mask[:20, :20] = True
    for roi in (mask, shapely.box(0, 0, 20, 20)):
        m = evaluate_cells(pred, truth, 3, roi=roi)
        assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)


def test_string_positive_columns_from_csv_are_understood(tmp_path):
    path = tmp_path / "t.csv"
    _cells([[0, 0], [9, 9]], positive=[True, False]).to_csv(path, index=False)
    truth = pd.read_csv(path, dtype={"positive": str})
    m = evaluate_cells(_cells([[0, 0]]), truth, 2)
    assert m["pos_tp"] == 1
    assert m["pct_positive_truth"] == pytest.approx(50.0)


def test_bad_inputs_raise_config_errors():
    with pytest.raises(ConfigError, match="radius"):
        match_points([[0, 0]], [[0, 0]], math.nan)
    with pytest.raises(ConfigError, match="NaN"):
        match_points([[math.nan, 0]], [[0, 0]], 3)
    with pytest.raises(ConfigError, match="positive"):
        evaluate_cells(pd.DataFrame({"x": [0.0], "y": [0.0]}), _cells([[0, 0]]), 3)


def test_format_table_shows_the_numbers():
    m = evaluate_cells(_cells([[0, 0], [30, 30]]), _cells([[0, 1]]), 3)
    text = format_table(m)
    assert "precision" in text
    assert "0.500" in text  # precision
    assert "0.667" in text  # F1


def test_large_random_scene_matches_a_dense_assignment():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 200, (300, 2))
    pred = np.concatenate(
        [truth[:250] + rng.normal(0, 1.5, (250, 2)), rng.uniform(0, 200, (40, 2))]
    )
    pairs = match_points(pred, truth, 4.0)
    d = np.hypot(*(pred[pairs[:, 0]] - truth[pairs[:, 1]]).T)
    assert (d <= 4.0).all()
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
    # reference: one dense Hungarian problem with forbidden pairs
    from scipy.optimize import linear_sum_assignment

    full = np.hypot(*(pred[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    cost = np.where(full <= 4.0, full - 1e4, 1e9)
    r, c = linear_sum_assignment(cost)
    assert len(pairs) == int((full[r, c] <= 4.0).sum())
