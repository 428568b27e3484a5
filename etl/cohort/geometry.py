"""Geometry of sampling: region boxes, tissue shares of regions, distances to polygons,
spacing of centres.

A region centred at level-0 ``(x, y)`` covers the level-0 box ``[x + offset, x + offset +
side)`` on each axis (its :class:`Footprint`), the box extract reads: with side ``size`` px,
``[x - size // 2, x - size // 2 + size)``; at a target mpp (``--mpp``) the box of
``etl.wsi.scale.plan_region``, ``size * target / slide mpp`` level-0 px around the centre. Its
tissue share is the share of tissue-mask pixels whose centres lie in that box (the pixel holding
the centre when no pixel centre does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from etl.wsi.scale import plan_region
from etl.wsi.tissue import TissueMask

__all__ = [
    "Footprint",
    "SpacingIndex",
    "TissueShares",
    "distance_to_polygons",
    "region_window",
]

_CHUNK = 1 << 22  # points x edges per distance block


@dataclass(frozen=True)
class Footprint:
    """A region's level-0 box around its centre, ``[x + offset, x + offset + side)`` on each
    axis, and ``scale``: level-0 px per px of the region's own scale, in which the lengths of
    the sampling options (``--margin``, ``--min-spacing``, ``--stride``) are given."""

    offset: float
    side: float
    scale: float = 1

    @classmethod
    def of(cls, size: int) -> Footprint:
        """A region of ``size`` level-0 px (without ``--mpp``): extract's read at level 0."""
        return cls(-(size // 2), size)

    @classmethod
    def at_mpp(
        cls, size: int, mpp: float, target: float, downsamples: Sequence[float]
    ) -> Footprint:
        """A region of ``size`` px at ``target`` um/px on a slide of ``mpp`` um/px at level 0:
        the box extract reads at ``--mpp`` (exact, or the level's own when it is the target)."""
        r = plan_region(0, 0, size, mpp=mpp, target_mpp=target, downsamples=downsamples)
        return cls(r.left, r.side, r.side / size)

    def length(self, n: float) -> float:
        """``n`` px at the region's scale, in level-0 px."""
        return n * self.scale if self.scale != 1 else n


def region_window(width: int, height: int, fp: Footprint) -> tuple[int, int, int, int]:
    """(x_lo, y_lo, x_hi, y_hi): the centres whose region lies inside the slide (inclusive);
    empty (lo > hi) when the slide is smaller than a region."""
    lo = math.ceil(-fp.offset)
    return lo, lo, math.floor(width - fp.side - fp.offset), math.floor(height - fp.side - fp.offset)


class TissueShares:
    """Tissue share of square level-0 boxes, from a summed-area table of the tissue mask."""

    def __init__(self, tissue: TissueMask) -> None:
        self.tissue = tissue
        mask = tissue.mask
        self.table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
        self.table[1:, 1:] = mask.cumsum(0).cumsum(1)

    def _span(
        self, lo: np.ndarray, size: float, ds: float, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mask pixels whose centres lie in ``[lo, lo + size)``: ``[first, stop)``."""
        first = np.clip(np.ceil(lo / ds - 0.5), 0, n).astype(np.int64)
        stop = np.clip(np.ceil((lo + size) / ds - 0.5), 0, n).astype(np.int64)
        return first, np.maximum(stop, first)

    def share(self, x: np.ndarray, y: np.ndarray, fp: Footprint) -> np.ndarray:
        """Tissue share of the regions of footprint ``fp`` centred at (x, y)."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        h, w = self.tissue.mask.shape
        dsx, dsy = self.tissue.downsample
        c0, c1 = self._span(x + fp.offset, fp.side, dsx, w)
        r0, r1 = self._span(y + fp.offset, fp.side, dsy, h)
        t = self.table
        count = t[r1, c1] - t[r0, c1] - t[r1, c0] + t[r0, c0]
        n = (r1 - r0) * (c1 - c0)
        share: np.ndarray = np.where(
            n > 0, count / np.maximum(n, 1), self.tissue.at(x, y).astype(np.float64)
        )
        return share


def distance_to_polygons(xy: np.ndarray, polygons: list[np.ndarray]) -> np.ndarray:
    """Level-0 distance from each point to the nearest edge of any polygon (inf: none)."""
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    best = np.full(len(pts), np.inf)
    for poly in polygons:
        a = np.asarray(poly, dtype=np.float64)
        ab = np.roll(a, -1, axis=0) - a
        length2 = np.maximum((ab**2).sum(axis=1), 1e-12)
        (x0, y0), (x1, y1) = a.min(axis=0), a.max(axis=0)
        box = np.hypot(
            np.maximum(np.maximum(x0 - pts[:, 0], pts[:, 0] - x1), 0),
            np.maximum(np.maximum(y0 - pts[:, 1], pts[:, 1] - y1), 0),
        )
        todo = np.flatnonzero(box < best)  # points this polygon may bring closer
        step = max(1, _CHUNK // len(a))
        for s in range(0, len(todo), step):
            idx = todo[s : s + step]
            ap = pts[idx, None, :] - a[None, :, :]
            t = np.clip((ap * ab[None]).sum(axis=2) / length2[None], 0.0, 1.0)
            d = np.hypot(*(ap - t[..., None] * ab[None]).transpose(2, 0, 1)).min(axis=1)
            best[idx] = np.minimum(best[idx], d)
    return best


class SpacingIndex:
    """Accepted centres of one slide, so that no two lie closer than ``spacing`` (a hash grid of
    cells of side ``spacing``; with spacing 0 only equal centres are refused)."""

    def __init__(self, spacing: float) -> None:
        self.spacing = float(spacing)
        self.cells: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.seen: set[tuple[int, int]] = set()

    def add(self, x: int, y: int) -> bool:
        """Accept (x, y) if it keeps the spacing; return whether it was accepted."""
        if (x, y) in self.seen:
            return False
        if self.spacing > 0:
            s = self.spacing
            cx, cy = math.floor(x / s), math.floor(y / s)
            for i in (cx - 1, cx, cx + 1):
                for j in (cy - 1, cy, cy + 1):
                    for px, py in self.cells.get((i, j), ()):
                        if (px - x) ** 2 + (py - y) ** 2 < s * s:
                            return False
            self.cells.setdefault((cx, cy), []).append((x, y))
        self.seen.add((x, y))
        return True
