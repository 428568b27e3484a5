"""Cell labels of regions: the centre rule and the tumor-area-fraction rule.

A region centred at level-0 ``(x, y)`` covers its footprint's box (``etl.cohort.geometry``):
top-left ``x0 = x + offset`` (``x - size // 2`` without ``--mpp``) and ``grid x grid`` cells of
side ``cs = side / grid`` level-0 px, cell (row, col) spanning ``[x0 + col * cs, x0 + (col + 1)
* cs)`` (same in y), as extract cuts them (at ``--mpp`` too; cell centres in level-0 px).

- ``center``: a cell is 1 when its centre is in tumor (NCRF's and MONAI's convention), decided by
  the exact test of the slide's truth.
- ``fraction``: a cell is 1 when its tumor share is >= the threshold. The share is measured on
  ``FRACTION_SAMPLES x FRACTION_SAMPLES`` points at the centres of a regular sub-grid of the
  cell: where a tumor border crosses each column of sample points once, the measured share is
  within ``1 / (2 * FRACTION_SAMPLES)`` (1/32) of the exact area share per crossing.

Labels are returned as the datalist lists them: column by column, ``k = grid * col + row``.
"""

from __future__ import annotations

import numpy as np

from etl.cohort.geometry import Footprint
from etl.cohort.truth import SlideTruth

__all__ = ["FRACTION_SAMPLES", "cell_labels", "tumor_shares"]

FRACTION_SAMPLES = 16
_REGIONS_PER_BLOCK = 256


def _axis_points(lo: np.ndarray, size: float, grid: int, sub: int) -> np.ndarray:
    """(n, grid * sub) sample coordinates along one axis: ``sub`` per cell, at sub-cell centres."""
    cs = size / grid
    offs = (np.arange(grid)[:, None] * cs + (np.arange(sub)[None, :] + 0.5) * cs / sub).ravel()
    points: np.ndarray = lo[:, None] + offs[None, :]
    return points


def tumor_shares(
    truth: SlideTruth, centres: np.ndarray, fp: Footprint, grid: int, sub: int
) -> np.ndarray:
    """(n, grid, grid) row-major share of each cell's ``sub x sub`` sample points in tumor
    (``sub = 1``: the cell centre alone)."""
    c = np.asarray(centres, dtype=np.int64).reshape(-1, 2)
    out = np.zeros((len(c), grid, grid))
    for s in range(0, len(c), _REGIONS_PER_BLOCK):
        block = c[s : s + _REGIONS_PER_BLOCK]
        px = _axis_points((block[:, 0] + fp.offset).astype(np.float64), fp.side, grid, sub)
        py = _axis_points((block[:, 1] + fp.offset).astype(np.float64), fp.side, grid, sub)
        m = grid * sub
        xs = np.broadcast_to(px[:, None, :], (len(block), m, m))
        ys = np.broadcast_to(py[:, :, None], (len(block), m, m))
        inside = truth.tumor(np.stack([xs.ravel(), ys.ravel()], axis=1))
        cells = inside.reshape(len(block), grid, sub, grid, sub)
        out[s : s + len(block)] = cells.mean(axis=(2, 4))
    return out


def cell_labels(
    truth: SlideTruth,
    centres: np.ndarray,
    fp: Footprint,
    grid: int,
    rule: str = "center",
    threshold: float = 0.5,
) -> np.ndarray:
    """(n, grid * grid) uint8 labels, column by column, by the ``center`` or ``fraction`` rule."""
    if rule == "center":
        rowmajor = tumor_shares(truth, centres, fp, grid, 1) > 0
    else:
        rowmajor = tumor_shares(truth, centres, fp, grid, FRACTION_SAMPLES) >= threshold
    labels: np.ndarray = rowmajor.astype(np.uint8).transpose(0, 2, 1).reshape(-1, grid * grid)
    return labels
