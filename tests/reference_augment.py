"""Reference versions of the augmentation steps, for the tests to compare against.

`training.data.augment` makes patches in one pass from pre-drawn randoms (`make_patches`);
these are the steps one at a time, out of place, as the seed's per-op pipeline applies them:
the colour adjustments one by one (compared with torchvision's functions), the dihedral step
by indexing (compared with the `torch.where` selection the library uses), grid crops of whole
batches, and an augmentation chain drawing its own randoms.
"""

from __future__ import annotations

import torch

from training.data.augment import (
    _DIHEDRAL_OPS,
    Augment,
    _check_regions,
    apply_dihedral,
    apply_jitter_,
    brightness_,
    cell_offsets,
    contrast_,
    crop_patches,
    draw_coins,
    draw_jitter,
    hue_,
    saturation_,
)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return brightness_(x.clone(), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return contrast_(x.clone(), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return saturation_(x.clone(), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return hue_(x.clone(), shift)


def dihedral_indexed(x: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
    """Transform only the patches whose coin says so (`apply_dihedral` transforms all, then
    selects)."""
    x = x.clone()
    for coin, op in zip(coins, _DIHEDRAL_OPS, strict=True):
        idx = coin.nonzero().squeeze(1)
        if idx.numel():
            x[idx] = op(x[idx])
    return x


def grid_patches(
    regions: torch.Tensor,
    grid: int,
    patch: int,
    random: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, C, R, R) regions -> (B * grid * grid, C, patch, patch) crops, cells row-major.

    Patch `b * grid * grid + row * grid + col` comes from cell (row, col) of region b.
    """
    b, _, h, _ = regions.shape
    _check_regions(regions.shape, grid)
    offsets = cell_offsets(grid, h // grid, patch, b, random, generator, regions.device)
    return crop_patches(regions, offsets.reshape(-1, 2), grid, patch)


def augment_patches(
    x: torch.Tensor, aug: Augment, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment float (N, 3, p, p) patches in [0, 1] (per-patch ColorJitter, then random flips
    and 90-degree rotations); the input itself when `aug` is off."""
    if not aug.enabled:
        return x
    if aug.jitter:
        x = apply_jitter_(x.clone(), draw_jitter(x.shape[0], aug, generator, x.device))
    if aug.flips:
        x = apply_dihedral(x, draw_coins(x.shape[0], generator, x.device))
    return x
