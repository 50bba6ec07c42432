"""Reviewing a result without a display: edits, undo/redo, recount, audit trail, round trip."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

import tilscore
from tilscore.errors import TilscoreError, TilscoreWarning
from tilscore.regions import Region, RegionSet, load_regions
from tilscore.results import export_labels, load_result, load_review
from tilscore.review import REVIEW_FILE, Review, ReviewError, read_review_log

EXAMPLES = Path(__file__).resolve().parents[1] / "example_slides"
#: a 400 x 400 µm box of the CD8 example with nests, stroma and positive cells (level-0 px)
BOX = shapely.box(1600, 1100, 2400, 1900)


@pytest.fixture(scope="module")
def scored():
    """The CD8 example scored in BOX with its annotated tumour / stroma (a few seconds)."""
    regions = load_regions(EXAMPLES / "synthetic_cd8.regions.geojson")
    kept = [r for r in regions if r.cls in ("tumour", "stroma", "tumour_bed")]
    kept.append(Region("roi", BOX, "Region*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)
        return tilscore.score_slide(
            EXAMPLES / "synthetic_cd8.tif", "CD8", regions=RegionSet(kept, "test")
        )


@pytest.fixture
def no_detection(monkeypatch):
    """Any detection during the test fails it: edits recount, they never detect."""

    def boom(*a, **k):
        raise AssertionError("detection ran during a review")

    import tilscore.detect

    monkeypatch.setattr(tilscore.detect, "iter_detect_cells", boom)
    monkeypatch.setattr(tilscore.detect, "detect_cells", boom, raising=False)


def _row(summary: pd.DataFrame, comp: str) -> dict:
    return summary.set_index("compartment").loc[comp].to_dict()


def _in(cells: pd.DataFrame, comp: str, positive: bool) -> list[int]:
    sel = (cells["compartment"] == comp) & (cells["positive"] == positive)
    return np.flatnonzero(sel.to_numpy()).tolist()


def test_flip_delete_add_and_class_recount_each_compartment(scored, no_detection):
    review = Review(scored, user="pathologist")
    before = _row(review.summary, "intratumoral")
    stroma_before = _row(review.summary, "stromal")
    negs = _in(scored.cells, "intratumoral", False)[:3]
    review.set_positive(negs)  # flip three negative tumour-nest cells
    after = _row(review.summary, "intratumoral")
    assert after["n_positive"] == before["n_positive"] + 3
    assert after["n_cells"] == before["n_cells"]
    assert _row(review.summary, "stromal")["n_positive"] == stroma_before["n_positive"]
    pos = _in(scored.cells, "stromal", True)[:1]
    review.delete(pos)
    assert _row(review.summary, "stromal")["n_positive"] == stroma_before["n_positive"] - 1
    assert _row(review.summary, "stromal")["n_cells"] == stroma_before["n_cells"] - 1
    # an immune cell added in the stroma, positive
    x, y = scored.cells.iloc[_in(scored.cells, "stromal", False)[0]][["x", "y"]]
    cid = review.add_cell(x + 3, y + 3, positive=True, cell_class="immune")
    assert cid == len(scored.cells)
    s = _row(review.summary, "stromal")
    assert (s["n_cells"], s["n_positive"]) == (
        stroma_before["n_cells"],
        stroma_before["n_positive"],
    )
    area = stroma_before["area_mm2"]
    assert s["density_per_mm2"] == pytest.approx(s["n_positive"] / area)
    # a class change: CD8 counts every class, so the count stays; the class is recorded
    pos_nest = _in(review.cells, "intratumoral", True)
    auto = [i for i in pos_nest if pd.isna(review.cells["manual_positive"].iloc[i])][:1]
    cid = int(review.cells["cell_id"].iloc[auto[0]])
    review.set_class([cid], "tumour")
    assert _row(review.summary, "intratumoral")["n_positive"] == after["n_positive"]
    counts = review.counts()
    assert (counts["flipped"], counts["added"], counts["removed"]) == (3, 1, 1)
    assert counts["class_changed"] == 1
    assert counts["edits"] == 4
    # a rule that counts immune cells only: the re-classed cell is negative now, manual calls stay
    review.reclassify(cell_classes=("immune",))
    cells = review.cells.set_index("cell_id")
    assert not cells.loc[cid, "positive"]
    assert cells.loc[cid, "cell_class"] == "tumour"
    assert cells.loc[negs, "positive"].all()


def test_undo_redo_walk_the_same_states(scored, no_detection):
    review = Review(scored, user="a")
    states = [review.summary.copy()]
    review.set_positive([0, 1])
    states.append(review.summary.copy())
    review.delete([2, 3, 4])
    states.append(review.summary.copy())
    x, y = scored.cells[["x", "y"]].iloc[5]
    review.add_cell(x + 2, y, positive=False, cell_class="tumour")
    states.append(review.summary.copy())
    for expected in reversed(states[:-1]):
        assert review.undo() is not None
        pd.testing.assert_frame_equal(review.summary, expected)
    assert review.undo() is None  # nothing left
    base_cols = ["x", "y", "positive", "cell_class", "intensity_bin"]
    pd.testing.assert_frame_equal(review.cells[base_cols], scored.cells[base_cols])
    for expected in states[1:]:
        assert review.redo() is not None
        pd.testing.assert_frame_equal(review.summary, expected)
    assert review.redo() is None
    review.undo()
    review.set_positive([10])  # a new edit ends the redo chain
    assert not review.can_redo
    actions = [r.action for r in review.records]
    assert actions == [
        "set_positive",
        "delete",
        "add_cell",
        *["undo"] * 3,
        *["redo"] * 3,
        "undo",
        "set_positive",
    ]


def test_audit_records_time_user_action_ids_before_after(scored, monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "os-user")
    review = Review(scored)
    review.set_positive([7])
    review.user = "Dr Override"  # the widget's user field
    review.set_class([7], "other")
    first, second = review.records
    assert first.user == "os-user"
    assert second.user == "Dr Override"
    assert first.action == "set_positive"
    assert first.ids == (7,)
    was = bool(scored.cells["positive"].iloc[7])
    assert first.before == [{"positive": was, "manual": None}]
    assert first.after == [{"positive": not was, "manual": not was}]
    assert second.before == [{"cell_class": str(scored.cells["cell_class"].iloc[7])}]
    assert second.after == [{"cell_class": "other"}]
    assert first.time[:4].isdigit()
    assert "T" in first.time


def test_log_is_appended_as_edits_are_made_and_round_trips(scored, tmp_path, no_detection):
    review = Review(scored, user="first")
    review.set_positive([0])
    files = review.save(tmp_path / "out")
    log = tmp_path / "out" / REVIEW_FILE
    assert files["review"] == log
    text0 = log.read_bytes()
    review.delete([1])  # attached: written at once, no save needed
    text1 = log.read_bytes()
    assert text1.startswith(text0)
    assert text1.count(b"\n") == text0.count(b"\n") + 1
    header, records = read_review_log(log)
    assert header["n_cells"] == len(scored.cells)
    assert len(records) == 2
    # reopen (another user) and go on: the history is there, undo reaches the first session
    again = load_review(tmp_path / "out", user="second")
    pd.testing.assert_frame_equal(again.summary, review.summary)
    again.undo()
    assert again.records[-1].user == "second"
    assert again.records[-1].ref == 2
    assert log.read_bytes().startswith(text1)
    loaded = load_result(tmp_path / "out")
    assert loaded.reviewed
    pd.testing.assert_frame_equal(loaded.summary, again.summary)
    scored_only = load_result(tmp_path / "out", reviewed=False)
    assert not scored_only.reviewed
    pd.testing.assert_frame_equal(
        scored_only.summary, scored.summary, check_dtype=False, check_exact=False
    )


def test_run_json_report_and_reviewed_files_say_what_changed(scored, tmp_path):
    review = Review(scored, user="pat")
    nest_neg = _in(scored.cells, "intratumoral", False)[:2]
    review.set_positive(nest_neg)
    review.delete(_in(scored.cells, "stromal", True)[:1])
    review.save(tmp_path)
    run = json.loads((tmp_path / "run.json").read_text())
    rev = run["review"]
    assert rev["counts"]["flipped"] == 2
    assert rev["counts"]["removed"] == 1
    assert rev["users"] == ["pat"]
    before = _row(scored.summary, "intratumoral")["n_positive"]
    assert rev["summary_before"]["intratumoral"]["n_positive"] == before
    assert rev["summary_after"]["intratumoral"]["n_positive"] == before + 2
    reviewed = pd.read_csv(tmp_path / "summary_reviewed.csv")
    assert _row(reviewed, "intratumoral")["n_positive"] == before + 2
    assert _row(pd.read_csv(tmp_path / "summary.csv"), "intratumoral")["n_positive"] == before
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Review</h2>" in html
    assert "2 flipped" in html
    assert "1 removed" in html
    cells = pd.read_parquet(tmp_path / "cells_reviewed.parquet")
    assert len(cells) == len(scored.cells) - 1
    assert cells["manual_positive"].notna().sum() == 2


def test_reclassify_keeps_manual_calls_unless_asked(scored, tmp_path):
    review = Review(scored)
    neg = _in(scored.cells, "intratumoral", False)[0]
    review.set_positive([neg], True)
    review.save(tmp_path)
    result = load_result(tmp_path)
    strict = result.reclassify(threshold_od=5.0)  # no cell reaches it
    assert strict.cells["positive"].sum() == 1  # only the manual call
    assert bool(strict.cells.set_index("cell_id").loc[neg, "positive"])
    assert strict.provenance["review"]["summary_after"]["tissue"]["n_positive"] == 1
    dropped = result.reclassify(keep_manual=False, threshold_od=5.0)
    assert dropped.cells["positive"].sum() == 0
    # the same in the live review: the threshold moves, the manual call stays, and it is audited
    review.reclassify(threshold_od=5.0)
    assert review.cells["positive"].sum() == 1
    assert review.records[-1].action == "reclassify"
    assert review.records[-1].after == {"threshold_od": 5.0}


def test_region_edit_rebuilds_compartments_and_undoes(scored, no_detection):
    review = Review(scored)
    inside = scored.cells[scored.cells["compartment"] == "stromal"]
    x, y = inside[["x", "y"]].median()
    hole = shapely.box(x - 60, y - 60, x + 60, y + 60)
    n_hit = int(shapely.contains_xy(hole, scored.cells["x"], scored.cells["y"]).sum())
    assert n_hit > 0
    before = review.summary.copy()
    review.set_regions(RegionSet([*review.regions.regions, Region("exclude", hole, "Ignore*")]))
    assert (review.cells["compartment"] == "excluded").sum() == n_hit
    tissue = _row(review.summary, "tissue")
    assert tissue["n_cells"] == _row(before, "tissue")["n_cells"] - n_hit
    assert tissue["area_mm2"] == pytest.approx(
        _row(before, "tissue")["area_mm2"] - hole.area * scored.mpp**2 / 1e6, rel=1e-6
    )
    assert review.counts()["region_edits"] == 1
    # a cell cannot be added in the excluded area (it would not count); nothing is recorded
    with pytest.raises(ReviewError, match="excluded region"):
        review.add_cell(x, y, positive=True)
    assert len(review.records) == 1
    review.undo()
    pd.testing.assert_frame_equal(
        review.summary.drop(columns="source"), before.drop(columns="source")
    )


def test_region_edits_replay_from_the_log(scored, tmp_path):
    review = Review(scored)
    nests = review.regions.geometry("tumour")
    smaller = shapely.intersection(nests, shapely.box(1600, 1100, 2000, 1900))
    kept = [r for r in review.regions if r.cls != "tumour"] + [Region("tumour", smaller, "Tumor")]
    review.set_regions(RegionSet(kept))
    review.save(tmp_path)
    loaded = load_result(tmp_path)
    pd.testing.assert_frame_equal(loaded.summary, review.summary)
    assert (tmp_path / "regions_reviewed.geojson").is_file()


# -- bad input ---------------------------------------------------------------------------------


def test_cells_outside_the_slide_or_tissue_are_refused(scored):
    review = Review(scored)
    with pytest.raises(ReviewError, match="outside the slide"):
        review.add_cell(-5, 10, positive=True)
    with pytest.raises(ReviewError, match="outside the scored tissue"):
        review.add_cell(100, 100, positive=True)  # slide, but not in the scored box
    with pytest.raises(ReviewError, match="unknown cell class"):
        review.add_cell(2000, 1500, positive=True, cell_class="lymphocyte")
    with pytest.raises(ReviewError, match="no cell with id"):
        review.delete([10**6])
    review.delete([0])
    with pytest.raises(ReviewError, match="is deleted"):
        review.set_positive([0])
    assert [r.action for r in review.records] == ["delete"]


def _saved(scored, folder: Path) -> Path:
    review = Review(scored, user="u")
    review.set_positive([0, 1])
    review.delete([2])
    review.set_class([3], "tumour")
    review.save(folder)
    return folder / REVIEW_FILE


def test_corrupt_or_hand_edited_logs_are_named_errors(scored, tmp_path):
    log = _saved(scored, tmp_path)
    good = log.read_text()
    lines = good.splitlines()
    cases = {
        "not JSON": "\n".join([lines[0], "{oops", *lines[2:]]) + "\n",
        "unknown action": good.replace('"action": "delete"', '"action": "explode"'),
        "edit 2 .delete. does not apply": good.replace('"ids": [2]', '"ids": [999999]'),
        "the edit says it was": good.replace(
            '"positive": false, "manual": null}, {', '"positive": true, "manual": null}, {', 1
        ),
        "newer than this tilscore": good.replace('"schema": 1', '"schema": 99'),
        "other cells": good.replace('"n_cells": ', '"n_cells": 1', 1),
        "is empty": "",
    }
    for message, text in cases.items():
        log.write_text(text)
        with pytest.raises(ReviewError, match=message) as info:
            load_result(tmp_path)
        assert str(log) in str(info.value)
    log.write_text(good)
    assert load_result(tmp_path).reviewed


def test_a_line_cut_short_by_a_crash_is_set_aside(scored, tmp_path):
    log = _saved(scored, tmp_path)
    good = log.read_text()
    log.write_text(good + '{"type": "edit", "seq": 4, "ti')
    with pytest.warns(TilscoreWarning, match="cut short"):
        review = load_review(tmp_path)
    assert len(review.records) == 3
    assert log.read_text() == good  # the partial line moved aside, the log ends cleanly
    assert (tmp_path / "review.jsonl.partial").read_text().startswith('{"type": "edit"')
    review.set_positive([5])
    assert len(read_review_log(log)[1]) == 4


def test_foreign_log_is_not_overwritten(scored, tmp_path):
    log = _saved(scored, tmp_path)
    text = log.read_text()
    other = Review(scored, user="someone else")
    other.set_positive([9])
    with pytest.raises(ReviewError, match="not this review's"):
        other.save(tmp_path)
    assert log.read_text() == text


def test_folder_from_an_older_version_says_how_to_fix_it(scored, tmp_path):
    scored.save(tmp_path)
    (tmp_path / "compartments.geojson").unlink()  # what tilscore before the review wrote
    with pytest.raises(TilscoreError, match=r"no compartments\.geojson") as info:
        load_result(tmp_path)
    assert "tilscore score" in str(info.value)
    with pytest.raises(TilscoreError, match="result folder not found"):
        load_result(tmp_path / "nothing")


def test_reviewed_result_cannot_be_reviewed_twice_in_memory(scored, tmp_path):
    review = Review(scored)
    review.set_positive([0])
    with pytest.raises(ReviewError, match="already reviewed"):
        Review(review.result())


# -- fine-tuning labels ---------------------------------------------------------------------


def test_corrections_export_as_finetuning_labels(scored, tmp_path):
    review = Review(scored)
    review.set_positive([0], True)
    review.delete([1])
    cid = review.add_cell(2000, 1500, positive=True, cell_class="immune")
    review.save(tmp_path / "a")
    manifest = export_labels([tmp_path / "a"], tmp_path / "labels")
    entry = manifest["slides"][0]
    assert entry["mpp"] == pytest.approx(scored.mpp)
    assert entry["labels"] == "synthetic_cd8.csv"
    table = pd.read_csv(tmp_path / "labels" / entry["labels"])
    assert list(table.columns) == ["x", "y", "positive", "cell_class"]
    assert len(table) == len(scored.cells)  # one deleted, one added
    added = table[(table["x"] == 2000) & (table["y"] == 1500)]
    assert added["positive"].tolist() == [True]
    assert added["cell_class"].tolist() == ["immune"]
    assert bool(table["positive"].iloc[0])
    x0, y0, w, h = entry["edited_box_px"]
    assert x0 <= 2000 <= x0 + w
    assert y0 <= 1500 <= y0 + h
    assert cid == len(scored.cells)
    unreviewed = tmp_path / "b"
    scored.save(unreviewed)
    with pytest.raises(TilscoreError, match="no review edits"):
        export_labels([unreviewed], tmp_path / "labels2")
    # the same from a shell
    from tilscore.cli import main as cli_main

    assert cli_main(["export-labels", str(tmp_path / "a"), "-o", str(tmp_path / "l3")]) == 0
    assert pd.read_csv(tmp_path / "l3" / "synthetic_cd8.csv").equals(table)
    assert cli_main(["export-labels", str(unreviewed), "-o", str(tmp_path / "l4")]) == 2
    assert cli_main(["export-labels", str(unreviewed), "-o", str(tmp_path / "l4"), "--all"]) == 0


def test_exported_labels_become_fields_and_a_fine_tuned_model(scored, tmp_path):
    """The review's corrections train the detector: the export is read back as fields around
    the edits (cells at the right place of each field) and tilscore.detect.finetune takes them."""
    from tilscore.detect import finetune
    from tilscore.detect.labels import read_label_export

    review = Review(scored, user="pat")
    review.set_positive([0, 1, 2])
    review.add_cell(2000, 1500, positive=True, cell_class="immune")
    review.save(tmp_path / "a")
    export_labels([tmp_path / "a"], tmp_path / "labels")
    images, labels, mpps = read_label_export(tmp_path / "labels", field_um=128)
    assert len(images) == len(labels) >= 2
    assert set(mpps) == {0.5}
    x0, y0, w, h = json.loads((tmp_path / "labels" / "labels.json").read_text())["slides"][0][
        "edited_box_px"
    ]
    n_box = sum(len(t) for t in labels)
    cells = scored.cells
    grow = 32 / scored.mpp
    inside = cells[
        cells["x"].between(x0 - grow, x0 + w + grow) & cells["y"].between(y0 - grow, y0 + h + grow)
    ]
    assert len(inside) + 1 >= n_box >= len(inside) - 5  # the box's cells (+ the added one)
    for rgb, table in zip(images, labels):
        assert rgb.dtype == np.uint8
        assert rgb.ndim == 3
        assert table["x"].between(0, rgb.shape[1]).all()
        assert table["y"].between(0, rgb.shape[0]).all()
        # a labelled nucleus is darker than the field's glass-and-stroma median
        ys, xs = (
            table["y"].astype(int).clip(0, rgb.shape[0] - 1),
            table["x"].astype(int).clip(0, rgb.shape[1] - 1),
        )
        assert np.median(rgb[ys, xs].sum(1)) < np.median(rgb.reshape(-1, 3).sum(1))
    res = finetune(
        images, labels, out=tmp_path / "model", base_model="synthetic", mpp=mpps, steps=2,
        batch_size=2, crop_px=96, val_every=1,
    )  # fmt: skip
    assert (res.folder / "model.safetensors").is_file()
    with pytest.raises(TilscoreError, match="not a label export"):
        read_label_export(tmp_path / "a")


def test_batch_and_cohort_use_the_reviewed_summary(scored, tmp_path):
    from tilscore.batch import BatchItem, _write_outputs
    from tilscore.cohort import load_cohort

    out = tmp_path / "batch"
    for sid in ("s1", "s2"):
        scored.save(out / sid)
    review = load_review(out / "s2")
    review.set_positive(_in(scored.cells, "intratumoral", False)[:4], True)
    review.save(out / "s2")
    items = [BatchItem(path=Path(f"{sid}.tif"), marker="CD8", slide_id=sid) for sid in ("s1", "s2")]
    summary_path, *_ = _write_outputs(out, items, items, [])
    table = pd.read_csv(summary_path)
    which = table.groupby("slide_id")["summary_from"].first().to_dict()
    assert which == {"s1": "scored", "s2": "reviewed"}
    nest = table[table["compartment"] == "intratumoral"].set_index("slide_id")["n_positive"]
    assert nest["s2"] == nest["s1"] + 4
    # reviewed after the batch: the cohort reads the newer reviewed values
    review.set_positive(_in(scored.cells, "stromal", False)[:2], True)
    review.save(out / "s2")
    cohort = load_cohort(summary_path)
    stroma = cohort[cohort["compartment"] == "stromal"].set_index("slide_id")["n_positive"]
    assert stroma["s2"] == stroma["s1"] + 2
    assert set(cohort["summary_from"]) == {"scored", "reviewed"}


def test_an_unwritable_log_keeps_the_edit_pending_and_writes_it_later(scored, tmp_path):
    log = _saved(scored, tmp_path)
    review = load_review(tmp_path)
    text = log.read_text()
    log.rename(tmp_path / "moved.jsonl")
    log.mkdir()  # review.jsonl is now a folder: appending fails
    with pytest.raises(ReviewError, match="could not be written to the audit trail"):
        review.set_positive([20])
    assert review.records[-1].action == "set_positive"  # applied and kept in memory
    assert review.pending == 1
    log.rmdir()
    (tmp_path / "moved.jsonl").rename(log)
    review.set_positive([21])  # both pending edits are written now, in order
    assert review.pending == 0
    _, records = read_review_log(log)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert log.read_text().startswith(text)
