"""GPU benchmark (`make bench-gpu`): training patches/s and data wait, dense-vs-patch agreement,
whole-slide inference time.

One script, about 3-5 minutes on a CUDA machine; writes a markdown section (default
benchmarks/results/gpu.md, which `benchmarks.report` puts into BENCHMARKS.md):

1. data: a few synthetic slides (`patchetl synth`) and their shards (`patchetl extract`,
   768 px regions, JPEG 95), in a temporary folder;
2. training on CUDA with the real `train()` (bf16 autocast, channels_last, AdamW, batch 512
   patches rounded down to whole regions, 224 px patches), four data paths: JPEG decode on
   CPU DataLoader workers or on the GPU (batched nvJPEG), each with the device-side steps
   (transfer, decode, crops, augmentation) in the training thread ("sync", as before) or
   prefetched by a background thread on a side CUDA stream (the default), against the
   model-alone ceiling (the same step on a batch already on the GPU). TrainConfig has no step
   limit, so the epoch is bounded by the data: the shards hold `workers x regions per batch x
   batches_per_worker` regions (6 full batches per DataLoader worker, 48 steps with 8
   workers); epoch 1 (cuDNN autotuning, worker start) is dropped and the table gives the
   medians of epochs 2-3 of 2 interleaved runs per variant, as the trainer logs them
   (patches/s over the epoch, share of it spent waiting for data);
3. dense vs patch-by-patch agreement (issue 5) of a default-variant run's checkpoint (224 px,
   AdamW) on two held-out synthetic slides, as `patchetl check-dense` computes it (Pearson r
   inside tissue; target >= 0.95);
4. whole-slide dense inference on CUDA of a 100k x 100k synthetic slide with the checkpoint
   the training runs wrote, after a warm-up on one of the small slides. Rendering 10^10 pixels
   would take about 10 minutes, so the slide is a *mosaic*: tissue blocks of 4096 px rendered
   once by the synthetic generator and placed on glass where the generator's tissue layout
   for the full size says tissue is; level 0 and the levels whose block is still whole tiles
   are written from pre-encoded JPEG tiles (`tifffile` writes an iterator of tile bytes), the
   coarser levels from downsampled blocks. It is a real pyramidal tiled TIFF that OpenSlide and
   the direct reader open; every tile is read and decoded like any other slide's.

It refuses to run (exit 2) without CUDA. `--device cpu --tiny` runs every stage at toy size
on the CPU (about 1-2 minutes on 2 cores) so that the code paths are checked anywhere; its
numbers mean nothing and it writes $TMPDIR/bench_gpu_smoke.md unless --out is given.

    python -m benchmarks.bench_gpu                      # CUDA machine
    python -m benchmarks.bench_gpu --device cpu --tiny  # smoke run, any machine
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cli, machine, median, table, write_section
from etl.synth.scene import GLASS_RGB, make_scene
from etl.synth.textures import TILE
from etl.wsi.downsample import block_mean
from etl.wsi.pyramid import PyramidWriter, pyramid_dims


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real run and the toy (--tiny) run."""

    slides: int
    slide_width: int
    slide_height: int
    batch_size: int  # patches per step (the trainer rounds down to whole regions of 9)
    batches_per_worker: int  # bounds the epoch: every worker yields this many full batches
    workers: int  # DataLoader workers
    region: int
    patch: int
    epochs: int
    rounds: int
    big_side: int  # the mosaic slide is big_side x big_side
    block: int  # mosaic block side (a multiple of TILE)
    unique_blocks: int
    heldout_width: int  # the two held-out slides of the dense-vs-patch agreement stage
    heldout_height: int

    @property
    def regions_per_batch(self) -> int:
        return self.batch_size // 9


def full_sizes(cpus: int) -> Sizes:
    return Sizes(
        slides=4,
        slide_width=8000,
        slide_height=6000,
        batch_size=512,
        batches_per_worker=6,
        workers=max(1, min(8, cpus)),
        region=768,
        patch=224,
        epochs=3,
        rounds=2,
        big_side=100_000,
        block=4096,
        unique_blocks=4,
        heldout_width=4000,
        heldout_height=3000,
    )


def tiny_sizes() -> Sizes:
    return Sizes(
        slides=2,
        slide_width=1600,
        slide_height=1200,
        batch_size=36,
        batches_per_worker=2,
        workers=2,
        region=288,
        patch=64,
        epochs=2,
        rounds=1,
        big_side=1536,
        block=256,
        unique_blocks=3,
        heldout_width=1024,
        heldout_height=768,
    )


def log(message: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- mosaic slide
@dataclass
class Mosaic:
    """What `write_mosaic_slide` wrote."""

    path: Path
    width: int
    height: int
    levels: list[tuple[int, int]]
    tissue_blocks: int
    blocks: int
    seconds: float

    @property
    def gib(self) -> float:
        return self.path.stat().st_size / 2**30


def block_layout(
    width: int, height: int, block: int, unique: int, mpp: float, seed: int
) -> tuple[np.ndarray, list[tuple[int, int]], Callable]:
    """Which block shows which rendered source block (-1: glass), the sources' (x, y), and
    the scene to render them from. Tissue blocks follow the generator's full-size tissue
    layout (at least half of a 5 x 5 sample of the block on tissue)."""
    scene = make_scene(width, height, mpp=mpp, has_tumor=False, seed=seed)
    nby, nbx = -(-height // block), -(-width // block)
    frac = np.zeros((nby, nbx))
    offs = (np.arange(5) + 0.5) * block / 5
    for by in range(nby):
        for bx in range(nbx):
            xs, ys = np.meshgrid(bx * block + offs, by * block + offs)
            frac[by, bx] = np.mean(scene.tissue_distance(xs.ravel(), ys.ravel()) > 0)
    # sources: the most tissue-filled blocks lying wholly inside the slide
    inside = [(by, bx) for by in range(height // block) for bx in range(width // block)]
    if not inside:
        raise ValueError(f"slide {width} x {height} is smaller than one block of {block} px")
    rng = np.random.default_rng(seed)
    inside.sort(key=lambda b: (-frac[b], rng.random()))
    sources = [(bx * block, by * block) for by, bx in inside[:unique]]
    layout = np.full((nby, nbx), -1, dtype=np.int64)
    tissue = frac >= 0.5
    layout[tissue] = rng.integers(len(sources), size=int(tissue.sum()))
    return layout, sources, scene.render_tile


def write_mosaic_slide(
    path: Path,
    side: int,
    *,
    block: int = 4096,
    unique: int = 4,
    mpp: float = 0.243,
    seed: int = 0,
    quality: int = 90,
) -> Mosaic:
    """A side x side pyramidal JPEG TIFF made of `unique` rendered tissue blocks on glass.

    Level k (downsample 2^k, sizes as `patchetl synth` makes them) is written from
    pre-encoded tiles while a block is whole tiles at that level, else from an array
    assembled from downsampled blocks (those levels are small).
    """
    if block % TILE:
        raise ValueError(f"block {block}: use a multiple of {TILE}")
    t0 = time.perf_counter()
    layout, sources, render_tile = block_layout(side, side, block, unique, mpp, seed)
    blocks = []
    for x0, y0 in sources:
        img = np.empty((block, block, 3), np.uint8)
        for ty in range(0, block, TILE):
            for tx in range(0, block, TILE):
                img[ty : ty + TILE, tx : tx + TILE] = render_tile(x0 + tx, y0 + ty)
        blocks.append(img)
    glass = np.empty((TILE, TILE, 3), np.uint8)
    glass[:] = GLASS_RGB
    levels = pyramid_dims(side, side, 2)
    small = blocks
    with PyramidWriter(path, side, side, quality=quality, tile=TILE, mpp=(mpp, mpp)) as writer:
        for k, (w, h) in enumerate(levels):
            d = 2**k
            if block % d:
                raise ValueError(f"block {block} is not a multiple of level {k}'s downsample {d}")
            bl = block // d  # block side at this level
            if k:  # each level from the one above, as the generator's pyramid is made
                small = [block_mean(b, 2, "drop") for b in small]
            if bl % TILE == 0:
                per = bl // TILE  # tiles per block side
                coded = writer.encode_tiles(
                    [glass]
                    + [
                        s[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
                        for s in small
                        for r in range(per)
                        for c in range(per)
                    ]
                )
                glass_bytes, tiles = coded[0], coded[1:]

                def tile_bytes(
                    w: int = w, h: int = h, per: int = per, tiles=tiles, glass_bytes=glass_bytes
                ) -> Iterator[bytes]:
                    for ty in range(-(-h // TILE)):
                        for tx in range(-(-w // TILE)):
                            src = layout[ty // per, tx // per]
                            yield (
                                glass_bytes
                                if src < 0
                                else tiles[(src * per + ty % per) * per + tx % per]
                            )

                writer.level(tile_bytes(), size=(w, h))
            else:
                img = np.empty((h, w, 3), np.uint8)
                img[:] = GLASS_RGB
                for by, bx in zip(*np.nonzero(layout >= 0), strict=True):
                    y, x = by * bl, bx * bl
                    part = small[layout[by, bx]][: max(0, h - y), : max(0, w - x)]
                    img[y : y + part.shape[0], x : x + part.shape[1]] = part
                writer.level(img)
    return Mosaic(
        path, side, side, levels, int((layout >= 0).sum()), layout.size, time.perf_counter() - t0
    )


# --------------------------------------------------------------------------- stages
def make_shards(work: Path, sz: Sizes) -> tuple[Path, Path, int]:
    """Synthetic slides + shards; returns (data folder, training split folder, regions)."""
    data, shards = work / "data", work / "shards"
    regions = sz.workers * sz.regions_per_batch * sz.batches_per_worker
    per_slide = -(-regions // sz.slides)
    cli(
        "synth",
        "--out",
        data,
        "--slides",
        sz.slides,
        "--width",
        sz.slide_width,
        "--height",
        sz.slide_height,
        "--seed",
        3,
        "--regions-per-slide",
        per_slide,
        "--region-size",
        sz.region,
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
        "--region-size",
        sz.region,
        "--quality",
        95,
        "--no-progress",
        "--shard-size",
        max(1, -(-regions // 16)),
        "--workers",
        os.cpu_count() or 1,
    )
    return data, shards / "training", per_slide * sz.slides


def run_training(
    shards: Path, out: Path, sz: Sizes, device: str, decode: str, prefetch: bool, seed: int
) -> list[dict]:
    """The real trainer for `sz.epochs` epochs; returns its per-epoch metric rows."""
    from training.config import TrainConfig
    from training.train import train

    # AdamW without warm-up (the demo's settings): a default-variant run's checkpoint is
    # also the trained model of the dense-vs-patch agreement stage
    cfg = TrainConfig(
        train=str(shards),
        out=str(out),
        epochs=sz.epochs,
        batch_size=sz.batch_size,
        patch_size=sz.patch,
        decode=decode,
        device=device,
        channels_last=True,
        workers=sz.workers,
        seed=seed,
        optimizer="adamw",
        warmup_epochs=0.0,
        prefetch=prefetch,
        progress=False,
    )
    result = train(cfg, log=lambda m: log(f"  {m}"))
    if device == "cuda":
        torch.cuda.empty_cache()
    return result["history"]


def model_ceiling(sz: Sizes, device: str, steps: int = 20, repeats: int = 3) -> float:
    """Patches/s of the training step alone (the same model, batch, bf16, channels_last and
    AdamW) on one batch already on the device: what the GPU does when it never waits."""
    speed = _step_rate(sz, device, steps, repeats)
    if device == "cuda":  # the model and batch are gone with _step_rate's frame
        torch.cuda.empty_cache()
    return speed


def _step_rate(sz: Sizes, device: str, steps: int, repeats: int) -> float:
    from training.model import build_model

    dev = torch.device(device)
    n = sz.regions_per_batch * 9
    torch.manual_seed(0)
    model = build_model().to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(n, 3, sz.patch, sz.patch, device=dev).contiguous(
        memory_format=torch.channels_last
    )
    y = (torch.rand(n, device=dev) < 0.5).float()
    cuda = dev.type == "cuda"

    def run(k: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(k):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x).flatten()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return k * n / (time.perf_counter() - t)

    run(max(2, steps // 2))  # cuDNN autotuning, allocator warm-up
    return median([run(steps) for _ in range(repeats)])


VARIANTS = {  # name: (decode, prefetch, description)
    "cpu-sync": (
        "cpu",
        False,
        "JPEG decode on CPU workers; transfer, crops and augmentation "
        "in the training thread (before)",
    ),
    "cpu": (
        "cpu",
        True,
        "JPEG decode on CPU workers; transfer, crops and augmentation prefetched on a side stream",
    ),
    "cuda-sync": (
        "cuda",
        False,
        "nvJPEG decode on the GPU, crops and augmentation in the training thread (before)",
    ),
    "cuda": (
        "cuda",
        True,
        "nvJPEG decode, crops and augmentation prefetched on a side stream (the default on CUDA)",
    ),
}


def bench_training(shards: Path, work: Path, sz: Sizes, device: str) -> tuple[list[list], Path]:
    """Interleaved runs of every variant, with the model-alone ceiling as the last row;
    returns the rows for the table and the default variant's checkpoint."""
    ceiling = model_ceiling(sz, device)
    log(f"model alone: {ceiling:.0f} patches/s")
    speed: dict[str, list[float]] = {v: [] for v in VARIANTS}
    steady: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wait: dict[str, list[float]] = {v: [] for v in VARIANTS}
    loss: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ckpt = None
    for rnd in range(sz.rounds):
        for variant in list(VARIANTS) if rnd % 2 == 0 else list(VARIANTS)[::-1]:
            decode, prefetch, _ = VARIANTS[variant]
            # on the CPU smoke run nvJPEG does not exist: the 'cuda' rows run CPU decode
            decode = decode if device == "cuda" else "cpu"
            out = work / f"train-{variant}-{rnd}"
            log(f"training: {variant}, round {rnd + 1}/{sz.rounds}")
            history = run_training(shards, out, sz, device, decode, prefetch, seed=rnd)
            later = history[1:] or history  # epoch 1 warms up (cuDNN autotune, workers)
            speed[variant] += [r["patches_per_s"] for r in later]
            # without the epoch's start (worker processes, first batch), paid once per epoch
            # (the first batch's patches are left out too, its step stays in: conservative)
            steady[variant] += [
                r["train_patches"] * (1 - 1 / r["train_steps"]) / (r["seconds"] - r["startup_s"])
                for r in later
            ]
            wait[variant] += [r["data_wait"] for r in later]
            loss[variant].append(history[-1]["train_loss"])
            if variant == "cuda":
                ckpt = out / "last.pt"
    base = median(speed["cpu-sync"])
    rows = [
        [
            VARIANTS[v][2]
            + (
                ""
                if device == "cuda" or VARIANTS[v][0] == "cpu"
                else " (smoke run: ran CPU decode)"
            ),
            f"{median(speed[v]):.0f}",
            f"{100 * median(wait[v]):.0f}%",
            f"{median(speed[v]) / base:.2f}x",
            f"{median(speed[v]) / ceiling:.0%}",
            f"{median(steady[v]):.0f} ({median(steady[v]) / ceiling:.0%})",
            ", ".join(f"{x:.3f}" for x in loss[v]),
            ", ".join(f"{x:.0f}" for x in speed[v]),
        ]
        for v in VARIANTS
    ]
    rows.append(
        [
            "model alone (one batch already on the device, no data path)",
            f"{ceiling:.0f}",
            "-",
            f"{ceiling / base:.2f}x",
            "100%",
            "-",
            "-",
            "-",
        ]
    )
    assert ckpt is not None
    return rows, ckpt


def bench_inference(
    slide: Path, warmup_slide: Path, ckpt: Path, out: Path, device: str, workers: int
) -> dict:
    """Warm-up on a small slide, then the whole big slide, timed by stage."""
    from training.config import InferConfig
    from training.infer.outputs import write_outputs
    from training.infer.predictor import Predictor
    from training.infer.run import infer_slide
    from training.model import load_model

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, info = load_model(ckpt, dev)
    patch = int(info.get("patch_size", 224))
    cfg = InferConfig(
        checkpoint=str(ckpt),
        out=str(out),
        mode="dense",
        stride=32,
        patch_size=patch,
        device=device,
        workers=workers,
        progress=False,
    )
    amp = dev.type == "cuda"
    predictor = Predictor(model, patch, cfg.stride, dev, amp=amp, channels_last=True)
    t0 = time.perf_counter()
    infer_slide(warmup_slide, predictor, cfg)
    warm = time.perf_counter() - t0
    log(f"inference warm-up on {warmup_slide.name}: {warm:.1f} s")
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = infer_slide(slide, predictor, cfg)
    t1 = time.perf_counter()
    write_outputs(result, out, cfg, {"device": dev.type, "amp": amp})
    outputs = time.perf_counter() - t1
    s = result.seconds
    return {
        "tissue_s": s["tissue"],
        "map_s": s["model"],
        "slide_s": s["total"],
        "outputs_s": outputs,
        "tissue_px": result.tissue_pixels,
        "tissue_fraction": result.tissue.fraction,
        "map": result.geometry.shape,
        "cells": int(result.cells.sum()),
        "patch": patch,
        "amp": amp,
        "tiles_per_batch": cfg.tiles_per_batch or (4 if dev.type == "cuda" else 1),
        "candidates": len(result.candidates),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    }


def bench_agreement(
    work: Path, ckpt: Path, sz: Sizes, device: str, workers: int
) -> tuple[list[list], dict]:
    """Dense vs patch maps of the trained checkpoint on held-out slides (one with tumor, one
    without, not seen in training), as `patchetl check-dense` computes them."""
    from training.config import InferConfig
    from training.infer.agreement import compare_slide, pooled
    from training.infer.predictor import make_predictor

    held = work / "heldout"
    cli(
        "synth",
        "--out",
        held,
        "--slides",
        2,
        "--width",
        sz.heldout_width,
        "--height",
        sz.heldout_height,
        "--seed",
        11,
        "--tumor-fraction",
        0.5,
        "--val-fraction",
        0,
    )
    cfg, predictor = make_predictor(
        InferConfig(checkpoint=str(ckpt), device=device, workers=workers, progress=False)
    )
    rows, results = [], []
    for path in sorted((held / "training" / "images").glob("*.tif")):
        res = compare_slide(path, predictor, cfg)
        results.append(res)
        a = res.agreement
        rows.append(
            [
                res.slide,
                a.cells,
                f"{a.pearson:.4f}",
                f"{a.mean_abs:.4f}",
                f"{a.max_abs:.3f}",
                f"{a.same_call:.2%}",
                f"{res.dense_seconds:.1f}",
                f"{res.patch_seconds:.1f}",
            ]
        )
        log(f"  {res.slide}: r {a.pearson:.4f}, mean |d| {a.mean_abs:.4f}")
    total = pooled(results)
    rows.append(
        [
            "**pooled**",
            total.cells,
            f"**{total.pearson:.4f}**",
            f"{total.mean_abs:.4f}",
            f"{total.max_abs:.3f}",
            f"{total.same_call:.2%}",
            "",
            "",
        ]
    )
    return rows, {"patch": cfg.patch_size, "amp": predictor.amp, "r": total.pearson}


def device_line(device: str) -> str:
    if device != "cuda":
        return f"CPU (smoke run), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    return (
        f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB), torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}"
    )


def refuse_without_cuda() -> None:
    if not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device is available (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); run it on a "
            "machine with an NVIDIA GPU, or `python -m benchmarks.bench_gpu --device cpu "
            "--tiny` for a smoke run of every stage on the CPU. Nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(2)


def _report_training(
    args: argparse.Namespace,
    sz: Sizes,
    stage: dict[str, float],
    total: float,
    n_regions: int,
    train_rows: list[list],
) -> list[str]:
    """The title, command line and training table of the markdown section."""
    batch = sz.regions_per_batch * 9
    steps = sz.batches_per_worker * sz.workers
    title = "## GPU: training throughput, dense-vs-patch agreement, whole-slide inference"
    if args.device != "cuda":
        title += " — CPU SMOKE RUN, toy sizes, numbers mean nothing"
    return [
        title,
        f"Command: `python -m benchmarks.bench_gpu{' --device cpu --tiny' if args.tiny else ''}"
        f"{' --only-training' if args.only_training else ''}"
        f"{f' --rounds {args.rounds}' if args.rounds else ''}`"
        f" (`make bench-gpu`). Device: {device_line(args.device)}. Host: {machine()}. "
        f"Whole script: {total:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in stage.items())
        + ").",
        f"### Training: patches/s and data wait by data path\n\n"
        f"Real `train()` ({'bf16 autocast' if args.device == 'cuda' else 'fp32'}, "
        f"channels_last, AdamW, augmentation on the device), batch {batch} patches "
        f"(--batch-size {sz.batch_size} rounded down to {sz.regions_per_batch} whole regions "
        f"x 9) of {sz.patch} px from {sz.region} px regions "
        f"(JPEG 95 shards, {n_regions} regions from {sz.slides} synthetic slides), "
        f"{sz.workers} DataLoader workers, {steps} steps per epoch. Medians over epochs "
        f"2-{sz.epochs} of {sz.rounds} interleaved run(s) per variant (epoch 1 warms up); "
        "data wait = share of the epoch the training loop spent in `next(batches)` "
        "(without prefetch: loader, transfer, decode, crops, augmentation, and any wait for "
        "the GPU these force; with prefetch: waiting for the prefetch thread); of ceiling = "
        "patches/s over the model-alone rate (the same step on a batch already on the "
        "device); after start-up = patches/s counted from the first batch in hand (each "
        f"epoch here is only {steps} steps, so starting the DataLoader workers and filling "
        "the first batch weighs more than in a real epoch); loss = the last epoch's training "
        "loss of each run (finite = no corrupted batches).",
        table(
            [
                "data path",
                "patches/s (median)",
                "data wait (median)",
                "vs first row",
                "of ceiling",
                "after start-up (of ceiling)",
                "final train loss per run",
                "patches/s of each measured epoch",
            ],
            train_rows,
        ),
    ]


def _report_agreement(sz: Sizes, agree_rows: list[list] | None, agree: dict | None) -> list[str]:
    """The dense-vs-patch part of the markdown section (a 'not run' note without results)."""
    if agree_rows is None or agree is None:
        return [
            "### Dense vs patch-by-patch maps\n\nNot run (--only-training, or the "
            "run stopped before)."
        ]
    return [
        f"### Dense vs patch-by-patch maps of the trained checkpoint (issue 5)\n\n"
        f"The default variant's last.pt from the last round ({sz.patch} px patches, "
        f"{sz.epochs} epochs) on two "
        f"held-out synthetic slides of {sz.heldout_width} x {sz.heldout_height} px (`patchetl "
        f"synth --seed 11`: one with tumor, one without), stride 32, "
        f"{'bf16' if agree['amp'] else 'fp32'}, as `patchetl check-dense` computes it: over "
        "the map pixels inside tissue, Pearson r, mean and largest |dense - patch|, and the "
        "share of pixels on the same side of 0.5. Target: pooled r >= 0.95 "
        f"({'met' if agree['r'] >= 0.95 else 'NOT met'}). A normal slide's map is ~0 "
        "everywhere, so its own r measures noise.",
        table(
            [
                "slide",
                "tissue map px",
                "Pearson r",
                "mean abs diff",
                "max abs diff",
                "same call",
                "dense s",
                "patch s",
            ],
            agree_rows,
        ),
    ]


def _report_inference(
    sz: Sizes, mosaic: Mosaic | None, inf: dict | None, infer_workers: int
) -> list[str]:
    """The whole-slide part of the markdown section (a 'not run' note without results)."""
    if mosaic is None or inf is None:
        return [
            "### Whole-slide dense inference\n\nNot run (--only-training, or the "
            "run stopped before)."
        ]
    per_1e8 = inf["map_s"] / (inf["tissue_px"] / 1e8)
    rows_inf = [
        ["tissue mask (Otsu on saturation, level-0 / 32)", f"{inf['tissue_s']:.1f}", ""],
        [
            "probability map: tile reads + dense model",
            f"{inf['map_s']:.1f}",
            f"{per_1e8:.2f} s per 1e8 tissue px",
        ],
        ["whole slide (mask + map + NMS)", f"{inf['slide_s']:.1f}", "target < 60 s"],
        [
            "writing the outputs (npy, PNG, pyramidal TIFF, CSV, GeoJSON)",
            f"{inf['outputs_s']:.1f}",
            "",
        ],
    ]
    return [
        f"### Whole-slide dense inference\n\n"
        f"Slide: {mosaic.width} x {mosaic.height} px synthetic mosaic at 0.243 um/px "
        f"({mosaic.gib:.2f} GiB pyramidal JPEG TIFF, {len(mosaic.levels)} levels, "
        f"{mosaic.tissue_blocks}/{mosaic.blocks} blocks of {sz.block} px with tissue, "
        f"written in {mosaic.seconds:.0f} s; tissue {inf['tissue_fraction']:.0%} of the "
        f"slide = {inf['tissue_px'] / 1e9:.2f} G px). Checkpoint: the training runs' "
        f"last.pt; dense mode, stride 32, patch {inf['patch']} px, tiles 2048 px + 224 px "
        f"margin, tiles per pass: {inf['tiles_per_batch']}, "
        f"{'bf16' if inf['amp'] else 'fp32'}, {infer_workers} tile-reading threads; map "
        f"{inf['map'][1]} x {inf['map'][0]} ({inf['cells']} tissue cells), after a warm-up "
        "on a small slide"
        + (f"; peak GPU memory {inf['peak_gib']:.1f} GiB" if inf["peak_gib"] else "")
        + ". NCRF reports 0.5-1 h per Camelyon16 slide.",
        table(["stage", "seconds", "note"], rows_inf),
    ]


def report(
    args: argparse.Namespace,
    sz: Sizes,
    stage: dict[str, float],
    total: float,
    n_regions: int,
    train_rows: list[list],
    agree_rows: list[list] | None,
    agree: dict | None,
    mosaic: Mosaic | None,
    inf: dict | None,
    infer_workers: int,
) -> str:
    """The markdown section (without the whole-slide part while mosaic/inf are None)."""
    parts = _report_training(args, sz, stage, total, n_regions, train_rows)
    parts += _report_agreement(sz, agree_rows, agree)
    parts += _report_inference(sz, mosaic, inf, infer_workers)
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown section to write (default: benchmarks/results/gpu.md; "
        "with --tiny: $TMPDIR/bench_gpu_smoke.md)",
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a smoke run of every stage)")
    ap.add_argument(
        "--infer-workers",
        type=int,
        default=None,
        help="tile-reading threads for inference (default: CPU count, at most 16)",
    )
    ap.add_argument(
        "--only-training",
        action="store_true",
        help="stop after the training stage (data paths and model ceiling)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds of the training variants (default 2)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="work folder (kept); default: a temporary folder, deleted at the end",
    )
    return ap.parse_args(argv)


def bench_whole_slide(
    work: Path,
    data: Path,
    ckpt: Path,
    sz: Sizes,
    device: str,
    infer_workers: int,
    stage: dict[str, float],
) -> tuple[Mosaic, dict]:
    """The mosaic slide, then its dense inference; their seconds go into `stage`."""
    t = time.perf_counter()
    log(f"mosaic slide {sz.big_side} x {sz.big_side}")
    mosaic = write_mosaic_slide(
        work / f"mosaic_{sz.big_side}.tif",
        sz.big_side,
        block=sz.block,
        unique=sz.unique_blocks,
        seed=1,
    )
    log(
        f"  written in {mosaic.seconds:.1f} s: {mosaic.gib:.2f} GiB, {len(mosaic.levels)} "
        f"levels, {mosaic.tissue_blocks}/{mosaic.blocks} tissue blocks"
    )
    stage["mosaic slide"] = time.perf_counter() - t
    t = time.perf_counter()
    warmup_slide = min((data / "training" / "images").glob("*.tif"))
    inf = bench_inference(mosaic.path, warmup_slide, ckpt, work / "infer", device, infer_workers)
    stage["inference"] = time.perf_counter() - t
    return mosaic, inf


def run_stages(
    args: argparse.Namespace, sz: Sizes, work: Path, out: Path, infer_workers: int
) -> None:
    """Every stage in turn; the markdown section is written after the training stage with
    --only-training, else after the agreement stage and again at the end."""
    started = time.perf_counter()
    stage: dict[str, float] = {}
    t = time.perf_counter()
    log(f"data: {sz.slides} synthetic slides {sz.slide_width} x {sz.slide_height} + shards")
    data, shards, n_regions = make_shards(work, sz)
    stage["data"] = time.perf_counter() - t

    t = time.perf_counter()
    train_rows, ckpt = bench_training(shards, work, sz, args.device)
    stage["training"] = time.perf_counter() - t

    def save(
        total: float,
        agree_rows: list[list] | None = None,
        agree: dict | None = None,
        mosaic: Mosaic | None = None,
        inf: dict | None = None,
    ) -> None:
        section = report(
            args,
            sz,
            stage,
            total,
            n_regions,
            train_rows,
            agree_rows,
            agree,
            mosaic,
            inf,
            infer_workers,
        )
        write_section(out, section)

    if args.only_training:
        save(time.perf_counter() - started)
        return

    t = time.perf_counter()
    log("dense vs patch agreement on 2 held-out slides")
    agree_rows, agree = bench_agreement(work, ckpt, sz, args.device, infer_workers)
    stage["agreement"] = time.perf_counter() - t
    # written now as well, so that a later stage's failure does not lose it
    save(time.perf_counter() - started, agree_rows, agree)

    mosaic, inf = bench_whole_slide(work, data, ckpt, sz, args.device, infer_workers, stage)
    total = time.perf_counter() - started
    log(
        "stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in stage.items())
        + f"; total {total:.0f} s"
    )
    save(total, agree_rows, agree, mosaic, inf)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda":
        refuse_without_cuda()
    cpus = os.cpu_count() or 1
    sz = tiny_sizes() if args.tiny else full_sizes(cpus)
    if args.rounds:
        sz = dataclasses.replace(sz, rounds=args.rounds)
    infer_workers = args.infer_workers or max(1, min(16, cpus))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (
        Path(tempfile.gettempdir()) / "bench_gpu_smoke.md"
        if args.tiny
        else Path("benchmarks/results/gpu.md")
    )
    try:
        run_stages(args, sz, work, out, infer_workers)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
