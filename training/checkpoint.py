"""Training checkpoints: a run's whole state, written atomically and read back safely.

`<out>/last.pt` holds the model, optimiser, scheduler, global RNG states and the `RunRecord`
(epochs done, their metrics, best score, bad samples) as tensors and plain Python values only,
so it loads with `torch.load(weights_only=True)` (`training.model.read_weights`, the one reader
of weight files). It is written through a temporary file and renamed (`etl.atomic`): a visible
checkpoint is always complete, whatever kills the run; `best.pt` is an atomic copy of the
best epoch's `last.pt`. A resume restores everything, so it continues exactly as the
uninterrupted run would; settings that change what the checkpoint means cannot change. An
empty, truncated, foreign or incomplete `last.pt` is a `CheckpointError` naming the file.
`--out` is proven writable (`etl.atomic.output_folder`) before the first epoch.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from etl.atomic import atomic_file, atomic_path, output_folder, remove_temporaries
from training.config import FIXED_ON_RESUME, TrainConfig
from training.distributed import Dist
from training.errors import TrainError
from training.metrics import RunRecord
from training.model import CheckpointError, read_weights

CHECKPOINT_FORMAT = 1
RESUME_FIX = "use another --out, or delete the file to start the run again"


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors / plain values (loadable with weights_only=True)."""
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    name, keys, pos, has_gauss, cached = legacy
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_state(
    cfg: TrainConfig,
    record: RunRecord,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    region_size: int,
    scale: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a resume needs, and what inference reads (arch, grid, patch size, and the
    physical scale of the training shards: `training.shard_scale`; None when unknown)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": record.epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "history": record.history,
        "best": record.best,
        "bad_total": record.bad_total,
        "config": asdict(cfg),
        "arch": "FCResNet18",
        "grid": cfg.grid,
        "patch_size": cfg.patch_size,
        "region_size": region_size,
        "scale": scale,
    }


def restore_run(
    ckpt: dict[str, Any],
    path: Path,
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> RunRecord:
    """Load a run's state into the model, optimiser, scheduler and RNGs; its record."""
    old = ckpt.get("config", {})
    changed = [k for k in FIXED_ON_RESUME if k in old and old[k] != getattr(cfg, k)]
    if changed:
        raise TrainError(
            f"{path}: --resume with changed "
            + ", ".join(f"--{k.replace('_', '-')} ({old[k]} -> {getattr(cfg, k)})" for k in changed)
            + "; use the checkpoint's values or a new --out"
        )
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        return RunRecord(
            epoch=int(ckpt["epoch"]),
            history=list(ckpt["history"]),
            best=float(ckpt["best"]),
            bad_total=int(ckpt["bad_total"]),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{path}: not a complete training checkpoint of this model ({what}) "
            f"(--resume: {RESUME_FIX})"
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint (`last.pt`, `best.pt`) as written by `run_state`."""
    ckpt = read_weights(path, "--resume", RESUME_FIX)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a patchetl training checkpoint (format {CHECKPOINT_FORMAT}) "
            f"(--resume: {RESUME_FIX})"
        )
    return ckpt


def resume_run(
    cfg: TrainConfig,
    dd: Dist,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    log: Callable[[str], None],
) -> RunRecord:
    """Prepare `--out`: continue the run in `<out>/last.pt` with --resume (a new record when
    there is none), refuse to clobber it without. Every rank proves the folder writable (each
    writes its own files there); rank 0 then removes what a run killed while writing left."""
    out = Path(cfg.out)
    last = out / "last.pt"
    if last.exists() and not cfg.resume:
        raise TrainError(
            f"{last} exists: pass --resume to continue that run, or choose another --out"
        )
    output_folder(out, "--out")
    dd.barrier()  # every probe is gone before rank 0 sweeps temporaries
    if dd.main:
        remove_temporaries(out)
    dd.barrier()
    if not last.exists():
        if cfg.resume:
            log(f"no checkpoint at {last}: starting a new run")
        return RunRecord()
    record = restore_run(load_checkpoint(last), last, cfg, model, optimizer, scheduler)
    log(f"resumed from {last} after epoch {record.epoch}")
    return record


def save_epoch(state: dict[str, Any], out: Path, best: bool) -> None:
    """Write `<out>/last.pt`; copy it to `best.pt` when this is the best epoch."""
    last = out / "last.pt"
    with atomic_file(last) as fh:
        torch.save(state, fh)
    if best:
        with atomic_path(out / "best.pt") as tmp:
            shutil.copyfile(last, tmp)
