"""Tests of the whole-slide reader (tilscore.slide).

Small pyramidal TIFF / OME-TIFF / PNG / JPEG files are written with tifffile and cv2 into
tmp_path and read back; the real SVS, NDPI and DICOM samples in ../shared/data are read where
present (``shared_data`` fixture).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilscore import open_slide
from tilscore.errors import (
    ConfigError,
    MissingPixelSizeError,
    RegionError,
    SlideReadError,
    TilscoreError,
    UnsupportedFormatError,
)
from tilscore.slide import Slide, Tile

# ------------------------------------------------------------------------------- helpers ---


def make_image(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A smooth, non-repeating uint8 test image (JPEG-friendly, every pixel distinct enough)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), channels), np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return img.reshape(height, width, channels)


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level arrays: each one the previous one sampled every 2nd pixel."""
    out = [image]
    for _ in range(levels - 1):
        out.append(out[-1][::2, ::2])
    return out


def write_pyramid(
    path: Path,
    image: np.ndarray,
    *,
    levels: int = 3,
    tile: int = 64,
    mpp: float | None = 0.5,
    compression: str | None = None,
    subifds: bool = False,
    ome: bool = False,
    photometric: str | None = None,
    extrasamples: tuple[str, ...] | None = None,
) -> list[np.ndarray]:
    """Write a tiled pyramidal TIFF (levels as pages, or as SubIFDs); return the level arrays.

    ``mpp`` goes into XResolution/YResolution (cm) or, for OME, into PhysicalSizeX/Y.
    """
    arrays = pyramid(image, levels)
    if photometric is None:
        photometric = "rgb" if image.ndim == 3 and image.shape[2] >= 3 else "minisblack"
    common = {"tile": (tile, tile), "photometric": photometric, "compression": compression}
    if extrasamples:
        common["extrasamples"] = extrasamples
    first: dict = {}
    if ome:
        first["metadata"] = (
            {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm"} if mpp else {}
        )
    elif mpp:
        first["resolution"] = (1e4 / mpp, 1e4 / mpp)
        first["resolutionunit"] = "CENTIMETER"
    with tifffile.TiffWriter(path, ome=ome) as tw:
        tw.write(arrays[0], subifds=levels - 1 if subifds else None, **first, **common)
        for arr in arrays[1:]:
            tw.write(arr, subfiletype=1, **common)
    return arrays


@pytest.fixture
def rgb() -> np.ndarray:
    return make_image(600, 520)


@pytest.fixture
def tiff_path(tmp_path: Path, rgb: np.ndarray) -> Path:
    path = tmp_path / "slide.tif"
    write_pyramid(path, rgb, compression="zlib")
    return path


# ------------------------------------------------------------------- real slides (shared) ---


def test_aperio_svs_metadata_and_pixels(shared_data: Path) -> None:
    path = shared_data / "wsi-samples" / "aperio-svs" / "CMU-1-Small-Region.svs"
    with open_slide(path) as slide:
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "aperio"
        assert slide.objective_power == 20
        assert slide.properties["aperio.AppMag"] == "20"
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}
        assert slide.associated_images["thumbnail"].shape == (768, 574, 3)
        assert slide.associated_images["label"].shape == (463, 387, 3)
        assert slide.associated_images["macro"].shape == (431, 1280, 3)
        region = slide.read_region(1000, 700, 300, 250)
        expected = tifffile.imread(path)[700:950, 1000:1300]
        np.testing.assert_array_equal(region, expected)


def test_hamamatsu_ndpi_metadata_and_levels(shared_data: Path) -> None:
    path = shared_data / "wsi-samples" / "hamamatsu-ndpi" / "test3-DAPI-2-387.ndpi"
    with open_slide(path) as slide:
        assert slide.vendor == "hamamatsu"
        assert slide.level_dimensions == ((3968, 4864), (1984, 2432), (992, 1216), (496, 608))
        assert slide.level_downsamples == pytest.approx((1, 2, 4, 8))
        assert slide.mpp == pytest.approx(1e4 / 43826, rel=1e-4)
        assert slide.mpp_source == "ndpi"
        assert slide.objective_power == 40
        assert "macro" in slide.associated_images
        assert slide.associated_images["macro"].shape == (406, 1188, 3)
        assert slide.best_level_for_mpp(1.0) == 2
        # DAPI stored as RGB: the signal is in the blue channel at every level
        for level in range(slide.level_count):
            ds = slide.level_downsamples[level]
            w, h = (round(d / ds * 0.5) for d in (3968, 4864))  # the centre half of the level
            region = slide.read_region(992, 1216, w, h, level).astype(float)
            assert region[..., 2].mean() > 5 * region[..., 0].mean() + 10
        full = tifffile.imread(path)
        np.testing.assert_array_equal(
            slide.read_region(1000, 2000, 64, 40), full[2000:2040, 1000:1064]
        )


def test_dicom_partial_pyramid_monochrome(shared_data: Path) -> None:
    pytest.importorskip("wsidicom", reason="DICOM support is the optional extra tilscore[dicom]")
    path = shared_data / "wsi-samples" / "dicom-wsi" / "nema-wg26-BPAEC-partial"
    with open_slide(path) as slide:
        assert slide.vendor == "dicom"
        assert slide.dimensions == (3072, 2304)  # level 5_0: the finest level present
        assert slide.level_count == 8
        assert slide.mpp == pytest.approx(1.29)
        assert slide.mpp_source == "dicom"
        region = slide.read_region(1000, 1000, 128, 96)
        assert region.shape == (96, 128, 3)
        assert region.dtype == np.uint8
        assert np.array_equal(region[..., 0], region[..., 1])  # MONOCHROME2 -> grey RGB
        assert "label" in slide.associated_images
        coarse = slide.read_region(0, 0, *slide.level_dimensions[-1], level=slide.level_count - 1)
        assert coarse.shape == (18, 24, 3)


def test_dicom_file_without_pyramid_is_a_clear_error(shared_data: Path) -> None:
    path = shared_data / "wsi-samples" / "dicom-wsi" / "pathml-he-single-level" / "small_dicom.dcm"
    with pytest.raises(SlideReadError, match=r"small_dicom\.dcm"):
        open_slide(path)


# -------------------------------------------------------------------- written TIFF formats ---


@pytest.mark.parametrize(
    ("compression", "tolerance"),
    [(None, 0), ("lzw", 0), ("zlib", 0), ("jpeg", 10.0), ("jpeg2000", 0)],
)
def test_compressions_round_trip(
    tmp_path: Path, rgb: np.ndarray, compression: str | None, tolerance: float
) -> None:
    path = tmp_path / f"{compression}.tif"
    arrays = write_pyramid(path, rgb, compression=compression)
    with open_slide(path) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.level_dimensions == tuple((a.shape[1], a.shape[0]) for a in arrays)
        assert slide.mpp == pytest.approx(0.5)
        assert slide.mpp_source == "tiff-resolution"
        for level, expected in enumerate(arrays):
            got = slide.read_region(0, 0, expected.shape[1], expected.shape[0], level)
            assert got.dtype == np.uint8
            assert got.shape == expected.shape
            if tolerance:  # lossy: close to the truth, identical to tifffile's own decoding
                assert np.abs(got.astype(int) - expected).mean() <= tolerance
                np.testing.assert_array_equal(got, tifffile.imread(path, level=level))
            else:
                np.testing.assert_array_equal(got, expected)


def test_jpeg_rgb_photometric_and_ycbcr_agree(tmp_path: Path, rgb: np.ndarray) -> None:
    write_pyramid(tmp_path / "ycbcr.tif", rgb, compression="jpeg", levels=1)
    # tifffile stores JPEG as YCbCr unless told to keep RGB (Aperio's photometric-RGB tiles)
    tifffile.imwrite(
        tmp_path / "rgb.tif",
        rgb,
        tile=(64, 64),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"outcolorspace": "RGB"},
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    with tifffile.TiffFile(tmp_path / "ycbcr.tif") as tif:
        assert tif.pages[0].photometric == 6
    with tifffile.TiffFile(tmp_path / "rgb.tif") as tif:
        assert tif.pages[0].photometric == 2
    for name in ("ycbcr.tif", "rgb.tif"):
        with open_slide(tmp_path / name) as slide:
            got = slide.read_region(0, 0, 520, 600)
            assert np.abs(got.astype(int) - rgb).mean() < 6


def test_pyramid_in_subifds(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "subifds.tif"
    arrays = write_pyramid(path, rgb, subifds=True, compression="lzw")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1  # the reduced levels hang off page 0 as SubIFDs
        assert len(tif.pages[0].subifds) == 2
    with open_slide(path) as slide:
        assert slide.level_count == 3
        np.testing.assert_array_equal(
            slide.read_region(128, 64, 90, 80, 2), arrays[2][16:96, 32:122]
        )


def test_ome_tiff_subifds_with_units(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "slide.ome.tif"
    arrays = pyramid(rgb, 3)
    meta = {"PhysicalSizeX": 250, "PhysicalSizeY": 260, "PhysicalSizeXUnit": "nm",
            "PhysicalSizeYUnit": "nm"}  # fmt: skip
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(arrays[0], tile=(64, 64), photometric="rgb", subifds=2, metadata=meta)
        for arr in arrays[1:]:
            tw.write(arr, tile=(64, 64), photometric="rgb", subfiletype=1)
    with open_slide(path) as slide:
        assert slide.vendor == "ome"
        assert slide.mpp_source == "ome"
        assert (slide.mpp_x, slide.mpp_y) == pytest.approx((0.25, 0.26))
        assert slide.mpp == pytest.approx(0.255)
        assert slide.level_count == 3
        np.testing.assert_array_equal(slide.read_region(0, 0, 130, 150, 2), arrays[2])
        assert "ome.xml" in slide.properties


def test_ome_multi_series_pyramid_and_label(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "multi.ome.tif"
    arrays = pyramid(rgb, 2)
    label = make_image(50, 60, seed=3)
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(label, photometric="rgb", metadata={"Name": "label"})
        meta = {"Name": "tissue", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
        tw.write(arrays[0], tile=(64, 64), photometric="rgb", metadata=meta)
        tw.write(arrays[1], tile=(64, 64), photometric="rgb", metadata={"Name": "tissue 1:2"})
    with open_slide(path) as slide:
        assert slide.dimensions == (520, 600)
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_count == 2
        np.testing.assert_array_equal(slide.read_region(0, 0, 260, 300, 1), arrays[1])
        np.testing.assert_array_equal(slide.associated_images["label"], label)


def test_ome_objective_power(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "obj.ome.tif"
    write_pyramid(path, rgb, ome=True, levels=1)
    xml = tifffile.TiffFile(path).ome_metadata
    instrument = (
        '<Instrument ID="Instrument:0">'
        '<Objective ID="Objective:0:0" NominalMagnification="40"/></Instrument>'
    )
    tifffile.tiffcomment(path, xml.replace("<Image ", instrument + "<Image ", 1).encode())
    with open_slide(path) as slide:
        assert slide.vendor == "ome"
        assert slide.objective_power == 40


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    rgba = make_image(200, 180, channels=4)
    rgba[..., 3] = 255
    rgba[:50, :, 3] = 0  # transparent top band
    path = tmp_path / "rgba.tif"
    write_pyramid(path, rgba, levels=1, extrasamples=("unassalpha",))
    with open_slide(path) as slide:
        got = slide.read_region(0, 0, 180, 200)
        assert (got[:50] == 255).all()
        np.testing.assert_array_equal(got[50:], rgba[50:, :, :3])


def test_grey_and_16_bit(tmp_path: Path) -> None:
    grey = make_image(200, 160, channels=1)[..., 0]
    write_pyramid(tmp_path / "grey.tif", grey, levels=2, compression="zlib")
    with open_slide(tmp_path / "grey.tif") as slide:
        got = slide.read_region(0, 0, 160, 200)
        assert got.shape == (200, 160, 3)
        for c in range(3):
            np.testing.assert_array_equal(got[..., c], grey)
    deep = grey.astype(np.uint16) * 257  # 16-bit, full range
    write_pyramid(tmp_path / "deep.tif", np.dstack([deep] * 3), levels=1, compression="lzw")
    with open_slide(tmp_path / "deep.tif") as slide:
        got = slide.read_region(0, 0, 160, 200)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got[..., 1], grey)


def test_uncompressed_ycbcr_is_converted_to_rgb(tmp_path: Path, rgb: np.ndarray) -> None:
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[:, :, [0, 2, 1]]  # Y, Cb, Cr (BT.601, full)
    path = tmp_path / "ycbcr.tif"
    write_pyramid(path, ycc, levels=1, photometric="ycbcr", compression="zlib")
    assert tifffile.TiffFile(path).pages[0].photometric == 6
    with open_slide(path) as slide:
        got = slide.read_region(0, 0, 520, 600)
        assert np.abs(got.astype(int) - rgb).max() <= 3


def test_miniswhite_and_palette(tmp_path: Path) -> None:
    grey = make_image(100, 90, channels=1)[..., 0]
    tifffile.imwrite(tmp_path / "mw.tif", 255 - grey, photometric="miniswhite", tile=(32, 32),
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    with open_slide(tmp_path / "mw.tif") as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 90, 100)[..., 0], grey)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[0] = np.arange(256) * 257  # index -> red ramp, 16-bit
    colormap[2] = 65535
    tifffile.imwrite(tmp_path / "pal.tif", grey, photometric="palette", colormap=colormap,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    with open_slide(tmp_path / "pal.tif") as slide:
        got = slide.read_region(0, 0, 90, 100)
        np.testing.assert_array_equal(got[..., 0], grey)
        assert (got[..., 1] == 0).all()
        assert (got[..., 2] == 255).all()


def test_plain_stripped_tiff_resolution_in_inch(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=37,
                     resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")  # fmt: skip
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_count == 1
        np.testing.assert_array_equal(slide.read_region(13, 70, 300, 100), rgb[70:170, 13:313])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_plain_png_jpeg_need_mpp(tmp_path: Path, rgb: np.ndarray, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    cv2.imwrite(str(path), rgb[:, :, ::-1])
    with pytest.raises(MissingPixelSizeError, match=r"mpp=0\.5"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.vendor == "image"
        assert slide.mpp_source == "user"
        got = slide.read_region(0, 0, 520, 600)
        err = np.abs(got.astype(int) - rgb).mean()
        assert err == 0 if suffix == ".png" else err < 6


def test_user_mpp_overrides_and_is_validated(tiff_path: Path) -> None:
    with open_slide(tiff_path, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.mpp_source == "user"
        assert slide.level_mpp(1) == pytest.approx(0.5)
    for bad in (0, -1, float("nan"), float("inf"), "abc"):
        with pytest.raises(ConfigError):
            open_slide(tiff_path, mpp=bad)
    with pytest.raises(ConfigError):
        open_slide(tiff_path, backend="nope")


@pytest.mark.parametrize(
    ("resolution", "unit"),
    [(None, None), ((2e4, 2e4), "NONE"), ((72, 72), "INCH"), ((96, 96), "INCH")],
)
def test_missing_or_default_resolution_is_no_pixel_size(
    tmp_path: Path, rgb: np.ndarray, resolution: tuple | None, unit: str | None
) -> None:
    path = tmp_path / "nompp.tif"
    kwargs = {"resolution": resolution, "resolutionunit": unit} if resolution else {}
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(64, 64), **kwargs)
    with pytest.raises(MissingPixelSizeError) as info:
        open_slide(path)
    assert str(path) in str(info.value)
    assert "--mpp 0.5" in str(info.value)


# ---------------------------------------------------------------------------------- reading ---


def test_read_region_uses_level0_coordinates(tiff_path: Path, rgb: np.ndarray) -> None:
    arrays = pyramid(rgb, 3)
    with open_slide(tiff_path) as slide:
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        got = slide.read_region(200, 100, 50, 40, level=1)  # level-0 (200, 100) = level-1 (100, 50)
        np.testing.assert_array_equal(got, arrays[1][50:90, 100:150])


def test_region_partly_outside_is_white(tiff_path: Path, rgb: np.ndarray) -> None:
    with open_slide(tiff_path) as slide:
        got = slide.read_region(-10, 580, 40, 40)
        assert (got[:, :10] == 255).all()
        assert (got[20:] == 255).all()
        np.testing.assert_array_equal(got[:20, 10:], rgb[580:600, 0:30])


@pytest.mark.parametrize(
    "box", [(600, 0, 10, 10), (0, 700, 10, 10), (-50, -50, 20, 20), (0, 0, 0, 10), (0, 0, 10, -5)]
)
def test_bad_regions_raise_region_error(tiff_path: Path, box: tuple[int, ...]) -> None:
    with open_slide(tiff_path) as slide, pytest.raises(RegionError) as info:
        slide.read_region(*box)
    assert str(tiff_path) in str(info.value)


def test_unknown_level_raises_region_error(tiff_path: Path) -> None:
    with open_slide(tiff_path) as slide, pytest.raises(RegionError, match=r"levels 0\.\.2"):
        slide.read_region(0, 0, 10, 10, level=3)


def test_best_level_and_read_at_mpp(tiff_path: Path, rgb: np.ndarray) -> None:
    arrays = pyramid(rgb, 3)
    with open_slide(tiff_path) as slide:
        assert [slide.best_level_for_mpp(m) for m in (0.3, 0.5, 0.99, 1.0, 1.5, 2.0, 8.0)] == [
            0, 0, 0, 1, 1, 2, 2,
        ]  # fmt: skip
        exact = slide.read_at_mpp(40, 80, 400, 200, mpp=1.0)  # straight from level 1
        np.testing.assert_array_equal(exact, arrays[1][40:140, 20:220])
        resized = slide.read_at_mpp(0, 0, 520, 600, mpp=1.5)  # level 1 resized by 2/3
        assert resized.shape == (200, 173, 3)
        expected = cv2.resize(arrays[1], (173, 200), interpolation=cv2.INTER_AREA)
        assert np.abs(resized.astype(int) - expected).mean() < 1.0
        with pytest.raises(ConfigError):
            slide.read_at_mpp(0, 0, 10, 10, mpp=0)


def test_reads_shrunk_tile_by_tile_equal_the_whole_box_resized(tmp_path: Path) -> None:
    # an integer shrink of an aligned box is done per decoded tile (no full-size box); it must
    # give exactly what reading the box and resizing it gives: at the slide's partial edge
    # tiles, for boxes partly outside the slide (white there), and through the fallback where
    # blocks would straddle a tile or the slide's edge (odd corners, factor 3, 602 % 4 != 0)
    rng = np.random.default_rng(1)
    h, w = 602, 522
    path = tmp_path / "one_level.tif"
    write_pyramid(path, make_image(h, w, seed=5), levels=1, compression="jpeg")
    fast = 0
    with open_slide(path) as slide:
        for factor in (2, 3, 4):
            for _ in range(60):
                bw, bh = (int(rng.integers(1, 130)) * factor for _ in range(2))
                x = int(rng.integers(-bw // 2, w - bw // 2))
                y = int(rng.integers(-bh // 2, h - bh // 2))
                if rng.random() < 0.7:  # mostly aligned corners
                    x, y = x // factor * factor, y // factor * factor
                got = slide.read_at_mpp(x, y, bw, bh, mpp=0.5 * factor)
                whole = slide.read_region(x, y, bw, bh)
                expected = cv2.resize(
                    whole, (bw // factor, bh // factor), interpolation=cv2.INTER_AREA
                )
                np.testing.assert_array_equal(got, expected)
                fast += slide._reader.read_reduced(0, x, y, bw, bh, factor) is not None
    assert 40 < fast < 150  # the tile-by-tile path ran, and so did the fallback


def test_iter_tiles_cores_cover_the_slide_once(tiff_path: Path, rgb: np.ndarray) -> None:
    with open_slide(tiff_path) as slide:
        tiles = slide.iter_tiles(mpp=0.5, size=128, overlap=16)
        assert inspect.isgenerator(tiles)
        count = np.zeros((600 + 256, 520 + 256), np.int32)
        canvas = np.full((600 + 256, 520 + 256, 3), 255, np.uint8)
        n = 0
        for tile in tiles:
            assert isinstance(tile, Tile)
            assert tile.image.shape == (160, 160, 3)
            assert tile.downsample == pytest.approx(1.0)
            cx, cy = round(tile.x) + 16, round(tile.y) + 16
            assert (cx, cy) == (tile.col * 128, tile.row * 128)
            count[cy : cy + 128, cx : cx + 128] += 1
            canvas[cy : cy + 128, cx : cx + 128] = tile.image[16:-16, 16:-16]
            n += 1
        assert n == math.ceil(520 / 128) * math.ceil(600 / 128)
        assert (count[:600, :520] == 1).all()
        np.testing.assert_array_equal(canvas[:600, :520], rgb)
        assert (canvas[600:, :] == 255).all()  # beyond the slide: white padding


@pytest.mark.parametrize("mpp", [0.25, 0.5, 0.6, 1.0])
def test_iter_tiles_crop_reads_the_same_pixels_as_the_whole_tile_cut(
    tmp_path: Path, mpp: float
) -> None:
    # 0.25 and 0.5 µm/px on a 0.25 µm/px level 0 (and 1.0 on its 0.5 µm/px level 1) read
    # only the part; 0.6 (resampled) reads the whole tile and cuts it. Same pixels either way.
    path = tmp_path / "s.tif"
    write_pyramid(path, make_image(600, 520, seed=2), levels=2, mpp=0.25, compression="jpeg")

    def crop(x: float, y: float, ds: float, full: int):
        k = int(abs(x) + 2 * abs(y)) % 3  # a different cut per tile, some none at all
        return None if k == 0 else (slice(k * 5, full - 7), slice(3, full // k))

    with open_slide(path) as slide:
        whole = list(slide.iter_tiles(mpp, 96, 16))
        cut = list(slide.iter_tiles(mpp, 96, 16, crop=crop))
    assert len(whole) == len(cut) >= 4
    for w, c in zip(whole, cut, strict=True):
        box = crop(w.x, w.y, w.downsample, 128)
        assert (c.x, c.y, c.col, c.row) == (w.x, w.y, w.col, w.row)
        expected = w.image if box is None else w.image[box]
        assert (c.oy, c.ox) == ((0, 0) if box is None else (box[0].start, box[1].start))
        np.testing.assert_array_equal(c.image, expected)


def test_iter_tiles_at_coarser_mpp_reads_the_matching_level(
    tiff_path: Path, rgb: np.ndarray
) -> None:
    level1 = pyramid(rgb, 2)[1]
    with open_slide(tiff_path) as slide:
        tile = next(iter(slide.iter_tiles(mpp=1.0, size=64, overlap=8)))
        assert tile.downsample == pytest.approx(2.0)
        assert tile.mpp == 1.0
        assert (tile.x, tile.y) == (-16, -16)
        np.testing.assert_array_equal(tile.image[8:, 8:], level1[:72, :72])
        assert (tile.image[:8] == 255).all()


class HalfMask:
    """A stand-in tissue mask: tissue in the left half of the slide (level-0 px)."""

    def __init__(self, width: float) -> None:
        self.width = width

    def fraction_in(self, x: float, y: float, width: float, height: float) -> float:
        inside = max(0.0, min(x + width, self.width / 2) - max(x, 0.0))
        return inside / width


def test_iter_tiles_skips_tiles_outside_the_mask(tiff_path: Path) -> None:
    with open_slide(tiff_path) as slide:
        tiles = list(slide.iter_tiles(mpp=0.5, size=100, mask=HalfMask(520)))
        assert {t.col for t in tiles} == {0, 1, 2}  # x 0..300 touches the left half (0..260)
        assert len(tiles) == 3 * 6
        tiles = list(slide.iter_tiles(0.5, 100, mask=HalfMask(520), min_tissue_fraction=0.7))
        assert {t.col for t in tiles} == {0, 1}  # col 2 holds 60 % tissue (x 200..260 of 300)


def test_to_dask_matches_read_region(tiff_path: Path, rgb: np.ndarray) -> None:
    arrays = pyramid(rgb, 3)
    with open_slide(tiff_path) as slide:
        for level in (0, 2):
            arr = slide.to_dask(level)
            assert arr.shape == arrays[level].shape
            assert arr.dtype == np.uint8
            np.testing.assert_array_equal(arr.compute(), arrays[level])
        assert slide.to_dask(0)[10:20, 30:50].compute().shape == (10, 20, 3)


def test_thumbnail_fits_and_looks_like_the_slide(tiff_path: Path, rgb: np.ndarray) -> None:
    with open_slide(tiff_path) as slide:
        thumb = slide.thumbnail(100)
        assert max(thumb.shape[:2]) == 100
        assert thumb.shape == (100, 87, 3)
        level2 = pyramid(rgb, 3)[2]  # the coarsest level at least 100 px high is read
        expected = cv2.resize(level2, (87, 100), interpolation=cv2.INTER_AREA)
        assert np.abs(thumb.astype(int) - expected).mean() < 4


def test_concurrent_reads_match_serial_reads(tiff_path: Path) -> None:
    rng = np.random.default_rng(1)
    boxes = [
        (int(rng.integers(-20, 500)), int(rng.integers(-20, 580)), int(rng.integers(1, 150)),
         int(rng.integers(1, 150)), int(rng.integers(0, 3)))
        for _ in range(200)
    ]  # fmt: skip
    with open_slide(tiff_path) as serial:
        expected = [serial.read_region(*b) for b in boxes]
    with open_slide(tiff_path) as shared, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: shared.read_region(*b), boxes))
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_tile_cache_stays_bounded() -> None:
    from tilscore.slide import _TileCache

    cache = _TileCache(max_bytes=10_000)
    for i in range(100):
        cache.put(i, np.zeros(3000, np.uint8))
    assert cache._bytes <= 10_000
    assert cache.get(99) is not None
    assert cache.get(0) is None


def test_closed_slide_raises(tiff_path: Path) -> None:
    slide = open_slide(tiff_path)
    slide.close()
    with pytest.raises(SlideReadError, match="closed"):
        slide.read_region(0, 0, 10, 10)


def test_openslide_backend(tiff_path: Path, rgb: np.ndarray) -> None:
    pytest.importorskip("openslide")
    with open_slide(tiff_path, mpp=0.5, backend="openslide") as slide:
        assert slide.vendor == "openslide"
        np.testing.assert_array_equal(slide.read_region(0, 0, 100, 80), rgb[:80, :100])


def test_mrxs_without_openslide_says_how_to_install_it(tmp_path: Path) -> None:
    if importlib.util.find_spec("openslide") is not None:
        pytest.skip("openslide is installed")
    path = tmp_path / "slide.mrxs"
    path.write_text("[GENERAL]\n")
    with pytest.raises(UnsupportedFormatError, match=r"tilscore\[openslide\]") as info:
        open_slide(path)
    assert str(path) in str(info.value)


# -------------------------------------------------------------------------------- bad input ---


def _assert_names(error: pytest.ExceptionInfo, path: Path) -> None:
    assert str(path) in str(error.value)


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.svs"
    with pytest.raises(SlideReadError, match="no such file") as info:
        open_slide(path)
    _assert_names(info, path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(SlideReadError, match="directory") as info:
        open_slide(tmp_path)
    _assert_names(info, tmp_path)


def test_text_file_named_svs(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n")
    with pytest.raises(UnsupportedFormatError, match="not a slide") as info:
        open_slide(path)
    _assert_names(info, path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with pytest.raises(SlideReadError, match="empty") as info:
        open_slide(path)
    _assert_names(info, path)


def test_truncated_tiff(tmp_path: Path, tiff_path: Path) -> None:
    data = tiff_path.read_bytes()
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError) as info, open_slide(path) as slide:  # noqa: PT012
        for level in range(slide.level_count):
            slide.read_region(0, 0, *slide.level_dimensions[level], level=level)
    _assert_names(info, path)


def test_unsupported_compression(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "weird.tif"
    write_pyramid(path, rgb, levels=1)
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags[259]  # Compression, a SHORT stored in the IFD entry
        offset, byteorder = tag.valueoffset, tif.byteorder
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(byteorder + "H", 60001))
    # tilscore says "compression 60001"; with openslide-python installed, OpenSlide says
    # "compression: 60001" (its fallback is tried first)
    with pytest.raises(UnsupportedFormatError, match=r"compression:? 60001") as info:
        open_slide(path)
    _assert_names(info, path)


# ------------------------------------------------------------------ corruption never escapes ---

_SMALL_TIFF: list[bytes] = []


def _small_tiff() -> bytes:
    if not _SMALL_TIFF:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "small.tif"
            write_pyramid(path, make_image(96, 80, seed=5), levels=2, tile=32, compression="zlib")
            _SMALL_TIFF.append(path.read_bytes())
    return _SMALL_TIFF[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_corrupt_tiff_raises_only_tilscore_errors(
    edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_small_tiff())
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corrupt.tif"
        path.write_bytes(bytes(data))
        try:
            with open_slide(path) as slide:
                for level in range(slide.level_count):
                    w, h = slide.level_dimensions[level]
                    slide.read_region(0, 0, min(w, 96), min(h, 96), level=level)
                slide.thumbnail(32)
        except TilscoreError:
            pass


def test_slide_is_the_public_class(tiff_path: Path) -> None:
    import tilscore

    with tilscore.open_slide(tiff_path) as slide:
        assert isinstance(slide, tilscore.Slide)
        assert isinstance(slide, Slide)
        assert "0.5 µm/px" in repr(slide)


def test_from_array_wraps_an_image_in_memory() -> None:
    from tilscore.slide import Slide

    rgba = np.zeros((100, 120, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:10, :10, 3] = 0  # transparent corner: composited over white
    slide = Slide.from_array(rgba, mpp=0.25)
    assert slide.dimensions == (120, 100)
    assert slide.mpp_source == "user"
    assert slide.read_region(0, 0, 2, 2)[0, 0].tolist() == [255, 255, 255]
    assert slide.read_region(50, 50, 1, 1)[0, 0].tolist() == [200, 0, 0]
    assert slide.read_at_mpp(0, 0, 120, 100, 0.5).shape == (50, 60, 3)
    grey16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    assert Slide.from_array(grey16, 0.5).read_region(0, 0, 64, 64).dtype == np.uint8
    with pytest.raises(MissingPixelSizeError, match="mpp="):
        Slide.from_array(rgba, None)
    with pytest.raises(ConfigError, match="shape"):
        Slide.from_array(np.zeros((4, 4, 5), np.uint8), 0.5)
