"""Fields as inputs (issue: real images end to end): tissue and glass that hold on real fields,
the user's regions as drawn, and ink, frames and pigment that are not cells.

The real-set checks run each field through ``score_image`` exactly as a user does and compare
with the labels; ``benchmarks/eval_fields.py`` prints the same numbers for every set.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely

import tilscore
from tilscore.detect import detect_cells
from tilscore.errors import TilscoreWarning
from tilscore.regions import Region, RegionSet
from tilscore.synthetic import synthetic_tile
from tilscore.tissue import find_glass, tissue_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_sets


def _share_in_mask(cases) -> float:
    inside = total = 0
    for c in cases:
        t = c["truth"]
        m = tissue_mask(c["image"], c["mpp"])
        inside += int(m.contains(t.x, t.y).sum())
        total += len(t)
    return inside / total


@pytest.mark.parametrize("name", ["deepliif", "lyon19", "dlubak", "ehh2025"])
def test_labelled_cells_lie_in_the_tissue_mask(shared_data, name):
    cases = list(real_sets.LOADERS[name](shared_data))
    assert _share_in_mask(cases) >= 0.98


def test_endonuke_cells_lie_in_the_tissue_mask(shared_data):
    ids = real_sets.endonuke_ids(shared_data)[::8]
    assert _share_in_mask(real_sets.endonuke_cases(shared_data, ids)) >= 0.98


def test_field_with_no_glass_is_all_tissue_and_says_why(shared_data):
    case = next(real_sets.ehh_cases(shared_data))
    m = tissue_mask(case["image"], case["mpp"])
    assert m.mask.mean() > 0.95
    assert m.info["background_source"].startswith("default 255")
    assert find_glass(case["image"], case["mpp"]).i0 is None


def test_score_image_counts_what_detect_cells_finds(shared_data):
    """The whole pipeline counts the cells the detector finds on a field (within 2 %), with no
    warning storm."""
    for case in real_sets.deepliif_cases(shared_data):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TilscoreWarning)
            res = tilscore.score_image(case["image"], mpp=case["mpp"], marker="Ki67")
        assert not [w for w in caught if issubclass(w.category, TilscoreWarning)]
        counted = int(res.row("tissue")["n_cells"])
        found = len(detect_cells(case["image"], mpp=case["mpp"], marker="Ki67"))
        assert counted == pytest.approx(found, rel=0.02), case["name"]
        assert res.row("tissue")["area_mm2"] == pytest.approx(
            case["image"].shape[0] * case["image"].shape[1] * case["mpp"] ** 2 / 1e6, rel=0.05
        )


def test_batch_of_fields_with_a_default_pixel_size(shared_data, tmp_path):
    """A folder of exported PNG fields (no µm/px in the file) is a batch with --mpp: each field
    counts what score_image counts; a file's own µm/px is kept; without --mpp the PNGs are not
    taken and a TIFF without resolution is reported, not guessed."""
    import json
    import shutil

    import pandas as pd
    import tifffile

    from tilscore.batch import run_batch

    cases = list(real_sets.deepliif_cases(shared_data))[:2]
    folder = tmp_path / "fields"
    folder.mkdir()
    for case in cases:
        shutil.copy(case["path"], folder / case["path"].name)
    tifffile.imwrite(folder / "nompp.tif", cases[0]["image"])  # no resolution tags
    shutil.copy(
        Path(__file__).resolve().parents[1] / "example_slides" / "synthetic_cd8.tif",
        folder / "own_mpp.tif",
    )
    fast = {"output": {"overlay": False, "heatmap": False, "report": False}}
    report = run_batch(
        [folder], tmp_path / "out", config=fast, marker="Ki67", processes=False, workers=1,
        mpp=0.25,
    )  # fmt: skip
    ids = {c["path"].stem for c in cases}
    assert set(report.done) == ids | {"nompp", "own_mpp"}
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    tissue = summary[summary["compartment"] == "tissue"].set_index("slide_id")
    for case in cases:
        want = tilscore.score_image(case["image"], mpp=0.25, marker="Ki67").row("tissue")
        assert tissue.loc[case["path"].stem, "n_cells"] == want["n_cells"]
    done = json.loads((tmp_path / "out" / "own_mpp" / "batch.json").read_text())
    assert done["mpp"] == pytest.approx(0.5)  # the file's, not --mpp
    done = json.loads((tmp_path / "out" / "nompp" / "batch.json").read_text())
    assert (done["mpp"], done["mpp_source"]) == (0.25, "user")
    again = run_batch(
        [folder], tmp_path / "out2", config=fast, marker="Ki67", processes=False, workers=1
    )
    assert set(again.done) == {"own_mpp"}
    assert {r["slide_id"]: r["error_type"] for r in again.failed} == {
        "nompp": "MissingPixelSizeError"
    }


def test_roi_drawn_as_tumour_is_scored_as_drawn(shared_data):
    """dlubak's tumour ROI as a Tumor annotation: the intratumoral row counts the nests' cells."""
    case = next(real_sets.dlubak_cases(shared_data))
    regions = RegionSet.from_mask(case["roi"], 1.0, "tumour")
    res = tilscore.score_image(case["image"], mpp=case["mpp"], marker="Ki67", regions=regions)
    row = res.row("intratumoral")
    assert row["source"] == "annotation"
    roi_area = case["roi"].sum() * case["mpp"] ** 2 / 1e6
    assert row["area_mm2"] == pytest.approx(roi_area, rel=0.1)
    assert row["n_cells"] >= 0.8 * len(case["truth"])


def test_red_frame_of_a_viewer_screenshot_holds_no_positive_cell(shared_data):
    path = shared_data / "unlabeled-ihc" / "real-markers" / "cd8_arontier-iciscore_1.png"
    rgb = real_sets.read_rgb(path)
    res = tilscore.score_image(rgb, mpp=0.7, marker="CD8")
    h, w = rgb.shape[:2]
    pos = res.cells[
        res.cells.positive & res.cells.compartment.isin(["tissue", "stromal", "intratumoral"])
    ]
    near_frame = (pos.x < 12) | (pos.y < 12) | (pos.x > w - 12) | (pos.y > h - 12)
    assert not near_frame.any()
    assert res.row("tissue")["excluded_area_mm2"] > 0
    assert int(res.row("tissue")["n_positive"]) > 20  # the real CD8 cells are still counted


def _tile_with_marks():
    rgb, truth = synthetic_tile("CD8", size_px=768, mpp=0.5, seed=3)
    rgb = rgb.copy()
    cv2.rectangle(rgb, (0, 0), (767, 767), (255, 0, 0), 4)  # a viewer's red frame
    cv2.line(rgb, (60, 700), (700, 620), (40, 150, 70), 40)  # green pen
    for x, y in ((200, 200), (420, 330), (560, 180)):  # black pigment clumps (16 µm across)
        cv2.circle(rgb, (x, y), 16, (20, 20, 22), -1)
    return rgb, truth


def test_ink_frame_and_pigment_are_excluded_and_counted():
    rgb, _ = _tile_with_marks()
    res = tilscore.score_image(rgb, mpp=0.5, marker="CD8")
    tissue = res.row("tissue")
    assert tissue["excluded_area_mm2"] > 0.01  # pen, frame and clumps, grown by 5 µm
    cells = res.cells
    counted = cells[cells.compartment.isin(["tissue", "stromal", "intratumoral"])]
    x, y = counted.x.to_numpy(), counted.y.to_numpy()
    on_frame = (x < 6) | (y < 6) | (x > 762) | (y > 762)
    assert not (counted.positive.to_numpy() & on_frame).any()
    for px, py in ((200, 200), (420, 330), (560, 180)):
        assert not (np.hypot(x - px, y - py) < 12).any()
    # switched off in the config: nothing excluded
    off = tilscore.score_image(
        rgb, mpp=0.5, marker="CD8", config={"regions": {"exclude_artefacts": False}}
    )
    assert off.row("tissue")["excluded_area_mm2"] == 0


def test_annotation_mostly_on_glass_is_kept_with_a_warning():
    rgb, _ = synthetic_tile("CD8", size_px=512, mpp=0.5, seed=5)
    field = np.full((512, 1024, 3), 245, np.uint8)
    field[:, :512] = rgb
    tumour = shapely.box(256, 0, 768, 512)  # half on tissue, half on glass
    regions = RegionSet([Region("tumour", tumour, "Tumor")], "annotation")
    with pytest.warns(TilscoreWarning, match="scored as drawn"):
        res = tilscore.score_image(field, mpp=0.5, marker="CD8", regions=regions)
    row = res.row("intratumoral")
    assert row["area_mm2"] == pytest.approx(512 * 512 * 0.25 / 1e6, rel=0.02)


def test_annotation_covering_the_whole_field():
    rgb, _ = synthetic_tile("CD8", size_px=256, mpp=0.5, seed=6)
    regions = RegionSet([Region("tumour", shapely.box(0, 0, 256, 256), "Tumor")], "annotation")
    res = tilscore.score_image(rgb, mpp=0.5, marker="CD8", regions=regions)
    assert res.row("intratumoral")["area_mm2"] == pytest.approx(256 * 256 * 0.25 / 1e6, rel=0.01)
    assert res.row("intratumoral")["n_cells"] > 0


def test_roi_wholly_on_glass_scores_zero_cells_with_a_warning():
    rgb, _ = synthetic_tile("CD8", size_px=256, mpp=0.5, seed=7)
    field = np.full((256, 768, 3), 246, np.uint8)
    field[:, :256] = rgb
    regions = RegionSet([Region("roi", shapely.box(512, 0, 768, 256), "ROI")], "annotation")
    with pytest.warns(TilscoreWarning, match="cover no tissue"):
        res = tilscore.score_image(field, mpp=0.5, marker="CD8", regions=regions)
    assert res.row("tissue")["n_cells"] == 0


@pytest.mark.parametrize(
    "image",
    [
        np.full((300, 300, 3), 250, np.uint8),  # all glass
        np.zeros((300, 300, 3), np.uint8),  # all black
        np.tile(np.array([120, 70, 30], np.uint8), (300, 300, 1)),  # all brown
    ],
    ids=["glass", "black", "brown"],
)
def test_degenerate_fields_give_clear_results(image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)
        res = tilscore.score_image(image, mpp=0.5, marker="CD8")
    assert res.row("tissue")["n_positive"] <= 2
    assert np.isfinite(res.row("tissue")["area_mm2"])


def test_small_patch_and_odd_pixel_types():
    rgb, _ = synthetic_tile("CD8", size_px=128, mpp=0.5, seed=8)  # a 64 µm patch
    res = tilscore.score_image(rgb, mpp=0.5, marker="CD8")
    assert res.row("tissue")["area_mm2"] == pytest.approx(128 * 128 * 0.25 / 1e6, rel=0.05)
    n = res.row("tissue")["n_cells"]
    assert n > 0
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert tilscore.score_image(rgba, mpp=0.5, marker="CD8").row("tissue")["n_cells"] == n
    sixteen = rgb.astype(np.uint16) * 257
    assert tilscore.score_image(sixteen, mpp=0.5, marker="CD8").row("tissue")["n_cells"] == n


def test_one_pixel_image_scores_nothing():
    res = tilscore.score_image(np.full((1, 1, 3), 200, np.uint8), mpp=0.5, marker="CD8")
    assert res.row("tissue")["n_cells"] == 0
