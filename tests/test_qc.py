"""Slide-level QC: metadata summary, tissue, background and stain vectors of a whole slide."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tilscore import open_slide
from tilscore.qc import slide_info, slide_stain_qc, write_stain_qc, write_thumbnail
from tilscore.stain import RUIFROK_HDAB, angle_deg
from tilscore.synthetic import make_synthetic_slide


@pytest.fixture(scope="module")
def cd68_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("qc") / "cd68.tif"
    layout = make_synthetic_slide(path, marker="CD68", width_px=1600, height_px=1200, seed=5)
    return path, layout


def test_info_reports_geometry_and_pixel_size(cd68_slide):
    path, _ = cd68_slide
    with open_slide(path) as slide:
        info = slide_info(slide)
    assert (info["width_px"], info["height_px"]) == (1600, 1200)
    assert info["mpp"] == pytest.approx(0.5)
    assert info["width_mm"] == pytest.approx(0.8)
    assert info["levels"][0]["downsample"] == 1.0
    json.dumps(info)  # JSON-able for `tilscore info --json`


def test_stain_qc_recovers_the_slide_background_and_vectors(cd68_slide):
    path, layout = cd68_slide
    spec = layout.spec
    with open_slide(path) as slide:
        qc = slide_stain_qc(slide)
    # the generator renders glass at I0 (plus noise and JPEG): the estimate is within a few levels
    assert np.abs(qc.background - np.asarray(spec.background)).max() < 4
    # CD68 slides carry plenty of DAB: both vectors are estimated, near the truth used to render
    assert qc.stains.source == "estimated"
    true_h, true_dab = (np.asarray(v) for v in spec.stain_vectors)
    assert angle_deg(qc.stains.hematoxylin, true_h) < 8
    assert angle_deg(qc.stains.dab, true_dab) < 8
    # tissue area matches the truth's tissue polygon (mask at 8 µm/px: edge pixels differ)
    truth_mm2 = layout.regions["tissue"].area * (spec.mpp / 1000) ** 2
    assert qc.tissue.area_mm2 == pytest.approx(truth_mm2, rel=0.1)


def test_stain_qc_writes_images_and_a_provenance_record(cd68_slide, tmp_path):
    path, _ = cd68_slide
    with open_slide(path) as slide:
        qc = slide_stain_qc(slide)
        files = write_stain_qc(qc, slide, tmp_path)
        write_thumbnail(slide, tmp_path / "thumb.png", max_size=256)
    assert {"tissue", "hematoxylin", "dab", "stain_tile", "json"} <= set(files)
    for f in files.values():
        assert f.stat().st_size > 0
    record = json.loads((tmp_path / "stain.json").read_text())
    assert len(record["background"]) == 3
    assert np.asarray(record["stains"]["vectors"]).shape == (3, 3)
    from PIL import Image

    dab = np.asarray(Image.open(files["dab"]))
    hema = np.asarray(Image.open(files["hematoxylin"]))
    # the DAB rendering is brownish where the hematoxylin one is blue: not two copies of one image
    assert not np.array_equal(dab, hema)
    assert max(Image.open(tmp_path / "thumb.png").size) == 256


def test_stain_qc_on_he_slide_keeps_default_dab_and_says_so(shared_data):
    svs = shared_data / "wsi-samples" / "aperio-svs" / "CMU-1-Small-Region.svs"
    with open_slide(svs) as slide:
        qc = slide_stain_qc(slide)
    # H&E has no DAB: the DAB vector falls back to the default and the record says why
    assert np.allclose(qc.stains.dab, RUIFROK_HDAB.dab)
    assert any("DAB" in w for w in qc.warnings)
    assert 0.25 < qc.to_dict()["tissue_fraction"] < 0.6
