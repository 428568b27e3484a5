"""Epoch metrics: how a run is measured, and where the numbers go.

Losses are masked BCE sums (bad slots weigh 0) kept on the device during an epoch and summed
over ranks once at its end. The patch AUC is `etl.evaluate.auc.binary_auc` (rank based, ties
averaged) over the probabilities of every valid patch of all ranks; training validation and
`patchetl evaluate --checkpoint` score patches with the same `score_patches`. The data wait is
the share of an epoch spent waiting for the next batch (loader, transfer, decode, crops,
augmentation). Each epoch is one row of `<out>/metrics.csv`, rewritten whole from the history so
that a resumed run never duplicates rows, and of TensorBoard when it is installed. The best
epoch has the highest validation AUC (the lowest validation loss while the AUC is undefined).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from etl.atomic import atomic_file
from etl.evaluate.auc import binary_auc
from training.data.pipeline import PatchBatch

T = TypeVar("T")
CSV_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_patches",
    "train_steps",
    "patches_per_s",
    "data_wait",
    "startup_s",
    "val_loss",
    "val_acc",
    "val_auc",
    "val_patches",
    "bad_samples",
    "seconds",
)


def masked_bce(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch BCE; bad slots (weight 0) add nothing. Returns (mean loss, sum, count)."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    total = (losses * weight).sum()
    count = weight.sum()
    return total / count.clamp(min=1.0), total.detach(), count


@torch.no_grad()
def score_patches(
    model: torch.nn.Module,
    batches: Iterable[PatchBatch],
    *,
    amp: bool,
    on_batch: Callable[[PatchBatch], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(probabilities (float64), labels, BCE sum) over every valid patch of `batches`."""
    probs, labels = [], []
    loss_sum: torch.Tensor | float = 0.0
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        with torch.autocast(batch.x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch.x).flatten().float()
        loss_sum = loss_sum + masked_bce(logits, batch.y, batch.weight)[1].double()
        keep = batch.weight > 0
        probs.append(torch.sigmoid(logits[keep]).cpu())
        labels.append(batch.y[keep].cpu())
    p = torch.cat(probs).double().numpy() if probs else np.zeros(0)
    t = torch.cat(labels).numpy() if labels else np.zeros(0)
    return p, t, float(loss_sum)


def patch_metrics(
    p: np.ndarray, t: np.ndarray, loss_sum: float, threshold: float = 0.5
) -> dict[str, Any]:
    """Mean BCE loss, accuracy (prob >= `threshold` vs label >= 0.5), AUC and patch count;
    NaN where undefined (no patches; one class only for the AUC)."""
    n = len(p)
    return {
        "loss": loss_sum / n if n else math.nan,
        "accuracy": float(np.mean((p >= threshold) == (t >= 0.5))) if n else math.nan,
        "auc": binary_auc(t, p),
        "patches": n,
    }


class DataClock:
    """Times a batch iterator: seconds waited for batches, and the start-up (worker start and
    the first batch, paid once per epoch)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wait = self.startup = 0.0

    def timed(self, batches: Iterator[T]) -> Iterator[T]:
        first = True
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.wait += time.perf_counter() - t0
            if first:
                self.startup, first = time.perf_counter() - self.start, False
            if batch is None:
                return
            yield batch

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class RunRecord:
    """What a run has done so far (kept in its checkpoints): epochs, their rows, the best
    score, the bad samples met."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: float = -math.inf
    bad_total: int = 0

    def add(self, row: dict) -> bool:
        """Record a finished epoch's row; True when it is the best so far."""
        self.epoch = row["epoch"]
        self.history.append(row)
        auc, vloss = row.get("val_auc", math.nan), row.get("val_loss", math.nan)
        score = auc if not math.isnan(auc) else -vloss
        if math.isnan(score) or score <= self.best:
            return False
        self.best = score
        return True


class MetricsLog:
    """`<out>/metrics.csv` and TensorBoard (`<out>/tensorboard`, when installed)."""

    def __init__(self, out: Path) -> None:
        self.csv = out / "metrics.csv"
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: CSV only
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def write(self, history: list[dict]) -> None:
        """Rewrite the CSV from the history; add the last row to TensorBoard."""
        with atomic_file(self.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
        if self.tensorboard is not None and history:
            row = history[-1]
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and not math.isnan(v):
                    self.tensorboard.add_scalar(k, v, row["epoch"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_keys(out: Path, epoch: int, rank: int, keys: list[str]) -> None:
    """`<out>/keys/train-epoch<e>-rank<r>.txt`: the keys a rank trained on (`--record-keys`,
    an audit of the sample splitting)."""
    (out / "keys").mkdir(exist_ok=True)
    (out / "keys" / f"train-epoch{epoch + 1:03d}-rank{rank}.txt").write_text(
        "".join(f"{k}\n" for k in keys)
    )


def epoch_line(row: dict, epochs: int, best: bool) -> str:
    """One epoch's log line."""

    def fmt(k: str, spec: str) -> str:
        return format(row[k], spec) if k in row else "-"

    return (
        f"epoch {row['epoch']}/{epochs}: train loss {fmt('train_loss', '.4f')}"
        f"  val loss {fmt('val_loss', '.4f')} acc {fmt('val_acc', '.3f')} "
        f"auc {fmt('val_auc', '.3f')}  {row['patches_per_s']:.1f} patches/s  "
        f"data wait {100 * row['data_wait']:.0f}%  bad {row['bad_samples']}"
        + ("  (best)" if best else "")
    )
