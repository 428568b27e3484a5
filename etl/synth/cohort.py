"""Synthetic H&E-looking whole-slide images with ground truth and a coordinate file.

``synth_cohort`` writes a small Camelyon16-like cohort that OpenSlide opens as real pyramids::

    out/training/images/tumor_001.tif, normal_001.tif, ...   (.svs when vendor='aperio')
    out/training/annotations/tumor_001.xml                   ASAP XML tumor polygons (level 0)
    out/training/masks/tumor_001_mask.tif                    low-resolution tumor mask
    out/dataset_0.json                                       MONAI datalist {"training", "validation"}
    out/dataset_0.csv, dataset_0_training.csv, dataset_0_validation.csv
    out/synth.json                                           parameters and per-slide facts

Slides: tiled (256 px) JPEG pyramidal TIFF, each level its own top-level page (OpenSlide ignores
SubIFDs), each level ``downsample`` (2 or 4) times smaller until the longest side is <= 1024 px;
XResolution/YResolution in pixels per centimetre give the mpp. ``vendor='aperio'`` writes the
Aperio SVS layout instead: an ImageDescription starting with "Aperio Image Library" holding
``|AppMag = ..|MPP = ..|``, and a stripped thumbnail as the second page (tifffile's SVS reader
expects it there; OpenSlide lists it as the associated image "thumbnail").

Picture: tissue blobs (30-55 % of the slide) on glass, pink eosin stroma with fibres and purple
hematoxylin nuclei, mixed through the Beer-Lambert law; tumor lesions have denser, larger, darker
nuclei. Sizes are physical (micrometres) and scale with ``mpp``. Every tile is rendered on its own
from a per-slide ``SlideScene`` (low-resolution fields plus periodic textures sampled at global
coordinates), so slides are written tile by tile without holding level 0 in memory, and
``render_slide`` gives the exact level-0 array that was JPEG-compressed (for tests).

Ground truth: lesions are irregular star-shaped polygons clipped to tissue, coordinates rounded
to 2 decimals (the XML precision), so the XML reproduces them exactly. Labels are decided on
these polygons (``etl.wsi.annotations.points_in_polygons``): a grid cell is tumor when its centre is
inside a polygon. The mask is a uint8 TIFF (1 = tumor, 0 = not) at ``MASK_DOWNSAMPLE`` (16):
pixel (i, j) is 1 when the level-0 point ((j + 0.5) * 16, (i + 0.5) * 16) is inside a polygon;
its ImageDescription is JSON ``{"downsample": 16, "level0_width": W, "level0_height": H, ...}``
(read it back with ``read_mask``). Normal slides have neither XML nor mask.

Regions: ``location`` = [y, x] centre at level 0; the region spans
``[x - region_size // 2, x - region_size // 2 + region_size)`` (same in y) and lies inside the
slide; labels list the ``grid x grid`` cells column by column (k = grid * col + row). Centres
are on tissue; on tumor slides half are in or at the border of lesions. Train/validation split
is by slide. Everything is deterministic: slide i (0-based, synth.json order) uses the seed
``(seed, i)``; the same options give byte-identical files.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFilter

from etl.errors import OptionError
from etl.wsi.annotations import points_in_polygons, read_asap_xml, write_asap_xml

__all__ = [
    "MASK_DOWNSAMPLE", "SlideScene", "SynthCohort", "SynthSlide", "box_downsample", "make_scene",
    "points_in_polygons", "pyramid_dims", "read_asap_xml", "read_mask", "region_labels",
    "render_slide", "sample_regions", "synth_cohort", "tumor_mask", "write_mask", "write_slide",
]

TILE = 256
MASK_DOWNSAMPLE = 16
MAX_TOP_SIDE = 1024  # the pyramid stops once the longest side is at most this
TEXTURE_PERIODS = (1024, 1152)  # two nuclei layers with these periods repeat only every 9216 px
FIELD_CELLS = 256  # low-resolution field: about this many cells along the longest side
MIN_LESION_UM = 275.0  # Camelyon16: smaller lesions are isolated tumor cells

# Ruifrok & Johnston optical-density vectors (R, G, B) of hematoxylin and eosin.
_H_VEC = np.array([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11])
_GLASS_RGB = np.array([243.0, 241.0, 245.0])


@dataclass(frozen=True)
class _NucleiStyle:
    """Look of one tissue class; sizes in micrometres."""

    per_um2: float  # nuclei per square micrometre
    radius_um: tuple[float, float]  # semi-major axis range
    elongation: float  # largest major/minor axis ratio
    stain: tuple[float, float]  # hematoxylin optical density range
    clustering: float  # 0 = uniform positions, 1 = strongly clustered
    eosin: float  # eosin density of the surrounding stroma / cytoplasm


_NORMAL = _NucleiStyle(1 / 140, (2.0, 3.4), 2.0, (0.55, 0.85), 0.5, 0.50)
_TUMOR = _NucleiStyle(1 / 60, (3.0, 5.0), 1.5, (0.80, 1.15), 0.8, 0.40)


@dataclass
class SynthSlide:
    """One generated slide and its ground truth (paths are absolute)."""

    name: str
    path: Path
    width: int
    height: int
    mpp: float
    has_tumor: bool
    xml: Path | None
    mask: Path | None


@dataclass
class SynthCohort:
    """What ``synth_cohort`` wrote; ``csv_paths`` has keys 'all', 'training', 'validation'."""

    root: Path
    slides: list[SynthSlide]
    dataset_json: Path
    csv_paths: dict[str, Path]


# ----------------------------------------------------------------------------- noise helpers


def _fft_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Periodic Gaussian-smoothed white noise (zero mean, unit std, float32)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    ky = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    gain = np.exp(np.float32(-2.0 * (np.pi * sigma) ** 2) * (kx**2 + ky**2))
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=shape)
    field -= field.mean()
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Non-periodic smooth noise: periodic noise on a doubled grid, cropped."""
    big = _fft_noise(rng, (2 * shape[0], 2 * shape[1]), sigma)[: shape[0], : shape[1]]
    return (big - big.mean()) / (big.std() + 1e-12)


def _nuclei_layer(rng: np.random.Generator, period: int, style: _NucleiStyle, mpp: float,
                  share: float) -> tuple[np.ndarray, np.ndarray]:
    """Periodic hematoxylin density of ``share`` of a class's nuclei, and per-pixel offsets.

    Returns ``(density (T, T) float32, offsets (T, T, 2) int16)``: the offset (dy, dx) from
    each pixel to the centre of the nucleus that covers it (0 where none), so a renderer can
    decide per nucleus (at its centre) whether it lies in a lesion and never cut one in two.
    """
    area_um2 = (period * mpp) ** 2
    count = max(1, int(round(area_um2 * style.per_um2 * share)))
    # Clustered positions: thin uniform candidates by a smooth periodic density (coarse grid).
    coarse = 8 if period % 8 == 0 else 1
    density = _fft_noise(rng, (period // coarse, period // coarse), 18.0 / mpp / coarse)
    keep_p = 1.0 / (1.0 + np.exp(-2.5 * style.clustering * density))
    cand = rng.integers(0, period, size=(count * 4, 2))
    accept = rng.random(len(cand)) < keep_p[cand[:, 0] // coarse, cand[:, 1] // coarse]
    centres = cand[accept][:count]
    stain = rng.uniform(*style.stain, size=len(centres)).astype(np.float32)
    n_protos = 32
    proto_of = rng.integers(0, n_protos, size=len(centres))
    soft = max(0.8, 0.35 / mpp)  # edge softness in pixels (about a scanner's blur)
    flats, vals, offs = [], [], []
    for p in range(n_protos):
        a = rng.uniform(*style.radius_um) / mpp
        b = a / rng.uniform(1.0, style.elongation)
        theta = rng.uniform(0, np.pi)
        reach = int(math.ceil(1.25 * a + 2 * soft))
        dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        phi = np.arctan2(v, u)
        outline = 1.0 + sum(rng.normal(0, 0.06) * np.cos(k * phi + rng.uniform(0, 6.3))
                            for k in (2, 3, 5))  # irregular, pleomorphic border
        dist = np.sqrt((u / a) ** 2 + (v / b) ** 2) / outline  # 1 on the nuclear border
        prof = np.clip((1.0 - dist) * b / soft + 0.5, 0.0, 1.0)
        clumps = _fft_noise(rng, dist.shape, max(0.8, 0.5 / mpp))  # chromatin texture
        chromatin = 0.8 + 0.2 * np.clip(clumps, -2, 2) / 2
        prof *= (0.8 + 0.2 * np.clip(dist, 0, 1)) * chromatin  # darker rim, grainy inside
        keep = prof > 0.02
        dy, dx, prof = dy[keep], dx[keep], prof[keep].astype(np.float32)
        sel = np.flatnonzero(proto_of == p)
        if sel.size == 0:
            continue
        cy, cx = centres[sel, 0], centres[sel, 1]
        flats.append((((cy[:, None] + dy) % period) * period + (cx[:, None] + dx) % period).ravel())
        vals.append((stain[sel, None] * prof).ravel())
        offs.append(np.broadcast_to(np.stack([-dy, -dx], -1), (sel.size, dy.size, 2)).reshape(-1, 2))
    flat, val, off = np.concatenate(flats), np.concatenate(vals), np.concatenate(offs)
    field = np.zeros(period * period, np.float32)
    np.maximum.at(field, flat, val)  # the darkest nucleus wins each pixel
    win = val == field[flat]  # (on exact ties the later nucleus's offset is kept)
    offsets = np.zeros((period * period, 2), np.int16)
    offsets[flat[win]] = off[win]
    return field.reshape(period, period), offsets.reshape(period, period, 2)


@dataclass(frozen=True)
class _Textures:
    """Periodic per-slide textures, channel first, wrap-padded by a tile (any tile is a slice).

    Sample a texture of period T at level-0 (y, x) as ``tex[:, (y+oy) % T, (x+ox) % T]``.
    """

    a: np.ndarray  # (4, T1+TILE, T1+TILE) float32 nuclei layer 1 normal, tumor; patchiness; vacuoles
    a_off: np.ndarray  # (4, ...) int16 offsets to the nucleus centre: normal dy, dx; tumor dy, dx
    b: np.ndarray  # (6, T2+TILE, T2+TILE) nuclei layer 2 normal, tumor; fibres; fine; edge; vacuoles
    b_off: np.ndarray  # (4, ...) int16, as a_off
    grain: np.ndarray  # (T2+TILE, T2+TILE) fine grain, unit std
    reach: int  # largest nucleus offset, in pixels


def _wrap_pad(stack: np.ndarray) -> np.ndarray:
    """(C, T, T) -> (C, T+TILE, T+TILE), periodic continuation, contiguous."""
    return np.ascontiguousarray(np.pad(stack, [(0, 0), (0, TILE), (0, TILE)], mode="wrap"))


def _make_textures(rng: np.random.Generator, mpp: float) -> _Textures:
    t1, t2 = TEXTURE_PERIODS
    an, an_off = _nuclei_layer(rng, t1, _NORMAL, mpp, 0.5)
    at, at_off = _nuclei_layer(rng, t1, _TUMOR, mpp, 0.5)
    bn, bn_off = _nuclei_layer(rng, t2, _NORMAL, mpp, 0.5)
    bt, bt_off = _nuclei_layer(rng, t2, _TUMOR, mpp, 0.5)
    # Stroma fibres: ridges of band-limited noise (where it crosses zero) look like collagen.
    fibres = np.clip(1.0 - 1.6 * np.abs(_fft_noise(rng, (t2, t2), 1.6 / mpp)), 0, 1) ** 2
    fine = _fft_noise(rng, (t2, t2), 0.6 / mpp)
    edge = _fft_noise(rng, (t2, t2), 6.0 / mpp)
    # Patchiness and vacuoles mix both periods, so they repeat only every 9216 px.
    patchy = _fft_noise(rng, (t1, t1), 10.0 / mpp)
    hole_a = _fft_noise(rng, (t1, t1), 12.0 / mpp)
    hole_b = _fft_noise(rng, (t2, t2), 12.0 / mpp)
    a = _wrap_pad(np.stack([an, at, patchy, hole_a]).astype(np.float32))
    b = _wrap_pad(np.stack([bn, bt, fibres, fine, edge, hole_b]).astype(np.float32))
    grain = _wrap_pad(_fft_noise(rng, (t2, t2), 1.0)[None])[0]
    reach = int(max(np.abs(o).max() for o in (an_off, at_off, bn_off, bt_off)))
    a_off = _wrap_pad(np.concatenate([an_off, at_off], -1).transpose(2, 0, 1))
    b_off = _wrap_pad(np.concatenate([bn_off, bt_off], -1).transpose(2, 0, 1))
    return _Textures(a=a, a_off=a_off, b=b, b_off=b_off, grain=grain, reach=reach)


# ----------------------------------------------------------------------------- the scene


@dataclass
class SlideScene:
    """Everything needed to render any tile of one synthetic slide, deterministically."""

    width: int
    height: int
    mpp: float
    cell: float  # level-0 pixels per low-resolution field cell
    fields: np.ndarray  # (3, gh, gw) float32: tissue score, hematoxylin gain, eosin gain
    threshold: float  # tissue where the score exceeds this
    score_per_px: float  # score change per level-0 pixel near the tissue border
    polygons: list[np.ndarray]  # tumor polygons, (N, 2) float (x, y), level 0
    textures: _Textures
    offset: tuple[int, int]  # global texture offset (y, x)
    h_vec: np.ndarray
    e_vec: np.ndarray
    bg_od: np.ndarray

    @property
    def _ragged_px(self) -> float:
        return 10.0 / self.mpp  # amplitude of the tissue-border raggedness

    @property
    def _soft_px(self) -> float:
        return max(1.0, 1.5 / self.mpp)  # width of the tissue border blend

    def tissue_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate signed distance (px) to the tissue border; > 0 on tissue."""
        gh, gw = self.fields.shape[1:]
        u = np.clip(np.asarray(x, float) / self.cell - 0.5, 0, gw - 1.000001)
        v = np.clip(np.asarray(y, float) / self.cell - 0.5, 0, gh - 1.000001)
        i, j = v.astype(int), u.astype(int)
        fy, fx = v - i, u - j
        s = self.fields[0]
        val = ((s[i, j] * (1 - fx) + s[i, j + 1] * fx) * (1 - fy)
               + (s[i + 1, j] * (1 - fx) + s[i + 1, j + 1] * fx) * fy)
        return (val - self.threshold) / self.score_per_px

    def _interp(self, start: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Bilinear interpolation along one axis: field indices and weights of pixels start..+n."""
        u = (np.arange(start, start + n) + 0.5) / self.cell - 0.5
        idx = np.clip(np.floor(u).astype(np.int64), 0, size - 2)
        return idx, np.clip(u - idx, 0.0, 1.0).astype(np.float32)

    def _tumor_raster(self, x0: int, y0: int, h: int, w: int) -> Image.Image | None:
        """Lesion pixels (255) of the window at (x0, y0), size (h, w), or None if it has none.

        PIL rasterisation, for looks only: labels and masks use the exact polygon test.
        """
        img = None
        for poly in self.polygons:
            (xmin, ymin), (xmax, ymax) = poly.min(axis=0), poly.max(axis=0)
            if xmax < x0 or ymax < y0 or xmin >= x0 + w or ymin >= y0 + h:
                continue
            if img is None:
                img = Image.new("L", (w, h), 0)
                draw = ImageDraw.Draw(img)
            draw.polygon([(x - x0 - 0.5, y - y0 - 0.5) for x, y in poly], fill=255)
        return img

    def render_tile(self, x0: int, y0: int, h: int = TILE, w: int = TILE) -> np.ndarray:
        """Render the (h, w, 3) uint8 RGB tile whose top-left level-0 pixel is (x0, y0)."""
        if not (0 < h <= TILE and 0 < w <= TILE):
            raise ValueError(f"tile size {h}x{w}: at most {TILE}x{TILE}")
        tex = self.textures
        gh, gw = self.fields.shape[1:]
        iy, fy = self._interp(y0, h, gh)
        ix, fx = self._interp(x0, w, gw)
        oy, ox = self.offset
        t1, t2 = TEXTURE_PERIODS
        ya, xa = (y0 + oy) % t1, (x0 + ox) % t1
        yb, xb = (y0 + oy) % t2, (x0 + ox) % t2
        grain = tex.grain[yb : yb + h, xb : xb + w]
        od = [self.bg_od[c] + 0.012 * grain for c in range(3)]  # planar R, G, B
        win = self.fields[:, iy[0] : iy[-1] + 2, ix[0] : ix[-1] + 2]
        reach = 4.0 * self._ragged_px + self._soft_px
        if (win[0].max() - self.threshold) / self.score_per_px + reach > 0:  # tissue possible
            # Bilinear upsampling by gathers (tiny BLAS matmuls stall on busy machines).
            iy, ix = iy - iy[0], ix - ix[0]
            rows = win[:, iy] * (1 - fy)[:, None] + win[:, iy + 1] * fy[:, None]
            f = rows[:, :, ix] * (1 - fx) + rows[:, :, ix + 1] * fx  # (3, h, w)
            a = tex.a[:, ya : ya + h, xa : xa + w]
            b = tex.b[:, yb : yb + h, xb : xb + w]
            dist = (f[0] - self.threshold) / self.score_per_px + self._ragged_px * b[4]
            vacuole = np.clip(((a[3] + b[5]) * 0.7071 - 2.4) / 0.05, 0.0, 1.0)
            alpha = np.clip(dist / self._soft_px + 0.5, 0.0, 1.0) * (1.0 - vacuole)
            fib, fine, patchy = b[2], b[3], a[2]
            eos = _NORMAL.eosin * np.maximum(0.45 + 0.55 * fib + 0.15 * patchy + 0.08 * fine, 0.05)
            m = tex.reach
            raster = self._tumor_raster(x0 - m, y0 - m, h + 2 * m, w + 2 * m)
            lesion = None if raster is None else np.asarray(raster) > 127
            tumor_share = None  # how much of the stroma is tumor stroma
            if lesion is None or not lesion.any():
                hema = np.maximum(a[0], b[0])
                base = 0.07
            elif lesion.all():  # well inside a lesion
                hema = np.maximum(a[1], b[1])
                tumor_share = 1.0
                base = 0.12
            else:
                # A nucleus belongs to the lesion when its centre does: none is cut in two.
                yy, xx = np.ogrid[m : m + h, m : m + w]
                a_off = tex.a_off[:, ya : ya + h, xa : xa + w]
                b_off = tex.b_off[:, yb : yb + h, xb : xb + w]

                def centre_in(off: np.ndarray) -> np.ndarray:
                    return lesion[yy + off[0], xx + off[1]]

                hema = np.maximum.reduce([
                    np.where(centre_in(a_off[0:2]), 0.0, a[0]),
                    np.where(centre_in(b_off[0:2]), 0.0, b[0]),
                    np.where(centre_in(a_off[2:4]), a[1], 0.0),
                    np.where(centre_in(b_off[2:4]), b[1], 0.0),
                ])
                # Stroma changes over about a nucleus' width at the lesion border.
                near = np.asarray(raster.filter(ImageFilter.BoxBlur(m)), np.float32)
                tumor_share = near[m : m + h, m : m + w] / np.float32(255.0)
                base = 0.07 + 0.05 * tumor_share
            if tumor_share is not None:
                eos_t = _TUMOR.eosin * np.maximum(0.70 + 0.30 * fib + 0.10 * patchy + 0.08 * fine,
                                                  0.05)
                eos = eos + tumor_share * (eos_t - eos)
            hema = alpha * (hema * (0.85 + 0.15 * grain) + base) * f[1]
            eos = alpha * eos * f[2]
            od = [od[c] + hema * self.h_vec[c] + eos * self.e_vec[c] for c in range(3)]
        out = np.empty((h, w, 3), np.uint8)
        for c in range(3):  # Beer-Lambert: transmitted light per channel
            v = np.exp(-od[c])
            v *= np.float32(255.0)
            v += np.float32(0.5)
            np.minimum(v, np.float32(255.0), out=v)
            out[..., c] = v  # truncating cast: rounded since v >= 0.5
        return out

    def render(self) -> np.ndarray:
        """The whole level-0 image (height, width, 3) uint8, assembled from ``render_tile``."""
        out = np.empty((self.height, self.width, 3), dtype=np.uint8)
        for y0 in range(0, self.height, TILE):
            for x0 in range(0, self.width, TILE):
                tile = self.render_tile(x0, y0)
                out[y0 : y0 + TILE, x0 : x0 + TILE] = tile[: self.height - y0, : self.width - x0]
        return out


def _tissue_fields(rng: np.random.Generator, width: int, height: int
                   ) -> tuple[float, np.ndarray, float, float]:
    """Low-resolution tissue score, stain gains, threshold and score slope per pixel."""
    cell = max(width, height) / FIELD_CELLS
    gh, gw = int(math.ceil(height / cell)) + 2, int(math.ceil(width / cell)) + 2
    yc = (np.arange(gh) + 0.5) * cell
    xc = (np.arange(gw) + 0.5) * cell
    side = max(width, height)
    X, Y = np.meshgrid(xc / side, yc / side)
    score = np.zeros((gh, gw))
    for _ in range(int(rng.integers(2, 5))):  # a few irregular tissue pieces
        cx, cy = rng.uniform(0.2, 0.8) * width / side, rng.uniform(0.2, 0.8) * height / side
        sx, sy = rng.uniform(0.08, 0.22, size=2) * min(width, height) / side * 1.6
        th = rng.uniform(0, np.pi)
        u = (X - cx) * math.cos(th) + (Y - cy) * math.sin(th)
        v = -(X - cx) * math.sin(th) + (Y - cy) * math.cos(th)
        score += rng.uniform(0.6, 1.0) * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    score += 0.30 * _smooth_noise(rng, (gh, gw), 0.07 * FIELD_CELLS)
    score += 0.10 * _smooth_noise(rng, (gh, gw), 0.02 * FIELD_CELLS)
    # Keep a margin of glass along the slide border (a wavy one: no straight tissue edges).
    border = np.minimum(np.minimum(X, width / side - X), np.minimum(Y, height / side - Y))
    border = border + 0.015 * _smooth_noise(rng, (gh, gw), 0.03 * FIELD_CELLS)
    taper = np.clip(border / 0.06, 0.0, 1.0)
    score = score * taper - 2.0 * (1.0 - taper)
    inside = (yc[:, None] < height) & (xc[None, :] < width)
    coverage = rng.uniform(0.30, 0.55)
    threshold = float(np.quantile(score[inside], 1.0 - coverage))
    gy, gx = np.gradient(score)
    slope = np.hypot(gy, gx) / cell
    near = np.abs(score - threshold) < 0.1 * score[inside].std()
    score_per_px = float(np.median(slope[near])) if near.any() else float(np.median(slope))
    gains = 1.0 + 0.10 * np.stack([_smooth_noise(rng, (gh, gw), 0.05 * FIELD_CELLS),
                                   _smooth_noise(rng, (gh, gw), 0.05 * FIELD_CELLS)])
    fields = np.concatenate([score[None], gains]).astype(np.float32)
    return cell, fields, threshold, max(score_per_px, 1e-9)


def _polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of an (N, 2) polygon."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _lesion(rng: np.random.Generator, scene: SlideScene, centre: np.ndarray, radius: float,
            n_vertices: int = 48) -> np.ndarray:
    """Irregular star-shaped polygon around ``centre``, clipped to tissue and the slide."""
    theta = np.sort(rng.uniform(0, 2 * np.pi, n_vertices))
    wobble = np.zeros(n_vertices)
    for k in range(1, 6):  # a few smooth harmonics make an irregular outline
        wobble += rng.normal(0, 0.22 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    target = radius * np.clip(1.0 + wobble, 0.35, 1.8)
    # March along each ray; stop before leaving tissue (10 um margin) or the slide.
    steps = np.linspace(0.0, 1.0, 65)[None, :] * target[:, None]
    xs = centre[0] + steps * np.cos(theta)[:, None]
    ys = centre[1] + steps * np.sin(theta)[:, None]
    ok = ((scene.tissue_distance(xs, ys) > 10.0 / scene.mpp)
          & (xs >= 1) & (xs <= scene.width - 1) & (ys >= 1) & (ys <= scene.height - 1))
    first_bad = np.where(ok.all(axis=1), steps.shape[1], np.argmin(ok, axis=1))
    reach = steps[np.arange(n_vertices), np.maximum(first_bad - 1, 0)]
    r = np.maximum(reach, 0.1 * target)
    poly = np.stack([centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta)], axis=1)
    poly[:, 0] = np.clip(poly[:, 0], 1, scene.width - 1)
    poly[:, 1] = np.clip(poly[:, 1], 1, scene.height - 1)
    return np.round(poly, 2)  # the XML precision: XML and labels agree exactly


def _tumor_polygons(rng: np.random.Generator, scene: SlideScene) -> list[np.ndarray]:
    """1-3 lesions mostly > 275 um (as far as the slide allows), sometimes a small extra one."""
    mpp = scene.mpp
    cap = 0.2 * min(scene.width, scene.height)  # keep lesions well inside small slides
    cand = rng.uniform((0, 0), (scene.width, scene.height), size=(4000, 2))
    deep = cand[scene.tissue_distance(cand[:, 0], cand[:, 1]) > 30.0 / mpp]
    if len(deep) == 0:
        deep = cand[scene.tissue_distance(cand[:, 0], cand[:, 1]) > 0]
    if len(deep) == 0:
        return []
    wanted = int(rng.integers(1, 4))
    polys: list[np.ndarray] = []
    placed: list[tuple[np.ndarray, float]] = []

    def try_place(r_um: tuple[float, float], min_diam_um: float, tries: int) -> None:
        for _ in range(tries):
            radius = min(rng.uniform(*r_um) / mpp, cap)
            c = deep[rng.integers(len(deep))]
            poly = _lesion(rng, scene, c, radius)
            extent = float(np.hypot(*(poly - c).T).max())
            if any(np.hypot(*(c - pc)) < extent + pe for pc, pe in placed):
                continue  # lesions never overlap
            diam_um = 2.0 * math.sqrt(_polygon_area(poly) / math.pi) * mpp
            if diam_um < min(min_diam_um, 1.4 * cap * mpp):
                continue
            polys.append(poly)
            placed.append((c, extent))
            return

    for _ in range(wanted):
        try_place((180.0, 900.0), MIN_LESION_UM, 40)
    if not polys:  # small slide or little tissue: accept any lesion
        try_place((180.0, 900.0), 0.0, 40)
    if rng.random() < 0.3:  # an isolated-tumor-cell cluster (< 275 um), as in Camelyon16
        try_place((30.0, 100.0), 0.0, 20)
    return polys


def make_scene(width: int, height: int, *, mpp: float = 0.243, has_tumor: bool = True,
               seed: int | Sequence[int] = 0) -> SlideScene:
    """Draw a slide's tissue, stain and lesions (cheap; pixels are rendered per tile later)."""
    rng = np.random.default_rng(seed)
    textures = _make_textures(rng, mpp)
    cell, fields, threshold, slope = _tissue_fields(rng, width, height)
    gain = rng.uniform(0.85, 1.15, size=2)  # slide-to-slide staining strength
    fields[1] *= gain[0]
    fields[2] *= gain[1]
    h_vec = _H_VEC + rng.normal(0, 0.03, 3)
    e_vec = _E_VEC + rng.normal(0, 0.03, 3)
    scene = SlideScene(
        width=width, height=height, mpp=mpp, cell=cell, fields=fields, threshold=threshold,
        score_per_px=slope, polygons=[], textures=textures,
        offset=(int(rng.integers(0, 1 << 20)), int(rng.integers(0, 1 << 20))),
        h_vec=(1.5 * h_vec / np.linalg.norm(h_vec)).astype(np.float32),
        e_vec=(e_vec / np.linalg.norm(e_vec)).astype(np.float32),
        bg_od=(-np.log(_GLASS_RGB / 255.0)).astype(np.float32),
    )
    if has_tumor:
        scene.polygons = _tumor_polygons(rng, scene)
    return scene


def render_slide(width: int, height: int, *, mpp: float = 0.243, has_tumor: bool = True,
                 seed: int | Sequence[int] = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Level-0 RGB array (height, width, 3) and tumor polygons of the slide ``write_slide`` writes."""
    scene = make_scene(width, height, mpp=mpp, has_tumor=has_tumor, seed=seed)
    return scene.render(), scene.polygons


# ----------------------------------------------------------------------------- writing


def box_downsample(img: np.ndarray, ds: int) -> np.ndarray:
    """Box-filter downsample of a uint8 image by ``ds`` (remainder rows/columns dropped), rounded.

    This is how each pyramid level is made from the one above it.
    """
    h, w = img.shape[0] // ds, img.shape[1] // ds
    acc = np.full((h, w) + img.shape[2:], ds * ds // 2, np.uint16)  # rounding offset
    for dy in range(ds):  # summing strided views is much faster than reshape + sum
        for dx in range(ds):
            acc += img[dy : h * ds : ds, dx : w * ds : ds]
    return (acc // (ds * ds)).astype(np.uint8)


def _app_mag(mpp: float) -> float:
    """Nominal objective power for an mpp (40x ~ 0.25 um/px)."""
    mags = [80.0, 40.0, 20.0, 10.0, 5.0, 2.5, 1.25]
    return min(mags, key=lambda m: abs(math.log(m * mpp / 10.0)))


def pyramid_dims(width: int, height: int, downsample: int) -> list[tuple[int, int]]:
    """(width, height) per level: divide by ``downsample`` until the longest side <= 1024."""
    dims = [(width, height)]
    while max(dims[-1]) > MAX_TOP_SIDE and min(dims[-1]) // downsample >= 1:
        w, h = dims[-1]
        dims.append((w // downsample, h // downsample))
    return dims


def write_slide(path: str | Path, scene: SlideScene, *, downsample: int = 2,
                vendor: str = "generic", jpeg_quality: int = 90) -> list[tuple[int, int]]:
    """Write the scene as a tiled JPEG pyramidal TIFF (or Aperio SVS); return level dims."""
    if downsample not in (2, 4):
        raise ValueError(f"downsample={downsample}: use 2 or 4")
    if vendor not in ("generic", "aperio"):
        raise ValueError(f"vendor={vendor!r}: use 'generic' or 'aperio'")
    path = Path(path)
    W, H = scene.width, scene.height
    dims = pyramid_dims(W, H, downsample)
    level1 = np.zeros((dims[1][1], dims[1][0], 3), np.uint8) if len(dims) > 1 else None

    def tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, H, TILE):
            for x0 in range(0, W, TILE):
                tile = scene.render_tile(x0, y0)
                if level1 is not None:  # build level 1 on the way, from exact pixels
                    small = box_downsample(tile[: H - y0, : W - x0], downsample)
                    ly, lx = y0 // downsample, x0 // downsample
                    level1[ly : ly + small.shape[0], lx : lx + small.shape[1]] = small
                yield tile

    aperio_head = "Aperio Image Library v12.0.16 \r\n"
    tags = f"|AppMag = {_app_mag(scene.mpp):g}|MPP = {scene.mpp:.4f}"
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": jpeg_quality},
                  resolutionunit="CENTIMETER", metadata=None)

    def resolution(w: int, h: int) -> tuple[float, float]:
        return 1e4 / (scene.mpp * W / w), 1e4 / (scene.mpp * H / h)  # pixels per cm

    bigtiff = W * H * 3 * 1.4 > 2**31  # JPEG is far smaller, but stay safe for huge slides
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        desc = None
        if vendor == "aperio":
            desc = (f"{aperio_head}{W}x{H} [0,0 {W}x{H}] ({TILE}x{TILE}) JPEG/RGB "
                    f"Q={jpeg_quality}{tags}|Filename = {path.stem}|Title = patchetl synthetic")
        tw.write(tiles(), shape=(H, W, 3), dtype=np.uint8, tile=(TILE, TILE),
                 resolution=resolution(W, H), description=desc, **common)
        level = level1
        if vendor == "aperio":  # real SVS: stripped thumbnail as the second page
            src = level if level is not None else scene.render()
            scale = min(1.0, 768 / max(src.shape[:2]))
            thumb = np.asarray(Image.fromarray(src).resize(
                (max(1, round(src.shape[1] * scale)), max(1, round(src.shape[0] * scale))),
                Image.Resampling.BOX))
            tw.write(thumb, rowsperstrip=16, resolution=resolution(thumb.shape[1], thumb.shape[0]),
                     description=f"{aperio_head}{W}x{H} -> {thumb.shape[1]}x{thumb.shape[0]} - {tags}",
                     **common)
        for w, h in dims[1:]:
            assert level is not None and level.shape[:2] == (h, w)
            desc = None
            if vendor == "aperio":
                desc = (f"{aperio_head}{W}x{H} [0,0 {W}x{H}] ({TILE}x{TILE}) -> {w}x{h} "
                        f"JPEG/RGB Q={jpeg_quality}")
            tw.write(level, tile=(TILE, TILE), resolution=resolution(w, h), description=desc,
                     subfiletype=1 if vendor == "generic" else 0, **common)
            level = box_downsample(level, downsample)
    return dims


def tumor_mask(polygons: Sequence[np.ndarray], width: int, height: int,
               downsample: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """uint8 mask (1 = tumor): pixel (i, j) tests the level-0 point ((j+.5)*ds, (i+.5)*ds)."""
    mh, mw = math.ceil(height / downsample), math.ceil(width / downsample)
    mask = np.zeros((mh, mw), np.uint8)
    for poly in polygons:  # only the pixels in each polygon's bounding box
        (xmin, ymin), (xmax, ymax) = poly.min(axis=0), poly.max(axis=0)
        j0, j1 = max(0, int(xmin // downsample) - 1), min(mw, int(xmax // downsample) + 2)
        i0, i1 = max(0, int(ymin // downsample) - 1), min(mh, int(ymax // downsample) + 2)
        jj, ii = np.meshgrid(np.arange(j0, j1), np.arange(i0, i1))
        pts = np.stack([(jj.ravel() + 0.5) * downsample, (ii.ravel() + 0.5) * downsample], axis=1)
        inside = points_in_polygons(pts, [poly]).reshape(ii.shape)
        mask[i0:i1, j0:j1] |= inside.astype(np.uint8)
    return mask


def write_mask(path: str | Path, mask: np.ndarray, *, downsample: int, width: int,
               height: int) -> None:
    """Write a tumor mask TIFF whose ImageDescription (JSON) records its level-0 downsample."""
    desc = json.dumps({"downsample": downsample, "level0_width": width, "level0_height": height,
                       "values": {"0": "normal", "1": "tumor"},
                       "pixel_centre": "pixel (i, j) = level-0 point ((j+0.5)*ds, (i+0.5)*ds)"})
    tifffile.imwrite(path, mask, photometric="minisblack", compression="zlib",
                     description=desc, metadata=None)


def read_mask(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a mask written by ``write_mask``: (uint8 mask, level-0 downsample)."""
    with tifffile.TiffFile(path) as tf:
        desc = tf.pages.first.description
        mask = tf.pages.first.asarray()
    try:
        ds = int(json.loads(desc)["downsample"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: mask TIFF without a JSON description holding 'downsample'; "
                         "write it with etl.synth.cohort.write_mask") from None
    return mask, ds


# ----------------------------------------------------------------------------- regions


def region_labels(centres_xy: np.ndarray, polygons: Sequence[np.ndarray], region_size: int,
                  grid: int) -> np.ndarray:
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
    return rowmajor.transpose(0, 2, 1).reshape(len(c), grid * grid)  # k = grid*col + row


def sample_regions(scene: SlideScene, n: int, region_size: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(n, 2) int (x, y) region centres: on tissue, regions inside the slide, no duplicates.

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

    def on_tissue(p: np.ndarray) -> np.ndarray:
        return p[scene.tissue_distance(p[:, 0], p[:, 1]) > 0] if len(p) else p

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
        take(rng.uniform(lo, hi + 1, size=(50 * n, 2)), n)
    return np.array(chosen, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------- the cohort


def _validate(n_slides: int, width: int, height: int, tumor_fraction: float, mpp: float,
              downsample: int, vendor: str, jpeg_quality: int, regions_per_slide: int,
              region_size: int, grid: int, val_fraction: float) -> None:
    problems = []
    if n_slides < 1:
        problems.append(f"n_slides={n_slides}: need at least 1 slide")
    if grid < 1:
        problems.append(f"grid={grid}: use a grid of at least 1")
    elif region_size < grid or region_size % grid:
        problems.append(f"region_size={region_size} is not a positive multiple of grid={grid}: "
                        f"use e.g. region_size={max(grid, region_size - region_size % grid)}")
    if min(width, height) < max(region_size, TILE):
        problems.append(f"slide {width}x{height} is smaller than region_size={region_size} "
                        f"(or the {TILE} px tile): use a width and height >= "
                        f"{max(region_size, TILE)} or a smaller region size")
    if not 0.0 <= tumor_fraction <= 1.0:
        problems.append(f"tumor_fraction={tumor_fraction}: use a value in [0, 1]")
    if not 0.02 <= mpp <= 50:
        problems.append(f"mpp={mpp}: use micrometres per pixel in [0.02, 50] (e.g. 0.243)")
    if downsample not in (2, 4):
        problems.append(f"downsample={downsample}: use 2 or 4")
    if vendor not in ("generic", "aperio"):
        problems.append(f"vendor={vendor!r}: use 'generic' or 'aperio'")
    if not 1 <= jpeg_quality <= 100:
        problems.append(f"jpeg_quality={jpeg_quality}: use 1..100")
    if regions_per_slide < 1:
        problems.append(f"regions_per_slide={regions_per_slide}: use at least 1")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction={val_fraction}: use a value in [0, 1)")
    if problems:
        raise OptionError("; ".join(problems))


def _write_csv(path: Path, rows: list[dict], n_labels: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image", "x", "y"] + [f"label{k}" for k in range(n_labels)])
        for r in rows:
            y, x = r["location"]
            w.writerow([r["image"], x, y, *r["label"]])


def synth_cohort(out: Path, *, n_slides: int = 4, width: int = 4000, height: int = 3000,
                 tumor_fraction: float = 0.5, seed: int = 0, mpp: float = 0.243,
                 downsample: int = 2, vendor: str = "generic", jpeg_quality: int = 90,
                 regions_per_slide: int = 32, region_size: int = 768, grid: int = 3,
                 val_fraction: float = 0.25,
                 progress: Callable[[SynthSlide], None] | None = None) -> SynthCohort:
    """Write ``n_slides`` synthetic slides, their ground truth and coordinate files under ``out``."""
    _validate(n_slides, width, height, tumor_fraction, mpp, downsample, vendor, jpeg_quality,
              regions_per_slide, region_size, grid, val_fraction)
    root = Path(out)
    images, annots, masks = (root / "training" / d for d in ("images", "annotations", "masks"))
    for d in (images, annots, masks):
        d.mkdir(parents=True, exist_ok=True)
    n_tumor = min(n_slides, int(math.floor(tumor_fraction * n_slides + 0.5)))
    kinds = [("tumor", i + 1) for i in range(n_tumor)]
    kinds += [("normal", i + 1) for i in range(n_slides - n_tumor)]
    ext = ".svs" if vendor == "aperio" else ".tif"

    # Split by slide: validation takes the last slides, alternately tumor and normal; the
    # first tumor and first normal slide go last, so training keeps one of each if it can.
    n_val = 0
    if n_slides > 1 and val_fraction > 0:
        n_val = min(n_slides - 1, max(1, int(math.floor(val_fraction * n_slides + 0.5))))
    tumor_idx = list(range(n_tumor))[::-1]
    normal_idx = list(range(n_tumor, n_slides))[::-1]
    tail = [idx.pop() for idx in (normal_idx, tumor_idx) if idx]  # normal_001, tumor_001
    order = [i for pair in zip(tumor_idx, normal_idx) for i in pair]
    order += tumor_idx[len(normal_idx):] + normal_idx[len(tumor_idx):] + tail
    val_set = set(order[:n_val])

    slides: list[SynthSlide] = []
    entries: dict[str, list[dict]] = {"training": [], "validation": []}
    facts = []
    for i, (kind, k) in enumerate(kinds):
        name = f"{kind}_{k:03d}"
        has_tumor = kind == "tumor"
        scene = make_scene(width, height, mpp=mpp, has_tumor=has_tumor, seed=(seed, i))
        path = images / f"{name}{ext}"
        dims = write_slide(path, scene, downsample=downsample, vendor=vendor,
                           jpeg_quality=jpeg_quality)
        xml = mask = None
        if has_tumor:
            xml, mask = annots / f"{name}.xml", masks / f"{name}_mask.tif"
            write_asap_xml(xml, scene.polygons)
            write_mask(mask, tumor_mask(scene.polygons, width, height), downsample=MASK_DOWNSAMPLE,
                       width=width, height=height)
        centres = sample_regions(scene, regions_per_slide, region_size,
                                 np.random.default_rng((seed, i, 1)))
        labels = region_labels(centres, scene.polygons, region_size, grid)
        split = "validation" if i in val_set else "training"
        entries[split] += [{"image": path.name, "location": [int(y), int(x)],
                            "label": [int(v) for v in lab]}
                           for (x, y), lab in zip(centres, labels)]
        slide = SynthSlide(name=name, path=path, width=width, height=height, mpp=mpp,
                           has_tumor=has_tumor, xml=xml, mask=mask)
        slides.append(slide)
        facts.append({
            "name": name, "image": path.relative_to(root).as_posix(), "split": split,
            "width": width, "height": height, "mpp": mpp, "has_tumor": has_tumor,
            "levels": [list(d) for d in dims], "seed": [seed, i],
            "polygons": len(scene.polygons),
            "lesion_diameters_um": [round(2 * math.sqrt(_polygon_area(p) / math.pi) * mpp, 1)
                                    for p in scene.polygons],
            "xml": xml.relative_to(root).as_posix() if xml else None,
            "mask": mask.relative_to(root).as_posix() if mask else None,
            "regions": len(centres), "tumor_regions": int((labels.max(axis=1) > 0).sum()),
        })
        if progress is not None:
            progress(slide)

    dataset_json = root / "dataset_0.json"
    parts = []
    # An empty split is left out: our own parser (rightly) rejects empty splits.
    splits = [s for s in ("training", "validation") if entries[s]]
    for split in splits:
        body = ",\n".join("  " + json.dumps(e) for e in entries[split])
        parts.append(f' "{split}": [\n{body}\n ]')
    dataset_json.write_text("{\n" + ",\n".join(parts) + "\n}\n", encoding="utf-8")

    csv_paths = {"all": root / "dataset_0.csv",
                 **{split: root / f"dataset_0_{split}.csv" for split in splits}}
    _write_csv(csv_paths["all"], entries["training"] + entries["validation"], grid * grid)
    for split in splits:
        _write_csv(csv_paths[split], entries[split], grid * grid)

    params = dict(n_slides=n_slides, width=width, height=height, tumor_fraction=tumor_fraction,
                  seed=seed, mpp=mpp, downsample=downsample, vendor=vendor,
                  jpeg_quality=jpeg_quality, regions_per_slide=regions_per_slide,
                  region_size=region_size, grid=grid, val_fraction=val_fraction)
    meta = {"generator": "patchetl.etl.synth", "params": params,
            "mask_downsample": MASK_DOWNSAMPLE, "label_order": "column-by-column (k = grid*col + row)",
            "dataset_json": dataset_json.name,
            "csv": {k: v.name for k, v in csv_paths.items()}}
    head = json.dumps(meta, indent=1)[: -len("\n}")]  # one line per slide below
    slide_lines = ",\n".join("  " + json.dumps(f) for f in facts)
    (root / "synth.json").write_text(f'{head},\n "slides": [\n{slide_lines}\n ]\n}}\n',
                                     encoding="utf-8")
    return SynthCohort(root=root, slides=slides, dataset_json=dataset_json, csv_paths=csv_paths)
