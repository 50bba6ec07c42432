"""Tests of the CNN nucleus detector (tilscore.detect.cnn) and its shipped weights."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tilscore.models import model_dir  # noqa: E402

from tilscore.detect import cnn  # noqa: E402
from tilscore.detect.train import match_count  # noqa: E402
from tilscore.errors import ConfigError  # noqa: E402
from tilscore.synthetic import synthetic_tile  # noqa: E402

# validation seeds are 900001-900004, training renders use 1000-1359: these are neither
TEST_SEEDS = {"CD8": 910001, "CD68": 910002, "CD56": 910003}


@pytest.fixture(scope="module")
def detector(request):
    """The shipped default model, loaded with every network connection refused."""
    mp = pytest.MonkeyPatch()

    def no_network(*args, **kwargs):
        raise AssertionError("the detector tried to open a network connection")

    mp.setattr(socket, "socket", no_network)
    mp.setattr(socket, "create_connection", no_network)
    try:
        det = cnn.CNNDetector.load("default", device="cpu")
    finally:
        mp.undo()
    return det


@pytest.fixture(scope="module")
def tiles():
    out = {}
    for marker, seed in TEST_SEEDS.items():
        out[marker] = synthetic_tile(marker, 448, mpp=0.5, seed=seed, nerve_count=0)
    return out


def test_shipped_weights_load_offline_with_recorded_hash(detector):
    folder = model_dir("default")
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 2_000_000
    assert detector.sha256 == cnn.sha256_of(weights)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["weights_sha256"] == detector.sha256
    assert detector.mpp == pytest.approx(0.5)
    assert 0.0 < detector.threshold < 1.0


@pytest.mark.parametrize("marker", list(TEST_SEEDS))
def test_finds_synthetic_cells_with_high_f1_and_right_classes(detector, tiles, marker):
    rgb, truth = tiles[marker]
    cells, nuclei = detector.predict(rgb, background=cnn._quiet_estimate_background(rgb))
    assert nuclei is None
    assert list(cells.columns) == ["x", "y", "confidence", "cell_class"]
    radius_px = 4.0 / detector.mpp
    m = match_count(
        cells[["x", "y"]].to_numpy(), truth[["x", "y"]].to_numpy(float) - 0.5, radius_px
    )
    precision, recall = len(m) / len(cells), len(m) / len(truth)
    f1 = 2 * precision * recall / (precision + recall)
    assert f1 >= 0.9, (precision, recall)
    want = truth["cell_type"].map(cnn.CELL_TYPE_TO_CLASS).to_numpy()[m[:, 1]]
    got = cells["cell_class"].to_numpy()[m[:, 0]]
    assert np.mean(got == want) >= 0.85
    assert cells["confidence"].between(detector.threshold, 1.0).all()


def test_immune_cells_are_called_immune(detector, tiles):
    rgb, truth = tiles["CD8"]
    cells, _ = detector.predict(rgb)
    m = match_count(cells[["x", "y"]].to_numpy(), truth[["x", "y"]].to_numpy(float) - 0.5, 8.0)
    lymph = truth["cell_type"].to_numpy()[m[:, 1]] == "lymphocyte"
    assert lymph.sum() >= 5
    assert np.mean(cells["cell_class"].to_numpy()[m[:, 0]][lymph] == "immune") >= 0.8


def test_black_and_grey_tiles_have_no_cells(detector):
    for value in (0, 60, 128):
        cells, _ = detector.predict(np.full((200, 248, 3), value, np.uint8))
        assert len(cells) == 0
        assert list(cells.columns) == ["x", "y", "confidence", "cell_class"]


def test_black_square_on_glass_has_no_cells(detector):
    img = np.full((240, 240, 3), 255, np.uint8)
    img[40:200, 40:200] = 0
    cells, _ = detector.predict(img)
    assert len(cells) == 0


def test_white_tile_has_no_cells(detector):
    cells, _ = detector.predict(np.full((256, 320, 3), 255, np.uint8))
    assert len(cells) == 0
    cells, _ = detector.predict(np.full((64, 64, 3), 240, np.uint8), background=(240, 240, 240))
    assert len(cells) == 0


@pytest.mark.parametrize("shape", [(1, 1), (37, 91), (130, 17), (203, 301)])
def test_any_size_is_handled_and_cells_lie_inside(detector, tiles, shape):
    rgb = tiles["CD68"][0][: shape[0], : shape[1]]
    cells, _ = detector.predict(rgb)
    assert cells["x"].between(-0.5, shape[1] - 0.5).all()
    assert cells["y"].between(-0.5, shape[0] - 0.5).all()


def test_cells_do_not_depend_on_the_tile_offset(detector, tiles):
    """A tile cut at an odd offset from a larger image: same cells away from its border."""
    big, _ = tiles["CD8"]
    oy, ox, size, margin = 37, 53, 320, 40
    small = big[oy : oy + size, ox : ox + size]
    a, _ = detector.predict(big)
    b, _ = detector.predict(small)
    a = a.assign(x=a["x"] - ox, y=a["y"] - oy)
    core_a = a[a["x"].between(margin, size - margin) & a["y"].between(margin, size - margin)]
    core_b = b[b["x"].between(margin, size - margin) & b["y"].between(margin, size - margin)]
    assert len(core_a) > 50
    m = match_count(core_a[["x", "y"]].to_numpy(), core_b[["x", "y"]].to_numpy(), 2.0)
    assert len(m) >= 0.97 * max(len(core_a), len(core_b))
    dist = np.hypot(
        *(core_a[["x", "y"]].to_numpy()[m[:, 0]] - core_b[["x", "y"]].to_numpy()[m[:, 1]]).T
    )
    assert np.median(dist) < 0.5
    same = core_a["cell_class"].to_numpy()[m[:, 0]] == core_b["cell_class"].to_numpy()[m[:, 1]]
    assert same.mean() >= 0.97


def test_white_padding_does_not_change_cells(detector, tiles):
    rgb, _ = tiles["CD56"]
    tile = rgb[:200, :232]
    padded = np.pad(tile, ((0, 24), (0, 40), (0, 0)), constant_values=255)
    a, _ = detector.predict(tile)
    b, _ = detector.predict(padded)
    b = b[(b["x"] < 231.5) & (b["y"] < 199.5)].reset_index(drop=True)
    assert len(a) == len(b)
    # the glass beyond the tile is the same; only the network's zero padding of its deepest
    # feature maps moves, which shifts cells at the far border by a fraction of a pixel
    np.testing.assert_allclose(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy(), atol=0.5)
    assert (a["cell_class"] == b["cell_class"]).all()


def test_batch_equals_single(detector, tiles):
    imgs = [tiles["CD8"][0][:160, :200], tiles["CD68"][0][:96, :96]]
    batch = detector.predict_batch(imgs)
    for img, (cells, _) in zip(imgs, batch):
        single, _ = detector.predict(img)
        assert len(single) == len(cells)
        np.testing.assert_allclose(
            single[["x", "y"]].to_numpy(), cells[["x", "y"]].to_numpy(), atol=1e-2
        )


def test_config_and_weights_round_trip(detector, tiles, tmp_path):
    config = cnn.load_config(model_dir("default"))
    model = cnn.build_model(config)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(model_dir("default") / "model.safetensors")))
    sha = cnn.save_weights(model, tmp_path, config)
    assert cnn.load_config(tmp_path) == config
    copy = cnn.CNNDetector.load(tmp_path, device="cpu")
    assert copy.sha256 == sha
    rgb = tiles["CD8"][0][:128, :128]
    a, _ = detector.predict(rgb)
    b, _ = copy.predict(rgb)
    np.testing.assert_allclose(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy(), atol=1e-4)


def test_bad_model_name_and_threshold_raise(detector):
    with pytest.raises(ConfigError, match="default"):
        cnn.CNNDetector.load("no-such-model")
    with pytest.raises(ConfigError):
        detector.predict(np.zeros((32, 32, 3), np.uint8), threshold=float("nan"))
    with pytest.raises(ConfigError):
        cnn.build_model({"widths": [16, 32], "depth": [1], "output_stride": 4})


def test_torch_not_imported_by_tilscore():
    code = "import sys, tilscore, tilscore.detect; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# device and precision selection (the CUDA code path, checked on CPU: no GPU in CI)


def test_device_auto_picks_cuda_only_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cnn.select_device(None) == "cpu"
    assert cnn.select_device("auto") == "cpu"
    assert cnn.select_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cnn.select_device(None) == "cuda"
    assert cnn.select_device("cuda:0") == "cuda:0"


def test_asking_for_a_missing_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        cnn.select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="1 GPU"):
        cnn.select_device("cuda:3")
    with pytest.raises(ConfigError, match="unknown torch device"):
        cnn.select_device("gpu-please")


def test_bf16_auto_follows_what_the_device_computes_natively(monkeypatch):
    assert cnn.autocast_dtype("cpu", False) is None
    assert cnn.autocast_dtype("cuda", False) is None
    assert cnn.autocast_dtype("cpu", True) == torch.bfloat16
    monkeypatch.setattr(cnn, "_cpu_has_native_bf16", lambda: True)
    assert cnn.autocast_dtype("cpu", "auto") == torch.bfloat16
    monkeypatch.setattr(cnn, "_cpu_has_native_bf16", lambda: False)
    assert cnn.autocast_dtype("cpu", "auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cnn.autocast_dtype("cuda:0", "auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert cnn.autocast_dtype("cuda", "auto") is None  # e.g. a V100: float32
    with pytest.raises(ConfigError, match="bf16"):
        cnn.autocast_dtype("cpu", "sometimes")


def test_bf16_finds_the_same_cells_as_float32(detector, tiles):
    """bf16 autocast (the default where the CPU or GPU has it) changes no detection."""
    saved = detector.config["bf16"]
    try:
        for marker in ("CD8", "CD56"):
            rgb, _ = tiles[marker]
            detector.config["bf16"] = False
            ref, _ = detector.predict(rgb)
            detector.config["bf16"] = True
            half, _ = detector.predict(rgb)
            # the same cells within 1 µm (2 px: the sub-pixel centroid may move by about 1 px)
            m = match_count(half[["x", "y"]].to_numpy(), ref[["x", "y"]].to_numpy(), 2.0)
            assert len(half) == len(ref) == len(m)
            assert (
                half["cell_class"].to_numpy()[m[:, 0]] == ref["cell_class"].to_numpy()[m[:, 1]]
            ).mean() > 0.98
    finally:
        detector.config["bf16"] = saved
