"""The scene of one synthetic slide: tissue, stain and lesions, rendered tile by tile.

Picture: tissue blobs (30-55 % of the slide) on glass, pink eosin stroma with fibres and purple
hematoxylin nuclei, mixed through the Beer-Lambert law; tumor lesions have denser, larger, darker
nuclei. Every tile is rendered on its own from a per-slide ``SlideScene`` (low-resolution fields
plus periodic textures sampled at global coordinates), so slides are written tile by tile
without holding level 0 in memory, and ``render_slide`` gives the exact level-0 array that was
JPEG-compressed (for tests). Slide i of a cohort uses the seed ``(seed, i)``: the same seed
gives the same scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from etl.synth.artefacts import Artefact, make_artefacts, paint_artefacts
from etl.synth.lesions import tumor_polygons
from etl.synth.textures import (
    NORMAL,
    TEXTURE_PERIODS,
    TILE,
    TUMOR,
    Textures,
    make_textures,
    smooth_noise,
)

__all__ = ["GLASS_RGB", "SlideScene", "make_scene", "render_slide"]

FIELD_CELLS = 256  # low-resolution field: about this many cells along the longest side

# Ruifrok & Johnston optical-density vectors (R, G, B) of hematoxylin and eosin.
_H_VEC = np.array([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11])
GLASS_RGB = np.array([243.0, 241.0, 245.0])


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
    textures: Textures
    offset: tuple[int, int]  # global texture offset (y, x)
    h_vec: np.ndarray
    e_vec: np.ndarray
    bg_od: np.ndarray
    artefacts: list[Artefact] = field(default_factory=list)  # pen, borders, dust, bubbles

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
        val = (s[i, j] * (1 - fx) + s[i, j + 1] * fx) * (1 - fy) + (
            s[i + 1, j] * (1 - fx) + s[i + 1, j + 1] * fx
        ) * fy
        dist: np.ndarray = (val - self.threshold) / self.score_per_px
        return dist

    def _interp(self, start: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Bilinear interpolation along one axis: field indices and weights of pixels start..+n."""
        u = (np.arange(start, start + n) + 0.5) / self.cell - 0.5
        idx = np.clip(np.floor(u).astype(np.int64), 0, size - 2)
        return idx, np.clip(u - idx, 0.0, 1.0).astype(np.float32)

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
            eos = NORMAL.eosin * np.maximum(0.45 + 0.55 * fib + 0.15 * patchy + 0.08 * fine, 0.05)
            hema, tumor_share, base = _nuclei(self.polygons, tex, self.offset, x0, y0, h, w, a, b)
            if tumor_share is not None:
                eos_t = TUMOR.eosin * np.maximum(
                    0.70 + 0.30 * fib + 0.10 * patchy + 0.08 * fine, 0.05
                )
                eos = eos + tumor_share * (eos_t - eos)
            hema = alpha * (hema * (0.85 + 0.15 * grain) + base) * f[1]
            eos = alpha * eos * f[2]
            od = [od[c] + hema * self.h_vec[c] + eos * self.e_vec[c] for c in range(3)]
        if self.artefacts:
            od = paint_artefacts(self.artefacts, od, x0, y0, grain, self._soft_px)
        return _transmitted(od, h, w)

    def render(self) -> np.ndarray:
        """The whole level-0 image (height, width, 3) uint8, assembled from ``render_tile``."""
        out = np.empty((self.height, self.width, 3), dtype=np.uint8)
        for y0 in range(0, self.height, TILE):
            for x0 in range(0, self.width, TILE):
                tile = self.render_tile(x0, y0)
                out[y0 : y0 + TILE, x0 : x0 + TILE] = tile[: self.height - y0, : self.width - x0]
        return out


def _lesion_raster(
    polygons: list[np.ndarray], x0: int, y0: int, h: int, w: int
) -> Image.Image | None:
    """Lesion pixels (255) of the window at (x0, y0), size (h, w), or None if it has none.

    PIL rasterisation, for looks only: labels and masks use the exact polygon test.
    """
    img = None
    for poly in polygons:
        (xmin, ymin), (xmax, ymax) = poly.min(axis=0), poly.max(axis=0)
        if xmax < x0 or ymax < y0 or xmin >= x0 + w or ymin >= y0 + h:
            continue
        if img is None:
            img = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(img)
        draw.polygon([(x - x0 - 0.5, y - y0 - 0.5) for x, y in poly], fill=255)
    return img


def _nuclei(
    polygons: list[np.ndarray],
    tex: Textures,
    offset: tuple[int, int],
    x0: int,
    y0: int,
    h: int,
    w: int,
    a: np.ndarray,
    b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | float | None, np.ndarray | float]:
    """Nuclei of the (h, w) window at (x0, y0): (hematoxylin density, share of tumor stroma
    (None: no lesion near), base density). ``offset``: the scene's texture offset (y, x);
    ``a``, ``b``: the window's texture slices."""
    m = tex.reach
    raster = _lesion_raster(polygons, x0 - m, y0 - m, h + 2 * m, w + 2 * m)
    lesion = None if raster is None else np.asarray(raster) > 127
    if lesion is None or not lesion.any():
        return np.maximum(a[0], b[0]), None, 0.07
    if lesion.all():  # well inside a lesion
        return np.maximum(a[1], b[1]), 1.0, 0.12
    # A nucleus belongs to the lesion when its centre does: none is cut in two.
    oy, ox = offset
    t1, t2 = TEXTURE_PERIODS
    ya, xa = (y0 + oy) % t1, (x0 + ox) % t1
    yb, xb = (y0 + oy) % t2, (x0 + ox) % t2
    yy, xx = np.ogrid[m : m + h, m : m + w]
    a_off = tex.a_off[:, ya : ya + h, xa : xa + w]
    b_off = tex.b_off[:, yb : yb + h, xb : xb + w]

    def centre_in(off: np.ndarray) -> np.ndarray:
        inside: np.ndarray = lesion[yy + off[0], xx + off[1]]
        return inside

    hema = np.maximum.reduce(
        [
            np.where(centre_in(a_off[0:2]), 0.0, a[0]),
            np.where(centre_in(b_off[0:2]), 0.0, b[0]),
            np.where(centre_in(a_off[2:4]), a[1], 0.0),
            np.where(centre_in(b_off[2:4]), b[1], 0.0),
        ]
    )
    # Stroma changes over about a nucleus' width at the lesion border.
    assert raster is not None  # a lesion pixel came from it
    near = np.asarray(raster.filter(ImageFilter.BoxBlur(m)), np.float32)
    tumor_share = near[m : m + h, m : m + w] / np.float32(255.0)
    return hema, tumor_share, 0.07 + 0.05 * tumor_share


def _transmitted(od: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """uint8 RGB from planar optical densities (Beer-Lambert: transmitted light per channel)."""
    out = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        v = np.exp(-od[c])
        v *= np.float32(255.0)
        v += np.float32(0.5)
        np.minimum(v, np.float32(255.0), out=v)
        out[..., c] = v  # truncating cast: rounded since v >= 0.5
    return out


def tissue_fields(
    rng: np.random.Generator, width: int, height: int
) -> tuple[float, np.ndarray, float, float]:
    """Low-resolution tissue score, stain gains, threshold and score slope per pixel."""
    cell = max(width, height) / FIELD_CELLS
    gh, gw = math.ceil(height / cell) + 2, math.ceil(width / cell) + 2
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
    score += 0.30 * smooth_noise(rng, (gh, gw), 0.07 * FIELD_CELLS)
    score += 0.10 * smooth_noise(rng, (gh, gw), 0.02 * FIELD_CELLS)
    # Keep a margin of glass along the slide border (a wavy one: no straight tissue edges).
    border = np.minimum(np.minimum(X, width / side - X), np.minimum(Y, height / side - Y))
    border = border + 0.015 * smooth_noise(rng, (gh, gw), 0.03 * FIELD_CELLS)
    taper = np.clip(border / 0.06, 0.0, 1.0)
    score = score * taper - 2.0 * (1.0 - taper)
    inside = (yc[:, None] < height) & (xc[None, :] < width)
    coverage = rng.uniform(0.30, 0.55)
    threshold = float(np.quantile(score[inside], 1.0 - coverage))
    gy, gx = np.gradient(score)
    slope = np.hypot(gy, gx) / cell
    near = np.abs(score - threshold) < 0.1 * score[inside].std()
    score_per_px = float(np.median(slope[near])) if near.any() else float(np.median(slope))
    gains = 1.0 + 0.10 * np.stack(
        [
            smooth_noise(rng, (gh, gw), 0.05 * FIELD_CELLS),
            smooth_noise(rng, (gh, gw), 0.05 * FIELD_CELLS),
        ]
    )
    fields = np.concatenate([score[None], gains]).astype(np.float32)
    return cell, fields, threshold, max(score_per_px, 1e-9)


def make_scene(
    width: int,
    height: int,
    *,
    mpp: float = 0.243,
    has_tumor: bool = True,
    seed: int | Sequence[int] = 0,
    artefacts: bool = False,
) -> SlideScene:
    """Draw a slide's tissue, stain and lesions (cheap; pixels are rendered per tile later);
    ``artefacts``: add pen marks, scan borders, dust and air bubbles (``etl.synth.artefacts``),
    drawn last, so the rest of the scene is the same either way."""
    rng = np.random.default_rng(seed)
    textures = make_textures(rng, mpp)
    cell, fields, threshold, slope = tissue_fields(rng, width, height)
    gain = rng.uniform(0.85, 1.15, size=2)  # slide-to-slide staining strength
    fields[1] *= gain[0]
    fields[2] *= gain[1]
    h_vec = _H_VEC + rng.normal(0, 0.03, 3)
    e_vec = _E_VEC + rng.normal(0, 0.03, 3)
    scene = SlideScene(
        width=width,
        height=height,
        mpp=mpp,
        cell=cell,
        fields=fields,
        threshold=threshold,
        score_per_px=slope,
        polygons=[],
        textures=textures,
        offset=(int(rng.integers(0, 1 << 20)), int(rng.integers(0, 1 << 20))),
        h_vec=(1.5 * h_vec / np.linalg.norm(h_vec)).astype(np.float32),
        e_vec=(e_vec / np.linalg.norm(e_vec)).astype(np.float32),
        bg_od=(-np.log(GLASS_RGB / 255.0)).astype(np.float32),
    )
    if has_tumor:
        scene.polygons = tumor_polygons(rng, scene)
    if artefacts:
        scene.artefacts = make_artefacts(rng, scene)
    return scene


def render_slide(
    width: int,
    height: int,
    *,
    mpp: float = 0.243,
    has_tumor: bool = True,
    seed: int | Sequence[int] = 0,
    artefacts: bool = False,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Level-0 RGB array (height, width, 3) and tumor polygons of the slide ``write_slide``
    writes."""
    scene = make_scene(width, height, mpp=mpp, has_tumor=has_tumor, seed=seed, artefacts=artefacts)
    return scene.render(), scene.polygons
