"""Regions -> model-ready patches: grid split, the seed's augmentations, scaling to [-1, 1].

`make_patches` splits each region into its grid of cells, crops one patch per cell (random
offset inside the cell for training, centred for evaluation), broadcasts the row-major label
grid to the patches, and applies the seed's augmentations per patch: ColorJitter(brightness
64/255, contrast 0.75, saturation 0.25, hue 0.04), random flips and 90-degree rotations; then
scales to [-1, 1].

Every random draw is per patch and comes from one `torch.Generator`, in a fixed order
(`draw_patches`: crop offsets, jitter factors, jitter order, flip coins), so an epoch is
reproducible from its seed. torchvision's ColorJitter draws one set of factors per call (per
batch); the per-patch version here uses torchvision's formulas with a factor tensor (checked
against torchvision in the tests). Like torchvision it applies the four adjustments in a random
order, drawn per batch.

Two executions of the same draws:
- on a GPU the batch is processed whole (gather crops, then each adjustment on all patches);
- on a CPU a few patches at a time (`CPU_CHUNK`), fused: crop, flip/rotate and uint8 -> float in
  one strided copy, then every adjustment in place while the chunk is in cache, then the scaled
  result straight into the output. Flips and rotations only move pixels and every colour
  adjustment is per pixel (contrast uses the patch mean, which a permutation keeps), so doing
  the dihedral step first on uint8 gives the same patches as doing it last (tested).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
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
    def off(cls) -> Augment:
        return cls(0.0, 0.0, 0.0, 0.0, False)

    @property
    def jitter(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.hue))

    @property
    def enabled(self) -> bool:
        return self.flips or self.jitter


# --------------------------------------------------------------------------- random draws
@dataclass
class JitterDraws:
    """Per-patch colour factors, as (name, (n,) factors) in the order they are applied."""

    steps: list[tuple[str, torch.Tensor]]


def draw_jitter(n: int, aug: Augment, generator: torch.Generator | None,
                device=None, order_generator: torch.Generator | None = None) -> JitterDraws:
    """Factors for n patches (brightness, contrast, saturation, hue), then a random order.

    The order is needed on the host (it picks which kernel runs first); reading it from a GPU
    generator would stall the host until the GPU has finished all queued work (the previous
    training step), so a GPU run passes a CPU `order_generator` for it.
    """

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) * (hi - lo) + lo

    ops = []
    if aug.brightness:
        ops.append(("brightness", uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness)))
    if aug.contrast:
        ops.append(("contrast", uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast)))
    if aug.saturation:
        ops.append(("saturation", uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation)))
    if aug.hue:
        ops.append(("hue", uniform(-aug.hue, aug.hue)))
    if order_generator is not None:
        order = torch.randperm(len(ops), generator=order_generator).tolist()
    else:
        order = torch.randperm(len(ops), generator=generator, device=device).tolist()
    return JitterDraws([ops[i] for i in order])


def draw_coins(n: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """(3, n) bool: transpose, flip left-right, flip up-down, per patch."""
    return torch.rand(3, n, generator=generator, device=device) < 0.5


@dataclass
class PatchDraws:
    """Every random draw of one batch of patches."""

    offsets: torch.Tensor  # (n, 2) top-left (y, x) of each patch in its region
    jitter: JitterDraws | None  # None: no colour jitter
    coins: torch.Tensor | None  # (3, n) bool, or None: no flips


def draw_patches(regions: int, grid: int, cell: int, patch: int, train: bool, aug: Augment,
                 generator: torch.Generator | None, device=None,
                 order_generator: torch.Generator | None = None) -> PatchDraws:
    """The draws of `make_patches`, in its fixed order: offsets, jitter factors, jitter order,
    flip coins (evaluation: centre offsets and no draws at all)."""
    offsets = cell_offsets(grid, cell, patch, regions, train, generator, device).reshape(-1, 2)
    n = offsets.shape[0]
    jitter = draw_jitter(n, aug, generator, device, order_generator) \
        if train and aug.jitter else None
    coins = draw_coins(n, generator, device) if train and aug.flips else None
    return PatchDraws(offsets, jitter, coins)


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


def _check_regions(shape: Sequence[int], grid: int) -> None:
    h, w = shape[-2:]
    if h != w or h % grid:
        raise ValueError(f"regions are {h}x{w}: expected square regions divisible by grid {grid}")


def crop_patches(regions: torch.Tensor, offsets: torch.Tensor, grid: int, patch: int
                 ) -> torch.Tensor:
    """(B, C, R, R) regions + (B * g * g, 2) offsets -> (B * g * g, C, p, p) crops (a gather)."""
    b = regions.shape[0]
    steps = torch.arange(patch, device=regions.device)
    rows = (offsets[:, 0, None] + steps)  # (N, p)
    cols = (offsets[:, 1, None] + steps)
    index = torch.arange(b, device=regions.device).repeat_interleave(grid * grid)
    # Advanced indexing puts the indexed dims first: (N, p, p, C) -> (N, C, p, p).
    crops = regions[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2)


def grid_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, g, g) row-major label grids -> (B * g * g,) labels in the order of the patches:
    patch `b * g * g + row * g + col` comes from cell (row, col) of region b."""
    return labels.reshape(-1)


# --------------------------------------------------------------------------- colour
# In place, on a tensor the caller owns: on a CPU these ops are bound by memory traffic, so
# every temporary and every extra pass counts.
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _per_image(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.to(x.dtype).view(-1, 1, 1, 1)


def brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(_per_image(factor, x)).clamp_(0.0, 1.0)


def contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean grey level of each image (the mean of the weighted channel means)."""
    ratio = _per_image(factor, x)
    mean = (x.mean(dim=(-2, -1)) * x.new_tensor(GRAY)).sum(-1).view(-1, 1, 1, 1)
    # (addcmul is several times slower here: both of its small operands broadcast)
    return x.mul_(ratio).add_((1.0 - ratio) * mean).clamp_(0.0, 1.0)


def saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image; (1 - ratio) * grey is one small matrix product."""
    n = x.shape[0]
    ratio = _per_image(factor, x)
    weights = x.new_tensor(GRAY) * (1.0 - ratio.view(n, 1))  # (n, 3)
    grey = torch.bmm(weights.unsqueeze(1), x.reshape(n, 3, -1)).view(n, 1, *x.shape[-2:])
    return torch.addcmul(grey, x, ratio, out=x).clamp_(0.0, 1.0)


def hue_(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by `shift` turns, per image, in place.

    torchvision's RGB -> HSV -> RGB round trip, fused: a hue shift keeps the maximum (V) and
    the chroma (max - min), and each channel is c = max - chroma * clamp(d - 1, 0, 1), with d
    the distance around the hue circle (in sixths of a turn) from the shifted hue to the
    channel's own hue. Hues are measured from green (red -2, green 0, blue 2), so that they
    lie in [-3, 3] before the shift. Same values as torchvision (tested). No boolean masks,
    `where` or `remainder` (unless a shift exceeds a sixth of a turn): on a CPU those are
    several times slower than plain arithmetic.
    """
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    chroma = maxc.sub(minc)
    # 1.0 where the channel holds the maximum, else 0.0
    is_r = torch.sub(r, maxc).sign_().add_(1.0)
    is_g = torch.sub(g, maxc).sign_().add_(1.0)
    # hue * chroma; torchvision's tie order: r wins over g, g over b (ties agree modulo 6)
    h = torch.add(torch.sub(r, g), chroma, alpha=2.0)  # b is the max
    h.lerp_(torch.sub(b, r), is_g)
    h.lerp_(torch.sub(g, b).sub_(chroma, alpha=2.0), is_r)
    # grey pixels (chroma 0) have h * chroma = 0: any hue gives c = max
    h.div_(chroma.clamp(min=1e-30)).add_(6.0 * shift.to(x.dtype).view(-1, 1, 1))
    if x.device.type != "cpu" or float(shift.abs().max()) > 1.0 / 6.0:
        h.sub_(torch.mul(h, 1.0 / 6.0).round_().mul_(6.0))  # back into [-3, 3]
    # d - 1 for each channel, then c = max - chroma * clamp(d - 1, 0, 1), in [0, max]
    ramps = (torch.minimum(torch.add(h, 2.0).abs_().sub_(1.0), 3.0 - h),  # red: -2 (or 4)
             h.abs().sub_(1.0),  # green: 0 (|h| up to 4 saturates the same way)
             torch.minimum(torch.sub(h, 2.0).abs_().sub_(1.0), h + 3.0))  # blue: 2 (or -4)
    for c, ramp in enumerate(ramps):
        torch.addcmul(maxc, chroma, ramp.clamp_(0.0, 1.0), value=-1.0, out=x[:, c])
    return x


JITTER: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "brightness": brightness_, "contrast": contrast_, "saturation": saturation_, "hue": hue_}


def apply_jitter_(x: torch.Tensor, draws: JitterDraws, start: int = 0) -> torch.Tensor:
    """Apply the drawn adjustments in place to patches start .. start + len(x) of the batch."""
    for name, factor in draws.steps:
        JITTER[name](x, factor[start:start + x.shape[0]])
    return x


# --------------------------------------------------------------------------- geometry
_DIHEDRAL_OPS = (lambda t: t.transpose(-1, -2), lambda t: t.flip(-1), lambda t: t.flip(-2))


def apply_dihedral(x: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
    """Transpose, flip left-right, flip up-down the square patches whose coins say so.

    Random coins give each of the 8 symmetries of the square with probability 1/8: the law of
    the seed's random flip + random rot90 chain. Every patch is transformed and then selected:
    on a GPU that costs a few memory passes, while indexing by the coins (`nonzero`) would
    stall the host until the GPU catches up. (The fused CPU path flips views while cropping.)
    """
    for coin, op in zip(coins, _DIHEDRAL_OPS, strict=True):
        x = torch.where(coin[:, None, None, None], op(x), x)
    return x


def to_unit_range(patches: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    # contiguous NCHW: the crops come out of the gather channels-last, which makes the
    # elementwise colour ops several times slower on a CPU
    return patches.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> [-1, 1] (the seed's ScaleIntensityRange(0, 255, -1, 1))."""
    return x * 2.0 - 1.0


# On a CPU, a few patches at a time keep the working set in cache (the ops are bound by memory
# traffic), and are enough to keep the per-op overhead of torch small.
CPU_CHUNK = 2


def empty_patches(n: int, patch: int, channels_last: bool = False, shared: bool = False
                  ) -> torch.Tensor:
    """An uninitialised (n, 3, patch, patch) float32 CPU output for `make_patches`.

    shared=True puts it in shared memory first, so that a DataLoader worker hands it to the
    main process without another copy.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not shared:
        return torch.empty((n, 3, patch, patch), memory_format=fmt)
    like = torch.empty((0, 3, patch, patch), memory_format=fmt)
    size, stride = (n, 3, patch, patch), like.stride()
    try:  # allocate in shared memory at once (share_memory_() copies what it is given)
        storage = torch.UntypedStorage._new_shared(n * 3 * patch * patch * 4)
        return torch.empty(0).set_(storage, 0, size, stride)
    except (AttributeError, RuntimeError, TypeError):  # private torch API: fall back
        return torch.empty(size, memory_format=fmt).share_memory_()


def _patches_cpu(regions: torch.Tensor | Sequence[torch.Tensor], draws: PatchDraws, grid: int,
                 patch: int, out: torch.Tensor) -> torch.Tensor:
    """The fused CPU execution of `draws` (see the module docstring), chunk by chunk."""
    n, cells = out.shape[0], grid * grid
    # (R, R, 3) numpy views of the regions, whatever their memory layout (decoders give HWC)
    hwc = [r.permute(1, 2, 0).numpy() for r in regions]
    ys, xs = draws.offsets.T.tolist()
    coins = draws.coins.tolist() if draws.coins is not None else None
    chunk = torch.empty((min(CPU_CHUNK, n), 3, patch, patch))
    planes = chunk.numpy()
    minus_one = torch.tensor(-1.0)
    channels_last = out.permute(0, 2, 3, 1).is_contiguous()
    nhwc = out.permute(0, 2, 3, 1).numpy()
    for start in range(0, n, CPU_CHUNK):
        stop = min(n, start + CPU_CHUNK)
        for j, i in enumerate(range(start, stop)):
            view = hwc[i // cells][ys[i]:ys[i] + patch, xs[i]:xs[i] + patch]
            if coins is not None:  # transpose, then flip columns, then rows: views only
                if coins[0][i]:
                    view = view.transpose(1, 0, 2)
                if coins[1][i]:
                    view = view[:, ::-1]
                if coins[2][i]:
                    view = view[::-1]
            np.copyto(planes[j], view.transpose(2, 0, 1), casting="unsafe")  # uint8 -> float
        part = chunk[:stop - start].div_(255.0)
        if draws.jitter is not None:
            apply_jitter_(part, draws.jitter, start)
        # [0, 1] -> [-1, 1] (one pass: -1 + 2 x), into the output's layout
        if channels_last:  # plane by plane: a strided copy per channel beats a 4-D one
            torch.add(minus_one, part, alpha=2.0, out=part)
            for c in range(3):
                np.copyto(nhwc[start:stop, :, :, c], planes[:stop - start, c])
        else:
            torch.add(minus_one, part, alpha=2.0, out=out[start:stop])
    return out


def make_patches(regions: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor, *,
                 grid: int, patch: int, train: bool, aug: Augment,
                 generator: torch.Generator | None = None, channels_last: bool = False,
                 out: torch.Tensor | None = None, fused: bool | None = None,
                 order_generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 regions (B, 3, R, R) + label grids (B, g, g) -> (patches in [-1, 1], labels).

    Training crops at a random offset inside each cell and augments; evaluation crops the
    centre of each cell and does not augment. `regions` may also be a list of (3, R, R)
    tensors of any memory layout (decoded images, unstacked). `fused` (default: on a CPU)
    picks the chunked CPU execution, which writes into `out` when given (`empty_patches`);
    otherwise the batch is processed whole, as on a GPU. Both give the same patches.
    `order_generator` (a CPU generator) draws the jitter order when `generator` is on a GPU,
    so that making a batch never waits for the GPU (see `draw_jitter`).
    """
    if not len(regions):
        raise ValueError("make_patches: no regions")
    first = regions[0]
    _check_regions(first.shape, grid)
    b, device = len(regions), first.device
    draws = draw_patches(b, grid, first.shape[-1] // grid, patch, train, aug, generator, device,
                         order_generator)
    y = grid_labels(labels).to(torch.float32)
    if fused if fused is not None else device.type == "cpu":
        n = b * grid * grid
        if out is None:
            out = empty_patches(n, patch, channels_last)
        elif tuple(out.shape) != (n, 3, patch, patch) or out.dtype != torch.float32 \
                or out.device.type != "cpu":
            raise ValueError(f"make_patches: out is {out.dtype} {tuple(out.shape)} on "
                             f"{out.device}, expected float32 {(n, 3, patch, patch)} on the CPU "
                             "(use empty_patches)")
        return _patches_cpu(regions, draws, grid, patch, out), y
    # The whole batch at once: one gather, then each step on every patch.
    if not isinstance(regions, torch.Tensor):
        regions = torch.stack(list(regions))
    x = to_unit_range(crop_patches(regions, draws.offsets, grid, patch))
    if draws.jitter is not None:
        apply_jitter_(x, draws.jitter)
    if draws.coins is not None:
        x = apply_dihedral(x, draws.coins)
    # x is our own fresh tensor here, so scale it in place (one pass less than to_model_range)
    x = x.mul_(2.0).sub_(1.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y
