"""The cells table and per-cell measurements (nucleus, membrane ring, cytoplasm, surround)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tilscore.cells import CELL_COLUMNS, measure_cells, segment_nuclei, validate_cells
from tilscore.detect.cnn import CELL_TYPE_TO_CLASS
from tilscore.errors import ConfigError
from tilscore.markers import classify_cells, get_marker
from tilscore.stain import deconvolve, estimate_background
from tilscore.synthetic import synthetic_tile

CLASS_OF = CELL_TYPE_TO_CLASS


@pytest.fixture(scope="module")
def tiles():
    """Measured truth cells of one synthetic tile per marker (truth centres and classes)."""
    out = {}
    for marker, seed in (("CD8", 101), ("CD68", 102), ("CD56", 102)):
        rgb, truth = synthetic_tile(marker, size_px=768, seed=seed, nest_fraction=0.25)
        conc = deconvolve(rgb, background=estimate_background(rgb))
        centres = truth[["x", "y"]].assign(cell_class=truth["cell_type"].map(CLASS_OF))
        cells = measure_cells(centres, conc, 0.5, marker)
        out[marker] = (cells, truth, conc, centres)
    return out


def test_cd8_positive_rings_are_clearly_browner_than_negatives(tiles):
    cells, truth, _, _ = tiles["CD8"]
    ring = cells["dab_od_membrane"].to_numpy()
    pos = truth["positive"].to_numpy()
    neg_lymph = (~pos) & (truth["cell_type"] == "lymphocyte").to_numpy()
    assert pos.sum() >= 20
    assert np.quantile(ring[pos], 0.05) > 2 * np.quantile(ring[neg_lymph], 0.95)
    called = classify_cells(cells, get_marker("CD8"))
    immune = (cells["cell_class"] == "immune").to_numpy()
    agree = (called["positive"].to_numpy() == pos)[immune].mean()
    assert agree >= 0.95
    assert not called["positive"][cells["cell_class"] != "immune"].any()


def test_cd68_positive_macrophages_have_brown_cytoplasm(tiles):
    cells, truth, _, _ = tiles["CD68"]
    cyto = cells["dab_od_cytoplasm"].to_numpy()
    pos = truth["positive"].to_numpy()
    tumour = (truth["cell_type"] == "tumour").to_numpy()
    assert pos.sum() >= 20
    assert np.median(cyto[pos]) > 0.15
    assert np.median(cyto[pos]) > 10 * abs(np.median(cyto[tumour]))
    called = classify_cells(cells, get_marker("CD68"))["positive"].to_numpy()
    recall = called[pos].mean()
    precision = pos[called].mean()
    assert recall >= 0.9
    assert precision >= 0.85
    assert not called[tumour].any()


def test_cd56_nerves_are_not_nk_cells_even_when_their_nuclei_look_immune(tiles):
    _, truth, conc, centres = tiles["CD56"]
    # worst case: the detector calls every nerve nucleus "immune"
    worst = centres.assign(
        cell_class=centres["cell_class"].where(truth["cell_type"] != "nerve", "immune")
    )
    cells = classify_cells(measure_cells(worst, conc, 0.5, "CD56"), get_marker("CD56"))
    called = cells["positive"].to_numpy()
    nerve = (truth["cell_type"] == "nerve").to_numpy()
    pos = truth["positive"].to_numpy()
    assert nerve.sum() >= 5
    assert not called[nerve].any()
    assert called[pos].mean() >= 0.85
    # the ring alone would have counted most nerve nuclei
    ring_only = get_marker("CD56", max_surround_ratio=None)
    assert classify_cells(cells, ring_only)["positive"].to_numpy()[nerve].mean() > 0.5


def test_measurements_do_not_depend_on_cell_order(tiles):
    _, _, conc, centres = tiles["CD8"]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(centres))
    a = measure_cells(centres, conc, 0.5, "CD8")
    b = measure_cells(centres.iloc[perm].reset_index(drop=True), conc, 0.5, "CD8")
    cols = ["nucleus_area_um2", "h_od_nucleus", "dab_od_membrane", "dab_od_cytoplasm"]
    np.testing.assert_allclose(b[cols].to_numpy(), a[cols].to_numpy()[perm], rtol=1e-5, atol=1e-6)


def _disc_image(mpp: float, radius_um: float = 4.0, ring_um: float = 1.0, size_um: float = 40.0):
    n = round(size_um / mpp)
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * mpp
    r = np.hypot(xx - size_um / 2, yy - size_um / 2)
    conc = np.zeros((n, n, 3), np.float32)
    conc[..., 0] = np.where(r <= radius_um, 0.8, 0.02)
    conc[..., 1] = np.where((r > radius_um) & (r <= radius_um + ring_um), 0.5, 0.0)
    centre = pd.DataFrame({"x": [n / 2], "y": [n / 2], "cell_class": ["immune"]})
    return conc, centre


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_areas_and_ring_are_in_microns_whatever_the_pixel_size(mpp):
    conc, centre = _disc_image(mpp)
    rule = get_marker("CD8", membrane_width_um=1.0)
    cells = measure_cells(centre, conc, mpp, rule)
    assert cells["nucleus_area_um2"].iloc[0] == pytest.approx(math.pi * 16, rel=0.12)
    assert cells["h_od_nucleus"].iloc[0] == pytest.approx(0.8, abs=0.05)
    assert cells["dab_od_membrane"].iloc[0] == pytest.approx(0.5, abs=0.1)
    assert cells["dab_ring_coverage"].iloc[0] == pytest.approx(1.0, abs=0.1)
    assert cells["dab_od_nucleus"].iloc[0] == pytest.approx(0.0, abs=1e-6)
    assert cells["x_um"].iloc[0] == pytest.approx(20.0, abs=mpp)


def test_ring_coverage_is_low_when_only_a_neighbour_s_side_is_brown():
    mpp = 0.5
    conc, centre = _disc_image(mpp)
    n = conc.shape[0]
    xx = (np.arange(n) + 0.5) * mpp
    # a brown blob touching the cell on its right: only the ring's right part is stained
    conc[..., 1] = np.where(xx[None, :] > 20 + 3.5, 1.2, 0.0)
    rule = get_marker("CD8", membrane_width_um=1.0)
    cells = measure_cells(centre, conc, mpp, rule)
    assert cells["dab_ring_coverage"].iloc[0] < 0.5
    # the ring mean alone would still call it positive
    assert cells["dab_od_membrane"].iloc[0] >= rule.threshold_od
    called = classify_cells(cells, rule.with_overrides(min_ring_coverage=0.5))
    assert not called["positive"].iloc[0]


def test_a_given_nucleus_label_image_is_used_as_is():
    conc, centre = _disc_image(0.5)
    nuclei = np.zeros(conc.shape[:2], np.int32)
    nuclei[38:42, 38:42] = 1  # a 2 x 2 µm "nucleus"
    cells = measure_cells(centre, conc, 0.5, "CD8", nuclei=nuclei)
    assert cells["nucleus_area_um2"].iloc[0] == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="shape"):
        measure_cells(centre, conc, 0.5, "CD8", nuclei=nuclei[:10])


def test_cells_expand_only_until_they_meet_their_neighbours():
    conc = np.zeros((40, 80, 3), np.float32)
    conc[..., 0] = 0.02
    conc[18:22, 18:22, 0] = 0.9
    conc[18:22, 28:32, 0] = 0.9
    conc[..., 1][:, :25] = 0.4  # left half brown: only the left cell's cytoplasm
    centres = pd.DataFrame({"x": [20.0, 30.0], "y": [20.0, 20.0], "cell_class": "immune"})
    cells = measure_cells(centres, conc, 0.5, get_marker("CD68"))
    left, right = cells["dab_od_cytoplasm"]
    assert left > 0.3
    assert right < 0.1


def test_empty_centres_give_an_empty_table_with_every_column():
    conc = np.zeros((64, 64, 3), np.float32)
    cells = measure_cells(pd.DataFrame({"x": [], "y": []}), conc, 0.5, "CD8")
    assert len(cells) == 0
    assert list(cells.columns[: len(CELL_COLUMNS)]) == list(CELL_COLUMNS)


def test_black_and_white_images_do_not_crash():
    centres = pd.DataFrame({"x": [10.0, 30.0], "y": [10.0, 30.0]})
    for value in (0, 255):
        rgb = np.full((64, 64, 3), value, np.uint8)
        cells = measure_cells(centres, deconvolve(rgb), 0.5, "CD8")
        assert len(cells) == 2
        assert np.isfinite(cells["nucleus_area_um2"]).all()


@pytest.mark.parametrize(
    "conc", [np.zeros((64, 64)), np.zeros((64, 64, 4)), np.zeros((3, 64, 64, 3)), [[1.0]]]
)
def test_wrong_concentration_shapes_raise(conc):
    with pytest.raises(ConfigError, match="H, W, 3"):
        measure_cells(pd.DataFrame({"x": [1.0], "y": [1.0]}), conc, 0.5, "CD8")


@pytest.mark.parametrize("mpp", [0, -1, math.nan, "a"])
def test_bad_mpp_raises(mpp):
    with pytest.raises(ConfigError, match="mpp"):
        measure_cells(pd.DataFrame({"x": [1.0], "y": [1.0]}), np.zeros((8, 8, 3)), mpp, "CD8")


def test_validate_cells_fills_defaults_and_rejects_bad_tables():
    out = validate_cells(pd.DataFrame({"x": [1, 2], "y": [3, 4], "extra": ["a", "b"]}))
    assert list(out.columns) == [*CELL_COLUMNS, "extra"]
    assert out["positive"].dtype == bool
    assert out["intensity_bin"].dtype == np.int8
    assert out["cell_class"].tolist() == ["other", "other"]
    with pytest.raises(ConfigError, match="x"):
        validate_cells(pd.DataFrame({"y": [1.0]}))
    with pytest.raises(ConfigError, match="lymphocyte"):
        validate_cells(pd.DataFrame({"x": [1.0], "y": [1.0], "cell_class": ["lymphocyte"]}))
    with pytest.raises(ConfigError, match="NaN"):
        validate_cells(pd.DataFrame({"x": [math.nan], "y": [1.0]}))


def test_segment_nuclei_stays_within_its_radius():
    signal = np.full((100, 100), 1.0, np.float32)  # everything dark
    labels = segment_nuclei(np.array([[50.0, 50.0]]), signal, mpp=0.5, max_radius_um=5.0)
    assert (labels == 1).sum() == pytest.approx(math.pi * 10**2, rel=0.1)
