"""Whole-slide reader: one :class:`Slide` over tifffile, plain images, DICOM and OpenSlide.

Open a slide with :func:`open_slide`. Coordinates are level-0 pixels (x = column); the pixel
size in µm/px comes from the file (Aperio ``MPP``, OME ``PhysicalSizeX/Y``, NDPI or TIFF
resolution tags, DICOM pixel spacing) or from the caller (``mpp=``). A slide without a pixel
size raises :class:`~tilscore.errors.MissingPixelSizeError`; it is never assumed.

Backends (private classes, one per family of formats) read rectangles of one pyramid level in
that level's pixel coordinates; :class:`Slide` does everything else (white padding outside the
slide, level choice, resampling, tiling, dask arrays). The tifffile backend decodes only the
tiles (or strips) that intersect the requested box, reads them with ``os.pread`` so that threads
never share a file position, and keeps recently decoded tiles in a small LRU cache.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import (
    ConfigError,
    MissingPixelSizeError,
    RegionError,
    SlideReadError,
    UnsupportedFormatError,
    check_positive,
)

if TYPE_CHECKING:  # pragma: no cover
    import dask.array

    from .tissue import TissueMask

__all__ = ["Slide", "Tile", "open_slide"]

_WHITE = 255
_MPP_HINT = (
    "Pass the pixel size yourself: open_slide(path, mpp=0.5) in Python or --mpp 0.5 on the CLI"
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_OPENSLIDE_SUFFIXES = {".mrxs", ".vms", ".vmu", ".svslide"}  # not TIFF inside
_JPEG_CODES = {6, 7, 33007, 34892}
_ASSOCIATED = ("label", "macro", "thumbnail")
_BOGUS_DPI = {72.0, 96.0}
_UM_PER_UNIT = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0,
    "nm": 1e-3, "Å": 1e-4, "pm": 1e-6,
}  # fmt: skip


# ----------------------------------------------------------------------------------- errors ---


# What tifffile and imagecodecs raise on a corrupt or truncated file: structural errors
# (TiffFileError, struct.error, IndexError, KeyError, OverflowError), bad values (ValueError,
# TypeError, ZeroDivisionError), I/O (OSError, EOFError) and codec failures (imagecodecs errors
# derive from RuntimeError, as does NotImplementedError), or an absurd allocation (MemoryError).
def _corrupt_errors() -> tuple[type[BaseException], ...]:
    import tifffile

    return (
        tifffile.TiffFileError,
        OSError,
        EOFError,
        ValueError,
        TypeError,
        struct.error,
        IndexError,
        KeyError,
        OverflowError,
        ZeroDivisionError,
        RuntimeError,
        MemoryError,
    )


# ------------------------------------------------------------------------------- data types ---


@dataclass(frozen=True)
class Tile:
    """One tile of a slide resampled to a pixel size, with its halo.

    Attributes
    ----------
    image
        (h, w, 3) uint8 RGB at ``mpp`` µm/px, halo included, white-padded at slide edges.
    x, y
        Level-0 pixel coordinates of ``image[0, 0]`` (px).
    mpp
        Pixel size of ``image`` (µm/px).
    downsample
        Level-0 pixels per tile pixel.
    col, row
        Grid index of the tile.
    overlap
        Halo width on each side (tile px); ``image[overlap:-overlap, overlap:-overlap]`` is the
        core, and the cores of all tiles tile the slide exactly once.
    ox, oy
        Where ``image`` starts within the whole tile (tile px): 0, 0 unless
        :meth:`Slide.iter_tiles` was asked to ``crop`` it, in which case ``image`` is the part
        ``[oy:oy + h, ox:ox + w]`` of the whole tile (whose corner stays at ``x``, ``y``).
    """

    image: np.ndarray
    x: float
    y: float
    mpp: float
    downsample: float
    col: int
    row: int
    overlap: int
    ox: int = 0
    oy: int = 0


@dataclass
class _Meta:
    """What a backend knows about its file, besides pixels."""

    vendor: str
    level_dimensions: list[tuple[int, int]]
    mpp_x: float | None = None
    mpp_y: float | None = None
    mpp_source: str | None = None
    objective_power: float | None = None
    properties: dict[str, str] | None = None
    associated: dict[str, Callable[[], np.ndarray]] | None = None


class _Backend(Protocol):
    meta: _Meta

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of a box that lies inside the level (level px)."""

    def preferred_chunk(self, level: int) -> tuple[int, int]:
        """(width, height) of a natural read unit of the level (px)."""

    def close(self) -> None: ...


# ------------------------------------------------------------------------ pixel conversion ---


def _scale_to_uint8(arr: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Scale integer, float or bool samples to uint8.

    Integers are scaled by their nominal range (``2**bits - 1``, bits from the file's
    BitsPerSample when given), so that every tile of a slide is scaled alike; floats are read as
    0..1; negative values clip to 0.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise UnsupportedFormatError(f"pixel type {arr.dtype} is not supported")
    info = np.iinfo(arr.dtype)
    nbits = bits if bits and 1 <= bits <= info.bits else info.bits
    if np.issubdtype(arr.dtype, np.signedinteger):
        nbits = min(nbits, info.bits - 1)
    top = float(2**nbits - 1)
    out = np.clip(arr.astype(np.float32), 0.0, top) * np.float32(255.0 / top) + np.float32(0.5)
    return out.astype(np.uint8)


def _ycbcr_to_rgb(arr: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 full-range YCbCr (uint8) to RGB uint8."""
    ycc = arr[..., :3].astype(np.float32)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return (np.clip(rgb, 0, 255) + 0.5).astype(np.uint8)


def _to_rgb(
    arr: np.ndarray,
    *,
    bits: int | None = None,
    invert: bool = False,
    ycbcr: bool = False,
    alpha: bool | None = None,
) -> np.ndarray:
    """Convert grey, grey+alpha, RGB, RGBA (any integer/float depth) to RGB uint8 (h, w, 3).

    Alpha is composited over white (glass); ``invert`` is for MINISWHITE grey; ``ycbcr`` for
    YCbCr samples that the codec left unconverted.
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = _scale_to_uint8(arr, bits)
    if invert:
        arr = 255 - arr
    samples = arr.shape[2]
    if alpha is None:
        alpha = samples in (2, 4)
    if samples >= 3:
        rgb = _ycbcr_to_rgb(arr) if ycbcr else arr[:, :, :3]
        a = arr[:, :, 3] if alpha and samples >= 4 else None
    else:
        rgb = np.repeat(arr[:, :, :1], 3, axis=2)
        a = arr[:, :, 1] if alpha and samples >= 2 else None
    if a is not None and not np.all(a == 255):
        af = a[:, :, None].astype(np.float32) / 255.0
        rgb = (rgb.astype(np.float32) * af + 255.0 * (1.0 - af) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize RGB to (height, width): area interpolation when shrinking, linear when enlarging."""
    if img.shape[1] == width and img.shape[0] == height:
        return img
    import cv2

    shrink = width <= img.shape[1] and height <= img.shape[0]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(img, (int(width), int(height)), interpolation=interp)


class _TileCache:
    """Thread-safe LRU of decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Any, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


# ---------------------------------------------------------------------- tifffile: metadata ---


def _um_per_px_from_resolution(page: Any) -> float | None:
    """µm/px from a page's XResolution + ResolutionUnit, or None when absent or a default."""
    tags = page.tags
    res, unit = tags.get(282), tags.get(296)
    if res is None or unit is None:
        return None
    unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    if unit_um is None:
        return None
    num, den = (res.value, 1) if np.isscalar(res.value) else res.value
    if not num or not den:
        return None
    px_per_unit = num / den
    if unit_um == 25400.0 and px_per_unit in _BOGUS_DPI:
        return None
    return unit_um / px_per_unit


def _y_um_per_px(page: Any, x_um: float) -> float:
    """µm/px along y from YResolution, falling back to the x value."""
    res = page.tags.get(283)
    unit_um = {2: 25400.0, 3: 10000.0}.get(int(page.tags[296].value))
    if res is None or unit_um is None:
        return x_um
    num, den = (res.value, 1) if np.isscalar(res.value) else res.value
    return unit_um / (num / den) if num and den else x_um


def _aperio_description(description: str) -> dict[str, str]:
    """``key = value`` pairs of an Aperio ImageDescription (``header|AppMag = 20|MPP = 0.499``)."""
    pairs = {}
    for item in description.split("|")[1:]:
        key, sep, value = item.partition("=")
        if sep:
            pairs[key.strip()] = value.strip()
    return pairs


def _positive_float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _aperio_meta(tif: Any, meta: _Meta) -> None:
    props = _aperio_description(tif.pages.first.description)
    meta.properties.update({f"aperio.{k}": v for k, v in props.items()})
    mpp = _positive_float(props.get("MPP"))
    if mpp is not None:
        meta.mpp_x = meta.mpp_y = mpp
        meta.mpp_source = "aperio"
    meta.objective_power = _positive_float(props.get("AppMag"))


def _ndpi_meta(tif: Any, meta: _Meta) -> None:
    page = tif.pages.first
    for key, value in (page.ndpi_tags or {}).items():
        meta.properties[f"hamamatsu.{key}"] = str(value)
    mag = page.tags.get(65421)
    if mag is not None and float(mag.value) > 0:
        meta.objective_power = float(mag.value)
    mpp = _um_per_px_from_resolution(page)
    if mpp is not None:
        meta.mpp_x, meta.mpp_y = mpp, _y_um_per_px(page, mpp)
        meta.mpp_source = "ndpi"


def _ome_meta(tif: Any, meta: _Meta, series_index: int) -> None:
    xml = tif.ome_metadata or ""
    meta.properties["ome.xml"] = xml
    root = ET.fromstring(xml)
    ns = {"ome": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {}
    pre = "ome:" if ns else ""
    images = root.findall(f"{pre}Image", ns)
    image = images[series_index] if series_index < len(images) else (images[0] if images else None)
    pixels = image.find(f"{pre}Pixels", ns) if image is not None else None
    if pixels is not None:
        sizes = []
        for axis in ("X", "Y"):
            value = pixels.get(f"PhysicalSize{axis}")
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            factor = _UM_PER_UNIT.get(unit)
            sizes.append(float(value) * factor if value and factor else None)
        if sizes[0] and sizes[0] > 0:
            meta.mpp_x = sizes[0]
            meta.mpp_y = sizes[1] if sizes[1] and sizes[1] > 0 else sizes[0]
            meta.mpp_source = "ome"
    for objective in root.iter():
        if objective.tag.endswith("Objective") and objective.get("NominalMagnification"):
            meta.objective_power = float(objective.get("NominalMagnification"))
            break


def _tiff_properties(page: Any) -> dict[str, str]:
    props = {}
    for code, name in ((270, "ImageDescription"), (305, "Software"), (271, "Make"), (272, "Model"),
                       (306, "DateTime"), (282, "XResolution"), (283, "YResolution"),
                       (296, "ResolutionUnit")):  # fmt: skip
        tag = page.tags.get(code)
        if tag is not None:
            props[f"tiff.{name}"] = str(tag.value)
    return props


# ------------------------------------------------------------------------ tifffile: levels ---


#: The largest tile or strip decoded at once (bytes): larger ones are refused, not allocated.
_MAX_CHUNK_BYTES = 1 << 30
#: Decoded bytes per stored byte beyond which a TIFF level's header is not believed (a blank
#: 256 px JPEG tile is about 300:1, deflate at most about 1000:1).
_MAX_COMPRESSION_RATIO = 20000
#: The largest physical size (mm, either side) a slide may claim: no glass slide is larger.
_MAX_SLIDE_MM = 250.0


class _TiffLevel:
    """Tile (or strip) geometry and decoding of one pyramid level (one TIFF page)."""

    def __init__(self, page: Any, path: Path, file_size: int) -> None:
        key = page.keyframe
        self.page, self.key = page, key
        self.width, self.height = int(key.imagewidth), int(key.imagelength)
        if key.imagedepth > 1:
            raise UnsupportedFormatError("3-D (volumetric) TIFF pages are not supported", path=path)
        if key.is_tiled:
            self.tile_w, self.tile_h = int(key.tilewidth), int(key.tilelength)
        else:
            self.tile_w = self.width
            self.tile_h = max(1, min(int(key.rowsperstrip or self.height), self.height))
        self.n_cols = math.ceil(self.width / self.tile_w)
        self.n_rows = math.ceil(self.height / self.tile_h)
        self.separate = key.planarconfig == 2
        self.n_planes = int(key.samplesperpixel) if self.separate else 1
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.decode = key.decode
        is_jpeg = key.compression in _JPEG_CODES
        self.decode_args = (
            {"jpegtables": page.jpegtables, "jpegheader": key.jpegheader} if is_jpeg else {}
        )
        self.convert = {
            "bits": int(key.bitspersample),
            "invert": key.photometric == 0,
            "ycbcr": key.compression == 33003 or (key.photometric == 6 and not is_jpeg),
            "alpha": bool(len(key.extrasamples)),
        }
        self.colormap = key.colormap if key.photometric == 3 else None
        self._check(path, file_size)

    def _check(self, path: Path, file_size: int) -> None:
        import tifffile

        key = self.key
        if key.compression != 1 and key.compression not in tifffile.TIFF.DECOMPRESSORS:
            raise UnsupportedFormatError(
                f"compression {int(key.compression)} is not supported by tifffile/imagecodecs",
                path=path,
                hint="Convert the slide to JPEG, LZW or deflate tiles (e.g. with vips tiffsave)",
            )
        if key.photometric not in (0, 1, 2, 3, 6):
            raise UnsupportedFormatError(
                f"photometric interpretation {int(key.photometric)} is not supported", path=path
            )
        if key.is_subsampled and key.compression not in _JPEG_CODES:
            raise UnsupportedFormatError(
                "chroma-subsampled YCbCr without JPEG compression is not supported", path=path
            )
        needed = self.n_rows * self.n_cols * self.n_planes
        if len(self.offsets) < needed or len(self.counts) < needed:
            raise SlideReadError(
                f"a pyramid level lists {len(self.offsets)} tiles, expected {needed}; "
                "the file is corrupt",
                path=path,
            )
        # sizes against the file before anything is allocated: a header may claim more pixels
        # than any decoder could produce from the bytes stored (a crafted or corrupt file)
        spp = 1 if self.separate else max(1, int(key.samplesperpixel))
        chunk_bytes = self.tile_w * self.tile_h * spp * max(8, int(key.bitspersample)) // 8
        kind = "tiles" if key.is_tiled else "strips"
        if chunk_bytes > _MAX_CHUNK_BYTES:
            raise UnsupportedFormatError(
                f"a pyramid level stores its pixels in {kind} of {chunk_bytes / 2**30:.1f} GB "
                "each, too large to decode",
                path=path,
                hint="Convert it to a tiled pyramid, e.g. vips tiffsave IN OUT.tif --tile "
                "--pyramid --compression jpeg",
            )
        stored = self.counts[:needed]
        nonzero = stored[stored > 0]
        if key.compression != 1 and nonzero.size:
            ratio = chunk_bytes * nonzero.size / max(1, int(nonzero.sum()))
            if ratio > _MAX_COMPRESSION_RATIO:
                raise SlideReadError(
                    f"a pyramid level claims {self.width} x {self.height} px in "
                    f"{int(nonzero.sum())} bytes of image data ({ratio:.0f}:1, more than any "
                    "codec gives); the header is corrupt",
                    path=path,
                    hint="Copy or export the slide again",
                )
        ends = self.offsets[:needed] + self.counts[:needed]
        if needed and (int(ends.max()) > file_size or int(self.offsets[:needed].min()) < 0):
            raise SlideReadError(
                "tile data lies beyond the end of the file; the file is truncated",
                path=path,
                hint="Copy or download the slide again",
            )

    def to_rgb(self, arr: np.ndarray) -> np.ndarray:
        if self.colormap is not None:
            cmap = np.asarray(self.colormap)
            lut = _scale_to_uint8(cmap.T, 16 if cmap.dtype == np.uint16 else None)
            return lut[np.clip(arr[..., 0], 0, lut.shape[0] - 1)]
        return _to_rgb(arr, **self.convert)


class _TiffBackend:
    """Aperio SVS, Hamamatsu NDPI, OME-TIFF and generic (pyramidal or plain) TIFF via tifffile."""

    def __init__(self, path: Path, cache_bytes: int = 96 * 2**20) -> None:
        import tifffile

        self.path = path
        self._tif = tifffile.TiffFile(path)
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._lock = threading.Lock()
            self._cache = _TileCache(cache_bytes)
            size = os.fstat(self._fd).st_size
            main, levels, index = self._pyramid()
            self.levels = [_TiffLevel(lvl.pages[0], path, size) for lvl in levels]
            self.meta = self._metadata(main, index)
        except BaseException:
            self.close()
            raise

    def _pyramid(self) -> tuple[Any, list[Any], int]:
        """The main series, its levels (largest first) and its index among the series."""
        series = list(self._tif.series)
        if not series:
            raise SlideReadError("the TIFF holds no image", path=self.path)
        candidates = [
            (i, s) for i, s in enumerate(series) if not _associated_name(s.name) and _is_image(s)
        ] or [(i, s) for i, s in enumerate(series) if _is_image(s)]
        if not candidates:
            raise UnsupportedFormatError("the TIFF holds no 2-D image", path=self.path)
        if self._tif.is_svs or self._tif.is_ndpi:
            index, main = candidates[0]
        else:
            index, main = max(candidates, key=lambda c: _yx(c[1])[0] * _yx(c[1])[1])
        levels = list(main.levels)
        if len(levels) == 1:  # pyramid stored as separate series (e.g. OME multi-series)
            levels += _reduced_series(main, [s for _, s in candidates if s is not main])
        return main, levels, index

    def _metadata(self, main: Any, index: int) -> _Meta:
        tif, first = self._tif, self.levels[0].page
        vendor = (
            "aperio" if tif.is_svs
            else "hamamatsu" if tif.is_ndpi
            else "ome" if tif.is_ome
            else "generic-tiff"
        )  # fmt: skip
        meta = _Meta(vendor, [(lv.width, lv.height) for lv in self.levels], properties={})
        meta.properties.update(_tiff_properties(first))
        meta.properties["tilscore.vendor"] = vendor
        if tif.is_svs:
            _aperio_meta(tif, meta)
        elif tif.is_ndpi:
            _ndpi_meta(tif, meta)
        elif tif.is_ome:
            _ome_meta(tif, meta, index)
        if meta.mpp_x is None:
            mpp = _um_per_px_from_resolution(first)
            if mpp is not None:
                meta.mpp_x, meta.mpp_y = mpp, _y_um_per_px(first, mpp)
                meta.mpp_source = "tiff-resolution"
        meta.associated = {}
        for s in tif.series:
            name = _associated_name(s.name)
            if name and s is not main and name not in meta.associated:
                meta.associated[name] = self._associated_loader(s)
        return meta

    def _associated_loader(self, series: Any) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            with self._lock:
                arr = series.asarray(maxworkers=1)
            key = series.keyframe
            while arr.ndim > 3 or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
                arr = arr[0]
            return _to_rgb(arr, bits=int(key.bitspersample), invert=key.photometric == 0)

        return load

    def preferred_chunk(self, level: int) -> tuple[int, int]:
        lv = self.levels[level]
        return lv.tile_w, lv.tile_h

    def _read_bytes(self, offset: int, count: int) -> bytes:
        if hasattr(os, "pread"):
            data = os.pread(self._fd, count, offset)
        else:  # pragma: no cover - Windows
            with self._lock:
                os.lseek(self._fd, offset, os.SEEK_SET)
                data = os.read(self._fd, count)
        if len(data) != count:
            raise SlideReadError("tile data ends early; the file is truncated", path=self.path)
        return data

    def _tile(self, level: int, row: int, col: int) -> np.ndarray | None:
        """Decoded RGB tile (cached), or None where the file stores no data for it."""
        key = (level, row, col)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        lv = self.levels[level]
        planes = []
        for plane in range(lv.n_planes):
            index = (plane * lv.n_rows + row) * lv.n_cols + col
            offset, count = int(lv.offsets[index]), int(lv.counts[index])
            if count == 0:
                return None
            data = self._read_bytes(offset, count)
            arr, _, _ = lv.decode(data, index, **lv.decode_args)
            if arr is None:
                return None
            planes.append(arr.reshape(arr.shape[-3:]))
        arr = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=-1)
        rgb = lv.to_rgb(arr)
        self._cache.put(key, rgb)
        return rgb

    def _tile_parts(
        self, level: int, x: int, y: int, width: int, height: int
    ) -> Iterator[tuple[np.ndarray, int, int, int, int]]:
        """The stored tiles under a box of the level: ``(part, x0, y0, x1, y1)``, where
        ``part`` is the decoded tile's pixels in the level box ``[x0, x1) x [y0, y1)``."""
        lv = self.levels[level]
        rows = range(max(0, y // lv.tile_h), min(lv.n_rows - 1, (y + height - 1) // lv.tile_h) + 1)
        cols = range(max(0, x // lv.tile_w), min(lv.n_cols - 1, (x + width - 1) // lv.tile_w) + 1)
        for row in rows:
            for col in cols:
                tile = self._decoded(level, row, col)
                if tile is None:
                    continue
                tx, ty = col * lv.tile_w, row * lv.tile_h
                x0, y0 = max(x, tx), max(y, ty)
                x1 = min(x + width, tx + tile.shape[1], lv.width)
                y1 = min(y + height, ty + tile.shape[0], lv.height)
                if x1 > x0 and y1 > y0:
                    yield tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx], x0, y0, x1, y1

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), _WHITE, dtype=np.uint8)
        for part, x0, y0, x1, y1 in self._tile_parts(level, x, y, width, height):
            out[y0 - y : y1 - y, x0 - x : x1 - x] = part
        return out

    def read_reduced(
        self, level: int, x: int, y: int, width: int, height: int, factor: int
    ) -> np.ndarray | None:
        """A box of the level shrunk by an integer factor, tile by tile; or None.

        The same pixels as reading the box (white outside the level) and shrinking it with an
        area resize by ``factor`` (each output pixel the rounded mean of its ``factor`` x
        ``factor`` block), when every block lies inside one stored tile or wholly outside the
        level: the box's corner, its size and the tile size are multiples of ``factor``, and
        so is the level's size where the box crosses its edge. Each decoded tile is shrunk on
        its own, so the full-resolution box is never assembled (less memory traffic). None
        when the blocks do not align; the caller then reads and resizes the whole box.
        """
        import cv2

        lv, f = self.levels[level], factor
        if f < 2 or any(v % f for v in (x, y, width, height, lv.tile_w, lv.tile_h)):
            return None
        out = np.full((height // f, width // f, 3), _WHITE, dtype=np.uint8)
        for part, x0, y0, x1, y1 in self._tile_parts(level, x, y, width, height):
            if (x1 - x0) % f or (y1 - y0) % f:  # blocks straddle a short tile or the edge
                return None
            out[(y0 - y) // f : (y1 - y) // f, (x0 - x) // f : (x1 - x) // f] = cv2.resize(
                part, ((x1 - x0) // f, (y1 - y0) // f), interpolation=cv2.INTER_AREA
            )
        return out

    def _decoded(self, level: int, row: int, col: int) -> np.ndarray | None:
        """:meth:`_tile`, with a decoding failure turned into a :class:`SlideReadError`."""
        try:
            return self._tile(level, row, col)
        except _corrupt_errors() as e:
            if isinstance(e, SlideReadError):
                raise
            raise SlideReadError(
                f"cannot decode tile ({col}, {row}) of level {level}: {e}",
                path=self.path,
                hint="The file is corrupt or truncated; copy or export it again",
            ) from e

    def clear_cache(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)
        if getattr(self, "_cache", None) is not None:
            self._cache.clear()
        self._tif.close()


def _associated_name(name: str | None) -> str | None:
    lowered = (name or "").lower()
    for kind in _ASSOCIATED:
        if kind in lowered:
            return kind
    return None


def _is_image(series: Any) -> bool:
    """True for a series with Y and X axes (grey or colour planes)."""
    return "Y" in series.axes and "X" in series.axes


def _yx(series: Any) -> tuple[int, int]:
    shape = dict(zip(series.axes, series.shape))
    return int(shape["Y"]), int(shape["X"])


def _reduced_series(main: Any, others: list[Any]) -> list[Any]:
    """Series that are reduced copies of ``main`` (same aspect, smaller), largest first."""
    h0, w0 = _yx(main)
    reduced = []
    for s in others:
        h, w = _yx(s)
        if w < w0 and h < h0 and abs(w0 / w - h0 / h) <= 0.02 * (w0 / w) + 2.0 / min(w, h):
            reduced.append(s)
    reduced.sort(key=lambda s: -_yx(s)[1])
    return [s.levels[0] for s in reduced]


# ------------------------------------------------------------------------ plain images (cv2) ---


class _InMemoryBackend:
    """A one-level image held whole in memory as RGB uint8 (``self._rgb``)."""

    _rgb: np.ndarray
    meta: _Meta

    def preferred_chunk(self, level: int) -> tuple[int, int]:
        return 1024, 1024

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._rgb[y : y + height, x : x + width].copy()

    def close(self) -> None:
        self._rgb = np.zeros((0, 0, 3), np.uint8)


class _ImageBackend(_InMemoryBackend):
    """PNG / JPEG images, decoded whole (they are small); no pixel size in the file."""

    def __init__(self, path: Path) -> None:
        import cv2

        self.path = path
        try:
            buf = np.fromfile(path, dtype=np.uint8)
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        except (OSError, ValueError, cv2.error) as e:
            raise SlideReadError(f"cannot decode the image: {e}", path=path) from e
        if img is None:
            raise SlideReadError(
                "cannot decode the image; the file is corrupt or not a PNG/JPEG", path=path
            )
        if img.ndim == 3 and img.shape[2] >= 3:
            order = [2, 1, 0, 3] if img.shape[2] == 4 else [2, 1, 0]
            img = img[:, :, order]
        self._rgb = _to_rgb(img)
        h, w = self._rgb.shape[:2]
        vendor_props = {"tilscore.vendor": "image", "image.format": path.suffix.lower()}
        self.meta = _Meta("image", [(w, h)], properties=vendor_props, associated={})


class _ArrayBackend(_InMemoryBackend):
    """An image already in memory (a numpy array), as a one-level slide."""

    def __init__(self, image: np.ndarray, name: str) -> None:
        arr = np.asarray(image)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)):
            raise ConfigError(
                f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}",
                path=name,
            )
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ConfigError(f"image is empty (shape {arr.shape})", path=name)
        self._rgb = _to_rgb(arr)
        h, w = self._rgb.shape[:2]
        self.meta = _Meta("array", [(w, h)], properties={"tilscore.vendor": "array"}, associated={})


# -------------------------------------------------------------------------- DICOM (wsidicom) ---


class _DicomBackend:
    """DICOM WSI (a folder of .dcm files or one file) via wsidicom, imported here."""

    def __init__(self, path: Path) -> None:
        try:
            import wsidicom.errors
            from pydicom.errors import InvalidDicomError
            from wsidicom import WsiDicom
        except ImportError as e:
            raise UnsupportedFormatError(
                "reading DICOM needs wsidicom", path=path, hint="pip install 'tilscore[dicom]'"
            ) from e
        self.path = path
        dicom_errors = tuple(
            c for c in vars(wsidicom.errors).values()
            if isinstance(c, type) and issubclass(c, Exception)
        )  # fmt: skip
        self._errors = (*dicom_errors, InvalidDicomError, OSError, ValueError, KeyError, IndexError)
        try:
            self._wsi = WsiDicom.open(path)
        except self._errors as e:
            raise SlideReadError(
                f"wsidicom cannot open it as a DICOM whole-slide image: {e}",
                path=path,
                hint="Pass the folder that holds all the slide's .dcm files",
            ) from e
        levels = list(self._wsi.levels)
        self._levels = [lv.level for lv in levels]
        dims = [(int(lv.size.width), int(lv.size.height)) for lv in levels]
        meta = _Meta("dicom", dims, properties={"tilscore.vendor": "dicom"}, associated={})
        mpp = levels[0].mpp
        if mpp is not None and mpp.width > 0:
            meta.mpp_x, meta.mpp_y, meta.mpp_source = float(mpp.width), float(mpp.height), "dicom"
        if self._wsi.labels:
            meta.associated["label"] = lambda: _to_rgb(self._wsi.read_label(as_array=True))
        if self._wsi.overviews:
            meta.associated["macro"] = lambda: _to_rgb(self._wsi.read_overview(as_array=True))
        self.meta = meta
        self._tile_size = [(int(lv.tile_size.width), int(lv.tile_size.height)) for lv in levels]

    def preferred_chunk(self, level: int) -> tuple[int, int]:
        return self._tile_size[level]

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        try:
            arr = self._wsi.read_region((x, y), self._levels[level], (width, height), as_array=True)
        except self._errors as e:
            raise SlideReadError(f"cannot read DICOM region: {e}", path=self.path) from e
        return _to_rgb(np.asarray(arr))

    def close(self) -> None:
        self._wsi.close()


# ------------------------------------------------------------------------------- OpenSlide ---


class _OpenSlideBackend:
    """Anything OpenSlide reads (MRXS, VMS, SCN, BIF, ...); openslide-python imported here."""

    def __init__(self, path: Path) -> None:
        try:
            import openslide
        except ImportError as e:
            raise UnsupportedFormatError(
                "this format needs OpenSlide, which is not installed",
                path=path,
                hint="pip install 'tilscore[openslide]'",
            ) from e
        self.path = path
        self._errors = (openslide.OpenSlideError, OSError, ValueError)
        try:
            self._osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideUnsupportedFormatError, *self._errors) as e:
            raise UnsupportedFormatError(
                f"is not a slide tilscore can read (OpenSlide: {e})",
                path=path,
                hint="Supported: SVS, NDPI, OME-TIFF, pyramidal TIFF, PNG, JPEG, DICOM, and what "
                "OpenSlide reads",
            ) from e
        props = dict(self._osr.properties)
        meta = _Meta(
            "openslide",
            [(int(w), int(h)) for w, h in self._osr.level_dimensions],
            properties={str(k): str(v) for k, v in props.items()},
        )
        meta.properties["tilscore.vendor"] = "openslide"
        try:
            meta.mpp_x = float(props["openslide.mpp-x"])
            meta.mpp_y = float(props.get("openslide.mpp-y", meta.mpp_x))
            meta.mpp_source = "openslide"
        except (KeyError, ValueError):
            meta.mpp_x = None
        try:
            meta.objective_power = float(props["openslide.objective-power"])
        except (KeyError, ValueError):
            meta.objective_power = None
        names = list(self._osr.associated_images)
        meta.associated = {
            kind: self._associated_loader(name)
            for kind in _ASSOCIATED
            for name in names
            if kind in name.lower()
        }
        self._downsamples = [float(d) for d in self._osr.level_downsamples]
        self.meta = meta

    def _associated_loader(self, name: str) -> Callable[[], np.ndarray]:
        return lambda: _to_rgb(np.asarray(self._osr.associated_images[name]))

    def preferred_chunk(self, level: int) -> tuple[int, int]:
        return 512, 512

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self._downsamples[level]
        location = (round(x * ds), round(y * ds))
        try:
            img = self._osr.read_region(location, level, (width, height))
        except self._errors as e:
            raise SlideReadError(f"OpenSlide cannot read the region: {e}", path=self.path) from e
        return _to_rgb(np.asarray(img))

    def close(self) -> None:
        self._osr.close()


# ------------------------------------------------------------------------------------ Slide ---


class _LazyImages(Mapping):
    """Associated images, decoded on first access."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]], path: Path) -> None:
        self._loaders, self._path, self._cache = loaders, path, {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            try:
                self._cache[key] = self._loaders[key]()
            except KeyError:
                raise
            except _corrupt_errors() as e:
                raise SlideReadError(f"cannot decode the {key} image: {e}", path=self._path) from e
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


class Slide:
    """An open whole-slide image: metadata, region reads, tiles and lazy arrays.

    Create with :func:`open_slide`. Reads are thread-safe. Use as a context manager, or call
    :meth:`close`.

    Attributes
    ----------
    path : pathlib.Path
        The file (or DICOM folder).
    mpp, mpp_x, mpp_y : float
        Level-0 pixel size (µm/px); ``mpp`` is the mean of x and y.
    mpp_source : str
        Where the pixel size came from: "aperio", "ome", "ndpi", "tiff-resolution", "dicom",
        "openslide" or "user".
    objective_power : float or None
        Scanning objective magnification, where the file records it.
    vendor : str
        "aperio", "hamamatsu", "ome", "generic-tiff", "image", "dicom", "openslide" or "array"
        (an image in memory, :meth:`from_array`).
    dimensions : tuple of int
        (width, height) of level 0 (px).
    level_count, level_dimensions, level_downsamples
        The pyramid: (width, height) per level (px) and level-0 px per level px.
    associated_images : Mapping[str, numpy.ndarray]
        "label", "macro", "thumbnail" where present, RGB uint8, decoded on first access.
    properties : dict of str to str
        Raw metadata.
    """

    def __init__(self, path: Path, backend: _Backend, mpp: float | None = None) -> None:
        self.path = path
        self._backend = backend
        meta = backend.meta
        self.vendor = meta.vendor
        self.properties: dict[str, str] = dict(meta.properties or {})
        self.objective_power = meta.objective_power
        if mpp is not None:
            self.mpp_x = self.mpp_y = float(mpp)
            self.mpp_source = "user"
        elif meta.mpp_x is not None and math.isfinite(meta.mpp_x) and meta.mpp_x > 0:
            self.mpp_x = float(meta.mpp_x)
            self.mpp_y = float(meta.mpp_y or meta.mpp_x)
            self.mpp_source = meta.mpp_source or "file"
        else:
            raise MissingPixelSizeError("the file records no pixel size (µm/px)", path=path,
                                        hint=_MPP_HINT)  # fmt: skip
        self.mpp = (self.mpp_x + self.mpp_y) / 2.0
        self.level_dimensions = tuple((int(w), int(h)) for w, h in meta.level_dimensions)
        if not self.level_dimensions or min(min(d) for d in self.level_dimensions) < 1:
            raise SlideReadError("the slide has an empty pyramid level", path=path)
        w_mm = self.level_dimensions[0][0] * self.mpp_x / 1000.0
        h_mm = self.level_dimensions[0][1] * self.mpp_y / 1000.0
        if max(w_mm, h_mm) > _MAX_SLIDE_MM:  # before an overview or a mask is allocated
            raise SlideReadError(
                f"{self.level_dimensions[0][0]} x {self.level_dimensions[0][1]} px at "
                f"{self.mpp_x:.4g} µm/px ({self.mpp_source}) is {w_mm:.0f} x {h_mm:.0f} mm, "
                "larger than any glass slide; the header or the pixel size is wrong",
                path=path,
                hint="Check the pixel size (--mpp); a slide whose header claims this size is "
                "corrupt",
            )
        self.dimensions = self.level_dimensions[0]
        self.level_count = len(self.level_dimensions)
        w0, h0 = self.dimensions
        self._level_scale = tuple((w0 / w, h0 / h) for w, h in self.level_dimensions)
        self.level_downsamples = tuple((sx + sy) / 2.0 for sx, sy in self._level_scale)
        self.associated_images: Mapping[str, np.ndarray] = _LazyImages(
            dict(meta.associated or {}), path
        )

    @classmethod
    def from_array(cls, image: np.ndarray, mpp: float | None, name: str = "<array>") -> Slide:
        """Wrap an image in memory as a one-level slide, so arrays and files share one API.

        Parameters
        ----------
        image
            (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; uint8, 16-bit or float (0-1). It is
            converted to RGB uint8 (alpha composited over white).
        mpp
            Its pixel size (µm/px); required.
        name
            How errors and provenance name the image.

        Raises
        ------
        MissingPixelSizeError
            ``mpp`` is None.
        ConfigError
            The array is not an image, or ``mpp`` is not a positive finite number.
        """
        if mpp is None:
            raise MissingPixelSizeError(
                "no pixel size (µm/px) given for the image",
                path=name,
                hint="Pass mpp=, e.g. mpp=0.5 for a 20x scan",
            )
        return cls(Path(name), _ArrayBackend(image, name), check_positive(mpp, "mpp"))

    # -- context manager / repr ------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"Slide({str(self.path)!r}, {w}x{h} px, {self.level_count} levels, "
            f"{self.mpp:.4g} µm/px ({self.mpp_source}), vendor={self.vendor!r})"
        )

    def close(self) -> None:
        """Release the file handles."""
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def clear_cache(self) -> None:
        """Drop the decoded tiles the reader keeps (TIFF/SVS: up to 96 MB), e.g. after a pass
        over the whole slide; later reads decode again. Nothing to do for other readers."""
        clear = getattr(self._backend, "clear_cache", None)
        if clear is not None:
            clear()

    # -- levels ----------------------------------------------------------------------------
    def level_mpp(self, level: int) -> float:
        """Pixel size of a pyramid level (µm/px)."""
        self._check_level(level)
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose pixel size is at most ``mpp`` µm/px (1 % tolerance).

        Returns level 0 when even level 0 is coarser than ``mpp``.
        """
        mpp = check_positive(mpp, "mpp")
        fine_enough = [lv for lv in range(self.level_count) if self.level_mpp(lv) <= mpp * 1.01]
        return max(fine_enough, key=self.level_mpp, default=0)

    def _check_level(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.level_count:
            raise RegionError(
                f"level {level!r} does not exist; the slide has levels 0..{self.level_count - 1}",
                path=self.path,
            )

    @property
    def _reader(self) -> _Backend:
        if self._backend is None:
            raise SlideReadError("the slide is closed", path=self.path, hint="open it again")
        return self._backend

    # -- reading ---------------------------------------------------------------------------
    def _read_level_box(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 of a box in level px; the parts outside the level are white."""
        if width <= 0 or height <= 0:
            raise RegionError(f"region size {width}x{height} px must be positive", path=self.path)
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lw), min(y + height, lh)
        if x1 <= x0 or y1 <= y0:
            raise RegionError(
                f"region at ({x}, {y}) size {width}x{height} px of level {level} lies entirely "
                f"outside the level ({lw}x{lh} px)",
                path=self.path,
                hint="Check the coordinates: they are level-0 pixels with x = column",
            )
        inner = self._reader.read(level, x0, y0, x1 - x0, y1 - y0)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return inner
        out = np.full((height, width, 3), _WHITE, dtype=np.uint8)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = inner
        return out

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """Read a rectangle of one pyramid level (OpenSlide's convention).

        Parameters
        ----------
        x, y
            Top-left corner in level-0 pixels (px).
        width, height
            Size in pixels of ``level`` (px).
        level
            Pyramid level.

        Returns
        -------
        numpy.ndarray
            (height, width, 3) RGB uint8; parts outside the slide are white (255).

        Raises
        ------
        RegionError
            The size is not positive, the level does not exist, or the box lies entirely
            outside the slide.
        """
        self._check_level(level)
        width, height = _check_size(width, height, self.path)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise RegionError(f"region corner ({x}, {y}) must be finite", path=self.path)
        sx, sy = self._level_scale[level]
        lx, ly = math.floor(x / sx + 1e-9), math.floor(y / sy + 1e-9)
        return self._read_level_box(level, lx, ly, width, height)

    def read_at_mpp(
        self, x: float, y: float, width: float, height: float, mpp: float
    ) -> np.ndarray:
        """Read a level-0 box resampled to a pixel size.

        Parameters
        ----------
        x, y
            Top-left corner (level-0 px).
        width, height
            Box size (level-0 px).
        mpp
            Output pixel size (µm/px).

        Returns
        -------
        numpy.ndarray
            RGB uint8 of shape (round(height * slide.mpp / mpp), round(width * slide.mpp / mpp),
            3), read from :meth:`best_level_for_mpp` and resized with area interpolation.
        """
        mpp = check_positive(mpp, "mpp")
        scale = self.mpp / mpp
        out_w, out_h = round(width * scale), round(height * scale)
        if width <= 0 or height <= 0 or out_w < 1 or out_h < 1:
            raise RegionError(f"region {width}x{height} px at {mpp} µm/px is empty", path=self.path)
        return self._read_scaled(x, y, width, height, out_w, out_h, self.best_level_for_mpp(mpp))

    def _read_scaled(
        self, x: float, y: float, width: float, height: float, out_w: int, out_h: int, level: int
    ) -> np.ndarray:
        sx, sy = self._level_scale[level]
        lx, ly = round(x / sx), round(y / sy)
        lw = max(1, round((x + width) / sx) - lx)
        lh = max(1, round((y + height) / sy) - ly)
        factor = lw // out_w
        reduced = getattr(self._reader, "read_reduced", None)
        if (
            reduced is not None
            and factor >= 2
            and (lw, lh) == (out_w * factor, out_h * factor)
            and lx < self.level_dimensions[level][0]
            and ly < self.level_dimensions[level][1]
            and lx + lw > 0
            and ly + lh > 0
        ):  # (a box wholly outside the level is left to _read_level_box's error)
            out = reduced(level, lx, ly, lw, lh, factor)
            if out is not None:
                return out
        return _resize(self._read_level_box(level, lx, ly, lw, lh), out_w, out_h)

    def iter_tiles(
        self,
        mpp: float,
        size: int,
        overlap: int = 0,
        mask: TissueMask | None = None,
        min_tissue_fraction: float = 0.0,
        crop: Callable[[float, float, float, int], tuple[slice, slice] | None] | None = None,
    ) -> Iterator[Tile]:
        """Lazily yield the tiles of a grid at a pixel size, row by row.

        Parameters
        ----------
        mpp
            Tile pixel size (µm/px).
        size
            Core size of a tile (px at ``mpp``); cores tile the slide exactly once.
        overlap
            Halo added on each side (px at ``mpp``); neighbours' halos overlap their cores.
        mask
            Tissue mask (anything with ``fraction_in(x, y, width, height)`` in level-0 px);
            tiles whose core holds a tissue fraction ``<= min_tissue_fraction`` are skipped.
        min_tissue_fraction
            See ``mask`` (0..1).
        crop
            Optional ``crop(x, y, downsample, full)`` -> ``(row slice, column slice)`` of the
            whole tile (``full`` px square, corner at level-0 ``x``, ``y``) to keep, or None for
            all of it. Only that part is read where the tile's scale is a whole multiple of the
            level's (the pixels are then exactly those of the whole tile, cut); otherwise the
            whole tile is read and cut.

        Yields
        ------
        Tile
            With its image (size + 2 * overlap px square, or its cut part), level-0 position and
            grid index.
        """
        mpp = check_positive(mpp, "mpp")
        size, overlap = int(size), int(overlap)
        if size < 1 or overlap < 0:
            raise ConfigError(f"tile size {size} px must be >= 1 and overlap {overlap} px >= 0")
        ds = mpp / self.mpp
        core0 = size * ds
        w0, h0 = self.dimensions
        n_cols, n_rows = math.ceil(w0 / core0 - 1e-9), math.ceil(h0 / core0 - 1e-9)
        level = self.best_level_for_mpp(mpp)
        full = size + 2 * overlap
        # a part of a tile reads as the same pixels as the whole tile cut, when each tile pixel
        # is a whole block of level pixels (no resampling phase to shift)
        sx, sy = self._level_scale[level]
        fx, fy = ds / sx, ds / sy
        whole_blocks = abs(fx - round(fx)) < 1e-9 and abs(fy - round(fy)) < 1e-9
        for row in range(n_rows):
            for col in range(n_cols):
                cx, cy = col * core0, row * core0
                if (
                    mask is not None
                    and mask.fraction_in(cx, cy, core0, core0) <= min_tissue_fraction
                ):
                    continue
                x, y = cx - overlap * ds, cy - overlap * ds
                box = crop(x, y, ds, full) if crop is not None else None
                (y0, y1), (x0, x1) = ((0, full), (0, full)) if box is None else (
                    box[0].indices(full)[:2], box[1].indices(full)[:2]
                )  # fmt: skip
                if box is not None and whole_blocks:  # read only the part
                    image = self._read_scaled(
                        x + x0 * ds, y + y0 * ds, (x1 - x0) * ds, (y1 - y0) * ds,
                        x1 - x0, y1 - y0, level,
                    )  # fmt: skip
                else:  # read the whole tile (and cut it)
                    image = self._read_scaled(x, y, full * ds, full * ds, full, full, level)
                    if box is not None:
                        image = np.ascontiguousarray(image[y0:y1, x0:x1])
                yield Tile(image, x, y, mpp, ds, col, row, overlap, ox=x0, oy=y0)

    def to_dask(self, level: int = 0) -> dask.array.Array:
        """A lazy (H, W, 3) uint8 dask array of one level, chunked on the file's tiles."""
        import dask.array as da

        self._check_level(level)
        w, h = self.level_dimensions[level]
        tw, th = self._reader.preferred_chunk(level)
        cw = tw * max(1, round(1024 / tw)) if tw < 1024 else tw
        ch = th * max(1, round(1024 / th)) if th < 1024 else th
        chunks = (_chunks(h, min(ch, h)), _chunks(w, min(cw, w)), (3,))

        def block(block_info: dict | None = None) -> np.ndarray:
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            return self._read_level_box(level, x0, y0, x1 - x0, y1 - y0)

        return da.map_blocks(
            block, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8)
        )

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, RGB uint8, its longer side ``max_size`` px (or less if smaller).

        Reads the coarsest level at least as large, block by block, so memory stays bounded.
        """
        max_size = int(check_positive(max_size, "max_size"))
        w0, h0 = self.dimensions
        scale = min(1.0, max_size / max(w0, h0))
        out_w, out_h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = 0
        for lv, (w, h) in enumerate(self.level_dimensions):
            if w >= out_w and h >= out_h:
                level = lv
        lw, lh = self.level_dimensions[level]
        fx, fy = out_w / lw, out_h / lh
        out = np.empty((out_h, out_w, 3), np.uint8)
        block = 4096
        for by in range(0, lh, block):
            for bx in range(0, lw, block):
                dx0, dy0 = round(bx * fx), round(by * fy)
                dx1, dy1 = round(min(bx + block, lw) * fx), round(min(by + block, lh) * fy)
                if dx1 > dx0 and dy1 > dy0:
                    src = self._read_level_box(
                        level, bx, by, min(block, lw - bx), min(block, lh - by)
                    )
                    out[dy0:dy1, dx0:dx1] = _resize(src, dx1 - dx0, dy1 - dy0)
        return out


def _chunks(total: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(total, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def _check_size(width: int, height: int, path: Path) -> tuple[int, int]:
    if int(width) != width or int(height) != height or width <= 0 or height <= 0:
        raise RegionError(
            f"region size {width}x{height} px must be positive whole numbers", path=path
        )
    return int(width), int(height)


# -------------------------------------------------------------------------------- open_slide ---


def _sniff(path: Path) -> str:
    """The backend for a file by its first bytes and suffix."""
    if path.is_dir():
        if any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
            return "dicom"
        raise SlideReadError(
            "is a directory, not a slide file",
            path=path,
            hint="Pass a slide file (or a folder of DICOM .dcm files)",
        )
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        raise SlideReadError("the file is empty (0 bytes)", path=path,
                             hint="Copy or download the slide again")  # fmt: skip
    if head[:4] in _TIFF_MAGIC:
        return "tifffile"
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC):
        return "image"
    if head[128:132] == b"DICM" or path.suffix.lower() == ".dcm":
        return "dicom"
    if path.suffix.lower() in _OPENSLIDE_SUFFIXES or _openslide_available():
        return "openslide"
    raise UnsupportedFormatError(
        "is not a slide or image tilscore can read (not TIFF, PNG, JPEG or DICOM)",
        path=path,
        hint="Supported: SVS, NDPI, OME-TIFF, pyramidal TIFF, PNG, JPEG, DICOM; MRXS and others "
        "with OpenSlide installed (pip install 'tilscore[openslide]')",
    )


def _openslide_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openslide") is not None


def _open_backend(path: Path, backend: str, *, fallback: bool = False) -> _Backend:
    """Open ``path`` with a backend; with ``fallback``, try OpenSlide where tifffile cannot."""
    if backend == "tifffile" and fallback and _openslide_available():
        try:
            return _open_backend(path, "tifffile")
        except UnsupportedFormatError:
            return _OpenSlideBackend(path)
    if backend == "image":
        return _ImageBackend(path)
    if backend == "dicom":
        return _DicomBackend(path)
    if backend == "openslide":
        return _OpenSlideBackend(path)
    try:
        return _TiffBackend(path)
    except _corrupt_errors() as e:
        if isinstance(e, SlideReadError):
            raise
        raise SlideReadError(
            f"cannot read it as TIFF: {e}",
            path=path,
            hint="The file is corrupt, truncated or not a TIFF; copy or export it again",
        ) from e


_BACKENDS = ("auto", "tifffile", "image", "dicom", "openslide")


def open_slide(
    path: str | os.PathLike, mpp: float | None = None, *, backend: str = "auto"
) -> Slide:
    """Open a whole-slide image or a plain image.

    Parameters
    ----------
    path
        Slide file (SVS, NDPI, OME-TIFF, pyramidal or plain TIFF, PNG, JPEG, DICOM file or
        folder; MRXS and other OpenSlide formats when openslide-python is installed).
    mpp
        Level-0 pixel size (µm/px); overrides the file's. Required when the file has none.
    backend
        "auto" (by file content), "tifffile", "image", "dicom" or "openslide".

    Returns
    -------
    Slide

    Raises
    ------
    SlideReadError
        Missing, empty, corrupt or truncated file; UnsupportedFormatError for an unknown format
        or compression.
    MissingPixelSizeError
        Neither the file nor ``mpp`` gives the pixel size.
    ConfigError
        ``mpp`` is not a positive finite number, or ``backend`` is unknown.
    """
    path = Path(path)
    if mpp is not None:
        mpp = check_positive(mpp, "mpp")
    if backend not in _BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(_BACKENDS)}")
    if not path.exists():
        raise SlideReadError("no such file", path=path, hint="Check the path and spelling")
    if not (path.is_file() or path.is_dir()):  # a pipe, device or socket would block or never end
        raise SlideReadError(
            "is not a regular file (a pipe, device or socket)",
            path=path,
            hint="Name a slide file, or a DICOM slide's folder",
        )
    try:
        kind = _sniff(path) if backend == "auto" else backend
    except OSError as e:
        raise SlideReadError(f"cannot read the file: {e}", path=path) from e
    reader = _open_backend(path, kind, fallback=backend == "auto")
    try:
        return Slide(path, reader, mpp)
    except BaseException:
        reader.close()
        raise
