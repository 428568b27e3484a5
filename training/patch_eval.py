"""Patch-level evaluation of a checkpoint on validation shards: AUC, accuracy, loss.

Runs the trainer's validation pass on its own: the same shard reader (`RegionStream`, no
shuffling), the same centre crops of each grid cell and the same input scaling
(`patch_batches(train=False)`), the same scoring (`training.metrics.score_patches`: masked
BCE, rank AUC with ties averaged), the checkpoint's model. Grid and patch size default to the
checkpoint's. The shards may be read from URLs (`etl.storage`), like the trainer's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from etl.storage import Retry
from training.data.augment import Augment
from training.data.pipeline import patch_batches
from training.data.stream import RegionStream, make_loader, open_shards
from training.errors import TrainError
from training.metrics import patch_metrics, score_patches
from training.model import load_model, resolve_device


@torch.no_grad()
def evaluate_patches(
    checkpoint: str | Path,
    shards: str | Path,
    *,
    device: str = "auto",
    batch_regions: int = 32,
    workers: int = 0,
    grid: int | None = None,
    patch_size: int | None = None,
    amp: bool | None = None,
    threshold: float = 0.5,
    retry: Retry | None = None,
) -> dict[str, Any]:
    """Patch AUC, accuracy (prob >= ``threshold``), BCE loss and counts over every valid patch.

    ``shards`` is a split folder, URL prefix or shard pattern (`open_shards`); ``retry`` says
    how URLs are read (default: `ShardReads`' defaults)."""
    dev = resolve_device(device)
    model, info = load_model(checkpoint, dev)
    grid = int(grid or info.get("grid", 3))
    patch = int(patch_size or info.get("patch_size", 224))
    data = open_shards(shards, retry)
    if data.region_size // grid < patch:
        raise TrainError(
            f"{data.source}: regions of {data.region_size} px split {grid}x{grid} give "
            f"cells of {data.region_size // grid} px, smaller than the patch size "
            f"{patch} (pass --grid/--patch-size matching the checkpoint's training)"
        )
    cuda = dev.type == "cuda"
    stream = RegionStream(
        data,
        epoch=0,
        seed=0,
        train=False,
        regions_per_batch=batch_regions,
        grid=grid,
        workers=workers,
        decode_in_worker=not cuda,
    )
    batches = patch_batches(
        make_loader(stream, pin_memory=cuda),
        dev,
        data.region_size,
        grid=grid,
        patch=patch,
        train=False,
        aug=Augment.off(),
        channels_last=False,
    )
    bad: list[str] = []
    p, t, loss = score_patches(
        model,
        batches,
        amp=cuda if amp is None else amp,
        on_batch=lambda batch: bad.extend(batch.regions.bad),
    )
    m = patch_metrics(p, t, loss, threshold)

    def num(v: float) -> float | None:
        return None if math.isnan(v) else v

    return {
        "auc": num(m["auc"]),
        "accuracy": num(m["accuracy"]),
        "loss": num(m["loss"]),
        "threshold": threshold,
        "patches": m["patches"],
        "tumor_patches": int((t >= 0.5).sum()),
        "bad_samples": len(bad),
        "grid": grid,
        "patch_size": patch,
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": int(info.get("epoch", 0)),
        "shards": data.source,
        "device": str(dev),
    }
