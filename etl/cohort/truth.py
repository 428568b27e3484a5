"""A slide's ground truth for sampling and labels: where tumor is, and where nothing is sampled.

:class:`SlideTruth` answers, for level-0 points: in tumor? in an exclusion area? how far from
tumor? and rasterises tumor at a downsample (pixel (i, j) = the level-0 point
``((j + 0.5) * ds, (i + 0.5) * ds)``, as ``etl.wsi.masks``) to find candidates quickly.

- :class:`PolygonTruth` (ASAP XML, QuPath GeoJSON, or nothing: tumor-free): exact even-odd
  tests on the polygons (tumor minus holes; exclusions minus their holes); the distance is the
  exact distance to the nearest tumor or hole edge (conservative near holes).
- :class:`MaskTruth` (Camelyon-style tumor mask TIFF; any non-zero value is tumor): the mask
  level read at ``MASK_DOWNSAMPLE`` or finer, nearest pixel; distances from its distance
  transform. As exact as the mask's resolution; masks have no exclusion areas.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from etl.cohort.geometry import distance_to_polygons
from etl.cohort.inputs import Problem, SlideInput
from etl.wsi.annotations import Annotations, check_annotations
from etl.wsi.masks import MaskError, MaskLevel, read_mask_level, tumor_mask

__all__ = ["MASK_DOWNSAMPLE", "MaskTruth", "PolygonTruth", "SlideTruth", "load_truth"]

MASK_DOWNSAMPLE = 16  # a mask TIFF is read at this downsample or finer


class SlideTruth(ABC):
    """Tumor and exclusion areas of one slide, in level-0 pixels."""

    ignored: dict[str, int]

    @abstractmethod
    def tumor(self, xy: np.ndarray) -> np.ndarray:
        """Bool per (x, y) point: in tumor."""

    def excluded(self, xy: np.ndarray) -> np.ndarray:
        """Bool per (x, y) point: in an exclusion area (never a region centre)."""
        return np.zeros(len(np.asarray(xy).reshape(-1, 2)), dtype=bool)

    @abstractmethod
    def tumor_distance(self, xy: np.ndarray) -> np.ndarray:
        """Level-0 distance per point to tumor (0 inside it; inf on a tumor-free slide)."""

    @abstractmethod
    def raster(self, width: int, height: int, ds: int) -> np.ndarray:
        """Bool tumor mask of the slide at integer downsample ``ds`` (pixel centres); callers
        must not modify it (it may be cached)."""

    @property
    @abstractmethod
    def has_tumor(self) -> bool:
        """Whether the slide has any tumor area."""


class PolygonTruth(SlideTruth):
    """Polygons of an ASAP XML or QuPath GeoJSON file (or none: a tumor-free slide)."""

    def __init__(self, annotations: Annotations) -> None:
        self.ann = annotations
        self.ignored = dict(annotations.ignored)
        self._rasters: dict[tuple[int, int, int], np.ndarray] = {}

    def tumor(self, xy: np.ndarray) -> np.ndarray:
        return self.ann.is_tumor(xy)

    def excluded(self, xy: np.ndarray) -> np.ndarray:
        return self.ann.is_excluded(xy)

    def tumor_distance(self, xy: np.ndarray) -> np.ndarray:
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        dist = np.zeros(len(pts))
        outside = ~self.tumor(pts)
        dist[outside] = distance_to_polygons(pts[outside], self.ann.tumor + self.ann.holes)
        return dist

    def raster(self, width: int, height: int, ds: int) -> np.ndarray:
        key = (width, height, ds)
        if key not in self._rasters:  # asked for the candidates and for the tumor area
            self._rasters[key] = self._raster(width, height, ds)
        return self._rasters[key]

    def _raster(self, width: int, height: int, ds: int) -> np.ndarray:
        mask: np.ndarray = tumor_mask(self.ann.tumor, width, height, ds, holes=self.ann.holes) > 0
        for poly in self.ann.tumor:  # lesions smaller than a pixel keep a pixel
            j = np.clip((poly[:, 0] // ds).astype(np.int64), 0, mask.shape[1] - 1)
            i = np.clip((poly[:, 1] // ds).astype(np.int64), 0, mask.shape[0] - 1)
            mask[i, j] = True
        return mask

    @property
    def has_tumor(self) -> bool:
        return bool(self.ann.tumor)


class MaskTruth(SlideTruth):
    """A tumor mask TIFF's level: pixel (r, c) covers level-0 ``[c*dsx, (c+1)*dsx) x ...``."""

    def __init__(self, level: MaskLevel) -> None:
        self.mask = np.asarray(level.pixels) > 0
        self.level = level
        self.ignored = {}
        self._distance: np.ndarray | None = None

    def _index(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        c = np.floor(pts[:, 0] / self.level.downsample[0]).astype(np.int64)
        r = np.floor(pts[:, 1] / self.level.downsample[1]).astype(np.int64)
        h, w = self.mask.shape
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        return np.where(inside, r, 0), np.where(inside, c, 0), inside

    def tumor(self, xy: np.ndarray) -> np.ndarray:
        r, c, inside = self._index(xy)
        hit: np.ndarray = self.mask[r, c] & inside
        return hit

    def tumor_distance(self, xy: np.ndarray) -> np.ndarray:
        if self._distance is None:
            if self.mask.any():
                self._distance = ndimage.distance_transform_edt(
                    ~self.mask, sampling=self.level.downsample[::-1]
                )
            else:
                self._distance = np.full(self.mask.shape, np.inf)
        r, c, inside = self._index(xy)
        dist: np.ndarray = np.where(inside, self._distance[r, c], np.inf)
        return dist

    def raster(self, width: int, height: int, ds: int) -> np.ndarray:
        sampled: np.ndarray = self.level.sample(ds) > 0
        return sampled

    @property
    def has_tumor(self) -> bool:
        return bool(self.mask.any())


def _read_mask(path: Path, size: tuple[int, int]) -> tuple[SlideTruth | None, list[Problem]]:
    try:
        level = read_mask_level(path, MASK_DOWNSAMPLE)
    except MaskError as exc:
        return None, [Problem(path, "", str(exc).removeprefix(f"{path}: "), "export it again")]
    w0, h0 = level.size0
    if not math.isclose(w0, size[0], rel_tol=0.01) or not math.isclose(h0, size[1], rel_tol=0.01):
        return None, [
            Problem(
                path,
                "",
                f"mask is {w0} x {h0} px at level 0 but its slide is {size[0]} x {size[1]}",
                "give the mask made for this slide",
            )
        ]
    return MaskTruth(level), []


def load_truth(
    item: SlideInput,
    size: tuple[int, int],
    tumor_classes: Sequence[str],
    exclude_classes: Sequence[str],
) -> tuple[SlideTruth | None, list[Problem]]:
    """The truth of a slide of level-0 ``size`` and every problem of its annotation file
    (None when it cannot be used)."""
    if item.annotation is None:
        return PolygonTruth(Annotations([], [])), []
    if item.kind == "mask":
        return _read_mask(item.annotation, size)
    ann, found = check_annotations(
        item.annotation,
        tumor_classes=tumor_classes,
        exclude_classes=exclude_classes,
        slide_size=size,
    )
    problems = [Problem.of(p) for p in found]
    if any(not p.warning for p in problems):
        return None, problems
    return PolygonTruth(ann), problems
