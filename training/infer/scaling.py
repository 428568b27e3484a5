"""The physical scale a slide's map is computed at, and tiles read at it.

Which scale (`plan_scale`), for each slide:

- `--mpp T`: T. The level read is `etl.wsi.scale.choose_level`'s (the coarsest at least as fine
  as T, within 1 %); its pixels are area-averaged (`etl.wsi.downsample.area_resize`) by
  `factor = T / level mpp` unless the level is within 1 % of T (read as is, `factor` 1). The
  slide's mpp is its own, else `--assume-mpp`; a slide with neither, with non-square pixels,
  or coarser than T fails alone (`ScaleError` names it).
- no `--mpp`, the checkpoint records a training mpp T (`training.shard_scale`): T as above when
  the slide's mpp is known and level 0 is at least as fine as T; otherwise `--level` as is,
  with a warning when that level's mpp is unknown or more than 10 % (`WARN_RATIO`) from T.
  A checkpoint trained on mixed scales records only their range: `--level` as is, with a
  warning when the level's mpp lies more than 10 % outside it.
- neither: `--level` as is, exactly as without any scale (no mpp is needed).

Map geometry stays level 0 (`training.infer.geometry`): the model runs on "model pixels" of
`level downsample x factor` level-0 px each, so a map pixel spans `stride x level downsample x
factor` level-0 px: `stride x T / slide mpp` when resampled, `stride x level downsample` when
a level is read as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etl.wsi.reader import SlideReader
from etl.wsi.scale import MPP_TOLERANCE, ScaleError, choose_level, read_resampled, slide_mpp
from training.config import InferConfig
from training.errors import InferError
from training.infer.geometry import MapGeometry

WARN_RATIO = 0.10  # a slide this far (relative) from the training scale gets a warning


@dataclass(frozen=True)
class MapScale:
    """How a slide's pixels reach the model: level read, resampling, and the mpps involved."""

    level: int
    level_downsample: float  # level-0 px per level px
    factor: float = 1.0  # level px per model px (1.0: the level as is)
    slide_mpp: float | None = None  # level 0, um/px (the slide's, or --assume-mpp)
    target_mpp: float | None = None  # None: no physical scale asked
    source: str = "--level"  # "--mpp", "checkpoint" or "--level"
    training: dict[str, Any] | None = None  # the checkpoint's `scale`

    @property
    def level_mpp(self) -> float | None:
        return None if self.slide_mpp is None else self.slide_mpp * self.level_downsample

    def as_dict(self, stride_level0: float) -> dict[str, Any]:
        """The sidecar's `physical_scale`: what the map's pixels mean in micrometres."""
        return {
            "slide_mpp": self.slide_mpp,
            "target_mpp": self.target_mpp,
            "level": self.level,
            "level_mpp": self.level_mpp,
            "scale": self.factor,
            "map_pixel_um": None if self.slide_mpp is None else stride_level0 * self.slide_mpp,
            "source": self.source,
            "training_mpp": (self.training or {}).get("mpp"),
        }


def _as_is(
    reader: SlideReader, cfg: InferConfig, training: dict[str, Any] | None, mpp: float | None
) -> tuple[MapScale, list[str]]:
    """`--level` as is; a warning when the checkpoint's scale is known and this one is not it."""
    if cfg.level >= reader.level_count:
        raise InferError(
            f"{reader.path}: --level {cfg.level} out of range (the slide has levels "
            f"0..{reader.level_count - 1})"
        )
    scale = MapScale(
        cfg.level, float(reader.level_downsamples[cfg.level]), slide_mpp=mpp, training=training
    )
    if not training or training.get("min") is None:
        return scale, []
    lo, hi = float(training["min"]), float(training["max"])
    what = f"{lo:g} um/px" if lo == hi else f"{lo:g}..{hi:g} um/px"
    level_mpp = scale.level_mpp
    if level_mpp is None:
        return scale, [
            f"{reader.path}: the slide records no pixel size, so its scale against the "
            f"training scale ({what}) is unknown; it runs at --level {cfg.level} as is (give "
            "--assume-mpp, or --mpp)"
        ]
    off = max(lo / level_mpp, level_mpp / hi) - 1
    if off <= WARN_RATIO:
        return scale, []
    return scale, [
        f"{reader.path}: level {cfg.level} is {level_mpp:g} um/px, {off:.0%} from the "
        f"training scale ({what}); the model sees it at another scale than it learnt (give "
        "--mpp to resample to one scale, or train on shards of this scale)"
    ]


def plan_scale(
    reader: SlideReader, cfg: InferConfig, training: dict[str, Any] | None
) -> tuple[MapScale, list[str]]:
    """The slide's `MapScale` and its warnings (see the module); raises `ScaleError` (with
    --mpp) or `InferError` (a missing --level) naming the slide."""
    path: str | Path = reader.path
    target: float | None
    mpp: float | None
    if cfg.mpp is not None:
        target, source = cfg.mpp, "--mpp"
        mpp = slide_mpp(reader.mpp, path, cfg.assume_mpp)
    else:
        target, source = (training or {}).get("mpp"), "checkpoint"
        try:
            mpp = slide_mpp(reader.mpp, path, cfg.assume_mpp)
        except ScaleError:
            mpp = None
        if (
            target is None
            or mpp is None
            or cfg.level != 0
            or mpp > target * (1 + MPP_TOLERANCE + 1e-9)
        ):
            return _as_is(reader, cfg, training, mpp)
    assert mpp is not None and target is not None  # slide_mpp raised, or returned above
    choice = choose_level(mpp, float(target), reader.level_downsamples, path)
    return MapScale(
        level=choice.level,
        level_downsample=float(reader.level_downsamples[choice.level]),
        factor=choice.factor,
        slide_mpp=mpp,
        target_mpp=float(target),
        source=source,
        training=training,
    ), []


def read_model_px(
    reader: SlideReader, geometry: MapGeometry, left: int, top: int, width: int, height: int
) -> np.ndarray:
    """(height, width, 3) model pixels whose top-left is model px (left, top).

    Model px (x, y) is level px (x, y) x ``factor``: as is, one ``read_region`` at the level
    (level-0 origin rounded as OpenSlide reads it); resampled, the level pixels under the box
    from a window aligned to the level's pixel grid (`etl.wsi.scale`'s rule), area-averaged.
    """
    d, f, level = geometry.downsample, geometry.factor, geometry.level
    if f == 1.0:
        return reader.read_region(round(left * d), round(top * d), level, width, height)
    origin = (left * f * d, top * f * d)
    return read_resampled(reader, level, d, origin, (width * f, height * f), (width, height))
