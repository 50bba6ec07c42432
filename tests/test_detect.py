"""detect_cells: one entry point over arrays and slides, tiles with halos, each cell once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tilscore import ConfigError, MissingPixelSizeError, RegionError
from tilscore.cells import CELL_COLUMNS
from tilscore.detect import detect_cells
from tilscore.evaluate import evaluate_cells
from tilscore.synthetic import make_layout, make_synthetic_slide, render_region


@pytest.fixture(scope="module")
def cd8_field():
    layout = make_layout(marker="CD8", width_px=900, height_px=700, mpp=0.5, seed=41)
    rgb = render_region(layout, 0, 0, 900, 700, 0.5)
    truth = layout.truth()
    return rgb, truth, layout


def test_result_has_the_cells_columns_and_settings(cd8_field):
    rgb, _, _ = cd8_field
    cells = detect_cells(rgb, mpp=0.5, marker="CD8", detector="classical")
    assert list(cells.columns[: len(CELL_COLUMNS)]) == list(CELL_COLUMNS)
    assert len(cells) > 100
    settings = cells.attrs["settings"]
    assert settings["detector"] == "classical"
    assert settings["marker"]["name"] == "CD8"
    assert np.allclose(cells["x_um"], cells["x"] * 0.5)


@pytest.mark.parametrize("detector", ["classical", "cnn"])
def test_same_cells_whatever_the_tile_size(cd8_field, detector):
    """A cell on a tile border is found exactly once: tiling does not change the result."""
    rgb, _, _ = cd8_field
    a = detect_cells(rgb, mpp=0.5, detector=detector, tile_size_px=1024)
    b = detect_cells(rgb, mpp=0.5, detector=detector, tile_size_px=256, halo_px=48)
    c = detect_cells(rgb, mpp=0.5, detector=detector, tile_size_px=320, halo_px=64)
    for other in (b, c):
        m = evaluate_cells(other[["x", "y", "positive"]], a[["x", "y", "positive"]], 2.0)
        # the same cells, within a pixel, and no duplicates along tile borders
        assert m["f1"] > 0.98
        assert abs(len(other) - len(a)) <= max(2, 0.01 * len(a))
        assert abs(int(other["positive"].sum()) - int(a["positive"].sum())) <= 2


def test_input_scale_is_handled(cd8_field):
    """An image at 0.25 µm/px gives the same cells (in its own px) as at 0.5 µm/px."""
    _, _, layout = cd8_field
    rgb25 = render_region(layout, 0, 0, 1800, 1400, 0.25)
    rgb50 = render_region(layout, 0, 0, 900, 700, 0.5)
    a = detect_cells(rgb50, mpp=0.5, detector="classical")
    b = detect_cells(rgb25, mpp=0.25, detector="classical")
    assert np.allclose(b["x_um"].max(), a["x_um"].max(), atol=5)
    b_half = b.assign(x=b["x"] / 2, y=b["y"] / 2)
    m = evaluate_cells(b_half[["x", "y", "positive"]], a[["x", "y", "positive"]], 4.0)
    assert m["f1"] > 0.9


def test_slide_and_region(tmp_path):
    path = tmp_path / "cd68.tif"
    layout = make_synthetic_slide(path, marker="CD68", width_px=1600, height_px=1200, seed=43)
    region = (400, 300, 600, 500)
    cells = detect_cells(path, marker="CD68", detector="classical", region=region)
    assert len(cells) > 20
    assert cells["x"].between(400, 1000).all()
    assert cells["y"].between(300, 800).all()
    assert cells.attrs["settings"]["stains"]["source"] in ("estimated", "default")
    truth = layout.truth()
    inside = truth[truth.x.between(400, 1000) & truth.y.between(300, 800)]
    assert len(cells) == pytest.approx(len(inside), rel=0.35)


def test_region_outside_the_slide_is_a_clear_error(tmp_path):
    path = tmp_path / "s.tif"
    make_synthetic_slide(path, marker="CD8", width_px=800, height_px=600, seed=1)
    with pytest.raises(RegionError, match="outside the slide"):
        detect_cells(path, detector="classical", region=(5000, 5000, 100, 100))


@pytest.mark.parametrize(
    "image",
    [
        np.full((300, 300, 3), 255, np.uint8),
        np.zeros((300, 300, 3), np.uint8),
        np.full((40, 30, 3), 230, np.uint8),
    ],
    ids=["white", "black", "smaller-than-a-tile"],
)
def test_blank_images_give_no_cells(image):
    for detector in ("classical", "cnn"):
        cells = detect_cells(image, mpp=0.5, detector=detector)
        assert isinstance(cells, pd.DataFrame)
        assert len(cells) == 0
        assert list(cells.columns[: len(CELL_COLUMNS)]) == list(CELL_COLUMNS)


def test_grey_rgba_and_16bit_inputs_work(cd8_field):
    rgb, _, _ = cd8_field
    crop = rgb[:300, :300]
    ref = detect_cells(crop, mpp=0.5, detector="classical")
    rgba = np.dstack([crop, np.full(crop.shape[:2], 255, np.uint8)])
    assert len(detect_cells(rgba, mpp=0.5, detector="classical")) == len(ref)
    rgb16 = crop.astype(np.uint16) * 257
    assert len(detect_cells(rgb16, mpp=0.5, detector="classical")) == len(ref)
    grey = crop.mean(axis=2).astype(np.uint8)
    detect_cells(grey, mpp=0.5, detector="classical")  # no stain: cells found or not, no crash


def test_bad_arguments_are_clear_errors(cd8_field):
    rgb, _, _ = cd8_field
    with pytest.raises(MissingPixelSizeError):
        detect_cells(rgb)
    with pytest.raises(ConfigError, match="CD8"):
        detect_cells(rgb, mpp=0.5, marker="CD999")
    with pytest.raises(ConfigError, match="threshold_od"):
        detect_cells(rgb, mpp=0.5, detector="classical", threshold_od=float("nan"))
    with pytest.raises(ConfigError, match="detector"):
        detect_cells(rgb, mpp=0.5, detector="magic")


def test_a_precomputed_slide_qc_is_used_not_recomputed(tmp_path, monkeypatch):
    import tilscore.qc
    from tilscore import open_slide

    path = tmp_path / "s.tif"
    make_synthetic_slide(path, marker="CD8", width_px=1000, height_px=800, seed=5)
    with open_slide(path) as slide:
        qc = tilscore.qc.slide_stain_qc(slide)
        ref = detect_cells(slide, detector="classical")

        def fail(*args, **kwargs):
            raise AssertionError("slide_stain_qc ran again")

        monkeypatch.setattr(tilscore.qc, "slide_stain_qc", fail)
        again = detect_cells(slide, detector="classical", qc=qc)
    assert len(again) == len(ref)
    assert again.attrs["settings"]["background"] == ref.attrs["settings"]["background"]


@pytest.mark.parametrize("detector", ["classical", "cnn"])
def test_threads_do_not_change_the_cells(cd8_field, detector):
    """Tiles processed in worker threads give exactly the cells of one tile at a time, in order."""
    rgb, _, _ = cd8_field
    one = detect_cells(rgb, mpp=0.5, detector=detector, tile_size_px=256, workers=1)
    three = detect_cells(rgb, mpp=0.5, detector=detector, tile_size_px=256, workers=3)
    pd.testing.assert_frame_equal(one, three)
    with pytest.raises(ConfigError, match="workers"):
        detect_cells(rgb, mpp=0.5, detector=detector, workers=0)


def test_stopping_early_stops_the_worker_threads(cd8_field):
    import threading

    from tilscore.detect import iter_detect_cells

    rgb, _, _ = cd8_field
    gen = iter_detect_cells(rgb, mpp=0.5, detector="classical", tile_size_px=128, workers=2)
    assert next(gen)[0] == 0
    assert next(gen)[0] == 1
    gen.close()  # e.g. the napari widget's cancel button
    assert not [t for t in threading.enumerate() if t.name.startswith("tilscore-tile")]


def test_freed_memory_is_given_back_before_and_after_the_tiles(cd8_field, monkeypatch):
    """glibc keeps freed memory per thread arena: it is released once the stain QC is done and
    once the workers are, not per tile; elsewhere than glibc nothing is called."""
    import tilscore.detect as detect
    from tilscore.detect import iter_detect_cells

    malloc_trim = detect._malloc_trim
    calls: list[int] = []
    monkeypatch.setattr(detect, "_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    rgb, _, _ = cd8_field
    gen = iter_detect_cells(rgb, mpp=0.5, detector="classical", tile_size_px=128)
    next(gen)
    assert calls == [0]  # before the first tile
    steps = sum(1 for _ in gen)
    assert steps > 4
    assert calls == [0, 0]  # and once after the last

    malloc_trim.cache_clear()
    monkeypatch.setattr(detect.sys, "platform", "darwin")
    assert malloc_trim() is None
    malloc_trim.cache_clear()


def test_tile_cache_and_summed_area_table_are_dropped_after_the_tiles(tmp_path):
    """What only the tiles need (decoded tiles, the mask's summed-area table) is freed after
    them; the slide and the mask still answer afterwards, with the same values."""
    from tilscore.qc import slide_stain_qc
    from tilscore.slide import open_slide
    from tilscore.synthetic import write_slide

    path = tmp_path / "s.svs"
    layout = make_layout(marker="CD8", width_px=1024, height_px=768, mpp=0.25, seed=5)
    write_slide(layout, path, format="aperio", tile_size=256, min_level_size_px=128)
    with open_slide(path) as slide:
        qc = slide_stain_qc(slide)
        before = slide.read_region(100, 100, 300, 200)
        assert qc.tissue._integral is not None  # built by the QC's tile sampling
        fraction = qc.tissue.fraction_in(0, 0, 512, 384)
        cells = detect_cells(slide, detector="classical", qc=qc, tile_size_px=256)
        assert len(cells)
        assert slide._backend._cache._bytes == 0
        assert qc.tissue._integral is None
        assert np.array_equal(slide.read_region(100, 100, 300, 200), before)
        assert qc.tissue.fraction_in(0, 0, 512, 384) == fraction


def test_glass_around_tissue_is_not_processed_and_changes_no_cell(tmp_path, monkeypatch):
    """Tiles are cut to their tissue (plus the halo): the same cells, fewer pixels processed."""
    import tilscore.detect as detect
    import tilscore.qc
    from tilscore import open_slide

    path = tmp_path / "s.tif"
    make_synthetic_slide(
        path, marker="CD8", width_px=2400, height_px=1800, mpp=0.5, seed=8, tissue_fraction=0.35
    )
    with open_slide(path) as slide:
        qc = tilscore.qc.slide_stain_qc(slide)
        tiles = list(slide.iter_tiles(0.5, 512, 48, mask=qc.tissue))
        boxes = [detect._tissue_box(t.x, t.y, t.downsample, 608, qc.tissue, 48) for t in tiles]
        assert any(b is not None for b in boxes)  # some tiles are mostly glass here
        cut = detect_cells(slide, detector="cnn", qc=qc, tile_size_px=512)
        monkeypatch.setattr(detect, "_CROP_MIN_SAVING", 0.0)  # never cut
        whole = detect_cells(slide, detector="cnn", qc=qc, tile_size_px=512)
    assert len(whole) > 100
    m = evaluate_cells(cut[["x", "y", "positive"]], whole[["x", "y", "positive"]], 1.0)
    assert m["f1"] == 1.0
    assert m["pos_fp"] == m["pos_fn"] == 0
