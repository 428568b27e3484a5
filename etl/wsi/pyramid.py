"""Pyramidal tiled TIFF writing: the one writer of slides, masks and heatmaps.

Layout, as OpenSlide's generic-TIFF and Aperio drivers read it: each pyramid level is its own
top-level page (OpenSlide ignores SubIFDs), widest first, tiled, all with the same compression.
Levels after the first are marked reduced images (NewSubfileType 1; the Aperio layout marks
none). With a pixel size, every page carries XResolution/YResolution in pixels per centimetre
for its own size, so OpenSlide reports ``mpp`` and each level's downsample. Pages that are no
level (an Aperio thumbnail) are stripped. BigTIFF is used when level 0 uncompressed could
approach the 4 GiB limit of classic TIFF.

A level is an array, an iterator of tiles (arrays, row-major over the tile grid, edge tiles
full size) or an iterator of tiles already compressed by :meth:`PyramidWriter.encode_tiles`
(written as they are: a level of repeated tiles costs one encoding per distinct tile).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import tifffile

from etl.wsi.downsample import Edge, block_mean, downsampled_size

__all__ = [
    "Compression",
    "Photometric",
    "PyramidWriter",
    "pyramid_dims",
    "pyramid_levels",
    "write_pyramid",
]

Compression = Literal["jpeg", "zlib"]
Photometric = Literal["rgb", "minisblack"]
_CHANNELS = {"rgb": 3, "minisblack": 1}


def pyramid_dims(
    width: int, height: int, factor: int, *, max_side: int = 1024, edge: Edge = "drop"
) -> list[tuple[int, int]]:
    """(width, height) per level: each ``factor`` times smaller (sizes as ``block_mean`` with
    ``edge`` makes them) until the longest side is at most ``max_side`` or a side would be 0."""
    dims = [(width, height)]
    while max(dims[-1]) > max_side and downsampled_size(min(dims[-1]), factor, edge) >= 1:
        w, h = dims[-1]
        dims.append((downsampled_size(w, factor, edge), downsampled_size(h, factor, edge)))
    return dims


def pyramid_levels(
    image: np.ndarray, factor: int, *, max_side: int = 1024, edge: Edge = "drop"
) -> list[np.ndarray]:
    """``image`` and its block means, each from the one before, sized as ``pyramid_dims``."""
    levels = [image]
    for _ in pyramid_dims(image.shape[1], image.shape[0], factor, max_side=max_side, edge=edge)[1:]:
        levels.append(block_mean(levels[-1], factor, edge))
    return levels


class PyramidWriter:
    """Write a pyramid page by page: :meth:`level` for each level (level 0 first), :meth:`page`
    for a page that is no level. Use as a context manager.

    ``width, height``: level 0's size; ``mpp``: its (x, y) pixel size in micrometres (None: no
    resolution tags); ``tile``: tile side (None: stripped pages); ``quality``: JPEG quality;
    ``reduced``: NewSubfileType of the levels after the first (None: no tag).
    """

    def __init__(
        self,
        path: str | PathLike[str],
        width: int,
        height: int,
        *,
        photometric: Photometric = "rgb",
        compression: Compression = "jpeg",
        quality: int = 90,
        tile: int | None = 256,
        mpp: tuple[float, float] | None = None,
        reduced: int | None = 1,
    ) -> None:
        self.width, self.height = width, height
        self.photometric, self.tile, self.mpp, self.reduced = photometric, tile, mpp, reduced
        self.channels = _CHANNELS[photometric]
        self._codec: dict[str, Any] = {"compression": compression}
        if compression == "jpeg":
            self._codec["compressionargs"] = {"level": quality}
        self.levels = 0
        bigtiff = width * height * self.channels * 1.4 > 2**31
        self._tw = tifffile.TiffWriter(path, bigtiff=bigtiff)

    def __enter__(self) -> PyramidWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._tw.close()

    def _common(self, width: int, height: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"photometric": self.photometric, "metadata": None, **self._codec}
        if self.mpp is not None:
            um_x, um_y = self.mpp
            kwargs["resolution"] = (
                1e4 / (um_x * self.width / width),
                1e4 / (um_y * self.height / height),
            )  # pixels per cm
            kwargs["resolutionunit"] = "CENTIMETER"
        return kwargs

    def _shape(self, width: int, height: int) -> tuple[int, ...]:
        return (height, width, self.channels) if self.channels > 1 else (height, width)

    def level(
        self,
        data: np.ndarray | Iterator[np.ndarray] | Iterator[bytes],
        *,
        size: tuple[int, int] | None = None,
        description: str | None = None,
    ) -> None:
        """Write the next level from an array, or from tiles (then ``size`` = (width, height))."""
        kwargs: dict[str, Any] = {"description": description}
        if isinstance(data, np.ndarray):
            height, width = data.shape[:2]
        elif size is None:
            raise ValueError("a level written from tiles needs size=(width, height)")
        else:
            width, height = size
            kwargs.update(shape=self._shape(width, height), dtype=np.uint8)
            if self.tile is None:
                raise ValueError("a level written from tiles needs a tiled writer (tile=...)")
        if self.tile is not None:
            kwargs["tile"] = (self.tile, self.tile)
        if self.levels:
            kwargs["subfiletype"] = self.reduced
        self._tw.write(data, **kwargs, **self._common(width, height))
        self.levels += 1

    def page(
        self, image: np.ndarray, *, rows_per_strip: int = 16, description: str | None = None
    ) -> None:
        """Write a stripped page that is no pyramid level (a thumbnail, say)."""
        self._tw.write(
            image,
            rowsperstrip=rows_per_strip,
            description=description,
            **self._common(image.shape[1], image.shape[0]),
        )

    def encode_tiles(self, tiles: Iterable[np.ndarray]) -> list[bytes]:
        """Each tile compressed exactly as :meth:`level` compresses it, for writing as bytes.

        The tiles go through an in-memory TIFF with this writer's settings and their bytes
        are read back; raises if the codec wrote shared JPEG tables (they would not travel).
        """
        if self.tile is None:
            raise ValueError("encode_tiles needs a tiled writer (tile=...)")
        stack = np.concatenate(list(tiles), axis=0)
        buf = io.BytesIO()
        with tifffile.TiffWriter(buf) as tw:
            tw.write(
                stack,
                tile=(self.tile, self.tile),
                photometric=self.photometric,
                metadata=None,
                **self._codec,
            )
        buf.seek(0)
        with tifffile.TiffFile(buf) as tf:
            page = tf.pages.first
            if getattr(page, "jpegtables", None) is not None:
                raise RuntimeError("tifffile wrote JPEG tables; pre-encoded tiles cannot be reused")
            fh, out = tf.filehandle, []
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                fh.seek(offset)
                out.append(fh.read(count))
        return out


def write_pyramid(
    path: str | PathLike[str],
    levels: list[np.ndarray],
    *,
    description: str | None = None,
    **options: Any,
) -> list[tuple[int, int]]:
    """Write ``levels`` (level 0 first) with :class:`PyramidWriter` ``options``; the description
    goes on level 0. Returns the (width, height) of each level."""
    height, width = levels[0].shape[:2]
    with PyramidWriter(Path(path), width, height, **options) as writer:
        for k, image in enumerate(levels):
            writer.level(image, description=description if k == 0 else None)
    return [(image.shape[1], image.shape[0]) for image in levels]
