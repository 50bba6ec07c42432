"""Model selection and fine-tuning: shipped models by name, model-folder checks, label readers,
``tilscore.detect.finetune`` and ``tilscore finetune`` (bad input, atomic output)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from tilscore.models import available_models, model_dir  # noqa: E402

from tilscore.cli import main as cli_main  # noqa: E402
from tilscore.detect import cnn, detect_cells, finetune  # noqa: E402
from tilscore.detect.fit import Field, point_targets  # noqa: E402
from tilscore.detect.labels import LabelError, check_labels, read_labels  # noqa: E402
from tilscore.errors import ConfigError, TilscoreError  # noqa: E402
from tilscore.synthetic import synthetic_tile  # noqa: E402


@pytest.fixture(scope="module")
def field():
    rgb, truth = synthetic_tile("CD8", 256, mpp=0.5, seed=930001, nerve_count=0)
    return rgb, truth[["x", "y"]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# shipped models and model folders


def test_shipped_models_load_by_name_and_record_their_hash():
    assert {"default", "synthetic", "endonuke"} <= set(available_models())
    shas = {}
    for name in ("default", "synthetic", "endonuke"):
        det = cnn.CNNDetector.load(name, device="cpu")
        metrics = json.loads((model_dir(name) / "metrics.json").read_text())
        assert det.sha256 == metrics["weights_sha256"]
        shas[name] = det.sha256
    # "synthetic" keeps the synthetic-only weights (today also the default); "endonuke" differs
    assert shas["synthetic"] == shas["default"] != shas["endonuke"]
    assert "CC BY 4.0" in (model_dir("endonuke") / "README.md").read_text()


def test_detect_cells_records_the_model_used(field):
    rgb, _ = field
    cells = detect_cells(rgb[:128, :128], mpp=0.5, model="synthetic")
    s = cells.attrs["settings"]
    assert s["model"] == "synthetic"
    assert s["model_sha256"] == cnn.sha256_of(model_dir("synthetic") / "model.safetensors")


def _copy_model(tmp_path, name="synthetic"):
    dst = tmp_path / "m"
    shutil.copytree(model_dir(name), dst)
    return dst


def test_model_folder_with_wrong_hash_is_refused(tmp_path):
    folder = _copy_model(tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["weights_sha256"] = "0" * 64
    (folder / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ConfigError, match="sha256"):
        cnn.CNNDetector.load(folder, device="cpu")
    with pytest.raises(ConfigError, match="sha256"):
        detect_cells(np.zeros((64, 64, 3), np.uint8), mpp=0.5, model=str(folder))


def test_model_folder_without_config_or_weights_is_refused(tmp_path):
    folder = _copy_model(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        cnn.CNNDetector.load(folder, device="cpu")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"no model\.safetensors"):
        cnn.CNNDetector.load(folder, device="cpu")
    with pytest.raises(ConfigError, match="unknown model"):
        cnn.CNNDetector.load("no-such-model", device="cpu")


def test_cli_model_option_checks_the_model_first(tmp_path, capsys):
    # 512 px: a 256 px image file gets no tissue mask and so no cells (seen 2026-12-04)
    rgb, _ = synthetic_tile("CD8", 512, mpp=0.5, seed=930001, nerve_count=0)
    from PIL import Image

    img = tmp_path / "f.png"
    Image.fromarray(rgb).save(img)
    out = tmp_path / "cells.csv"
    args = ["detect", str(img), "--mpp", "0.5", "--marker", "CD8", "-o", str(out)]
    assert cli_main([*args, "--model", "synthetic"]) == 0
    assert len(pd.read_csv(out)) > 0
    assert cli_main([*args, "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# labels


def test_label_readers(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("x,y,positive,cell_class\n10,20,1,Tumor\n30.5,40,no,lymphocyte\n")
    t = read_labels(csv)
    assert t[["x", "y"]].to_numpy().tolist() == [[10, 20], [30.5, 40]]
    assert t["positive"].tolist() == [True, False]
    assert t["cell_class"].tolist() == ["tumour", "immune"]
    gj = tmp_path / "a.geojson"
    square = [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]
    gj.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": square},
                        "properties": {
                            "objectType": "detection",
                            "classification": {"name": "Positive"},
                        },
                    },
                    {
                        "type": "Feature",
                        "geometry": {"type": "MultiPoint", "coordinates": [[7, 8], [9, 10]]},
                        "properties": {"objectType": "annotation"},
                    },
                ],
            }
        )
    )
    g = read_labels(gj)
    assert g[["x", "y"]].to_numpy().tolist() == [[2, 2], [7, 8], [9, 10]]
    mask = np.zeros((20, 20), np.uint16)
    mask[2:5, 2:5] = 1
    mask[10:14, 10:12] = 7
    m = read_labels(mask)
    assert sorted(m["x"].round(2).tolist()) == [3.5, 11.0]


def test_bad_labels_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LabelError, match="empty"):
        read_labels(empty)
    header_only = tmp_path / "h.csv"
    header_only.write_text("x,y\n")
    with pytest.raises(LabelError, match="no cells"):
        check_labels(read_labels(header_only), (100, 100), str(header_only))
    bad = tmp_path / "b.csv"
    bad.write_text("col,row\n1,2\n")
    with pytest.raises(LabelError, match="no x, y"):
        read_labels(bad)
    regions = tmp_path / "regions.geojson"
    poly = [[[0, 0], [50, 0], [50, 50], [0, 0]]]
    regions.write_text(
        json.dumps(
            [
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": poly},
                    "properties": {"objectType": "annotation"},
                }
            ]
        )
    )
    with pytest.raises(LabelError, match="region annotation"):
        read_labels(regions)
    outside = pd.DataFrame({"x": [10.0, 150.0], "y": [10.0, 20.0]})
    with pytest.raises(LabelError, match="outside"):
        check_labels(outside, (100, 100), "x.csv")
    # every point at twice the image's scale (exported at a higher resolution)
    rng = np.random.default_rng(0)
    scaled = pd.DataFrame({"x": rng.uniform(0, 200, 40), "y": rng.uniform(0, 200, 40)})
    with pytest.raises(LabelError, match="another resolution"):
        check_labels(scaled, (100, 100), "x.csv")
    # every point in the top-left corner (exported at a lower resolution)
    small = pd.DataFrame({"x": rng.uniform(0, 40, 40), "y": rng.uniform(0, 40, 40)})
    with pytest.raises(LabelError, match="another scale"):
        check_labels(small, (100, 100), "x.csv")


def test_point_targets_peak_at_the_points():
    heat, cls = point_targets(
        np.array([[10.0, 10.0]]), np.array([2]), (32, 32), stride=4, sigma_px=4.0, radius_px=6
    )
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert (r, c) in {(1, 1), (2, 2), (1, 2), (2, 1)}
    assert heat.max() > 0.8
    assert set(np.unique(cls)) == {2, 255}


# ------------------------------------------------------------------------------------------------
# finetune


def _fields(field, n=2):
    rgb, truth = field
    return [rgb] * n, [truth] * n


def test_finetune_writes_a_loadable_model_folder(tmp_path, field):
    images, labels = _fields(field)
    seen = []
    res = finetune(
        images,
        labels,
        out=tmp_path / "lab",
        base_model="synthetic",
        mpp=0.5,
        steps=6,
        batch_size=2,
        crop_px=128,
        val_every=3,
        seed=1,
        progress=lambda s, n, info: seen.append(s),
    )
    folder = res.folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "metrics.json",
        "model.safetensors",
    ]
    assert seen[-1] == 6
    m = json.loads((folder / "metrics.json").read_text())
    assert {"before", "after"} <= set(m["validation_all_cells"])
    assert m["base_model"]["name"] == "synthetic"
    assert "Data seen" in (folder / "README.md").read_text()
    det = cnn.CNNDetector.load(folder, device="cpu")
    assert det.sha256 == m["weights_sha256"]
    cells = detect_cells(images[0][:128, :128], mpp=0.5, model=str(folder))
    assert cells.attrs["settings"]["model_sha256"] == det.sha256
    with pytest.raises(ConfigError, match="already exists"):
        finetune(images, labels, out=folder, base_model="synthetic", mpp=0.5, steps=2)


def test_interrupted_finetune_leaves_no_folder(tmp_path, field):
    images, labels = _fields(field)

    def interrupt(step, total, info):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(
            images,
            labels,
            out=tmp_path / "lab",
            base_model="synthetic",
            mpp=0.5,
            steps=50,
            batch_size=2,
            crop_px=128,
            progress=interrupt,
        )
    assert list(tmp_path.iterdir()) == []
    from tilscore.detect.fit import Cancelled

    with pytest.raises(Cancelled):
        finetune(
            images,
            labels,
            out=tmp_path / "lab",
            base_model="synthetic",
            mpp=0.5,
            steps=50,
            batch_size=2,
            crop_px=128,
            cancel=lambda: True,
        )
    assert list(tmp_path.iterdir()) == []


def test_finetune_bad_input(tmp_path, field):
    rgb, truth = field
    few = truth.iloc[:5]
    with pytest.raises(LabelError, match="at least"):
        finetune([rgb], [few], out=tmp_path / "a", base_model="synthetic", mpp=0.5)
    with pytest.raises(ConfigError, match="µm/px"):
        finetune([rgb], [truth], out=tmp_path / "a", base_model="synthetic")
    with pytest.raises(ConfigError, match="label source"):
        finetune([rgb, rgb], [truth], out=tmp_path / "a", base_model="synthetic", mpp=0.5)
    with pytest.raises(LabelError, match="outside"):
        finetune([rgb], [truth * 3], out=tmp_path / "a", base_model="synthetic", mpp=0.5)
    folder = _copy_model(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(TilscoreError, match=r"config\.json"):
        finetune([rgb], [truth], out=tmp_path / "a", base_model=str(folder), mpp=0.5)
    assert not (tmp_path / "a").exists()


def test_cli_finetune(tmp_path, field, capsys):
    rgb, truth = field
    from PIL import Image

    for i in range(2):
        Image.fromarray(rgb).save(tmp_path / f"f{i}.png")
        truth.to_csv(tmp_path / f"f{i}.csv", index=False)
    out = tmp_path / "model"
    args = ["finetune", str(tmp_path / "f0.png"), str(tmp_path / "f1.png"), "--labels"]
    args += [str(tmp_path / "f0.csv"), str(tmp_path / "f1.csv"), "--mpp", "0.5"]
    args += ["--base-model", "synthetic", "--steps", "4", "-o", str(out)]
    assert cli_main(args) == 0
    assert (out / "model.safetensors").is_file()
    assert "wrote" in capsys.readouterr().out
    one_label = [*args[:-2], "-o", str(tmp_path / "x"), "--labels", str(tmp_path / "f0.csv")]
    assert cli_main(one_label) == 2
    assert "label files" in capsys.readouterr().err
    no_export = ["finetune", "--reviewed", str(tmp_path), "-o", str(tmp_path / "y")]
    assert cli_main(no_export) == 2
    assert "not a label export" in capsys.readouterr().err


def test_fields_given_directly_skip_reading(field, tmp_path):
    rgb, truth = field
    f = Field(rgb, 0.5, truth[["x", "y"]].to_numpy(float), name="a")
    res = finetune(
        [f, f], out=tmp_path / "m", base_model="synthetic", steps=4, batch_size=2, crop_px=128
    )
    assert res.metrics["data"]["cells"] == 2 * len(truth)


def test_one_image_is_split_into_halves_with_its_own_cells(field):
    """One labelled image: training and validation halves keep the cells at their pixels."""
    from tilscore.detect.finetuning import split_fields

    rgb, truth = field
    for img in (rgb, rgb[:, : rgb.shape[1] // 2 + 40], rgb[: rgb.shape[0] // 2 + 40]):
        h, w = img.shape[:2]
        xy = truth[["x", "y"]].to_numpy(float)
        xy = xy[(xy[:, 0] < w) & (xy[:, 1] < h)]
        f = Field(img, 0.5, xy, name="one")
        (a,), (b,) = split_fields([f], 0.25, 0)
        assert len(a.xy) + len(b.xy) == len(xy)
        for half in (a, b):
            hh, ww = half.rgb.shape[:2]
            assert (half.xy[:, 0] <= ww).all()
            assert (half.xy[:, 1] <= hh).all()
            # the pixel under each cell is the same as in the whole image
            off = (0, 0) if half is a else ((w - ww, 0) if ww < w else (0, h - hh))
            cols = half.xy[:, 0].astype(int).clip(0, ww - 1)
            rows = half.xy[:, 1].astype(int).clip(0, hh - 1)
            assert np.array_equal(half.rgb[rows, cols], img[rows + off[1], cols + off[0]])
