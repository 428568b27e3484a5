"""One synthetic scene scanned at two physical scales (tests of `--mpp`).

Slide A is the scene at 0.25 um/px (pyramid downsample 4: levels at 0.25 and 1.0 um/px); slide
B is A's exact level-0 pixels block-meaned by 2, written at 0.5 um/px (downsample 2: levels at
0.5 and 1.0). A point at level-0 (x, y) on A is (x / 2, y / 2) on B.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from etl.synth.scene import SlideScene, make_scene
from etl.wsi.downsample import block_mean
from etl.wsi.pyramid import pyramid_levels, write_pyramid


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR over all pixels of a and b together (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def scene_pair(side: int, seed: int = 3) -> tuple[SlideScene, np.ndarray, np.ndarray]:
    """The scene, its exact level-0 pixels at 0.25 um/px, and their block mean by 2 (0.5)."""
    scene = make_scene(side, side, mpp=0.25, seed=seed)
    exact = scene.render()
    return scene, exact, block_mean(exact, 2, "drop")


def write_pair(
    folder: Path,
    exact: np.ndarray,
    half: np.ndarray,
    compression: str = "jpeg",
    names: tuple[str, str] = ("a", "b"),
) -> tuple[Path, Path]:
    """Write A (0.25 um/px, downsample 4) and B (0.5 um/px, downsample 2) into ``folder``."""
    a, b = (folder / f"{name}.tif" for name in names)
    write_pyramid(
        a, pyramid_levels(exact, 4, max_side=256), mpp=(0.25, 0.25), compression=compression
    )
    write_pyramid(b, pyramid_levels(half, 2, max_side=256), mpp=(0.5, 0.5), compression=compression)
    return a, b
