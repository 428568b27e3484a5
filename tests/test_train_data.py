"""Trainer input pipeline: shards -> batches, grid split, augmentations, DDP/worker splitting."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from reference_augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_patches,
    grid_patches,
)

from training.data.augment import Augment, empty_patches, grid_labels, make_patches
from training.data.stream import (
    PatchSpec,
    RegionBatch,
    RegionStream,
    ShardError,
    count_batches,
    make_loader,
    open_shards,
    rank_slices,
    to_device,
)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency here).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

TUMOR = (80, 30, 130)  # dark purple cells are tumor; light pink cells are normal
NORMAL = (235, 180, 210)


def tissue_region(labels: np.ndarray, cell: int, rng: np.random.Generator) -> np.ndarray:
    """A region whose cells are purple (label 1) or pink (label 0), with noise."""
    grid = labels.shape[0]
    rgb = np.zeros((grid * cell, grid * cell, 3), np.float32)
    for r in range(grid):
        for c in range(grid):
            colour = TUMOR if labels[r, c] else NORMAL
            rgb[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = colour
    rgb += rng.normal(0, 12, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG" if fmt == "jpg" else "PNG", quality=95)
    return buf.getvalue()


def write_region_shards(
    folder: Path,
    n: int,
    *,
    region: int = 96,
    grid: int = 3,
    shard_size: int = 8,
    seed: int = 0,
    fmt: str = "jpg",
    painter=None,
    split: str = "training",
) -> list[dict]:
    """Shards + manifest.json in `patchetl extract`'s format; returns the samples' metadata.

    `painter(i, labels, rng) -> rgb` draws region i; by default tissue_region.
    """
    assert region % grid == 0, "regions must split into whole cells"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cell = region // grid
    metas, shards = [], []
    for s, first in enumerate(range(0, n, shard_size)):
        name = f"{split}-{s:06d}.tar"
        count = 0
        with wds.TarWriter(str(folder / name), encoder=False) as sink:
            for i in range(first, min(n, first + shard_size)):
                labels = rng.integers(0, 2, (grid, grid)).astype(np.uint8)
                rgb = painter(i, labels, rng) if painter else tissue_region(labels, cell, rng)
                meta = {
                    "key": f"s{i:05d}",
                    "slide": f"slide_{i % 3}",
                    "x": 1000 + i,
                    "y": 2000,
                    "level": 0,
                    "region_size": region,
                    "grid": grid,
                    "cell_size": cell,
                    "labels": labels.tolist(),
                    "mpp": None,
                }
                sink.write(
                    {
                        "__key__": meta["key"],
                        fmt: encode(rgb, fmt),
                        "json": json.dumps(meta).encode(),
                    }
                )
                metas.append(meta)
                count += 1
        shards.append({"name": name, "count": count})
    manifest = {
        "split": split,
        "params": {"region_size": region, "fmt": fmt},
        "counts": {"written": n},
        "shards": shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return metas


def epoch_keys(shards, *, rank=0, world=1, workers=0, epoch=0, train=True, batch=4, grid=3):
    stream = RegionStream(
        shards,
        epoch=epoch,
        seed=7,
        train=train,
        regions_per_batch=batch,
        grid=grid,
        rank=rank,
        world=world,
        workers=workers,
        shuffle_buffer=5,
    )
    batches = list(make_loader(stream))
    assert len(batches) == len(stream)
    return [k for b in batches for k in b["keys"]], batches


def device_batches(loader, device: torch.device, region_size: int) -> list[RegionBatch]:
    """The loader's batches on `device` (JPEG bytes decoded there)."""
    return [to_device(b, device, region_size) for b in loader]


# --------------------------------------------------------------------------- grid + labels
def assert_patches_are_their_cells(
    x: torch.Tensor,
    y: torch.Tensor,
    keys: list[str],
    by_key: dict[str, np.ndarray],
    colours: np.ndarray,
) -> None:
    """Patch k * g * g + r * g + c of a batch is cell (r, c) of region k: its label, and the
    cell's flat colour as the mean of the patch in [-1, 1] (row-major, g = colours' grid)."""
    grid = colours.shape[0]
    for k, key in enumerate(keys):
        for r in range(grid):
            for c in range(grid):
                i = (k * grid + r) * grid + c
                assert y[i] == by_key[key][r, c]
                pixel = ((x[i].mean(dim=(1, 2)) + 1) * 127.5).round().to(torch.uint8)
                assert pixel.tolist() == colours[r, c].tolist()


def test_grid_split_gives_each_patch_its_cells_colour_and_row_major_label(tmp_path):
    """Every cell a distinct colour, an asymmetric label grid: patch i <-> cell (row, col)."""
    region, grid = 96, 3
    cell = region // grid
    colours = np.array(
        [
            [r * 80 + 20, c * 80 + 20, 60 + 10 * (3 * r + c)]
            for r in range(grid)
            for c in range(grid)
        ],
        np.uint8,
    )
    colours = colours.reshape(grid, grid, 3)
    asym = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], np.uint8)  # not symmetric, not flip-safe

    def painter(i, labels, rng):
        labels[:] = asym if i % 2 == 0 else asym.T
        return np.repeat(np.repeat(colours, cell, 0), cell, 1)

    metas = write_region_shards(
        tmp_path / "s", 4, region=region, grid=grid, painter=painter, fmt="png"
    )
    shards = open_shards(tmp_path / "s")
    stream = RegionStream(shards, epoch=0, seed=0, train=False, regions_per_batch=4, grid=grid)
    (batch,) = device_batches(make_loader(stream), torch.device("cpu"), region)
    for train in (False, True):
        x, y = make_patches(
            batch.regions,
            batch.labels,
            grid=grid,
            patch=28,
            train=train,
            aug=Augment.off(),
            generator=torch.Generator().manual_seed(1),
        )
        assert x.shape == (4 * 9, 3, 28, 28) and y.shape == (36,)
        by_key = {m["key"]: np.array(m["labels"]) for m in metas}
        assert_patches_are_their_cells(x, y, batch.keys, by_key, colours)
    assert not torch.equal(batch.labels[0], batch.labels[1])  # the pattern is asymmetric


def test_eval_crops_are_cell_centres_and_train_crops_stay_inside_their_cell():
    region = torch.arange(96 * 96, dtype=torch.int32).reshape(1, 1, 96, 96)
    centre = grid_patches(region, 3, 28)
    assert centre[0, 0, 0, 0] == 2 * 96 + 2  # offset (32 - 28) / 2 = 2 in cell (0, 0)
    assert centre[5, 0, 0, 0] == (32 + 2) * 96 + 64 + 2  # cell (1, 2)
    rnd = grid_patches(
        region.expand(50, 1, 96, 96), 3, 28, random=True, generator=torch.Generator().manual_seed(0)
    )
    rows, cols = rnd[:, 0, 0, 0] // 96, rnd[:, 0, 0, 0] % 96
    cell = torch.arange(9).repeat(50)
    assert torch.all(rows - (cell // 3) * 32 <= 4) and torch.all(rows >= (cell // 3) * 32)
    assert torch.all(cols - (cell % 3) * 32 <= 4) and torch.all(cols >= (cell % 3) * 32)
    assert len(set(rnd[:, 0, 0, 0].tolist())) > 9  # offsets vary
    assert grid_labels(torch.tensor([[[0, 1], [2, 3]]])).tolist() == [0, 1, 2, 3]


def test_one_value_labels_broadcast_to_the_grid(tmp_path):
    folder = tmp_path / "s"
    write_region_shards(folder, 3, region=48, grid=1)  # grid 1: one label per region
    shards = open_shards(folder)
    _, batches = epoch_keys(shards, train=False, grid=2)
    labels = batches[0]["labels"]
    assert labels.shape == (3, 2, 2)
    assert all(torch.all(lab == lab[0, 0]) for lab in labels)


# --------------------------------------------------------------------------- augmentations
def test_augmentations_keep_shape_dtype_range_and_are_identity_when_off():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 28, 28, generator=gen)
    assert augment_patches(x, Augment.off()) is x
    y = augment_patches(x, Augment(), torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)
    z = augment_patches(x, Augment(), torch.Generator().manual_seed(1))
    assert torch.equal(y, z)  # seeded: reproducible
    regions = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    labels = torch.zeros(2, 3, 3, dtype=torch.uint8)
    a, _ = make_patches(regions, labels, grid=3, patch=28, train=False, aug=Augment())
    b, _ = make_patches(regions, labels, grid=3, patch=28, train=False, aug=Augment.off())
    assert torch.equal(a, b)  # evaluation never augments
    assert a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
    flips_only = augment_patches(x, Augment(0, 0, 0, 0, True), torch.Generator().manual_seed(2))
    # flips/rotations only permute pixels: per-patch sorted values are unchanged
    assert torch.equal(flips_only.flatten(1).sort().values, x.flatten(1).sort().values)


def test_per_patch_colour_jitter_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0] = x[0, :1]  # grey: no hue
    x[1, 0] = x[1, 1]  # ties for the maximum: r == g, r == b, g == b
    x[2, 2] = x[2, 0]
    x[3, 1] = x[3, 2]
    x[4] = (x[4] > 0.5).float()  # pure colours, black and white
    x[5] = torch.round(x[5] * 4) / 4  # many equal values
    factors = torch.tensor([0.3, 1.0, 1.6, 0.25, 1.75, 0.9, 1.1, 0.0])
    hues = {  # small shifts (no wrap-around) and large ones (wrap-around), per image
        "small": torch.tensor([-0.04, 0.0, 0.03, 1 / 6, -1 / 6, 0.01, -0.02, 0.04]),
        "large": torch.tensor([-0.5, 0.5, 0.3, -0.3, 0.45, -0.2, 0.25, 0.17]),
    }
    for name, tv, ours in (
        ("brightness", TF.adjust_brightness, adjust_brightness(x, factors)),
        ("contrast", TF.adjust_contrast, adjust_contrast(x, factors)),
        ("saturation", TF.adjust_saturation, adjust_saturation(x, factors)),
    ):
        for i in range(8):
            torch.testing.assert_close(ours[i], tv(x[i], float(factors[i])), msg=name)
    for shifts in hues.values():
        ours = adjust_hue(x, shifts)
        assert ours.min() >= 0 and ours.max() <= 1
        for i in range(8):
            torch.testing.assert_close(
                ours[i], TF.adjust_hue(x[i], float(shifts[i])), atol=1e-5, rtol=1e-5
            )
    before = x.clone()
    adjust_hue(x, hues["small"])
    assert torch.equal(x, before)  # the public functions leave their input alone


def hwc_regions(n: int, size: int, seed: int) -> list[torch.Tensor]:
    """(3, R, R) uint8 regions laid out in memory as decoders return them (HWC)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).permute(2, 0, 1)
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "aug", [Augment(), Augment(0, 0, 0, 0, True), Augment(0.3, 0.5, 0, 0.2, False)]
)
def test_cpu_chunked_patches_equal_the_whole_batch_path(aug):
    """The fused CPU path (flips first on uint8, in-place jitter by chunks, straight into a
    channels-last output) gives the patches of the whole-batch (GPU) path for the same draws."""
    regions = hwc_regions(3, 96, seed=4)
    labels = torch.randint(0, 2, (3, 3, 3), dtype=torch.uint8)
    for train in (True, False):
        out = {}
        for fused in (True, False):
            out[fused] = make_patches(
                regions,
                labels,
                grid=3,
                patch=28,
                train=train,
                aug=aug,
                generator=torch.Generator().manual_seed(9),
                channels_last=True,
                fused=fused,
            )
        (xf, yf), (xb, yb) = out[True], out[False]
        assert xf.shape == (27, 3, 28, 28) and xf.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xf, xb, atol=1e-5, rtol=0)
        assert torch.equal(yf, yb) and torch.equal(yf, labels.reshape(-1).float())
        assert xf.min() >= -1 and xf.max() <= 1
    layouts = [
        make_patches(
            regions,
            labels,
            grid=3,
            patch=28,
            train=True,
            aug=aug,
            generator=torch.Generator().manual_seed(9),
            channels_last=cl,
        )[0]
        for cl in (False, True)
    ]
    assert layouts[0].is_contiguous() and torch.equal(layouts[0], layouts[1])
    with pytest.raises(ValueError, match="empty_patches"):
        make_patches(
            regions, labels, grid=3, patch=28, train=True, aug=aug, out=empty_patches(26, 28)
        )


# --------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("n, shard_size", [(40, 8), (22, 10), (7, 3)])
def test_ranks_and_workers_see_every_sample_once_with_equal_steps(tmp_path, n, shard_size):
    """2 ranks x 2 workers; (22, 10) and (7, 3) have fewer shards than ranks x workers... or
    shards of unequal size; every epoch is reshuffled but still covers each sample."""
    folder = tmp_path / "s"
    metas = write_region_shards(folder, n, region=48, shard_size=shard_size)
    shards = open_shards(folder)
    assert shards.total == n
    everything = {m["key"] for m in metas}
    for epoch in (0, 1):
        seen, steps = Counter(), []
        for rank in (0, 1):
            keys, batches = epoch_keys(shards, rank=rank, world=2, workers=2, epoch=epoch, batch=3)
            seen.update(keys)
            steps.append(len(batches))
            assert len(keys) == -(-n // 2)  # every rank gets ceil(n / 2) samples
        assert steps[0] == steps[1] == count_batches(-(-n // 2), 2, 3)
        assert set(seen) == everything
        extra = sum(seen.values()) - n
        assert extra == (2 - n % 2) % 2 and all(v <= 2 for v in seen.values())
    # validation does not pad: exactly once, rank sizes differ by at most one
    val = [epoch_keys(shards, rank=r, world=2, workers=2, train=False)[0] for r in (0, 1)]
    assert sorted(val[0] + val[1]) == sorted(everything)
    assert abs(len(val[0]) - len(val[1])) <= 1


def test_fewer_samples_than_ranks_still_gives_every_rank_work(tmp_path):
    folder = tmp_path / "s"
    write_region_shards(folder, 3, region=48, shard_size=3)  # one shard, 4 ranks x 2 workers
    shards = open_shards(folder)
    per_rank = [sum(s.size for s in rank_slices(shards, r, 4, 0, 0, True, True)) for r in range(4)]
    assert per_rank == [1, 1, 1, 1]
    keys = [epoch_keys(shards, rank=r, world=4, workers=2)[0] for r in range(4)]
    assert all(len(k) == 1 for k in keys)
    assert {k[0] for k in keys} == {"s00000", "s00001", "s00002"}


def test_shard_order_and_buffer_change_per_epoch_but_not_per_run(tmp_path):
    folder = tmp_path / "s"
    write_region_shards(folder, 32, region=48, shard_size=4)
    shards = open_shards(folder)
    a0, _ = epoch_keys(shards, epoch=0)
    a1, _ = epoch_keys(shards, epoch=1)
    assert a0 == epoch_keys(shards, epoch=0)[0] and a0 != a1 and sorted(a0) == sorted(a1)


# --------------------------------------------------------------------------- corruption
def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "s"
    write_region_shards(folder, 12, region=48, shard_size=6)
    # sample 2 of shard 0: garbage instead of a JPEG
    bad = folder / "training-000000.tar"
    samples = list(wds.tarfile_samples([{"url": str(bad)}]))
    samples[2]["jpg"] = b"not a jpeg at all"
    with wds.TarWriter(str(bad), encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__"})
    # shard 1 cut in the middle of its third sample: 3 and more samples missing
    tail = folder / "training-000001.tar"
    tail.write_bytes(tail.read_bytes()[: int(tail.stat().st_size * 0.4)])
    shards = open_shards(folder)
    stream = RegionStream(
        shards, epoch=0, seed=0, train=True, regions_per_batch=4, grid=3, workers=2
    )
    batches = list(device_batches(make_loader(stream), torch.device("cpu"), 48))
    assert len(batches) == len(stream)  # bad slots keep their place: step count unchanged
    valid = torch.cat([b.valid for b in batches])
    reasons = [r for b in batches for r in b.bad]
    assert valid.numel() == 12 and int((~valid).sum()) == len(reasons)
    assert any(r.startswith("s00002:") and "JPEG" in r.upper() for r in reasons)
    assert sum("training-000001.tar" in r for r in reasons) >= 3
    assert 4 <= len(reasons) <= 5  # the cut sample may or may not come out whole


def test_missing_manifest_and_pattern_sources(tmp_path):
    folder = tmp_path / "s"
    write_region_shards(folder, 10, region=48, shard_size=4)
    pattern = str(folder / "training-{000000..000002}.tar")
    assert open_shards(pattern).counts == (4, 4, 2)
    (folder / "manifest.json").unlink()
    assert open_shards(pattern).counts == (4, 4, 2)  # counted from the tars
    with pytest.raises(ShardError, match=r"manifest\.json"):
        open_shards(folder)
    with pytest.raises(ShardError, match="not found"):
        open_shards(str(folder / "training-{000000..000009}.tar"))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA"),
        ),
    ],
)
def test_main_process_batch_decode_matches_worker_decode_and_flags_corrupt_jpeg(tmp_path, device):
    """The `--decode cuda` path (bytes to the main process, one batched decode_jpeg call) on
    the CPU and, where there is one, on the GPU (nvJPEG): the same pixels as worker decoding
    (nvJPEG's IDCT may differ by a level or two), and a bad JPEG is a bad slot, not a crash."""
    folder = tmp_path / "s"
    write_region_shards(folder, 5, region=48, shard_size=5)
    shard = folder / "training-000000.tar"
    samples = list(wds.tarfile_samples([{"url": str(shard)}]))
    samples[3]["jpg"] = samples[3]["jpg"][:60]
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__"})
    shards = open_shards(folder)
    out = {}
    for in_worker in (True, False):
        stream = RegionStream(
            shards,
            epoch=0,
            seed=0,
            train=False,
            regions_per_batch=5,
            grid=3,
            decode_in_worker=in_worker,
        )
        raw = next(iter(make_loader(stream)))
        assert isinstance(raw["images"], torch.Tensor) == in_worker
        (out[in_worker],) = device_batches([raw], torch.device(device), 48)
    a, b = out[True], out[False]
    assert a.regions.device.type == b.regions.device.type == device
    assert a.valid.tolist() == b.valid.tolist() == [True, True, True, False, True]
    assert a.keys == b.keys
    if device == "cpu":
        assert torch.equal(a.regions, b.regions)
    else:
        # nvJPEG upsamples chroma without libjpeg's "fancy" (triangular) filter, so colour
        # edges differ by up to a few tens of levels; the images are the same otherwise
        mse = (a.regions.float() - b.regions.float()).pow(2).mean().item()
        assert 10 * np.log10(255**2 / mse) >= 30, mse
    assert len(b.bad) == 1 and b.bad[0].startswith("s00003:")


# --------------------------------------------------------------------------- CPU training
def test_workers_make_ready_patches_reproducibly_with_their_cells_labels(tmp_path):
    """CPU training: 2 DataLoader workers crop, augment and scale; the main process receives
    ready float32 channels-last patches (through shared memory), labelled by their cells."""
    region, grid = 96, 3
    cell = region // grid
    colours = np.array(
        [
            [r * 80 + 20, c * 80 + 20, 60 + 10 * (3 * r + c)]
            for r in range(grid)
            for c in range(grid)
        ],
        np.uint8,
    ).reshape(3, 3, 3)

    def painter(i, labels, rng):
        return np.repeat(np.repeat(colours, cell, 0), cell, 1)

    metas = write_region_shards(
        tmp_path / "s", 8, region=region, painter=painter, fmt="png", shard_size=3
    )
    by_key = {m["key"]: np.array(m["labels"]) for m in metas}
    shards = open_shards(tmp_path / "s")

    def batches(epoch: int, aug: Augment, train: bool = True) -> list[dict]:
        stream = RegionStream(
            shards,
            epoch=epoch,
            seed=3,
            train=train,
            regions_per_batch=3,
            grid=grid,
            workers=2,
            shuffle_buffer=4,
            patches=PatchSpec(28, aug),
        )
        return list(make_loader(stream))

    flips_only = batches(0, Augment(0, 0, 0, 0, True))
    assert len(flips_only) == count_batches(8, 2, 3)
    assert sorted(k for b in flips_only for k in b["keys"]) == sorted(by_key)
    for b in flips_only:
        x, y = b["patches"], b["patch_labels"]
        assert x.dtype == torch.float32 and x.shape == (len(b["keys"]) * 9, 3, 28, 28)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert_patches_are_their_cells(x, y, b["keys"], by_key, colours)
    # full augmentation: the same epoch gives the same patches (exact resume), another does not
    first, again, other = batches(1, Augment()), batches(1, Augment()), batches(2, Augment())
    assert all(torch.equal(a["patches"], b["patches"]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0]["patches"], other[0]["patches"])
    # evaluation: the workers' centre crops are make_patches on the regions, in this process
    plain = RegionStream(
        shards, epoch=0, seed=3, train=False, regions_per_batch=3, grid=grid, workers=2
    )
    regions = list(device_batches(make_loader(plain), torch.device("cpu"), region))
    ready = batches(0, Augment(), train=False)
    assert len(ready) == len(regions)
    for a, b in zip(ready, regions, strict=True):
        x, _ = make_patches(
            b.regions, b.labels, grid=grid, patch=28, train=False, aug=Augment.off()
        )
        assert a["keys"] == b.keys and torch.equal(a["patches"], x)
    with pytest.raises(ValueError, match="decode_in_worker"):
        RegionStream(
            shards,
            epoch=0,
            seed=3,
            train=True,
            regions_per_batch=3,
            grid=grid,
            decode_in_worker=False,
            patches=PatchSpec(28, Augment()),
        )
