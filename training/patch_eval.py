"""Patch-level evaluation of a checkpoint on validation shards: AUC, accuracy, loss.

Runs the trainer's validation pass on its own: the same shard reader (`RegionStream`, no
shuffling), the same centre crops of each grid cell and the same input scaling
(`make_patches(train=False)`), the checkpoint's model. Grid and patch size default to the
checkpoint's. The AUC is `etl.evaluate.froc.binary_auc` (rank based, ties averaged).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from etl.evaluate.froc import binary_auc
from training.data.augment import Augment, make_patches
from training.data.stream import RegionStream, device_batches, make_loader, open_shards
from training.model import build_model
from training.errors import TrainError
from training.train import load_checkpoint


def resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise TrainError(f"--device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's FCResNet18 in eval mode on ``device``, and the checkpoint dict."""
    path = Path(checkpoint)
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found (train one with `patchetl train`, which "
                         "writes <out>/best.pt and <out>/last.pt)")
    ckpt = load_checkpoint(path)
    model = build_model()
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as exc:
        raise TrainError(f"{path}: the weights do not fit FCResNet18 ({str(exc)[:200]})") from None
    return model.to(device).eval(), ckpt


@torch.no_grad()
def evaluate_patches(checkpoint: str | Path, shards: str | Path, *, device: str = "auto",
                     batch_regions: int = 32, workers: int = 0, grid: int | None = None,
                     patch_size: int | None = None, amp: bool | None = None,
                     threshold: float = 0.5) -> dict:
    """Patch AUC, accuracy (prob >= ``threshold``), BCE loss and counts over every valid patch."""
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    grid = int(grid or ckpt.get("grid", 3))
    patch = int(patch_size or ckpt.get("patch_size", 224))
    data = open_shards(shards)
    if data.region_size // grid < patch:
        raise TrainError(f"{shards}: regions of {data.region_size} px split {grid}x{grid} give "
                         f"cells of {data.region_size // grid} px, smaller than the patch size "
                         f"{patch} (pass --grid/--patch-size matching the checkpoint's training)")
    cuda = dev.type == "cuda"
    use_amp = cuda if amp is None else amp
    stream = RegionStream(data, epoch=0, seed=0, train=False, regions_per_batch=batch_regions,
                          grid=grid, workers=workers, decode_in_worker=not cuda)
    probs, labels, bad = [], [], 0
    for batch in device_batches(make_loader(stream, pin_memory=cuda), dev, data.region_size):
        bad += len(batch.bad)
        x, y = make_patches(batch.regions, batch.labels, grid=grid, patch=patch, train=False,
                            aug=Augment.off())
        keep = batch.valid.repeat_interleave(grid * grid)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x).flatten().float()
        probs.append(torch.sigmoid(logits[keep]).double().cpu())
        labels.append(y[keep].cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros(0)
    t = torch.cat(labels).numpy() if labels else np.zeros(0)
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(t * np.log(clipped) + (1 - t) * np.log(1 - clipped))) if len(p) \
        else math.nan
    accuracy = float(np.mean((p >= threshold) == (t >= 0.5))) if len(p) else math.nan
    auc = binary_auc(t, p)

    def num(v: float) -> float | None:
        return None if math.isnan(v) else v

    return {"auc": num(auc), "accuracy": num(accuracy), "loss": num(loss), "threshold": threshold,
            "patches": int(len(p)), "tumor_patches": int((t >= 0.5).sum()), "bad_samples": bad,
            "grid": grid, "patch_size": patch, "checkpoint": str(checkpoint),
            "checkpoint_epoch": int(ckpt.get("epoch", 0)), "shards": str(shards),
            "device": str(dev)}
