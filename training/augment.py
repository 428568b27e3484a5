"""Regions -> model-ready patches, on the device, vectorised over the batch.

`make_patches` splits each region into its grid of cells, crops one patch per cell (random
offset inside the cell for training, centred for evaluation), broadcasts the row-major label
grid to the patches, and applies the seed's augmentations per patch: ColorJitter(brightness
64/255, contrast 0.75, saturation 0.25, hue 0.04), random flips and 90-degree rotations; then
scales to [-1, 1]. Every random draw is per patch and comes from one `torch.Generator`, so an
epoch is reproducible from its seed.

torchvision's ColorJitter draws one set of factors per call (per batch); the per-patch version
here uses torchvision's formulas with a factor tensor (checked against torchvision in the
tests). Like torchvision it applies the four adjustments in a random order, drawn per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Augment:
    """Per-patch augmentations; `Augment.off()` is the identity (evaluation)."""

    brightness: float = 64 / 255
    contrast: float = 0.75
    saturation: float = 0.25
    hue: float = 0.04
    flips: bool = True  # random h/v flips + transpose = flips and 90-degree rotations

    @classmethod
    def off(cls) -> "Augment":
        return cls(0.0, 0.0, 0.0, 0.0, False)

    @property
    def enabled(self) -> bool:
        return self.flips or any((self.brightness, self.contrast, self.saturation, self.hue))


# --------------------------------------------------------------------------- grid split
def cell_offsets(grid: int, cell: int, patch: int, n: int, random: bool,
                 generator: torch.Generator | None, device) -> torch.Tensor:
    """(n, grid * grid, 2) top-left (y, x) of each patch in its region, cells row-major."""
    if patch > cell:
        raise ValueError(f"patch size {patch} is larger than the grid cell {cell}; use a smaller "
                         "--patch-size or a coarser --grid")
    row, col = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device),
                              indexing="ij")
    base = torch.stack([row.flatten(), col.flatten()], dim=-1) * cell  # (g*g, 2)
    if random:
        jitter = torch.randint(0, cell - patch + 1, (n, grid * grid, 2), generator=generator,
                               device=device)
    else:
        jitter = torch.full((n, grid * grid, 2), (cell - patch) // 2, device=device)
    return base + jitter


def grid_patches(regions: torch.Tensor, grid: int, patch: int, random: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, R, R) regions -> (B * grid * grid, C, patch, patch) crops, cells row-major.

    Patch `b * grid * grid + row * grid + col` comes from cell (row, col) of region b.
    """
    b, c, h, w = regions.shape
    if h != w or h % grid:
        raise ValueError(f"regions are {h}x{w}: expected square regions divisible by grid {grid}")
    offsets = cell_offsets(grid, h // grid, patch, b, random, generator, regions.device)
    if regions.device.type == "cpu":
        # On a CPU, plain slice copies beat the 4-index gather below by ~10x.
        ys, xs = offsets.reshape(-1, 2).T.tolist()
        return torch.stack([regions[i // (grid * grid), :, y:y + patch, x:x + patch]
                            for i, (y, x) in enumerate(zip(ys, xs))])
    steps = torch.arange(patch, device=regions.device)
    rows = (offsets[..., 0, None] + steps).reshape(-1, patch)  # (N, p)
    cols = (offsets[..., 1, None] + steps).reshape(-1, patch)
    index = torch.arange(b, device=regions.device).repeat_interleave(grid * grid)
    # Advanced indexing puts the indexed dims first: (N, p, p, C) -> (N, C, p, p).
    crops = regions[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2)


def grid_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, g, g) row-major label grids -> (B * g * g,) labels in `grid_patches` order."""
    return labels.reshape(-1)


# --------------------------------------------------------------------------- colour
def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


# Each adjustment allocates its result once and then works in place on it: on a CPU these
# ops are bound by memory traffic, and torchvision's blend-with-temporaries doubles it.
def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    ratio = factor.view(-1, 1, 1, 1)
    mean = _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (x * ratio).add_((1.0 - ratio) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    ratio = factor.view(-1, 1, 1, 1)
    return (x * ratio).add_(_grayscale(x).mul_(1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by `shift` turns, per image.

    torchvision's RGB -> HSV -> RGB round trip, fused: a hue shift keeps the maximum (V) and
    the chroma (max - min), so the result is c = max - chroma * clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 * hue) mod 6, n = 5, 3, 1 for r, g, b. Same values as torchvision
    (tested), several times fewer full-size temporaries: hue is the costliest jitter on CPU.
    """
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # hue in sixths of a turn, torchvision's tie order: r wins over g, g over b
    h6 = torch.where(maxc == r, (g - b) / safe,
                     torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h6 = h6 + 6.0 * shift.view(-1, 1, 1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


# On a CPU, jittering a few patches at a time keeps the working set in cache (about 2x
# faster than whole-batch ops, which are bound by memory traffic); a GPU takes the batch whole.
CPU_CHUNK = 4


def color_jitter(x: torch.Tensor, aug: Augment, generator: torch.Generator | None) -> torch.Tensor:
    """Per-patch ColorJitter of float (N, 3, H, W) images in [0, 1]."""
    n, dev = x.shape[0], x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=dev) * (hi - lo) + lo

    ops = []
    if aug.brightness:
        ops.append((adjust_brightness, uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness)))
    if aug.contrast:
        ops.append((adjust_contrast, uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast)))
    if aug.saturation:
        ops.append((adjust_saturation, uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation)))
    if aug.hue:
        ops.append((adjust_hue, uniform(-aug.hue, aug.hue)))
    order = torch.randperm(len(ops), generator=generator, device=dev).tolist()
    chunk = CPU_CHUNK if dev.type == "cpu" else max(n, 1)
    out = torch.empty_like(x)
    for start in range(0, n, chunk):
        part = x[start:start + chunk]
        for i in order:
            fn, factor = ops[i]
            part = fn(part, factor[start:start + chunk].to(x.dtype))
        out[start:start + chunk] = part
    return out


# --------------------------------------------------------------------------- geometry
def random_dihedral(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random flips and 90-degree rotations per square patch (uniform over the 8 symmetries).

    A random transpose followed by random horizontal and vertical flips reaches each of the
    8 elements of the square's symmetry group with probability 1/8, which is the same law as
    the seed's random flip + random rot90 chain.
    """
    n = x.shape[0]
    coins = torch.rand(3, n, generator=generator, device=x.device) < 0.5
    x = x.clone()
    # Transform only the patches whose coin says so (torch.where would transform them all).
    for coin, op in zip(coins, (lambda t: t.transpose(-1, -2), lambda t: t.flip(-1),
                                lambda t: t.flip(-2))):
        idx = coin.nonzero().squeeze(1)
        if idx.numel():
            x[idx] = op(x[idx])
    return x


# --------------------------------------------------------------------------- all together
def augment_patches(x: torch.Tensor, aug: Augment, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Augment float (N, 3, p, p) patches in [0, 1]; the input itself when `aug` is off."""
    if not aug.enabled:
        return x
    if any((aug.brightness, aug.contrast, aug.saturation, aug.hue)):
        x = color_jitter(x, aug, generator)
    if aug.flips:
        x = random_dihedral(x, generator)
    return x


def to_unit_range(patches: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    # contiguous NCHW: the crops come out of the gather channels-last, which makes the
    # elementwise colour ops several times slower on a CPU
    return patches.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> [-1, 1] (the seed's ScaleIntensityRange(0, 255, -1, 1))."""
    return x * 2.0 - 1.0


def make_patches(regions: torch.Tensor, labels: torch.Tensor, *, grid: int, patch: int,
                 train: bool, aug: Augment, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 regions (B, 3, R, R) + label grids (B, g, g) -> (patches in [-1, 1], labels).

    Training crops at a random offset inside each cell and augments; evaluation crops the
    centre of each cell and does not augment.
    """
    crops = grid_patches(regions, grid, patch, random=train, generator=generator)
    x = to_unit_range(crops)
    if train:
        x = augment_patches(x, aug, generator)
    # x is our own fresh tensor here, so scale it in place (one pass less than to_model_range)
    return x.mul_(2.0).sub_(1.0), grid_labels(labels).to(torch.float32)
