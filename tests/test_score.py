"""Scoring: per-compartment metrics against synthetic truth, outputs, reclassify, bad input."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

import tilscore
from tilscore.errors import ConfigError, RegionError, TilscoreWarning
from tilscore.score import SUMMARY_COLUMNS

EXAMPLES = Path(__file__).resolve().parents[1] / "example_slides"
# truth compartment of the synthetic cells -> reported compartment
TRUTH_COMPARTMENT = {"tumour": "intratumoral", "stroma": "stromal"}


@pytest.fixture(scope="module")
def scored():
    """Each example slide scored with its own annotations (computed once per module)."""
    out = {}
    for marker in ("CD8", "CD68", "CD56"):
        stem = EXAMPLES / f"synthetic_{marker.lower()}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TilscoreWarning)
            out[marker] = tilscore.score_slide(
                f"{stem}.tif", marker=marker, regions=f"{stem}.regions.geojson"
            )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["CD8", "CD68", "CD56"])
def test_compartment_metrics_match_the_synthetic_truth(scored, marker):
    res = scored[marker]
    truth = pd.read_csv(EXAMPLES / f"synthetic_{marker.lower()}.cells.csv")
    for tname, comp in TRUTH_COMPARTMENT.items():
        sel = truth["compartment"] == tname
        n, k = int(sel.sum()), int((sel & truth["positive"]).sum())
        row = res.row(comp)
        assert row["source"] == "annotation"
        # % positive within 2 points of the truth
        assert row["pct_positive"] == pytest.approx(100 * k / n, abs=2.0), comp
        # density within 10 % (same area: the annotated compartment)
        assert row["density_per_mm2"] == pytest.approx(k / row["area_mm2"], rel=0.10), comp
        assert row["n_cells"] == pytest.approx(n, rel=0.03)


def test_summary_is_consistent(scored):
    s = scored["CD8"].summary
    assert list(s.columns) == [*SUMMARY_COLUMNS, "stain_check"]
    assert set(s.stain_check) == {"ok"}
    assert list(s["compartment"]) == [
        "intratumoral",
        "stromal",
        "invasive_margin",
        "tumour_bed",
        "tissue",
    ]
    s = s.set_index("compartment")
    bed = s.loc["tumour_bed"]
    assert bed["n_cells"] == s.loc["intratumoral", "n_cells"] + s.loc["stromal", "n_cells"]
    assert bed["area_mm2"] == pytest.approx(
        s.loc["intratumoral", "area_mm2"] + s.loc["stromal", "area_mm2"], rel=1e-6
    )
    assert (s[["n_bin0", "n_bin1", "n_bin2", "n_bin3"]].sum(axis=1) == s["n_cells"]).all()
    assert (s["n_bin1"] + s["n_bin2"] + s["n_bin3"] == s["n_positive"]).all()
    assert ((s["h_score"] >= 0) & (s["h_score"] <= 300)).all()
    assert ((s["area_fraction_pct"] > 0) & (s["area_fraction_pct"] < 100)).all()
    assert (s["density_per_mm2"] * s["area_mm2"]).round().astype(int).tolist() == s[
        "n_positive"
    ].tolist()


def test_cells_carry_their_compartment(scored):
    res = scored["CD8"]
    cells = res.cells
    assert set(cells["compartment"].unique()) <= {
        "intratumoral",
        "stromal",
        "tissue",
        "excluded",
        "outside",
    }
    assert cells["in_margin"].dtype == bool
    n_intra = int((cells["compartment"] == "intratumoral").sum())
    assert n_intra == res.row("intratumoral")["n_cells"]


def test_provenance_records_what_was_used(scored):
    prov = scored["CD68"].provenance
    assert prov["tilscore_version"] == tilscore.__version__
    assert prov["detection"]["detector"] == "cnn"
    assert len(prov["detection"]["model_sha256"]) == 64
    assert prov["detection"]["marker"]["name"] == "CD68"
    digest = hashlib.sha256((EXAMPLES / "synthetic_cd68.tif").read_bytes()).hexdigest()
    assert prov["slide"]["file_sha256"] == digest  # read in a thread during the stain QC
    assert prov["slide"]["file_size"] == (EXAMPLES / "synthetic_cd68.tif").stat().st_size
    assert prov["regions"]["source"].endswith("synthetic_cd68.regions.geojson")
    assert prov["config_sha256"] == tilscore.load_config().hash()
    assert len(prov["detection"]["stains"]["vectors"]) >= 2


def test_reclassify_changes_positives_without_detection(scored):
    res = scored["CD8"]
    higher = res.reclassify(threshold_od=0.3)
    assert list(higher.summary.columns) == list(res.summary.columns)  # stain_check kept
    assert len(higher.cells) == len(res.cells)
    assert higher.cells[["x", "y"]].equals(res.cells[["x", "y"]])
    assert higher.summary["n_positive"].sum() < res.summary["n_positive"].sum()
    assert higher.provenance["detection"]["marker"]["threshold_od"] == 0.3
    assert res.provenance["detection"]["marker"]["threshold_od"] != 0.3  # original unchanged
    back = higher.reclassify(threshold_od=res.provenance["detection"]["marker"]["threshold_od"])
    assert back.summary["n_positive"].tolist() == res.summary["n_positive"].tolist()


def test_save_writes_every_output(scored, tmp_path):
    res = scored["CD56"]
    files = res.save(tmp_path / "out")
    names = {p.name for p in files.values()}
    assert names == {
        "summary.csv",
        "cells.parquet",
        "cells.geojson",
        "regions.geojson",
        "compartments.geojson",
        "overlay.png",
        "heatmap.png",
        "run.json",
        "report.html",
    }
    summary = pd.read_csv(files["summary"])
    assert summary["n_positive"].tolist() == res.summary["n_positive"].tolist()
    cells = pd.read_parquet(files["cells"])
    assert len(cells) == len(res.cells)
    gj = json.loads(files["cells_geojson"].read_text())
    assert len(gj["features"]) == len(res.cells)
    assert {f["properties"]["classification"]["name"] for f in gj["features"]} == {
        "Positive",
        "Negative",
    }
    back = tilscore.load_regions(files["regions"])
    assert {"tumour", "stroma", "tumour_bed"} <= set(back.classes)
    run = json.loads(files["run"].read_text())
    assert run["detection"]["marker"]["name"] == "CD56"
    html = files["report"].read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "CD56" in html
    assert 'src="http' not in html  # self-contained
    from PIL import Image

    overlay = np.asarray(Image.open(files["overlay"]))
    assert overlay.std() > 10
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_automatic_compartments_without_annotations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)
        res = tilscore.score_slide(EXAMPLES / "synthetic_cd8.tif", marker="CD8")
    assert res.row("intratumoral")["source"] == "automatic"
    assert res.row("tissue")["source"] == "tissue mask"
    from tilscore.synthetic.layout import SyntheticSlideSpec, make_layout

    spec = json.loads((EXAMPLES / "synthetic_cd8.spec.json").read_text())["spec"]
    truth = make_layout(SyntheticSlideSpec.from_dict(spec)).regions
    got = res.compartments.geometries["intratumoral"]
    iou = got.intersection(truth["tumour"]).area / got.union(truth["tumour"]).area
    assert iou >= 0.8


def test_score_image_on_a_field_with_an_roi():
    from tilscore.synthetic import synthetic_tile

    image, _ = synthetic_tile(marker="CD8", size_px=768, mpp=0.5, seed=5)
    roi = {"roi": shapely.box(0, 0, 384, 768)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)
        res = tilscore.score_image(image, 0.5, "CD8", regions=roi)
    assert res.path is None
    assert res.row("tissue")["area_mm2"] <= 384 * 768 * 0.25 / 1e6 + 1e-9
    assert (res.cells.loc[res.cells["compartment"] != "outside", "x"] < 384).all()


def test_unknown_marker_and_bad_config_are_clear_errors():
    with pytest.raises(ConfigError, match="known markers"):
        tilscore.score_slide(EXAMPLES / "synthetic_cd8.tif", marker="CD999")
    with pytest.raises(ConfigError, match="unknown key"):
        tilscore.score_slide(EXAMPLES / "synthetic_cd8.tif", config={"detect": {"tile_size": 512}})


def test_regions_in_another_scale_get_a_hint(tmp_path):
    big = {
        "type": "Feature",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[50000, 50000], [60000, 50000], [60000, 60000], [50000, 50000]]],
        },
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }
    path = tmp_path / "r.geojson"
    path.write_text(json.dumps([big]))
    with pytest.raises(RegionError, match="level-0 pixels"):
        tilscore.score_slide(EXAMPLES / "synthetic_cd8.tif", regions=path)


def test_blank_slide_gives_honest_zeros():
    blank = np.full((600, 800, 3), 245, np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TilscoreWarning)
        res = tilscore.score_image(blank, 0.5, "CD8")
    assert any("no tissue" in str(w.message) for w in caught)
    assert len(res.cells) == 0
    assert (res.summary["n_cells"] == 0).all()
    assert (res.summary["area_mm2"] == 0).all()
    assert res.summary["pct_positive"].isna().all()


@pytest.mark.shared_data
def test_real_ki67_field_scored_inside_its_roi_mask(shared_data):
    """dlubak 503-05: 160 annotated tumour nuclei inside the ROI; the ROI mask is the region."""
    from PIL import Image

    from tilscore.regions import RegionSet

    d = shared_data / "ki67-points-dlubak" / "labeled"
    if not d.is_dir():
        pytest.skip(f"{d} absent")
    image = np.asarray(Image.open(d / "503-05_image.png").convert("RGB"))
    roi = np.asarray(Image.open(d / "503-05_roi.png").convert("L")) > 127
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TilscoreWarning)
        res = tilscore.score_image(image, 0.5, "Ki67", regions=RegionSet.from_mask(roi, 1.0, "roi"))
    inside = res.cells[res.cells["compartment"] != "outside"]
    iy, ix = inside["y"].astype(int).clip(0, roi.shape[0] - 1), inside["x"].astype(int)
    assert roi[iy, ix.clip(0, roi.shape[1] - 1)].mean() > 0.97  # counted cells lie in the ROI
    row = res.row("tissue")
    assert row["area_mm2"] == pytest.approx(roi.sum() * 0.25 / 1e6, rel=0.05)
    # the annotator marked 160 tumour nuclei (not the immune and stromal cells among them); the
    # CNN finds 87 of them one to one within 4 µm (its real-data gap, issue 3): a regression guard
    from tilscore.evaluate import match_points

    marks = pd.read_csv(d / "503-05_markers.csv")
    pairs = match_points(inside[["x", "y"]].to_numpy(), marks[["x", "y"]].to_numpy() + 0.5, 8.0)
    assert len(pairs) / len(marks) > 0.5
    assert row["n_cells"] >= len(pairs)


def test_regions_on_glass_warn_and_count_nothing():
    glass = {"roi": shapely.box(0, 2800, 150, 2990)}  # a corner of the CD8 example: no tissue
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TilscoreWarning)
        res = tilscore.score_slide(EXAMPLES / "synthetic_cd8.tif", "CD8", regions=glass)
    assert any("cover no tissue" in str(w.message) for w in caught)
    assert res.row("tissue")["n_cells"] == 0
    assert res.row("intratumoral")["area_mm2"] == 0
