"""Map geometry: which slide patch each pixel of a probability map stands for, and the tiles.

Inference runs at pyramid `level` (level-0 px per level px: `downsample`), on model pixels of
`factor` level px each (1 unless a physical scale resamples the level: `training.infer.scaling`),
with a step of `stride_level` model px (a multiple of 32). With `stride = stride_level *
downsample * factor` level-0 px,

    map pixel (i, j) = the `patch_size` x `patch_size` level patch CENTRED at level-0
    (x = x_start + j * stride, y = y_start + i * stride),   x_start = y_start = stride / 2,

so map pixel (i, j) also stands for the level-0 cell `[j*stride, (j+1)*stride) x
[i*stride, (i+1)*stride)`: the map is the slide downsampled by `stride`, top-left aligned,
`ceil(width_level / (stride_level * factor))` x `ceil(height_level / (stride_level *
factor))` pixels (patches that
reach past the slide edge see white, as OpenSlide reads it). This definition is written to
each map's sidecar. The map is computed in tiles of whole map pixels; only tiles holding
tissue are planned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MapGeometry:
    """Map pixel (i, j) = the patch centred at level-0 (x_start + j*stride, y_start + i*stride)."""

    cols: int
    rows: int
    level: int
    downsample: float  # level-0 px per level px
    stride_level: int  # model px per map pixel (level px when factor is 1)
    patch: int  # patch side, model px
    factor: float = 1.0  # level px per model px

    @classmethod
    def for_level(
        cls,
        level_dims: tuple[int, int],
        level: int,
        downsample: float,
        stride_level: int,
        patch: int,
        factor: float = 1.0,
    ) -> MapGeometry:
        w, h = level_dims
        if factor == 1.0:
            cols, rows = -(-w // stride_level), -(-h // stride_level)
        else:  # whole map pixels over the level's extent in model px
            cols, rows = (math.ceil(n / (stride_level * factor) - 1e-9) for n in (w, h))
        return cls(
            cols=cols,
            rows=rows,
            level=level,
            downsample=float(downsample),
            stride_level=stride_level,
            patch=patch,
            factor=float(factor),
        )

    @property
    def stride(self) -> float:
        """Level-0 px per map pixel."""
        return self.stride_level * self.downsample * self.factor

    @property
    def x_start(self) -> float:
        return self.stride / 2

    @property
    def y_start(self) -> float:
        return self.stride / 2

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def centre(self, i: np.ndarray | int, j: np.ndarray | int) -> tuple[Any, Any]:
        """Level-0 (x, y) centre of map pixel (i, j)."""
        x = self.x_start + np.asarray(j) * self.stride
        return x, self.y_start + np.asarray(i) * self.stride

    def patch_origin(self, i: int, j: int) -> tuple[int, int]:
        """Model-px (x, y) top-left of the patch of map pixel (i, j)."""
        off = self.stride_level // 2 - self.patch // 2
        return j * self.stride_level + off, i * self.stride_level + off

    def as_dict(self) -> dict:
        return {
            "stride": self.stride,
            "stride_level": self.stride_level,
            "x_start": self.x_start,
            "y_start": self.y_start,
            "map_width": self.cols,
            "map_height": self.rows,
            "level": self.level,
            "level_downsample": self.downsample,
            "patch_size": self.patch,
            "patch_size_level0": self.patch * self.downsample * self.factor,
            "definition": "map pixel (i, j) = the patch_size x patch_size patch (at `level`) "
            "centred at level-0 (x_start + j*stride, y_start + i*stride); it "
            "stands for level-0 [j*stride, (j+1)*stride) x [i*stride, "
            "(i+1)*stride)",
        }


@dataclass(frozen=True)
class Tile:
    """``rows x cols`` map pixels from (i0, j0) (the part inside the map is used)."""

    i0: int
    j0: int
    rows: int
    cols: int


def tile_cells(geometry: MapGeometry, tile_size: int) -> tuple[int, int]:
    """Map pixels per tile (rows, cols): ``tile_size // stride``, no more than the map has."""
    n = max(1, tile_size // geometry.stride_level)
    return min(n, geometry.rows), min(n, geometry.cols)


def plan_tiles(cells: np.ndarray, shape: tuple[int, int]) -> list[Tile]:
    """Tiles of ``shape`` map pixels covering the map, in raster order, those with tissue."""
    rows, cols = cells.shape
    nr, nc = shape
    return [
        Tile(i0, j0, nr, nc)
        for i0 in range(0, rows, nr)
        for j0 in range(0, cols, nc)
        if cells[i0 : i0 + nr, j0 : j0 + nc].any()
    ]
