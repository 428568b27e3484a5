"""Periodic per-slide textures of synthetic H&E: nuclei layers, fibres, grain, vacuoles.

Sizes are physical (micrometres) and scale with ``mpp``. Two nuclei layers with periods
``TEXTURE_PERIODS`` (1024 and 1152 px) repeat together only every 9216 px. Each texture is
wrap-padded by one render tile, so that any tile of any slide is a plain slice of it; each
nucleus also records, per pixel, the offset to its centre, so that a renderer can decide per
nucleus (at its centre) whether it lies in a lesion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NORMAL",
    "TEXTURE_PERIODS",
    "TILE",
    "TUMOR",
    "NucleiStyle",
    "Textures",
    "fft_noise",
    "make_textures",
    "smooth_noise",
]

TILE = 256  # render tile side: textures are padded by it
TEXTURE_PERIODS = (1024, 1152)  # two nuclei layers with these periods repeat only every 9216 px


@dataclass(frozen=True)
class NucleiStyle:
    """Look of one tissue class; sizes in micrometres."""

    per_um2: float  # nuclei per square micrometre
    radius_um: tuple[float, float]  # semi-major axis range
    elongation: float  # largest major/minor axis ratio
    stain: tuple[float, float]  # hematoxylin optical density range
    clustering: float  # 0 = uniform positions, 1 = strongly clustered
    eosin: float  # eosin density of the surrounding stroma / cytoplasm


NORMAL = NucleiStyle(1 / 140, (2.0, 3.4), 2.0, (0.55, 0.85), 0.5, 0.50)
TUMOR = NucleiStyle(1 / 60, (3.0, 5.0), 1.5, (0.80, 1.15), 0.8, 0.40)


def fft_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Periodic Gaussian-smoothed white noise (zero mean, unit std, float32)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    ky = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    gain = np.exp(np.float32(-2.0 * (np.pi * sigma) ** 2) * (kx**2 + ky**2))
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=shape)
    field -= field.mean()
    out: np.ndarray = (field / (field.std() + 1e-12)).astype(np.float32)
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Non-periodic smooth noise: periodic noise on a doubled grid, cropped."""
    big = fft_noise(rng, (2 * shape[0], 2 * shape[1]), sigma)[: shape[0], : shape[1]]
    out: np.ndarray = (big - big.mean()) / (big.std() + 1e-12)
    return out


def _nuclei_layer(
    rng: np.random.Generator, period: int, style: NucleiStyle, mpp: float, share: float
) -> tuple[np.ndarray, np.ndarray]:
    """Periodic hematoxylin density of ``share`` of a class's nuclei, and per-pixel offsets.

    Returns ``(density (T, T) float32, offsets (T, T, 2) int16)``: the offset (dy, dx) from
    each pixel to the centre of the nucleus that covers it (0 where none), so a renderer can
    decide per nucleus (at its centre) whether it lies in a lesion and never cut one in two.
    """
    area_um2 = (period * mpp) ** 2
    count = max(1, round(area_um2 * style.per_um2 * share))
    # Clustered positions: thin uniform candidates by a smooth periodic density (coarse grid).
    coarse = 8 if period % 8 == 0 else 1
    density = fft_noise(rng, (period // coarse, period // coarse), 18.0 / mpp / coarse)
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
        reach = math.ceil(1.25 * a + 2 * soft)
        dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        phi = np.arctan2(v, u)
        outline = 1.0 + sum(
            rng.normal(0, 0.06) * np.cos(k * phi + rng.uniform(0, 6.3)) for k in (2, 3, 5)
        )  # irregular, pleomorphic border
        dist = np.sqrt((u / a) ** 2 + (v / b) ** 2) / outline  # 1 on the nuclear border
        prof = np.clip((1.0 - dist) * b / soft + 0.5, 0.0, 1.0)
        clumps = fft_noise(rng, dist.shape, max(0.8, 0.5 / mpp))  # chromatin texture
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
        offs.append(
            np.broadcast_to(np.stack([-dy, -dx], -1), (sel.size, dy.size, 2)).reshape(-1, 2)
        )
    flat, val, off = np.concatenate(flats), np.concatenate(vals), np.concatenate(offs)
    field = np.zeros(period * period, np.float32)
    np.maximum.at(field, flat, val)  # the darkest nucleus wins each pixel
    win = val == field[flat]  # (on exact ties the later nucleus's offset is kept)
    offsets = np.zeros((period * period, 2), np.int16)
    offsets[flat[win]] = off[win]
    return field.reshape(period, period), offsets.reshape(period, period, 2)


@dataclass(frozen=True)
class Textures:
    """Periodic per-slide textures, channel first, wrap-padded by a tile (any tile is a slice).

    Sample a texture of period T at level-0 (y, x) as ``tex[:, (y+oy) % T, (x+ox) % T]``.
    Channels of ``a`` (period T1): nuclei normal, nuclei tumor, patchiness, vacuoles; of ``b``
    (period T2): nuclei normal, nuclei tumor, fibres, fine noise, tissue edge, vacuoles.
    """

    a: np.ndarray  # (4, T1+TILE, T1+TILE) float32
    a_off: np.ndarray  # (4, ...) int16 offsets to the nucleus centre: normal dy, dx; tumor dy, dx
    b: np.ndarray  # (6, T2+TILE, T2+TILE) float32
    b_off: np.ndarray  # (4, ...) int16, as a_off
    grain: np.ndarray  # (T2+TILE, T2+TILE) fine grain, unit std
    reach: int  # largest nucleus offset, in pixels


def _wrap_pad(stack: np.ndarray) -> np.ndarray:
    """(C, T, T) -> (C, T+TILE, T+TILE), periodic continuation, contiguous."""
    return np.ascontiguousarray(np.pad(stack, [(0, 0), (0, TILE), (0, TILE)], mode="wrap"))


def make_textures(rng: np.random.Generator, mpp: float) -> Textures:
    t1, t2 = TEXTURE_PERIODS
    an, an_off = _nuclei_layer(rng, t1, NORMAL, mpp, 0.5)
    at, at_off = _nuclei_layer(rng, t1, TUMOR, mpp, 0.5)
    bn, bn_off = _nuclei_layer(rng, t2, NORMAL, mpp, 0.5)
    bt, bt_off = _nuclei_layer(rng, t2, TUMOR, mpp, 0.5)
    # Stroma fibres: ridges of band-limited noise (where it crosses zero) look like collagen.
    fibres = np.clip(1.0 - 1.6 * np.abs(fft_noise(rng, (t2, t2), 1.6 / mpp)), 0, 1) ** 2
    fine = fft_noise(rng, (t2, t2), 0.6 / mpp)
    edge = fft_noise(rng, (t2, t2), 6.0 / mpp)
    # Patchiness and vacuoles mix both periods, so they repeat only every 9216 px.
    patchy = fft_noise(rng, (t1, t1), 10.0 / mpp)
    hole_a = fft_noise(rng, (t1, t1), 12.0 / mpp)
    hole_b = fft_noise(rng, (t2, t2), 12.0 / mpp)
    a = _wrap_pad(np.stack([an, at, patchy, hole_a]).astype(np.float32))
    b = _wrap_pad(np.stack([bn, bt, fibres, fine, edge, hole_b]).astype(np.float32))
    grain = _wrap_pad(fft_noise(rng, (t2, t2), 1.0)[None])[0]
    reach = int(max(np.abs(o).max() for o in (an_off, at_off, bn_off, bt_off)))
    a_off = _wrap_pad(np.concatenate([an_off, at_off], -1).transpose(2, 0, 1))
    b_off = _wrap_pad(np.concatenate([bn_off, bt_off], -1).transpose(2, 0, 1))
    return Textures(a=a, a_off=a_off, b=b, b_off=b_off, grain=grain, reach=reach)
