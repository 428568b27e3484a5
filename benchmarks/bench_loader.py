"""Loader benchmark: patches/s delivered as ready training batches, on this CPU.

(a) the seed's on-the-fly pattern: a map-style Dataset that calls OpenSlide `read_region` for
    each 768 region, splits it 3 x 3 into 224 patches and applies the seed's augmentations
    (torchvision ColorJitter, flip, rot90, scaling) on the CPU per sample, in a DataLoader
    with 2 workers;
(b) the shard stream as the trainer runs it on a CPU: `RegionStream` over the shards of the
    same regions, each of 2 DataLoader workers decodes the JPEGs of its batch and makes the
    patches (grid split + the same augmentations per patch, `make_patches`), the main process
    receives ready float32 batches (`patch_batches`);
(c) for reference, the earlier split of work: JPEG decode in the 2 workers, grid split +
    augmentation of each batch in the main process (as on a GPU machine, but on the CPU).
Same regions, same batch size (in patches), same augmentations, medians of --repeats
interleaved runs.

    python -m benchmarks.bench_loader --out benchmarks/results/loader.md
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import cli, machine, median, table, write_section
from etl.extract.coords import load_regions
from etl.wsi.scale import region_box
from training.data.augment import Augment
from training.data.pipeline import patch_batches
from training.data.stream import PatchSpec, RegionStream, make_loader, open_shards

REGION, GRID, PATCH = 768, 3, 224


class OnTheFlyRegions(Dataset):
    """The seed's pattern (MONAI tumor_detection): read each region from the slide when it is
    asked for, split it into its grid, then the seed's CPU transforms on the sample:
    torchvision ColorJitter, random flip, random rot90, cast, scale to [-1, 1]."""

    def __init__(self, regions, seed: int):
        self.regions, self.seed = regions, seed
        self.slides: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, i: int):
        import openslide
        from torchvision.transforms import ColorJitter

        from etl.wsi.reader import read_region_openslide_rgb

        r = self.regions[i]
        slide = self.slides.get(r.slide) or self.slides.setdefault(
            r.slide, openslide.OpenSlide(str(r.slide))
        )
        x0, y0, _ = region_box(r.x, r.y, REGION)
        rgb = read_region_openslide_rgb(slide, x0, y0, 0, REGION, REGION)
        rng = np.random.default_rng(self.seed * 100003 + i)
        cell = REGION // GRID
        patches, labels = [], []
        for row in range(GRID):
            for col in range(GRID):
                oy, ox = (int(v) for v in rng.integers(0, cell - PATCH + 1, 2))
                y, x = row * cell + oy, col * cell + ox
                patches.append(rgb[y : y + PATCH, x : x + PATCH].transpose(2, 0, 1))
                labels.append(r.labels[row][col])
        torch.manual_seed(self.seed * 100003 + i)
        image = ColorJitter(64 / 255, 0.75, 0.25, 0.04)(torch.from_numpy(np.stack(patches)))
        out = image.numpy()
        if rng.random() < 0.5:
            out = np.flip(out, axis=-1)
        out = np.rot90(out, k=int(rng.integers(0, 4)), axes=(-2, -1))
        out = np.ascontiguousarray(out, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(out), torch.tensor(labels, dtype=torch.float32)


def collate_patches(items):
    return torch.cat([x for x, _ in items]), torch.cat([y for _, y in items])


def time_batches(batches, n_batches: int, warmup: int = 2) -> float:
    """Patches/s over n_batches after `warmup` batches (worker start-up excluded)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0, patches = time.perf_counter(), 0
    for _ in range(n_batches):
        x = next(it)
        patches += (x[0] if isinstance(x, tuple) else x.x).shape[0]
    return patches / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/loader.md"))
    ap.add_argument("--regions-per-batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args(argv)


def make_data(work: Path, args: argparse.Namespace):
    """3 synthetic slides with enough regions for the timed and warm-up batches, and their
    shards; returns the regions (for the seed pattern) and the training shards."""
    data, shards = work / "data", work / "shards"
    need = (args.batches + 2) * args.regions_per_batch
    per_slide = -(-need // 3) + 4
    cli(
        "synth",
        "--out",
        data,
        "--slides",
        3,
        "--width",
        8000,
        "--height",
        6000,
        "--seed",
        11,
        "--regions-per-slide",
        per_slide,
        "--region-size",
        REGION,
        "--val-fraction",
        0,
    )
    cli(
        "extract",
        "--json",
        data / "dataset_0.json",
        "--data-root",
        data,
        "--out",
        shards,
        "--no-progress",
        "--shard-size",
        32,
    )
    regions = load_regions(data / "dataset_0.json", data_root=data).regions
    return regions, open_shards(shards / "training")


def measure(regions, shard_set, args: argparse.Namespace) -> dict[str, list[float]]:
    """Patches/s of `args.repeats` interleaved runs of the three variants."""
    cpu = torch.device("cpu")
    runs: dict[str, list[float]] = {"seed": [], "shards": [], "main": []}
    for rep in range(args.repeats):
        loader = DataLoader(
            OnTheFlyRegions(regions, rep),
            batch_size=args.regions_per_batch,
            shuffle=True,
            num_workers=args.workers,
            collate_fn=collate_patches,
            generator=torch.Generator().manual_seed(rep),
        )
        runs["seed"].append(time_batches(loader, args.batches))
        del loader
        for name, spec in (
            ("shards", PatchSpec(PATCH, Augment(), channels_last=True)),
            ("main", None),
        ):
            stream = RegionStream(
                shard_set,
                epoch=rep,
                seed=0,
                train=True,
                regions_per_batch=args.regions_per_batch,
                grid=GRID,
                workers=args.workers,
                decode_in_worker=True,
                shuffle_buffer=64,
                patches=spec,
            )
            g = torch.Generator().manual_seed(rep)
            batches = patch_batches(
                make_loader(stream),
                cpu,
                REGION,
                grid=GRID,
                patch=PATCH,
                train=True,
                aug=Augment(),
                generator=g,
                channels_last=True,
            )
            runs[name].append(time_batches(batches, args.batches))
            del batches
    return runs


def render(args: argparse.Namespace, runs: dict[str, list[float]]) -> str:
    """The markdown section."""
    seed, ours, main = median(runs["seed"]), median(runs["shards"]), median(runs["main"])
    rows = [
        [
            "(a) seed pattern: OpenSlide read_region + torchvision/numpy transforms "
            "per sample, "
            f"DataLoader {args.workers} workers",
            f"{seed:.1f}",
            "1.00x",
            "baseline",
        ],
        [
            f"(b) shard stream: JPEG decode + split/augment of each batch in {args.workers} "
            "workers (the trainer on a CPU)",
            f"{ours:.1f}",
            f"{ours / seed:.2f}x",
            ">= 5x (a)",
        ],
        [
            f"(c) shard stream: JPEG decode in {args.workers} workers, "
            "split/augment in the main "
            "process",
            f"{main:.1f}",
            f"{main / seed:.2f}x",
            "reference",
        ],
    ]
    return "\n\n".join(
        [
            "## Loader: patches/s as ready training batches (issue 4)",
            "Command: `python -m benchmarks.bench_loader` (run by `make bench`). "
            f"Machine: {machine()}.",
            f"Data: 3 synthetic slides 8000 x 6000, regions {REGION} px (JPEG 95 shards), "
            f"grid {GRID}x{GRID}, patches {PATCH} px, "
            f"{args.regions_per_batch * GRID * GRID} patches "
            f"per batch, {args.batches} timed batches after 2 warm-up batches; medians of "
            f"{args.repeats} interleaved runs (all runs: "
            + ", ".join(f"{k} {[round(v, 1) for v in vs]}" for k, vs in runs.items())
            + ").",
            table(["variant", "patches/s (median)", "ratio", "target"], rows),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        regions, shard_set = make_data(work, args)
        runs = measure(regions, shard_set, args)
        write_section(args.out, render(args, runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
