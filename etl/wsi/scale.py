"""Physical scale: regions of ``size`` output pixels at a target mpp (micrometres per pixel).

Coordinates stay level 0 everywhere; a target mpp only changes which level-0 box a region
covers and how its pixels are made:

- **Slide mpp** (:func:`slide_mpp`): the reader's level-0 ``mpp`` (``etl.wsi.reader``: OpenSlide's
  ``openslide.mpp-x/y``, else the TIFF resolution tags). Missing: an error naming the slide and
  ``--assume-mpp``, whose value is used only for slides that record none. Pixels must be square:
  x and y more than ``MPP_TOLERANCE`` (1 %) apart are refused; within it their mean is used.
- **Level** (:func:`choose_level`): the coarsest level whose mpp (slide mpp x its downsample) is at
  most ``target * (1 + MPP_TOLERANCE)``. A level within that tolerance of the target either way
  *is* the target: read as it is, never resampled. A target finer than level 0 beyond the
  tolerance is refused (it would invent detail).
- **Box** (level 0; pixel j spans [j, j + 1)): read as is, :func:`region_box` (extract's box
  at ``--level`` too): ``extent = round(size * downsample)`` from ``(x - extent // 2, y -
  extent // 2)``. Resampled, the exact box ``[x - s / 2, x + s / 2)``
  with ``s = size * target / slide mpp``, fractions kept: a whole-pixel box puts the centre
  half a pixel off when its extent is odd and rounds the scale, differently on slides of
  different mpp (tests/test_scale.py, slides at 0.25 and 0.5 um/px read at 0.6: 37.7 dB
  PSNR between them with exact boxes, 33.9 dB with whole-pixel boxes).
- **Pixels** (:func:`read_scaled`): read as is, ``reader.read_region(left, top, level, size,
  size)``, identical to OpenSlide's ``read_region`` at that level. Resampled, the level's
  pixels under the box are read from a window aligned to that level's pixel grid (a plain
  tile copy for the direct reader when the downsample is an integer) and area-averaged
  (``etl.wsi.downsample.area_resize``) to ``size``; pixels outside the slide are white, as
  OpenSlide reads them.

:class:`ScaledRegion` carries what shard metadata records: slide mpp, target mpp, level read,
its mpp, the resampling factor and the level-0 box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etl.errors import OptionError, PatchetlError
from etl.wsi.downsample import area_resize
from etl.wsi.reader import SlideReader

__all__ = [
    "MPP_TOLERANCE",
    "LevelChoice",
    "ScaleError",
    "ScaledRegion",
    "choose_level",
    "plan_region",
    "read_region_at_mpp",
    "read_resampled",
    "read_scaled",
    "region_box",
    "slide_mpp",
]

MPP_TOLERANCE = 0.01  # relative: x vs y pixel size, and a level's mpp vs the target
_SLACK = 1 + MPP_TOLERANCE + 1e-9  # the largest ratio taken as the same scale (float slack)


class ScaleError(PatchetlError, ValueError):
    """A slide that cannot be read at the asked physical scale; the message names it."""


def _check_mpp(value: float, option: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise OptionError(f"{option} {value}: give a pixel size in micrometres, > 0 (e.g. 0.5)")
    return float(value)


def slide_mpp(
    mpp: tuple[float, float] | None, slide: str | Path, assume: float | None = None
) -> float:
    """The slide's level-0 mpp (square pixels), from ``reader.mpp`` or ``assume``.

    ``assume`` (``--assume-mpp``) is used only when the slide records no pixel size.
    """
    if assume is not None:
        assume = _check_mpp(assume, "--assume-mpp")
    if mpp is None:
        if assume is None:
            raise ScaleError(
                f"{slide}: the slide records no pixel size (no openslide.mpp-x/y, TIFF "
                "resolution tags or DICOM pixel spacing); give it with --assume-mpp "
                "(e.g. --assume-mpp 0.25 for a 40x scan, 0.5 for 20x)"
            )
        return assume
    x, y = mpp
    if abs(x - y) > MPP_TOLERANCE * max(x, y):
        raise ScaleError(
            f"{slide}: pixels are not square (mpp x {x:g}, y {y:g} um/px, "
            f"{100 * abs(x - y) / max(x, y):.1f} % apart; at most {100 * MPP_TOLERANCE:g} % "
            "is taken as square): physical-scale reads need square pixels; resample the "
            "slide to square pixels, or read it without --mpp"
        )
    return (x + y) / 2


def _same_scale(a: float, b: float) -> bool:
    return max(a / b, b / a) <= _SLACK


@dataclass(frozen=True)
class LevelChoice:
    """Where a target mpp is read from: ``level``, its mpp, and ``factor`` level pixels per
    output pixel (exactly 1.0 when the level is the target: no resampling; else > 1)."""

    level: int
    level_mpp: float
    factor: float


def choose_level(
    mpp: float, target_mpp: float, downsamples: Sequence[float], slide: str | Path = "slide"
) -> LevelChoice:
    """The coarsest level at least as fine as ``target_mpp`` (within ``MPP_TOLERANCE``).

    For whole-tile resampling (inference): read tiles at ``level`` and shrink them by
    ``factor`` with ``area_resize``.
    """
    target = _check_mpp(target_mpp, "--mpp")
    fine = [k for k, d in enumerate(downsamples) if mpp * d <= target * _SLACK]
    if not fine:
        raise ScaleError(
            f"{slide}: level 0 is {mpp:g} um/px, coarser than --mpp {target:g}: the slide "
            f"cannot be read at that scale without inventing detail; use --mpp {mpp:g} or "
            "more, or leave the slide out"
        )
    level = max(fine, key=lambda k: downsamples[k])
    level_mpp = mpp * float(downsamples[level])
    factor = 1.0 if _same_scale(level_mpp, target) else target / level_mpp
    return LevelChoice(level, level_mpp, factor)


def region_box(x: int, y: int, size: int, downsample: float = 1.0) -> tuple[int, int, int]:
    """Level-0 top-left and extent of a ``size`` px region centred on (x, y) at ``downsample``.

    At level 0 OpenSlide's ``read_region((x - size // 2, y - size // 2), 0, (size, size))``, the
    seed's read; at a level the region stays centred: extent ``round(size * downsample)``,
    top-left ``(x - extent // 2, y - extent // 2)``.
    """
    extent = round(size * downsample)
    return x - extent // 2, y - extent // 2, extent


@dataclass(frozen=True)
class ScaledRegion:
    """One region at a physical scale: what to read, and what shard metadata records."""

    x: int  # level-0 centre
    y: int
    size: int  # output pixels per side
    slide_mpp: float
    target_mpp: float
    level: int  # the pyramid level read
    level_mpp: float
    downsample: float  # that level's downsample
    factor: float  # level pixels per output pixel (1.0: read as is)
    left: float  # the level-0 box the output covers: top-left and side (whole numbers
    top: float  # when the level is read as is)
    side: float

    @property
    def resampled(self) -> bool:
        return self.factor != 1.0

    def metadata(self) -> dict[str, Any]:
        """The facts a shard sample records (coordinates level 0)."""
        return {
            "slide_mpp": self.slide_mpp,
            "target_mpp": self.target_mpp,
            "level": self.level,
            "level_mpp": self.level_mpp,
            "scale": self.factor,
            "box": [self.left, self.top, self.side],
        }


def plan_region(
    x: int,
    y: int,
    size: int,
    *,
    mpp: float,
    target_mpp: float,
    downsamples: Sequence[float],
    slide: str | Path = "slide",
) -> ScaledRegion:
    """The region of ``size`` output px at ``target_mpp`` centred on level-0 (x, y); no I/O."""
    choice = choose_level(mpp, target_mpp, downsamples, slide)
    downsample = float(downsamples[choice.level])
    if choice.factor == 1.0:
        left, top, side = (float(v) for v in region_box(x, y, size, downsample))
    else:
        side = size * float(target_mpp) / mpp
        left, top = x - side / 2, y - side / 2
    return ScaledRegion(
        x=x,
        y=y,
        size=size,
        slide_mpp=mpp,
        target_mpp=float(target_mpp),
        level=choice.level,
        level_mpp=choice.level_mpp,
        downsample=downsample,
        factor=choice.factor,
        left=left,
        top=top,
        side=side,
    )


def _window(start: float, downsample: float) -> tuple[int, float]:
    """Level-0 start of a read aligned to the level's pixel grid at or before ``start``, and
    ``start`` in level pixels from it. With a non-integer downsample (OpenSlide reads those
    at sub-pixel offsets) the read starts at ``floor(start)``."""
    step = int(downsample) if downsample.is_integer() else 1
    aligned = math.floor(start / step) * step
    return aligned, (start - aligned) / downsample


def read_scaled(reader: SlideReader, region: ScaledRegion) -> np.ndarray:
    """The (size, size, 3) uint8 RGB pixels of a planned region."""
    size, level = region.size, region.level
    if not region.resampled:
        return reader.read_region(int(region.left), int(region.top), level, size, size)
    span = region.side / region.downsample  # the box's side in level pixels
    return read_resampled(
        reader, level, region.downsample, (region.left, region.top), (span, span), (size, size)
    )


def read_resampled(
    reader: SlideReader,
    level: int,
    downsample: float,
    origin: tuple[float, float],
    span: tuple[float, float],
    out_size: tuple[int, int],
) -> np.ndarray:
    """The level-0 box at ``origin`` spanning ``span`` (width, height) level pixels, read from a
    window aligned to the level's pixel grid and area-averaged to ``out_size`` (width, height).
    One rule for extract's regions and inference's tiles."""
    (wx, sx), (wy, sy) = _window(origin[0], downsample), _window(origin[1], downsample)
    w, h = math.ceil(sx + span[0]), math.ceil(sy + span[1])
    window = reader.read_region(wx, wy, level, w, h)
    box = (sx, sy, min(sx + span[0], w), min(sy + span[1], h))
    return area_resize(window, out_size, box)


def read_region_at_mpp(
    reader: SlideReader,
    x: int,
    y: int,
    size: int,
    target_mpp: float,
    *,
    assume_mpp: float | None = None,
) -> tuple[np.ndarray, ScaledRegion]:
    """Plan and read one region centred on level-0 (x, y) at ``target_mpp``."""
    mpp = slide_mpp(reader.mpp, reader.path, assume_mpp)
    region = plan_region(
        x,
        y,
        size,
        mpp=mpp,
        target_mpp=target_mpp,
        downsamples=reader.level_downsamples,
        slide=reader.path,
    )
    return read_scaled(reader, region), region
