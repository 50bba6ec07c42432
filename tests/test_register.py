"""Serial-section registration: a known rotation, shift and flip are recovered."""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pytest
import shapely

from tilscore.errors import ConfigError, TilscoreWarning
from tilscore.regions import Region, RegionSet
from tilscore.register import register_slides
from tilscore.slide import Slide
from tilscore.synthetic import make_layout
from tilscore.synthetic.render import render_region

MPP = 2.0  # µm/px of the test images (a 2000 x 1500 µm section)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    layout = make_layout(marker="CD8", width_px=4000, height_px=3000, mpp=0.5, seed=21)
    # 2000 x 1500 µm rendered at 2 µm/px, with a glass margin so a turn stays on the glass
    img = render_region(layout, 0, 0, 1000, 750, mpp=MPP)
    return cv2.copyMakeBorder(img, 200, 200, 200, 200, cv2.BORDER_REPLICATE)


def _moved(img: np.ndarray, angle_deg: float, shift: tuple[float, float], flip: bool):
    """The image turned about its centre, shifted (and mirrored); returns it and ref -> moving."""
    h, w = img.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle_deg, 1.0)
    rot[:, 2] += shift
    m3 = np.vstack([rot, [0, 0, 1]])
    if flip:
        m3 = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]]) @ m3
    glass = tuple(int(v) for v in img[0, 0])
    out = cv2.warpAffine(img, m3[:2], (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=glass)
    return out, m3[:2]


def _check(reg, truth: np.ndarray, shape) -> float:
    h, w = shape[:2]
    ys, xs = np.mgrid[h * 0.3 : h * 0.7 : 5j, w * 0.3 : w * 0.7 : 5j]
    x0, y0 = xs.ravel() + 0.5, ys.ravel() + 0.5  # continuous px of pixel centres
    gx, gy = reg.map_points(x0, y0)
    ex = truth[0, 0] * (x0 - 0.5) + truth[0, 1] * (y0 - 0.5) + truth[0, 2] + 0.5
    ey = truth[1, 0] * (x0 - 0.5) + truth[1, 1] * (y0 - 0.5) + truth[1, 2] + 0.5
    return float(np.hypot(gx - ex, gy - ey).max()) * MPP  # µm


@pytest.mark.parametrize(("angle", "flip"), [(25.0, False), (-140.0, False), (10.0, True)])
def test_known_transform_is_recovered(reference, angle, flip):
    moving, truth = _moved(reference, angle, (40, -30), flip)
    reg = register_slides(Slide.from_array(moving, MPP), Slide.from_array(reference, MPP))
    assert reg.flipped == flip
    assert reg.iou > 0.9
    assert reg.iou > reg.iou_before
    # within two mask pixels (16 µm masks) anywhere in the section
    assert _check(reg, truth, reference.shape) < 32.0
    expected = -angle if not flip else None  # cv2 angles turn counter-clockwise on screen
    if expected is not None:
        assert (reg.rotation_deg - expected + 180) % 360 - 180 == pytest.approx(0, abs=2)
    d = reg.to_dict()
    assert d["motion"] == "rigid"
    assert len(d["matrix"]) == 2
    assert reg.qc.shape[2] == 3


def test_annotations_follow_the_section(reference):
    moving, truth = _moved(reference, 30.0, (0, 0), False)
    reg = register_slides(Slide.from_array(moving, MPP), Slide.from_array(reference, MPP))
    box = shapely.box(500, 400, 700, 600)
    moved = reg.transform_regions(RegionSet([Region("tumour", box, "Tumor")]))
    got = moved.geometry("tumour")
    a, b, c = truth[0]
    d, e, f = truth[1]
    want = shapely.affinity.affine_transform(box, [a, b, d, e, c, f])
    assert got.intersection(want).area / got.union(want).area > 0.9
    assert "registered" in moved.source


def test_unrelated_tissue_is_flagged_and_blank_is_an_error(reference):
    blob = np.full_like(reference, reference[0, 0])
    cv2.circle(blob, (300, 300), 120, (120, 90, 160), -1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TilscoreWarning)
        reg = register_slides(Slide.from_array(blob, MPP), Slide.from_array(reference, MPP))
    assert reg.iou < 0.7
    assert any("poor" in str(w.message) for w in caught)
    blank = np.full_like(reference, 240)
    with pytest.raises(ConfigError, match="no tissue"):
        register_slides(Slide.from_array(blank, MPP), Slide.from_array(reference, MPP))
    with pytest.raises(ConfigError, match="rigid"):
        register_slides(blob, reference, motion="projective")
    assert math.isfinite(reg.rotation_deg)


def test_register_command_moves_annotations(reference, tmp_path, capsys):
    import json

    import tifffile

    from tilscore.cli import main

    moving, _ = _moved(reference, 15.0, (10, 5), False)
    paths = []
    for name, img in (("ref.tif", reference), ("mov.tif", moving)):
        p = tmp_path / name
        tifffile.imwrite(p, img, resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
        paths.append(p)
    regions = RegionSet([Region("tumour", shapely.box(500, 400, 700, 600), "Tumor")])
    regions.save(tmp_path / "ref.geojson")
    out = tmp_path / "out"
    args = ["register", str(paths[1]), "--reference", str(paths[0])]
    code = main([*args, "--regions", str(tmp_path / "ref.geojson"), "-o", str(out)])
    assert code == 0
    assert "tissue IoU" in capsys.readouterr().out
    rec = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert rec["iou"] > 0.9
    assert (tmp_path / "out" / "registration_qc.png").stat().st_size > 0
    moved = RegionSet.from_geojson(tmp_path / "out" / "regions.geojson")
    assert moved.classes == ["tumour"]
