"""Regions of a synthetic cohort's coordinate file: centres on tissue and their labels.

``location`` = [y, x] centre at level 0; the region spans
``[x - region_size // 2, x - region_size // 2 + region_size)`` (same in y) and lies inside the
slide; labels list the ``grid x grid`` cells column by column (k = grid * col + row), a cell
being tumor when its centre is inside a tumor polygon (``points_in_polygons``). On tumor slides
half the centres are in or at the border of lesions. On a slide with artefacts no centre lies
within ``ARTEFACT_CLEARANCE * region_size`` of one (so the centre cell of a 3 x 3 grid is clear).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from etl.synth.artefacts import artefact_distance
from etl.synth.scene import SlideScene
from etl.wsi.annotations import points_in_polygons

__all__ = ["ARTEFACT_CLEARANCE", "region_labels", "sample_regions"]

ARTEFACT_CLEARANCE = 0.25  # share of the region size between a centre and any artefact


def region_labels(
    centres_xy: np.ndarray, polygons: Sequence[np.ndarray], region_size: int, grid: int
) -> np.ndarray:
    """(n, grid*grid) uint8 labels of regions centred at (x, y), listed column by column.

    A cell is 1 when its centre is inside a tumor polygon; the region's top-left is
    ``centre - region_size // 2``.
    """
    c = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    cs = region_size / grid
    offs = (np.arange(grid) + 0.5) * cs - region_size // 2
    # pts[n, row, col] = (x, y) of cell (row, col)
    px = c[:, 0, None, None] + offs[None, None, :]
    py = c[:, 1, None, None] + offs[None, :, None]
    px, py = np.broadcast_arrays(px, py)
    inside = points_in_polygons(np.stack([px.ravel(), py.ravel()], 1), polygons)
    rowmajor = inside.reshape(len(c), grid, grid).astype(np.uint8)
    labels: np.ndarray = rowmajor.transpose(0, 2, 1).reshape(len(c), grid * grid)
    return labels  # k = grid*col + row


def sample_regions(
    scene: SlideScene, n: int, region_size: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, 2) int (x, y) region centres: on tissue and clear of artefacts, regions inside the
    slide, no duplicates.

    On tumor slides about half are tumor centred (half of those at lesion borders, so that
    some labels are mixed); the rest are on normal tissue.
    """
    half = region_size // 2
    lo = np.array([half, half])
    hi = np.array([scene.width - (region_size - half), scene.height - (region_size - half)])
    chosen: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()

    def take(cands: np.ndarray, k: int) -> None:
        for x, y in np.round(cands).astype(np.int64):
            if len(chosen) >= k:
                return
            if lo[0] <= x <= hi[0] and lo[1] <= y <= hi[1] and (x, y) not in seen:
                seen.add((int(x), int(y)))
                chosen.append((int(x), int(y)))

    def clear(p: np.ndarray) -> np.ndarray:
        if not scene.artefacts or not len(p):
            return p
        away = artefact_distance(scene.artefacts, p[:, 0], p[:, 1])
        return p[away > ARTEFACT_CLEARANCE * region_size]

    def on_tissue(p: np.ndarray) -> np.ndarray:
        return clear(p[scene.tissue_distance(p[:, 0], p[:, 1]) > 0]) if len(p) else p

    polys = scene.polygons
    n_tumor = n // 2 if polys else 0
    for _ in range(10):  # rejection sampling; a few rounds are plenty
        if len(chosen) >= n_tumor:
            break
        m = 8 * n
        pi = rng.integers(len(polys), size=m)
        verts = np.array([polys[p][rng.integers(len(polys[p]))] for p in pi])
        border = on_tissue(verts + rng.uniform(-region_size / 3, region_size / 3, (m, 2)))
        take(border, len(chosen) + (n_tumor - len(chosen) + 1) // 2)
        boxes = np.array([np.r_[p.min(0), p.max(0)] for p in polys])
        b = boxes[rng.integers(len(polys), size=m)]
        pts = rng.uniform(b[:, :2], b[:, 2:])
        take(on_tissue(pts[points_in_polygons(pts, polys)]), n_tumor)
    for _ in range(10):
        if len(chosen) >= n:
            break
        pts = on_tissue(rng.uniform(lo, hi + 1, size=(20 * n, 2)))
        take(pts[~points_in_polygons(pts, polys)] if polys else pts, n)
    if len(chosen) < n:  # almost no tissue in reach: fall back to any position
        take(clear(rng.uniform(lo, hi + 1, size=(50 * n, 2))), n)
    return np.array(chosen, dtype=np.int64).reshape(-1, 2)
