"""Tumor lesions of a synthetic slide: irregular star-shaped polygons clipped to tissue.

1-3 lesions mostly larger than 275 um (as far as the slide allows), never overlapping, and
sometimes a small isolated-tumor-cell cluster, as in Camelyon16. Coordinates are rounded to 2
decimals (the ASAP XML precision), so the XML reproduces the polygons exactly and labels
decided on them agree with the file.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from etl.synth.scene import SlideScene

__all__ = ["MIN_LESION_UM", "polygon_area", "tumor_polygons"]

MIN_LESION_UM = 275.0  # Camelyon16: smaller lesions are isolated tumor cells


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of an (N, 2) polygon."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _lesion(
    rng: np.random.Generator,
    scene: SlideScene,
    centre: np.ndarray,
    radius: float,
    n_vertices: int = 48,
) -> np.ndarray:
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
    ok = (
        (scene.tissue_distance(xs, ys) > 10.0 / scene.mpp)
        & (xs >= 1)
        & (xs <= scene.width - 1)
        & (ys >= 1)
        & (ys <= scene.height - 1)
    )
    first_bad = np.where(ok.all(axis=1), steps.shape[1], np.argmin(ok, axis=1))
    reach = steps[np.arange(n_vertices), np.maximum(first_bad - 1, 0)]
    r = np.maximum(reach, 0.1 * target)
    poly = np.stack([centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta)], axis=1)
    poly[:, 0] = np.clip(poly[:, 0], 1, scene.width - 1)
    poly[:, 1] = np.clip(poly[:, 1], 1, scene.height - 1)
    return np.round(poly, 2)  # the XML precision: XML and labels agree exactly


def tumor_polygons(rng: np.random.Generator, scene: SlideScene) -> list[np.ndarray]:
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
            diam_um = 2.0 * math.sqrt(polygon_area(poly) / math.pi) * mpp
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
