"""Slide reading: regions exactly as OpenSlide's ``read_region`` returns them, as RGB.

Every reader returns ``read_region(x0, y0, level, w, h)`` as an ``(h, w, 3)`` uint8 RGB
array equal to ``openslide.OpenSlide(path).read_region((x0, y0), level, (w, h))``
composited over white: transparent pixels (outside the slide) become (255, 255, 255),
opaque pixels keep their RGB. ``x0, y0`` are LEVEL-0 coordinates of the top-left corner.

Two implementations:

- :class:`TiffTileReader` decodes tiles of tiled TIFF / Aperio SVS files straight from the
  file (tifffile locates them, imagecodecs decodes them) into a byte-bounded LRU tile
  cache. It only accepts files it can read pixel-identically to OpenSlide, and it checks
  its level list against OpenSlide's when it opens a file.
- :class:`OpenSlideReader` wraps OpenSlide: the reference, and the fallback for every
  other format.

Damaged tiles fail where OpenSlide fails. imagecodecs hides the decoder warnings that
OpenSlide turns into errors (libjpeg's "Premature end of JPEG file", libtiff's LZW "not
terminated with EOI code"), so the direct reader checks for what causes them, at a few
microseconds per good tile: all of the tile's bytes are in the file; a JPEG tile ends with
its end-of-image marker, has no marker and no run of 128 zero bytes inside its compressed
data, and does not end in the flat grey block libjpeg paints once the data runs out; an
LZW, deflate or zstd tile decodes to exactly one tile of pixels (an LZW stream must stop at
its end code). A tile that fails a check, or that its decoder rejects, is read through
OpenSlide instead: OpenSlide's pixels where it returns pixels, else a :class:`SlideError`
naming the file, the level and the tile. A false alarm costs one OpenSlide read of that
tile. Not caught: flipped bits that upset the JPEG decoder without any of these signs (a
bad Huffman code, or data running out inside the last MCU of the tile).

A read error leaves an OpenSlide handle failing every later call, so both readers reopen
it after one: a damaged tile fails only the reads that touch it.

:func:`open_slide` picks one. Readers are not thread-safe and not picklable: each worker
process opens its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import imagecodecs
import numpy as np
import openslide
import tifffile

from etl.errors import OptionError, PatchetlError

__all__ = [
    "OpenSlideReader",
    "SlideError",
    "SlideReader",
    "TiffTileReader",
    "UnsupportedSlide",
    "composite_over_white",
    "open_slide",
    "read_region_openslide_rgb",
]

log = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tiff"]
BACKENDS: tuple[str, ...] = ("auto", "openslide", "tiff")
DEFAULT_TILE_CACHE_BYTES = 256 << 20

# OpenSlide formats whose levels are plain tiled TIFF pages (same grid, same clipping).
DIRECT_VENDORS = frozenset({"generic-tiff", "aperio"})
# TIFF compressions decoded identically to OpenSlide (libtiff) by tifffile + imagecodecs.
# none, LZW, JPEG, Adobe deflate, deflate, zstd.
DIRECT_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946, 50000})
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
_COMPRESSION_NONE = 1
_COMPRESSION_LZW = 5
_COMPRESSION_JPEG = 7
_SUBFILETYPE_REDUCED = 1
_PREDICTOR_HORIZONTAL = 2
# a marker inside JPEG compressed data: 0xFF then anything but a stuffed 0x00, a restart
# marker (0xD0-0xD7) or another fill 0xFF
_JPEG_STRAY_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_EOI = b"\xff\xd9"
# 1024 zero bits inside JPEG compressed data: an overwritten disk block, never written by
# an encoder with the standard Huffman tables (with optimised tables a blank tile might:
# it is then read through OpenSlide, correct but slower)
_JPEG_ZERO_RUN = bytes(128)
# one-bits after an LZW stream: past a cut, the decoder reads codes above its table size
# (an error) or more than one tile of pixels, never the end code; an intact stream stops
# at its end code first. (imagecodecs also misreads a stream's last code when fewer than 3
# bytes follow it; libtiff does not.)
_LZW_PAD = b"\xff" * 4


class SlideError(PatchetlError, OSError):
    """A slide cannot be opened or read; the message names the file and the problem."""


class UnsupportedSlide(SlideError):
    """The direct TIFF reader cannot read this file pixel-identically (use OpenSlide)."""


class _Doubtful(Exception):
    """A tile the direct decoder cannot vouch for: OpenSlide decides (never leaves here)."""


def composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA (as PIL gives it) over white; return RGB uint8.

    Opaque pixels keep their RGB, transparent ones become white; partial alpha (only
    seen with sub-pixel reads at levels > 0) is blended with rounding.
    """
    rgb = np.array(rgba[..., :3], dtype=np.uint8, copy=True)
    alpha = rgba[..., 3]
    partial = alpha != 255
    if partial.any():
        a = alpha[partial].astype(np.uint32)[:, None]
        c = rgb[partial].astype(np.uint32)
        rgb[partial] = ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return rgb


def read_region_openslide_rgb(
    slide: openslide.OpenSlide, x0: int, y0: int, level: int, w: int, h: int
) -> np.ndarray:
    """The reference read: OpenSlide ``read_region`` composited over white, (h, w, 3) uint8."""
    rgba = np.asarray(slide.read_region((int(x0), int(y0)), int(level), (int(w), int(h))))
    return composite_over_white(rgba)


# micrometres per TIFF ResolutionUnit, as OpenSlide spells the unit in tiff.ResolutionUnit
_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0}


def _positive_pair(x: Any, y: Any) -> tuple[float, float] | None:
    try:
        pair = (float(x), float(y))
    except (TypeError, ValueError):
        return None
    return pair if all(math.isfinite(v) and v > 0 for v in pair) else None


def _mpp_from_properties(props: Any) -> tuple[float, float] | None:
    """Level-0 (mpp_x, mpp_y) in micrometres per pixel from OpenSlide's properties, or None.

    First ``openslide.mpp-x/y``: OpenSlide fills them from each format's own record (Aperio's
    ``MPP``, generic TIFF resolution tags in centimetres or inches, DICOM PixelSpacing,
    Hamamatsu, MIRAX, Leica, ...). Else the TIFF resolution tags OpenSlide lists for every
    TIFF-based format (``tiff.XResolution``, ``tiff.YResolution`` in pixels per
    ``tiff.ResolutionUnit``, centimetre or inch): an Aperio file without ``MPP`` in its
    description still has them. Values that are not finite and positive count as missing.
    """
    mpp = _positive_pair(
        props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
    )
    if mpp is not None:
        return mpp
    um = _UM_PER_UNIT.get(str(props.get("tiff.ResolutionUnit", "")).lower())
    res = _positive_pair(props.get("tiff.XResolution"), props.get("tiff.YResolution"))
    if um is None or res is None:
        return None
    return um / res[0], um / res[1]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"{path}: slide file not found (check the path and --data-root)")
    if not path.is_file():
        raise SlideError(f"{path}: is not a file (expected a slide file such as .tif or .svs)")


def _open_openslide(path: Path, cache_bytes: int | None = None) -> openslide.OpenSlide:
    """Open with OpenSlide, turning its errors into a SlideError that names the file.

    cache_bytes: a private tile cache of that size (OpenSlide >= 4.0; older ones lack it),
    or None for OpenSlide's shared default cache.
    """
    _check_file(path)
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideError(
            f"{path}: not a slide OpenSlide can read (unrecognised or unsupported format: "
            f"{exc}); see https://openslide.org/formats/ for the formats it reads"
        ) from exc
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(
            f"{path}: OpenSlide cannot open this slide (unsupported variant or corrupt file): {exc}"
        ) from exc
    if cache_bytes is not None:
        with contextlib.suppress(AttributeError, openslide.OpenSlideError):
            slide.set_cache(openslide.OpenSlideCache(int(cache_bytes)))
    return slide


class SlideReader(ABC):
    """Read-only access to one slide; use as a context manager or call :meth:`close`."""

    backend: str
    path: Path
    vendor: str
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None  # level-0 (x, y) um/px (_mpp_from_properties); None: unknown
    _slide: openslide.OpenSlide | None = None  # None after close() or a failed read
    _openslide_cache_bytes: int | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0."""
        return self.level_dimensions[0]

    @abstractmethod
    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the region whose top-left is level-0 (x0, y0)."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handles (idempotent)."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getstate__(self) -> None:
        raise TypeError(
            f"{type(self).__name__} for {self.path} cannot be pickled: open a reader "
            "inside each worker with open_slide(path)"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, vendor={self.vendor!r}, "
            f"levels={self.level_dimensions})"
        )

    def _read_openslide(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """OpenSlide's read; its error becomes a SlideError naming the region.

        OpenSlide errors are sticky (after one, every call on that handle fails), so the
        handle is dropped and reopened at the next read.
        """
        if self._slide is None:
            self._slide = _open_openslide(self.path, self._openslide_cache_bytes)
        try:
            return read_region_openslide_rgb(self._slide, x0, y0, level, w, h)
        except openslide.OpenSlideError as exc:
            self._slide.close()
            self._slide = None
            raise SlideError(
                f"{self.path}: OpenSlide cannot read level {level} at ({x0}, {y0}), "
                f"{w} x {h}: {exc} (a damaged slide: copy it again from its source)"
            ) from exc

    def _check_args(self, x0: int, y0: int, level: int, w: int, h: int) -> tuple[int, ...]:
        x0, y0, level, w, h = (operator.index(v) for v in (x0, y0, level, w, h))
        if not 0 <= level < self.level_count:
            raise ValueError(
                f"{self.path}: level {level} out of range (slide has levels 0.."
                f"{self.level_count - 1})"
            )
        if w < 0 or h < 0:
            raise ValueError(f"{self.path}: region size must be non-negative, got {w}x{h}")
        return x0, y0, level, w, h


class OpenSlideReader(SlideReader):
    """OpenSlide-backed reader (the reference; reads every format OpenSlide knows)."""

    backend = "openslide"

    def __init__(self, path: str | Path, *, tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES):
        self.path = Path(path)
        self._closed = False
        self._openslide_cache_bytes = int(tile_cache_bytes)
        self._slide = slide = _open_openslide(self.path, self._openslide_cache_bytes)
        self.vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
        self.level_count = slide.level_count
        self.level_dimensions = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
        self.mpp = _mpp_from_properties(slide.properties)

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        if self._closed:
            raise ValueError(f"{self.path}: reader is closed")
        x0, y0, level, w, h = self._check_args(x0, y0, level, w, h)
        return self._read_openslide(x0, y0, level, w, h)

    def close(self) -> None:
        self._closed = True
        if self._slide is not None:
            self._slide.close()
            self._slide = None


class _TileCache:
    """LRU cache of decoded tiles, bounded by the total bytes of the arrays it holds."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        tile = self._items.get(key)
        if tile is not None:
            self._items.move_to_end(key)
        return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes:
            return  # would evict everything else and still not fit
        self._items[key] = tile
        self.nbytes += tile.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class _Level:
    """One pyramid level: a tiled TIFF page and where its tiles lie in the file."""

    page_index: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    tiles_down: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    decode: Callable[[bytes], np.ndarray]  # raises _Doubtful for a tile it cannot vouch for


def _level_pages(pages: list[tifffile.TiffPage], vendor: str) -> list[tifffile.TiffPage]:
    """The pages OpenSlide uses as levels, in its order (see openslide-vendor-*.c)."""
    if vendor == "aperio":
        # every tiled directory, in file order (thumbnail, label, macro are stripped)
        return [p for p in pages if p.is_tiled]
    # generic-tiff: page 0, plus tiled pages flagged reduced-resolution; widest first
    chosen = [
        p
        for i, p in enumerate(pages)
        if p.is_tiled and (i == 0 or p.subfiletype & _SUBFILETYPE_REDUCED)
    ]
    return sorted(chosen, key=lambda p: -p.imagewidth)


def _why_not_direct(page: tifffile.TiffPage) -> str | None:
    """Reason this page cannot be decoded identically to OpenSlide, or None if it can."""
    checks = [
        (page.is_tiled, "not tiled"),
        (page.compression in DIRECT_COMPRESSIONS, f"compression {page.compression}"),
        (
            page.photometric == _PHOTOMETRIC_RGB
            or (page.photometric == _PHOTOMETRIC_YCBCR and page.compression == _COMPRESSION_JPEG),
            f"photometric {page.photometric}",
        ),
        (
            page.samplesperpixel == 3 and not page.extrasamples,
            f"{page.samplesperpixel} samples per pixel",
        ),
        (
            page.bitspersample == 8 and page.sampleformat == 1,
            f"{page.bitspersample}-bit samples (format {page.sampleformat})",
        ),
        (page.planarconfig == 1, "separate colour planes"),
        (page.imagedepth == 1 and page.tiledepth == 1, "volumetric tiles"),
        (page.fillorder == 1, "fill order LSB2MSB"),
        (page.predictor in (1, _PREDICTOR_HORIZONTAL), f"predictor {page.predictor}"),
        (page.tags.valueof(274, 1) == 1, "orientation other than top-left"),
        (not page.subifds, "SubIFD pyramid"),
        (page.databytecounts and min(page.databytecounts) > 0, "missing (zero-length) tiles"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    return None


def _jpeg_doubt(data: bytes) -> str | None:
    """Why libjpeg may warn on this JPEG tile (OpenSlide fails on any warning), or None.

    Its warnings on tiles come from compressed data that is cut short (no end-of-image
    marker: "Premature end of JPEG file"), broken by a marker, or overwritten so that the
    decoder runs out of data ("premature end of data segment"). A scan of the bytes, no
    decoding; the decoder's flat grey block (see _make_jpeg_decoder) catches the rest.
    """
    if not data.startswith(b"\xff\xd8"):
        return "it does not start with a JPEG start-of-image marker"
    if not data.endswith(_JPEG_EOI):
        return "it does not end with a JPEG end-of-image marker (cut short or overwritten)"
    start = _jpeg_scan_start(data)
    if start is None:
        return "its JPEG headers are broken (no start-of-scan segment)"
    stray = _JPEG_STRAY_MARKER.search(data, start, len(data) - 2)
    if stray is not None:
        marker, at = stray.group()[1], stray.start()
        return f"a 0x{marker:02X} marker inside its compressed data (byte {at})"
    zeros = data.find(_JPEG_ZERO_RUN, start, len(data) - 2)
    if zeros >= 0:
        return f"a run of zero bytes inside its compressed data (byte {zeros}: overwritten?)"
    return None


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the compressed data: the byte after the first start-of-scan header."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        end = i + 2 + ((data[i + 2] << 8) | data[i + 3])
        if marker == 0xDA:
            return end
        i = end
    return None


def _make_jpeg_decoder(page: tifffile.TiffPage) -> Callable[[bytes], np.ndarray]:
    shape = (page.tilelength, page.tilewidth, 3)
    # OpenSlide forces the JPEG colour space from PhotometricInterpretation (RGB data is not
    # colour-converted, YCbCr is), whatever markers the stream carries.
    colorspace = "RGB" if page.photometric == _PHOTOMETRIC_RGB else "YCBCR"
    tables = page.jpegtables

    def decode_jpeg(data: bytes) -> np.ndarray:
        doubt = _jpeg_doubt(data)
        if doubt is not None:
            raise _Doubtful(doubt)
        tile = imagecodecs.jpeg8_decode(
            data, tables=tables, colorspace=colorspace, outcolorspace="RGB"
        ).reshape(shape)
        # when the compressed data runs out, libjpeg leaves every later 8 x 8 block at
        # value 128 (and warns); a tile whose last block is exactly that gets a second look
        if (tile[-8:, -8:] == 128).all():
            raise _Doubtful("it ends in a flat grey block, as when its compressed data runs out")
        return tile

    return decode_jpeg


def _make_decoder(page: tifffile.TiffPage) -> Callable[[bytes], np.ndarray]:
    """Tile bytes -> (tile_h, tile_w, 3) uint8 RGB, decoded as libtiff/OpenSlide does.

    The decoder raises :class:`_Doubtful` for a tile libtiff or libjpeg would warn about or
    reject, and lets decoder errors through; the reader then asks OpenSlide.
    """
    if page.compression == _COMPRESSION_JPEG:
        return _make_jpeg_decoder(page)
    shape = (page.tilelength, page.tilewidth, 3)
    size = shape[0] * shape[1] * shape[2]
    compression = page.compression
    decompress = (
        None if compression == _COMPRESSION_NONE else tifffile.TIFF.DECOMPRESSORS[compression]
    )
    horizontal = page.predictor == _PREDICTOR_HORIZONTAL

    def decode_other(data: bytes) -> np.ndarray:
        if decompress is None:
            raw = data
        else:  # room for one byte more: a stream that does not stop at one tile shows
            padded = data + _LZW_PAD if compression == _COMPRESSION_LZW else data
            raw = decompress(padded, out=size + 1)
        if len(raw) != size:
            what = "holds" if decompress is None else "decodes to"
            raise _Doubtful(f"it {what} {len(raw)} bytes of pixels, not {size}")
        tile = np.frombuffer(raw, np.uint8).reshape(shape)
        if horizontal:  # TIFF predictor 2: differences along each row, per sample
            tile = imagecodecs.delta_decode(tile, axis=1)
        return tile

    return decode_other


def _direct_levels(tif: tifffile.TiffFile, vendor: str, path: Path) -> list[_Level]:
    """The pyramid levels of a TIFF as the direct reader decodes them (widest first)."""
    pages = _level_pages([p for p in tif.pages if isinstance(p, tifffile.TiffPage)], vendor)
    levels = []
    for page in pages:
        reason = _why_not_direct(page)
        if reason is not None:
            raise UnsupportedSlide(
                f"{path}: page {page.index} cannot be decoded directly ({reason})"
            )
        levels.append(
            _Level(
                page_index=page.index,
                width=page.imagewidth,
                height=page.imagelength,
                tile_w=page.tilewidth,
                tile_h=page.tilelength,
                tiles_across=-(-page.imagewidth // page.tilewidth),
                tiles_down=-(-page.imagelength // page.tilelength),
                offsets=tuple(page.dataoffsets),
                bytecounts=tuple(page.databytecounts),
                decode=_make_decoder(page),
            )
        )
    return levels


class TiffTileReader(SlideReader):
    """Direct tile decoder for tiled TIFF and Aperio SVS files (pixel-identical to OpenSlide).

    Raises :class:`UnsupportedSlide` for any file it cannot read identically (other
    vendors, stripped or SubIFD pyramids, JPEG 2000, non-RGB, alpha, missing tiles...).
    Level 0, and levels > 0 at level-0 coordinates that are multiples of an integer
    downsample, are decoded directly; other level > 0 reads (where OpenSlide resamples
    at a sub-pixel offset) are delegated to the OpenSlide handle kept for that purpose.
    """

    backend = "tiff"

    def __init__(self, path: str | Path, *, tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES):
        self.path = Path(path)
        _check_file(self.path)
        self.tiles_decoded = 0  # tiles decoded so far (each costs a read + a decode)
        self.fallback_reads = 0  # reads delegated to OpenSlide
        self.tiles_doubted = 0  # tiles that failed a check and went to OpenSlide
        self._cache = _TileCache(tile_cache_bytes)
        self._tif: tifffile.TiffFile | None = None
        try:
            self._tif = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError, OSError) as exc:
            raise UnsupportedSlide(
                f"{self.path}: not a TIFF file the direct reader can parse ({exc})"
            ) from exc
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        try:
            self._slide = _open_openslide(self.path)
        except SlideError as exc:
            raise UnsupportedSlide(
                f"{exc} (the direct reader only reads what OpenSlide "
                "reads, to stay pixel-identical)"
            ) from exc
        slide = self._slide
        self.vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
        if self.vendor not in DIRECT_VENDORS:
            raise UnsupportedSlide(
                f"{self.path}: OpenSlide format {self.vendor!r} is not "
                f"read directly (only {sorted(DIRECT_VENDORS)})"
            )
        assert self._tif is not None
        levels = _direct_levels(self._tif, self.vendor, self.path)
        dims = tuple((lv.width, lv.height) for lv in levels)
        if dims != tuple(slide.level_dimensions):
            raise UnsupportedSlide(
                f"{self.path}: TIFF levels {dims} differ from OpenSlide's "
                f"{tuple(slide.level_dimensions)}"
            )
        self._levels = tuple(levels)
        self.level_count = len(levels)
        self.level_dimensions = dims
        self.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
        self.mpp = _mpp_from_properties(slide.properties)
        self._fh = self._tif.filehandle

    # --- reading ---

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        if self._tif is None:
            raise ValueError(f"{self.path}: reader is closed")
        x0, y0, level, w, h = self._check_args(x0, y0, level, w, h)
        lx, ly = x0, y0
        if level > 0:
            ds = self.level_downsamples[level]
            # OpenSlide maps level-0 x to x / ds (a double) and paints the tiles at that
            # offset; only whole-pixel offsets are plain copies we can reproduce.
            if not (ds.is_integer() and x0 % int(ds) == 0 and y0 % int(ds) == 0):
                self.fallback_reads += 1
                return self._read_openslide(x0, y0, level, w, h)
            lx, ly = x0 // int(ds), y0 // int(ds)
        return self._assemble(self._levels[level], level, lx, ly, w, h)

    def _assemble(self, lv: _Level, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """Copy the part of level pixels [lx, lx+w) x [ly, ly+h) inside the image; rest white."""
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x_lo, x_hi = max(lx, 0), min(lx + w, lv.width)
        y_lo, y_hi = max(ly, 0), min(ly + h, lv.height)
        if x_lo >= x_hi or y_lo >= y_hi:
            return out
        for row in range(y_lo // lv.tile_h, (y_hi - 1) // lv.tile_h + 1):
            ty = row * lv.tile_h
            r0, r1 = max(y_lo, ty), min(y_hi, ty + lv.tile_h)
            for col in range(x_lo // lv.tile_w, (x_hi - 1) // lv.tile_w + 1):
                tx = col * lv.tile_w
                c0, c1 = max(x_lo, tx), min(x_hi, tx + lv.tile_w)
                tile = self._tile(lv, level, row * lv.tiles_across + col)
                out[r0 - ly : r1 - ly, c0 - lx : c1 - lx] = tile[
                    r0 - ty : r1 - ty, c0 - tx : c1 - tx
                ]
        return out

    def _tile(self, lv: _Level, level: int, index: int) -> np.ndarray:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is None:
            self._fh.seek(lv.offsets[index])
            data = self._fh.read(lv.bytecounts[index])
            try:
                if len(data) != lv.bytecounts[index]:
                    raise _Doubtful(
                        f"the file ends {lv.bytecounts[index] - len(data)} bytes short of it"
                    )
                tile = lv.decode(data)
            except Exception as exc:  # a doubt or a decoder error: OpenSlide decides
                doubt = str(exc) if isinstance(exc, _Doubtful) else f"the decoder says {exc}"
                tile = self._tile_from_openslide(lv, level, index, doubt)
            tile.flags.writeable = False
            self.tiles_decoded += 1
            self._cache.put(key, tile)
        return tile

    def _tile_from_openslide(self, lv: _Level, level: int, index: int, doubt: str) -> np.ndarray:
        """OpenSlide's pixels of a tile the direct decoder doubts, or the SlideError of both."""
        self.tiles_doubted += 1
        col, row = index % lv.tiles_across, index // lv.tiles_across
        ds = round(self.level_downsamples[level])  # direct reads: level 0 or integer ds
        try:
            tile = self._read_openslide(
                col * lv.tile_w * ds, row * lv.tile_h * ds, level, lv.tile_w, lv.tile_h
            )
        except SlideError as exc:
            raise SlideError(
                f"{self.path}: level {level} tile {index} (column {col}, row {row}; TIFF page "
                f"{lv.page_index}, {lv.bytecounts[index]} bytes at offset {lv.offsets[index]}) "
                f"is damaged: {doubt}; OpenSlide cannot read it either: {exc.__cause__ or exc}. "
                "Copy the slide again from its source, or leave out the regions on this tile"
            ) from exc
        log.debug("%s: level %d tile %d read through OpenSlide: %s", self.path, level, index, doubt)
        return tile

    @property
    def cache_bytes(self) -> int:
        """Bytes of decoded tiles currently held in the cache."""
        return self._cache.nbytes

    def close(self) -> None:
        self._cache.clear()
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def open_slide(
    path: str | Path, *, backend: Backend = "auto", tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES
) -> SlideReader:
    """Open a slide for region reads.

    backend: "auto" uses the direct TIFF reader when the file is one it reads
    pixel-identically to OpenSlide, otherwise OpenSlide; "tiff" forces the direct reader
    (:class:`UnsupportedSlide` if it cannot); "openslide" forces OpenSlide.
    Raises :class:`SlideError` for a missing or unreadable file.
    """
    if backend not in BACKENDS:
        raise OptionError(f"unknown slide backend {backend!r}; choose one of {BACKENDS}")
    path = Path(path)
    _check_file(path)
    if backend == "openslide":
        return OpenSlideReader(path, tile_cache_bytes=tile_cache_bytes)
    try:
        return TiffTileReader(path, tile_cache_bytes=tile_cache_bytes)
    except UnsupportedSlide as exc:
        if backend == "tiff":
            raise
        log.debug("%s: using OpenSlide: %s", path, exc)
    return OpenSlideReader(path, tile_cache_bytes=tile_cache_bytes)
