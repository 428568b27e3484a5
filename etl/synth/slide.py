"""Synthetic slides written as pyramids that OpenSlide opens (generic tiled TIFF or Aperio SVS).

Tiled (256 px) JPEG pyramids written by ``etl.wsi.pyramid``: each level its own page, each
``downsample`` (2 or 4) times smaller than the one above until the longest side is at most
1024 px, the mpp in the resolution tags. Level 1 is the block mean of the exact rendered pixels
(made while level 0 is written, tile by tile); each further level is the block mean of the one
above (remainders dropped, as ``pyramid_dims`` sizes them). ``vendor='aperio'`` writes the
Aperio SVS layout instead: ImageDescriptions starting with "Aperio Image Library" holding
``|AppMag = ..|MPP = ..|``, and a stripped thumbnail as the second page (tifffile's SVS reader
expects it there; OpenSlide lists it as the associated image "thumbnail").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image

from etl.errors import OptionError
from etl.synth.scene import SlideScene
from etl.synth.textures import TILE
from etl.wsi.downsample import block_mean
from etl.wsi.pyramid import PyramidWriter, pyramid_dims, pyramid_levels

__all__ = ["DOWNSAMPLES", "MAX_TOP_SIDE", "VENDORS", "write_slide"]

MAX_TOP_SIDE = 1024  # the pyramid stops once the longest side is at most this
DOWNSAMPLES = (2, 4)
VENDORS = ("generic", "aperio")
_APERIO_HEAD = "Aperio Image Library v12.0.16 \r\n"


def _app_mag(mpp: float) -> float:
    """Nominal objective power for an mpp (40x ~ 0.25 um/px)."""
    mags = [80.0, 40.0, 20.0, 10.0, 5.0, 2.5, 1.25]
    return min(mags, key=lambda m: abs(math.log(m * mpp / 10.0)))


def _level0_tiles(
    scene: SlideScene, downsample: int, level1: np.ndarray | None
) -> Iterator[np.ndarray]:
    """The scene's tiles in raster order; fills ``level1`` on the way from the exact pixels."""
    width, height = scene.width, scene.height
    for y0 in range(0, height, TILE):
        for x0 in range(0, width, TILE):
            tile = scene.render_tile(x0, y0)
            if level1 is not None:
                small = block_mean(tile[: height - y0, : width - x0], downsample, "drop")
                ly, lx = y0 // downsample, x0 // downsample
                level1[ly : ly + small.shape[0], lx : lx + small.shape[1]] = small
            yield tile


def _thumbnail(image: np.ndarray, side: int = 768) -> np.ndarray:
    """``image`` box-resized so that its longest side is at most ``side``."""
    scale = min(1.0, side / max(image.shape[:2]))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def write_slide(
    path: str | PathLike[str],
    scene: SlideScene,
    *,
    downsample: int = 2,
    vendor: str = "generic",
    jpeg_quality: int = 90,
) -> list[tuple[int, int]]:
    """Write the scene as a tiled JPEG pyramidal TIFF (or Aperio SVS); return level dims."""
    if downsample not in DOWNSAMPLES:
        raise OptionError(f"downsample={downsample}: use 2 or 4")
    if vendor not in VENDORS:
        raise OptionError(f"vendor={vendor!r}: use 'generic' or 'aperio'")
    path = Path(path)
    width, height = scene.width, scene.height
    dims = pyramid_dims(width, height, downsample, max_side=MAX_TOP_SIDE)
    level1 = np.zeros((dims[1][1], dims[1][0], 3), np.uint8) if len(dims) > 1 else None
    aperio = vendor == "aperio"
    tags = f"|AppMag = {_app_mag(scene.mpp):g}|MPP = {scene.mpp:.4f}"
    whole = f"{_APERIO_HEAD}{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})"
    with PyramidWriter(
        path,
        width,
        height,
        quality=jpeg_quality,
        tile=TILE,
        mpp=(scene.mpp, scene.mpp),
        reduced=0 if aperio else 1,
    ) as writer:
        desc = (
            (
                f"{whole} JPEG/RGB Q={jpeg_quality}{tags}|Filename = {path.stem}"
                f"|Title = patchetl synthetic"
            )
            if aperio
            else None
        )
        writer.level(
            _level0_tiles(scene, downsample, level1), size=(width, height), description=desc
        )
        if aperio:  # real SVS: stripped thumbnail as the second page
            thumb = _thumbnail(level1 if level1 is not None else scene.render())
            writer.page(
                thumb,
                description=f"{_APERIO_HEAD}{width}x{height} -> "
                f"{thumb.shape[1]}x{thumb.shape[0]} - {tags}",
            )
        if level1 is not None:
            for level in pyramid_levels(level1, downsample, max_side=MAX_TOP_SIDE):
                h, w = level.shape[:2]
                writer.level(
                    level,
                    description=(
                        f"{whole} -> {w}x{h} JPEG/RGB Q={jpeg_quality}" if aperio else None
                    ),
                )
    return dims
