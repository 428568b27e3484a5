"""Low-resolution views of a slide: downsampled reads, thumbnails and the tissue mask.

The tissue mask follows NCRF's ``tissue_mask_gen.py`` (also what MONAI's tumor_detection
example feeds its masked inference), hardened against what real scans carry. At a low
resolution, a pixel is tissue when

- its HSV saturation is above the Otsu threshold of the saturation histogram (or a fixed
  ``threshold``), and never below ``min_saturation`` (so a blank slide, whose saturation is
  only noise, has no tissue instead of half of it; dust and air bubbles on glass are grey);
- it is not background in all of R, G and B (each channel above its own Otsu threshold);
- it is no artefact: every channel above ``rgb_min`` (black ink, black scan borders), and its
  hue outside ``ink_hues`` where saturated (blue and green ink: hematoxylin absorbs green at
  least as much as red, so stained tissue has R >= G and a hue of about 240-360 or 0-30
  degrees, blue ink G > R, green ink G largest); artefact pixels, grown by
  ``artefact_margin`` pixels (their fringes mix with tissue), are left out of every Otsu
  histogram too, so a large pen mark or border does not move the thresholds.

A morphological opening (``opening`` pixels; 3 x 3 square) then removes lines thinner than
the structuring element (a bubble's rim, a hair), and connected pieces smaller than
``min_area`` level-0 square pixels (dust) are dropped.

Geometry: mask pixel (r, c) covers level-0 pixels ``[c*ds_x, (c+1)*ds_x) x [r*ds_y, (r+1)*ds_y)``
where ``(ds_x, ds_y) = TissueMask.downsample``. Only numpy and scipy: no torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from etl.errors import OptionError
from etl.wsi.downsample import block_mean
from etl.wsi.reader import SlideReader

__all__ = [
    "INK_HUES",
    "MIN_AREA",
    "LowRes",
    "TissueMask",
    "artefact_pixels",
    "hue",
    "otsu_threshold",
    "read_low_res",
    "saturation",
    "thumbnail",
    "tissue_from_rgb",
    "tissue_mask",
]

STRIP_BYTES = 64 << 20  # bound on one strip read while downsampling a level
INK_HUES = (70.0, 240.0)  # degrees: saturated pixels with a hue in [lo, hi) are ink
MIN_AREA = 256 * 256  # level-0 square px: tissue pieces smaller than this are dropped (dust)


@dataclass(frozen=True)
class LowRes:
    """A downsampled RGB view: pixel (r, c) covers level-0 [c*ds_x, (c+1)*ds_x) x [r*ds_y, ...)."""

    rgb: np.ndarray  # (h, w, 3) uint8
    downsample: tuple[float, float]  # level-0 px per pixel (x, y)
    level: int  # pyramid level it was read from


def read_low_res(reader: SlideReader, downsample: float, *, coarser: bool = False) -> LowRes:
    """The slide at about ``downsample`` level-0 px per pixel.

    Reads the coarsest pyramid level whose downsample is at most ``downsample``, in strips of
    bounded size, then box-averages by the integer factor left (rounded down: the view is at
    least as fine as asked; ``coarser=True`` rounds up: at most as fine), rounding half up.
    Partial blocks at the right and bottom edges are averaged with white (``edge="white"``),
    so the view covers the whole slide.
    """
    if not downsample >= 1:
        raise OptionError(f"downsample must be >= 1, got {downsample}")
    w0, h0 = reader.dimensions
    level = max(
        (i for i, d in enumerate(reader.level_downsamples) if d <= downsample * 1.001), default=0
    )
    wl, hl = reader.level_dimensions[level]
    lds_x, lds_y = w0 / wl, h0 / hl
    ratio = downsample / reader.level_downsamples[level]
    f = max(1, int(math.ceil(ratio - 1e-6) if coarser else math.floor(ratio + 1e-6)))
    rows = max(f, (STRIP_BYTES // max(1, wl * 3)) // f * f)  # strip height, whole blocks
    step = reader.level_downsamples[level]
    parts = []
    for ly in range(0, hl, rows):
        h = min(rows, hl - ly)
        strip = reader.read_region(0, round(ly * step), level, wl, h)
        parts.append(block_mean(strip, f, "white") if f > 1 else strip)
    return LowRes(np.concatenate(parts, axis=0), (lds_x * f, lds_y * f), level)


def thumbnail(reader: SlideReader, max_side: int = 2048) -> LowRes:
    """A whole-slide view whose longest side is at most ``max_side`` px (or level 0 if smaller)."""
    w0, h0 = reader.dimensions
    return read_low_res(reader, max(1.0, max(w0, h0) / max_side), coarser=True)


def _max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over the channels (element-wise: a reduce over an axis of 3 is
    several times slower)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of uint8 RGB, float32 in [0, 1] (0 where max is 0)."""
    hi8, lo8 = _max_min(rgb)
    hi = hi8.astype(np.float32)
    sat: np.ndarray = np.divide(hi - lo8, hi, out=np.zeros_like(hi), where=hi8 > 0)
    return sat


def hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue of uint8 RGB (any shape (..., 3)) in degrees, float32 in [0, 360) (0 where the
    pixel is grey)."""
    hi, lo = _max_min(rgb)
    r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
    span = np.where(hi > lo, hi.astype(np.float32) - lo, np.float32(1))
    h = np.where(hi == rgb[..., 0], (g - b) / span, (r - g) / span + 4)
    h = np.where((hi == rgb[..., 1]) & (hi != rgb[..., 0]), (b - r) / span + 2, h)
    out: np.ndarray = (h * np.float32(60)) % np.float32(360)
    return out


def otsu_threshold(
    values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0, 1)
) -> float:
    """Otsu's threshold: the histogram split that maximises the between-class variance.

    Returns the upper edge of the last bin of the lower class (values above it are the upper
    class), as scikit-image's ``threshold_otsu`` does up to the bin-centre convention.
    """
    if values.dtype == np.uint8 and bins == 256 and tuple(value_range) == (0, 256):
        hist, edges = np.bincount(values.ravel(), minlength=256), np.arange(257.0)  # same, faster
    else:
        hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return float(value_range[0])
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def artefact_pixels(
    rgb: np.ndarray,
    *,
    rgb_min: int = 50,
    ink_hues: tuple[float, float] | None = INK_HUES,
    ink_saturation: float = 0.1,
    margin: int = 1,
    sat: np.ndarray | None = None,
) -> np.ndarray:
    """Bool mask of what is not tissue whatever its saturation: dark pixels (any channel at
    most ``rgb_min``), saturated (> ``ink_saturation``) pixels with a hue in ``ink_hues``
    (None: no ink rule), both grown by ``margin`` pixels. ``sat``: ``saturation(rgb)`` if
    already computed."""
    out: np.ndarray = _max_min(rgb)[1] <= rgb_min
    if ink_hues is not None:
        sat = saturation(rgb) if sat is None else sat
        coloured = sat > ink_saturation  # hue only where it means something
        h = hue(rgb[coloured])
        out[coloured] |= (h >= ink_hues[0]) & (h < ink_hues[1])
    if margin > 0 and out.any():
        out = ndimage.binary_dilation(out, np.ones((3, 3), bool), iterations=margin)
    return out


def tissue_from_rgb(
    rgb: np.ndarray,
    *,
    threshold: float | None = None,
    min_saturation: float = 0.05,
    rgb_min: int = 50,
    ink_hues: tuple[float, float] | None = INK_HUES,
    ink_saturation: float = 0.1,
    artefact_margin: int = 1,
    opening: int = 1,
) -> tuple[np.ndarray, float]:
    """(bool tissue mask, saturation threshold used) of a low-resolution uint8 RGB image.

    The rules are the module's; ``opening`` = 0 and ``artefact_margin`` = 0 with
    ``ink_hues=None`` keep only NCRF's (Otsu thresholds then skip dark pixels only).
    """
    sat = saturation(rgb)
    artefact = artefact_pixels(
        rgb,
        rgb_min=rgb_min,
        ink_hues=ink_hues,
        ink_saturation=ink_saturation,
        margin=artefact_margin,
        sat=sat,
    )
    valid = ~artefact
    thr = otsu_threshold(sat[valid]) if threshold is None else float(threshold)
    thr = max(thr, min_saturation)
    tissue = (sat > thr) & valid
    background = np.ones(rgb.shape[:2], dtype=bool)
    for c in range(3):
        channel = rgb[..., c]
        background &= channel > otsu_threshold(channel[valid], value_range=(0, 256))
    tissue &= ~background
    if opening > 0 and tissue.any():  # keep the pieces with a part thicker than the opening
        labels, n = ndimage.label(tissue)
        thick = ndimage.binary_opening(tissue, np.ones((3, 3), bool), iterations=opening)
        keep = np.zeros(n + 1, bool)
        keep[labels[thick]] = True
        keep[0] = False
        tissue = keep[labels]
    return tissue, thr


@dataclass(frozen=True)
class TissueMask:
    """Bool tissue mask; pixel (r, c) covers level-0 [c*ds_x, (c+1)*ds_x) x [r*ds_y, (r+1)*ds_y)."""

    mask: np.ndarray
    downsample: tuple[float, float]
    level: int
    threshold: float

    @property
    def fraction(self) -> float:
        """Share of the slide (mask pixels) that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def any_in_cells(self, stride: float, shape: tuple[int, int]) -> np.ndarray:
        """(rows, cols) bool: does cell (i, j), level-0 ``[j*stride, (j+1)*stride)`` x
        ``[i*stride, (i+1)*stride)``, overlap any tissue pixel? (summed-area table, exact)."""
        rows, cols = shape
        h, w = self.mask.shape
        table = np.zeros((h + 1, w + 1), dtype=np.int64)
        table[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        dsx, dsy = self.downsample

        def bounds(n: int, ds: float, size: int) -> tuple[np.ndarray, np.ndarray]:
            edges = np.arange(n + 1) * float(stride) / ds
            lo = np.clip(np.floor(edges[:-1] + 1e-9).astype(np.int64), 0, size)
            hi = np.clip(np.ceil(edges[1:] - 1e-9).astype(np.int64), 0, size)
            return lo, np.maximum(hi, lo)

        r0, r1 = bounds(rows, dsy, h)
        c0, c1 = bounds(cols, dsx, w)
        total = (
            table[r1[:, None], c1[None, :]]
            - table[r0[:, None], c1[None, :]]
            - table[r1[:, None], c0[None, :]]
            + table[r0[:, None], c0[None, :]]
        )
        cells: np.ndarray = total > 0
        return cells

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue at level-0 points (x, y) (False outside the slide)."""
        c = np.floor(np.asarray(x, np.float64) / self.downsample[0]).astype(np.int64)
        r = np.floor(np.asarray(y, np.float64) / self.downsample[1]).astype(np.int64)
        h, w = self.mask.shape
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out = np.zeros(np.shape(c), dtype=bool)
        out[inside] = self.mask[r[inside], c[inside]]
        return out


def tissue_mask(
    reader: SlideReader,
    *,
    downsample: float = 32.0,
    threshold: float | None = None,
    min_saturation: float = 0.05,
    rgb_min: int = 50,
    min_area: float = MIN_AREA,
    ink_hues: tuple[float, float] | None = INK_HUES,
    ink_saturation: float = 0.1,
    artefact_margin: int = 1,
    opening: int = 1,
) -> TissueMask:
    """Tissue mask of a slide at about ``downsample`` level-0 px per mask pixel.

    ``threshold``: fixed saturation threshold in [0, 1] instead of Otsu's. ``min_area``:
    drop connected tissue pieces smaller than this many level-0 square pixels. The other
    rules are ``tissue_from_rgb``'s (see the module docstring).
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise OptionError(f"tissue threshold {threshold}: use a saturation in [0, 1]")
    low = read_low_res(reader, downsample)
    mask, thr = tissue_from_rgb(
        low.rgb,
        threshold=threshold,
        min_saturation=min_saturation,
        rgb_min=rgb_min,
        ink_hues=ink_hues,
        ink_saturation=ink_saturation,
        artefact_margin=artefact_margin,
        opening=opening,
    )
    if min_area > 0 and mask.any():
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * low.downsample[0] * low.downsample[1]
        keep = sizes >= min_area
        keep[0] = False
        mask = keep[labels]
    return TissueMask(mask=mask, downsample=low.downsample, level=low.level, threshold=thr)
