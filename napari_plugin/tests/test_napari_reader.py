"""The reader and sample-data contributions: lazy multiscale layers in µm, every format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def small_layout():
    from tilscore.synthetic import make_layout

    return make_layout(marker="CD8", width_px=1600, height_px=1200, mpp=0.5, seed=3)


def _write(layout, path: Path, fmt: str) -> Path:
    from tilscore.synthetic import write_slide

    return write_slide(layout, path, format=fmt, tile_size=256, min_level_size_px=256)


@pytest.fixture
def read_log(monkeypatch):
    """Every pixel box read from any slide: (level, width, height)."""
    from tilscore.slide import Slide

    log: list[tuple[int, int, int]] = []
    original = Slide._read_level_box

    def logged(self, level, x, y, width, height):
        log.append((level, width, height))
        return original(self, level, x, y, width, height)

    monkeypatch.setattr(Slide, "_read_level_box", logged)
    return log


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("slide.svs", "aperio"), ("slide.tif", "aperio"), ("slide.ome.tif", "ome")],
)
def test_reader_gives_a_lazy_multiscale_layer_in_um(tmp_path, small_layout, read_log, name, fmt):
    import dask.array as da
    from napari_tilscore import napari_get_reader

    path = _write(small_layout, tmp_path / name, fmt)
    reader = napari_get_reader(str(path))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image"
    assert kwargs["multiscale"]
    assert len(data) >= 2
    assert all(isinstance(level, da.Array) for level in data)
    assert data[0].shape == (1200, 1600, 3)
    assert [lv.shape[0] for lv in data] == sorted((lv.shape[0] for lv in data), reverse=True)
    assert kwargs["scale"] == pytest.approx((0.5, 0.5))
    assert kwargs["rgb"]
    meta = kwargs["metadata"]["tilscore"]
    assert meta["path"] == str(path)
    assert meta["mpp"] == pytest.approx(0.5)
    assert meta["dimensions"] == (1600, 1200)
    assert read_log == []  # opening reads no pixels
    # pixels come from the file on demand, at the right place
    tile = np.asarray(data[0][600:632, 800:832])
    from tilscore import open_slide

    with open_slide(path) as slide:
        np.testing.assert_array_equal(tile, slide.read_region(800, 600, 32, 32))


def _write_big_pyramid(path: Path, size: int = 4096, mpp: float = 0.25) -> Path:
    """A generic tiled pyramidal TIFF (SubIFDs, resolution tags) of a smooth pattern."""
    import tifffile

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([200 * xx, 200 * yy, 120 + 0 * xx], axis=-1).astype(np.uint8)
    levels = [image, image[::4, ::4], image[::16, ::16]]
    res = (1e4 / mpp, 1e4 / mpp)
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], subifds=2, resolution=res, resolutionunit="CENTIMETER", **opts)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **opts)
    return path


def test_viewer_opens_a_large_slide_without_reading_level_0(make_napari_viewer, tmp_path, read_log):
    path = _write_big_pyramid(tmp_path / "big.tif")
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-tilscore")
    viewer.reset_view()
    layer.refresh()
    assert layer.multiscale
    assert [d.shape[0] for d in layer.data] == [4096, 1024, 256]
    assert tuple(layer.scale) == pytest.approx((0.25, 0.25))
    assert str(layer.units[0]) == "micrometer"
    assert read_log, "napari drew nothing"
    assert all(level > 0 for level, _, _ in read_log)  # the whole slide in view: a coarse level


def test_slide_without_pixel_size_asks_for_it(make_napari_viewer, tmp_path, monkeypatch):
    import tifffile
    from napari_tilscore import read_slide
    from napari_tilscore._widget import TilscoreWidget

    from tilscore.errors import MissingPixelSizeError

    path = tmp_path / "no_mpp.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    with pytest.raises(MissingPixelSizeError, match="µm/px field"):
        read_slide(path)
    # the widget's µm/px field opens it, with that pixel size and no guess
    errors: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer = make_napari_viewer()
    widget = TilscoreWidget(viewer)
    assert widget.open_slide(path) is None
    assert errors
    assert "no_mpp.tif" in errors[0]
    assert "µm/px" in errors[0]
    widget.mpp_spin.setValue(0.25)
    layer = widget.open_slide(path)
    assert layer is not None
    assert tuple(layer.scale) == pytest.approx((0.25, 0.25))
    assert layer.metadata["tilscore"]["mpp_source"] == "user"


def test_unreadable_file_is_a_notification_not_a_crash(make_napari_viewer, tmp_path, monkeypatch):
    from napari_tilscore._widget import TilscoreWidget

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    errors: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer = make_napari_viewer()
    widget = TilscoreWidget(viewer)
    assert widget.open_slide(bad) is None
    assert len(errors) == 1
    assert "broken.svs" in errors[0]
    assert len(viewer.layers) == 0


def test_reader_declines_other_files():
    from napari_tilscore import napari_get_reader

    assert napari_get_reader("cells.csv") is None
    assert napari_get_reader(["a.svs", "b.png"]) is None
    assert napari_get_reader("A.SVS") is not None


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("relpath", "mpp"),
    [
        ("aperio-svs/CMU-1-Small-Region.svs", 0.499),
        ("hamamatsu-ndpi/test3-DAPI-2-387.ndpi", 0.228),
    ],
)
def test_reader_on_real_slides(wsi_samples, relpath, mpp):
    from napari_tilscore import napari_get_reader

    path = wsi_samples / relpath
    [(data, kwargs, _)] = napari_get_reader(str(path))(str(path))
    meta = kwargs["metadata"]["tilscore"]
    assert meta["mpp"] == pytest.approx(mpp, rel=0.01)
    level0 = data[0] if kwargs["multiscale"] else data
    assert level0.shape[:2] == meta["dimensions"][::-1]
    # a block from the middle decodes to an image with content
    h, w = level0.shape[:2]
    block = np.asarray(level0[h // 2 : h // 2 + 64, w // 2 : w // 2 + 64])
    assert block.shape == (64, 64, 3)
    assert block.std() > 0


def test_sample_data_are_the_three_example_slides():
    from napari_tilscore import _sample_data

    for marker, sample in (
        ("cd8", _sample_data.sample_cd8),
        ("cd68", _sample_data.sample_cd68),
        ("cd56", _sample_data.sample_cd56),
    ):
        [(data, kwargs, kind)] = sample()
        meta = kwargs["metadata"]["tilscore"]
        assert kind == "image"
        assert Path(meta["path"]).name == f"synthetic_{marker}.tif"
        assert meta["mpp"] == pytest.approx(0.5)
        assert data[0].shape == (3000, 4000, 3)


def test_manifest_declares_reader_samples_and_widget():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-tilscore")
    contrib = manifest.contributions
    assert any("*.svs" in r.filename_patterns for r in contrib.readers)
    assert {s.key for s in contrib.sample_data} == {
        "synthetic_cd8",
        "synthetic_cd68",
        "synthetic_cd56",
    }
    assert [w.display_name for w in contrib.widgets] == ["TIL scoring"]
