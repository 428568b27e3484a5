"""Where a slide's regions go: sample mode (NCRF-style) and grid mode. Level-0 pixels.

Every region's box (its ``Footprint``) lies inside its slide, reaches the least tissue share
(``TissueShares``), and its centre is outside every exclusion area. Lengths of the options
(``margin``, ``min_spacing``, ``stride``) are px at the region's scale: level-0 px, or with
``--mpp`` px at the target mpp (``Footprint.length``).

- **sample**: up to ``tumor_per_slide`` centres in tumor and ``normal_per_slide`` centres on
  tissue outside tumor, at least ``margin`` from it; no two centres of a slide closer than
  ``min_spacing``. Candidates are drawn (seeded) from low-resolution candidate pixels, at a
  uniform point inside each pixel, and every condition is then tested exactly on the
  candidate; tumor centres are taken first. Too few candidates pass: fewer regions, and the
  reasons the candidates failed are counted.
- **grid**: centres every ``stride`` from ``size // 2``, plus one flush with the right (bottom)
  edge when the grid falls short of it, so the regions cover the slide; a region is kept when
  it holds tissue (share > 0 and >= ``min_tissue``) and its centre is not excluded.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from etl.cohort.geometry import Footprint, SpacingIndex, TissueShares, region_window
from etl.cohort.truth import SlideTruth
from etl.config import SamplingOptions
from etl.wsi.tissue import TissueMask

__all__ = ["Sampled", "grid_positions", "grid_regions", "sample_regions"]

ROUNDS = 12  # draws per class before a slide is declared short of candidates
Accept = Callable[[np.ndarray, np.ndarray, Counter[str]], np.ndarray]


@dataclass
class Sampled:
    """A slide's region centres (x, y), sorted by (y, x), whether each centre is in tumor, what
    was asked and why candidates were left out, by class (sample: ``tumor``, ``normal``; grid:
    ``grid``, counting grid positions with tissue)."""

    centres: np.ndarray
    tumor: np.ndarray
    asked: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, centres: np.ndarray, tumor: np.ndarray, **kw: Any) -> Sampled:
        c = np.asarray(centres, dtype=np.int64).reshape(-1, 2)
        order = np.lexsort((c[:, 0], c[:, 1]))
        return cls(c[order], np.asarray(tumor, dtype=bool)[order], **kw)


@dataclass(frozen=True)
class _Slide:
    """What sampling needs of one slide."""

    truth: SlideTruth
    shares: TissueShares
    width: int
    height: int
    opts: SamplingOptions
    fp: Footprint

    def keep(self, mask: np.ndarray, reason: str, rejected: Counter[str]) -> np.ndarray:
        rejected[reason] += int((~mask).sum())
        return mask


def _tumor_accept(s: _Slide) -> Accept:
    def accept(x: np.ndarray, y: np.ndarray, rejected: Counter[str]) -> np.ndarray:
        ok = s.keep(s.truth.tumor(np.c_[x, y]), "centre not in tumor", rejected)
        ok[ok] = s.keep(~s.truth.excluded(np.c_[x, y][ok]), "centre in an exclusion area", rejected)
        share = s.shares.share(x[ok], y[ok], s.fp)
        ok[ok] = s.keep(share >= s.opts.min_tissue, "tissue share below --min-tissue", rejected)
        return ok

    return accept


def _normal_accept(s: _Slide) -> Accept:
    def accept(x: np.ndarray, y: np.ndarray, rejected: Counter[str]) -> np.ndarray:
        ok = s.keep(s.shares.tissue.at(x, y), "centre not on tissue", rejected)
        xy = np.c_[x, y]
        ok[ok] = s.keep(~s.truth.tumor(xy[ok]), "centre in tumor", rejected)
        if s.opts.margin > 0:
            far = s.truth.tumor_distance(xy[ok]) >= s.fp.length(s.opts.margin)
            ok[ok] = s.keep(far, "centre within --margin of tumor", rejected)
        ok[ok] = s.keep(~s.truth.excluded(xy[ok]), "centre in an exclusion area", rejected)
        share = s.shares.share(x[ok], y[ok], s.fp)
        ok[ok] = s.keep(share >= s.opts.min_tissue, "tissue share below --min-tissue", rejected)
        return ok

    return accept


def _on_grid(tissue: TissueMask, ds: int, shape: tuple[int, int]) -> np.ndarray:
    """The tissue mask at the centres of the pixels of a grid of downsample ``ds``."""
    mh, mw = tissue.mask.shape
    r = np.floor((np.arange(shape[0]) + 0.5) * ds / tissue.downsample[1]).astype(np.int64)
    c = np.floor((np.arange(shape[1]) + 0.5) * ds / tissue.downsample[0]).astype(np.int64)
    grid: np.ndarray = tissue.mask[np.ix_(np.minimum(r, mh - 1), np.minimum(c, mw - 1))]
    grid &= (r < mh)[:, None] & (c < mw)[None, :]
    return grid


def _candidate_maps(s: _Slide, ds: int) -> tuple[np.ndarray, np.ndarray]:
    """Low-resolution (ds) candidate pixels of tumor and normal centres: tumor dilated by a pixel;
    tissue without pixels surely within the margin or deep inside tumor."""
    tumor = s.truth.raster(s.width, s.height, ds)
    h, w = tumor.shape
    tissue = _on_grid(s.shares.tissue, ds, (h, w))
    normal = tissue & ~ndimage.binary_erosion(tumor)
    if s.opts.margin > 0 and tumor.any():
        near = ndimage.distance_transform_edt(~tumor) * ds + ds * 0.71 < s.fp.length(s.opts.margin)
        normal &= ~near
    x_lo, y_lo, x_hi, y_hi = region_window(s.width, s.height, s.fp)
    cols = ((np.arange(w) + 1) * ds > x_lo) & (np.arange(w) * ds <= x_hi)
    rows = ((np.arange(h) + 1) * ds > y_lo) & (np.arange(h) * ds <= y_hi)
    window = rows[:, None] & cols[None, :]
    return ndimage.binary_dilation(tumor) & window, normal & window


def _draw(
    rng: np.random.Generator,
    pixels: np.ndarray,
    shape: tuple[int, int],
    ds: int,
    n: int,
    accept: Accept,
    index: SpacingIndex,
    window: tuple[int, int, int, int],
    rejected: Counter[str],
) -> list[tuple[int, int]]:
    """Up to ``n`` accepted, spaced centres drawn from candidate ``pixels`` (flat indices)."""
    taken: list[tuple[int, int]] = []
    for _ in range(ROUNDS):
        need = n - len(taken)
        if need <= 0 or pixels.size == 0:
            break
        k = max(8 * need, 512)
        i, j = np.divmod(pixels[rng.integers(pixels.size, size=k)], shape[1])
        x = np.floor((j + rng.random(k)) * ds).astype(np.int64)
        y = np.floor((i + rng.random(k)) * ds).astype(np.int64)
        inside = (x >= window[0]) & (y >= window[1]) & (x <= window[2]) & (y <= window[3])
        rejected["region reaches outside the slide"] += int((~inside).sum())
        x, y = x[inside], y[inside]
        good = accept(x, y, rejected)
        for xi, yi in zip(x[good].tolist(), y[good].tolist(), strict=True):
            if len(taken) >= n:
                break
            if index.add(xi, yi):
                taken.append((xi, yi))
            else:
                rejected["closer than --min-spacing to another centre"] += 1
    return taken


def sample_regions(
    truth: SlideTruth,
    shares: TissueShares,
    width: int,
    height: int,
    opts: SamplingOptions,
    rng: np.random.Generator,
    fp: Footprint,
) -> Sampled:
    """Sample mode on one slide (see the module docstring)."""
    s = _Slide(truth, shares, width, height, opts, fp)
    ds = opts.tissue_downsample
    tumor_map, normal_map = _candidate_maps(s, ds)
    window = region_window(width, height, fp)
    index = SpacingIndex(fp.length(opts.min_spacing))
    rejected: dict[str, Counter[str]] = {"tumor": Counter(), "normal": Counter()}
    tumor = _draw(
        rng,
        np.flatnonzero(tumor_map),
        tumor_map.shape,
        ds,
        opts.tumor_per_slide,
        _tumor_accept(s),
        index,
        window,
        rejected["tumor"],
    )
    normal = _draw(
        rng,
        np.flatnonzero(normal_map),
        normal_map.shape,
        ds,
        opts.normal_per_slide,
        _normal_accept(s),
        index,
        window,
        rejected["normal"],
    )
    flags = np.r_[np.ones(len(tumor), bool), np.zeros(len(normal), bool)]
    asked = {
        "tumor": opts.tumor_per_slide if truth.has_tumor else 0,
        "normal": opts.normal_per_slide,
    }
    return Sampled.of(
        np.array(tumor + normal, dtype=np.int64),
        flags,
        asked=asked,
        left_out={cls: _counts(c) for cls, c in rejected.items()},
    )


def _counts(counter: Counter[str]) -> dict[str, int]:
    return {k: v for k, v in sorted(counter.items()) if v}


def grid_positions(lo: int, hi: int, stride: float) -> np.ndarray:
    """Centres from ``lo`` every ``stride`` (rounded to whole px), plus ``hi`` when the last
    falls short of it."""
    if hi < lo:
        return np.zeros(0, dtype=np.int64)
    if float(stride).is_integer():
        pos = np.arange(lo, hi + 1, int(stride), dtype=np.int64)
    else:  # a stride at --mpp: level-0 px with a fraction
        steps = np.arange(math.floor((hi - lo) / stride) + 1)
        pos = np.unique(np.minimum(np.floor(lo + steps * stride + 0.5), hi).astype(np.int64))
    return pos if pos[-1] == hi else np.r_[pos, hi]


def grid_regions(
    truth: SlideTruth,
    shares: TissueShares,
    width: int,
    height: int,
    opts: SamplingOptions,
    fp: Footprint,
) -> Sampled:
    """Grid mode on one slide (see the module docstring)."""
    x_lo, y_lo, x_hi, y_hi = region_window(width, height, fp)
    stride = fp.length(opts.grid_stride)
    xs, ys = np.meshgrid(grid_positions(x_lo, x_hi, stride), grid_positions(y_lo, y_hi, stride))
    x, y = xs.ravel(), ys.ravel()
    share = shares.share(x, y, fp)
    some = share > 0
    x, y, share = x[some], y[some], share[some]
    rejected: Counter[str] = Counter()
    ok = share >= opts.min_tissue
    rejected["tissue share below --min-tissue"] += int((~ok).sum())
    excluded = truth.excluded(np.c_[x, y])
    rejected["centre in an exclusion area"] += int((ok & excluded).sum())
    ok &= ~excluded
    centres = np.c_[x[ok], y[ok]]
    return Sampled.of(
        centres,
        truth.tumor(centres),
        asked={},
        left_out={"grid": _counts(rejected)},
    )
