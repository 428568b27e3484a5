"""Tumor masks: polygons rasterised at a downsample, and mask TIFFs written and read.

Geometry: mask pixel (i, j) at downsample ``ds`` stands for the level-0 point
``((j + 0.5) * ds, (i + 0.5) * ds)`` (its centre); the mask has ``ceil(H / ds)`` x
``ceil(W / ds)`` pixels. A rasterised pixel is 1 when that point is inside a tumor polygon and
outside every hole (exact even-odd test, as labels are decided).

Mask TIFFs come in two kinds, both read by :func:`read_mask_level`:

- described (``write_mask``): one zlib page, 0 = normal, 1 = tumor, whose ImageDescription is
  JSON ``{"downsample": ds, "level0_width": W, "level0_height": H, ...}``;
- Camelyon-style: a pyramid (any TIFF layout tifffile reads) whose largest level has the
  slide's size; the coarsest level with a downsample at most the one asked for is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from etl.errors import PatchetlError
from etl.wsi.annotations import points_in_polygons
from etl.wsi.pyramid import PyramidWriter

__all__ = ["MaskError", "MaskLevel", "read_mask", "read_mask_level", "tumor_mask", "write_mask"]


class MaskError(PatchetlError, ValueError):
    """A mask TIFF cannot be read as a mask; the message names the file and the fix."""


def tumor_mask(
    polygons: Sequence[np.ndarray],
    width: int,
    height: int,
    downsample: int,
    *,
    holes: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """uint8 mask (1 = tumor) of a ``width x height`` level-0 slide at ``downsample``."""
    mh, mw = math.ceil(height / downsample), math.ceil(width / downsample)
    mask = np.zeros((mh, mw), np.uint8)
    for poly in polygons:  # only the pixels in each polygon's bounding box
        (xmin, ymin), (xmax, ymax) = poly.min(axis=0), poly.max(axis=0)
        j0, j1 = max(0, int(xmin // downsample) - 1), min(mw, int(xmax // downsample) + 2)
        i0, i1 = max(0, int(ymin // downsample) - 1), min(mh, int(ymax // downsample) + 2)
        jj, ii = np.meshgrid(np.arange(j0, j1), np.arange(i0, i1))
        pts = np.stack([(jj.ravel() + 0.5) * downsample, (ii.ravel() + 0.5) * downsample], axis=1)
        inside = points_in_polygons(pts, [poly]).reshape(ii.shape)
        mask[i0:i1, j0:j1] |= inside.astype(np.uint8)
    if holes:
        mask &= 1 - tumor_mask(holes, width, height, downsample)
    return mask


def write_mask(
    path: str | PathLike[str], mask: np.ndarray, *, downsample: int, width: int, height: int
) -> None:
    """Write a described mask TIFF: ``mask`` (uint8, 1 = tumor) at ``downsample`` of a
    ``width x height`` level-0 slide."""
    desc = json.dumps(
        {
            "downsample": downsample,
            "level0_width": width,
            "level0_height": height,
            "values": {"0": "normal", "1": "tumor"},
            "pixel_centre": "pixel (i, j) = level-0 point ((j+0.5)*ds, (i+0.5)*ds)",
        }
    )
    with PyramidWriter(
        path, mask.shape[1], mask.shape[0], photometric="minisblack", compression="zlib", tile=None
    ) as writer:
        writer.level(mask, description=desc)


@dataclass(frozen=True)
class MaskLevel:
    """One level of a mask TIFF: ``pixels`` (2-D, as stored; the first channel of a
    multi-channel mask), level-0 ``size0`` (width, height) and its ``downsample`` (x, y)."""

    pixels: np.ndarray
    size0: tuple[int, int]
    downsample: tuple[float, float]

    def sample(self, downsample: int) -> np.ndarray:
        """Pixel values at the centres of the pixels of a mask at ``downsample`` (nearest)."""
        w, h = math.ceil(self.size0[0] / downsample), math.ceil(self.size0[1] / downsample)
        rows = np.minimum(
            ((np.arange(h) + 0.5) * downsample / self.downsample[1]).astype(np.int64),
            self.pixels.shape[0] - 1,
        )
        cols = np.minimum(
            ((np.arange(w) + 0.5) * downsample / self.downsample[0]).astype(np.int64),
            self.pixels.shape[1] - 1,
        )
        return self.pixels[np.ix_(rows, cols)]


def _description(desc: str) -> dict[str, Any] | None:
    try:
        meta = json.loads(desc)
    except (TypeError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "downsample" in meta else None


def _described(tf: tifffile.TiffFile) -> MaskLevel | None:
    page = tf.pages.first
    meta = _description(page.description)
    if meta is None:
        return None
    ds = float(meta["downsample"])
    size0 = (int(meta["level0_width"]), int(meta["level0_height"]))
    return MaskLevel(np.asarray(page.asarray()), size0, (ds, ds))


def _pyramid_level(tf: tifffile.TiffFile, downsample: float) -> MaskLevel:
    """The coarsest pyramid level with downsample <= ``downsample`` (any TIFF pyramid layout)."""
    levels = []
    for series in tf.series:
        for level in series.levels:
            axes = level.axes
            if "Y" in axes and "X" in axes:
                levels.append((level.shape[axes.index("X")], level.shape[axes.index("Y")], level))
    if not levels:
        raise MaskError(f"{tf.filehandle.path}: no 2-D image in the mask TIFF")
    w0, h0, best = max(levels, key=lambda t: t[0] * t[1])
    best_ds = (1.0, 1.0)
    for w, h, level in levels:
        dx, dy = w0 / w, h0 / h
        if abs(dx - dy) > 0.05 * dx or dx > downsample * 1.01:  # thumbnails, labels, too coarse
            continue
        if dx > best_ds[0]:
            best, best_ds = level, (dx, dy)
    return MaskLevel(np.asarray(best.asarray()), (w0, h0), best_ds)


def read_mask_level(path: str | PathLike[str], downsample: float = 1.0) -> MaskLevel:
    """A described mask's page, else the coarsest level at most ``downsample`` times smaller
    than the largest one."""
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            level = _described(tf) or _pyramid_level(tf, downsample)
    except MaskError:
        raise
    except (OSError, ValueError, KeyError, tifffile.TiffFileError) as exc:
        raise MaskError(f"{path}: cannot read the mask TIFF ({exc})") from None
    pixels = level.pixels[..., 0] if level.pixels.ndim == 3 else level.pixels
    return MaskLevel(pixels, level.size0, level.downsample)


def read_mask(path: str | PathLike[str]) -> tuple[np.ndarray, int]:
    """A described mask (``write_mask``): (uint8 mask, level-0 downsample)."""
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            level = _described(tf)
    except (OSError, ValueError, KeyError, tifffile.TiffFileError) as exc:
        raise MaskError(f"{path}: cannot read the mask TIFF ({exc})") from None
    if level is None:
        raise MaskError(
            f"{path}: mask TIFF without a JSON description holding 'downsample'; "
            "write it with etl.wsi.masks.write_mask"
        )
    return level.pixels, int(level.downsample[0])
