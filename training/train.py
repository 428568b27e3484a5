"""The training loop: shards -> device batches -> FCResNet18, one epoch at a time.

Single process (`patchetl train ...`) or DDP under torchrun (`torchrun --nproc_per_node N
-m training.cli train ...`). Each epoch trains on every rank's share of the training split,
validates (patch AUC, loss, accuracy), and on rank 0 writes its metrics and checkpoints.
The pieces live apart: the process group in `training.distributed`, where the data steps run
in `training.data.pipeline`, checkpoints in `training.checkpoint`, the numbers in
`training.metrics`; here is what an epoch does with them.

Reproducibility: every random draw of an epoch (shard order, shuffle buffers, crop offsets,
augmentations) is seeded from (seed, epoch, rank), so `--resume` from an epoch's checkpoint
continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from etl.progress import progress_bar
from training.checkpoint import resume_run, run_state, save_epoch
from training.config import TrainConfig
from training.data.pipeline import EpochData, PatchBatch
from training.data.stream import seed_for
from training.distributed import init_distributed
from training.errors import TrainError
from training.metrics import (
    DataClock,
    MetricsLog,
    RunRecord,
    epoch_line,
    masked_bce,
    patch_metrics,
    score_patches,
    write_keys,
)
from training.model import build_model, resolve_device
from training.shard_scale import training_scale


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """State of a run: model, optimiser, schedule, record; `fit` runs the epochs."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.dd = init_distributed(
            cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        )
        self.log = log if self.dd.main else (lambda message: None)
        self.device = resolve_device(cfg.device, self.dd.local_rank)
        self.amp = self.device.type == "cuda" if cfg.amp is None else cfg.amp
        self.data = EpochData.from_config(cfg, self.dd, self.device)
        torch.manual_seed(cfg.seed)
        self.net = build_model(cfg.pretrained).to(self.device)
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(cfg, self.net.parameters())
        steps = len(self.data.train_stream(0))
        warmup = min(round(cfg.warmup_epochs * steps), max(0, cfg.epochs * steps - 1))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(cfg.epochs * steps, warmup)
        )
        self.scale, note = training_scale(cfg.train) if self.dd.main else (None, None)
        if note:
            self.log(f"warning: {note}")
        self.record = RunRecord()
        self.seen = 0  # samples (good and bad) this rank has been given, for the bad share
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def note_bad(self, batch: PatchBatch, epoch: int) -> None:
        """Count a batch's samples; list its bad ones; stop beyond --max-bad."""
        bad = batch.regions.bad
        self.seen += len(batch.regions.keys)
        if not bad:
            return
        self.record.bad_total += len(bad)
        with open(self.out / f"bad-samples-rank{self.dd.rank}.txt", "a") as fh:
            fh.writelines(f"epoch {epoch + 1}\t{b}\n" for b in bad)
        if self.record.bad_total > self.cfg.max_bad:
            raise TrainError(
                f"{self.record.bad_total} corrupt or unreadable samples so far "
                f"(limit --max-bad {self.cfg.max_bad}), e.g. {bad[0]}; all are "
                f"listed in {self.out}/bad-samples-rank*.txt. Check the shards "
                "with `patchetl verify FOLDER`, or raise --max-bad"
            )

    def check_epoch(self, row: dict, seen: int) -> None:
        """Stop when an epoch had no valid training (or validation) sample, or a share of
        corrupt samples above --max-bad-fraction: its weights would mean nothing. ``row`` and
        ``seen`` are summed over ranks, so every rank stops alike."""
        cfg, epoch = self.cfg, row["epoch"]
        where = f"all listed in {self.out}/bad-samples-rank*.txt"
        fix = "check the shards with `patchetl verify FOLDER` and extract them again"
        for option, split, key in (
            ("--train", cfg.train, "train_patches"),
            ("--val", cfg.val, "val_patches"),
        ):
            if key in row and row[key] == 0:
                raise TrainError(
                    f"{split}: epoch {epoch} had no valid {option[2:]} sample; every one was "
                    f"corrupt or unreadable ({where}) ({fix})"
                )
        share = row["bad_samples"] / max(seen, 1)
        if share > cfg.max_bad_fraction:
            raise TrainError(
                f"{cfg.train}: epoch {epoch}: {row['bad_samples']} of {seen} samples "
                f"({share:.1%}) were corrupt or unreadable, above --max-bad-fraction "
                f"{cfg.max_bad_fraction} ({where}) ({fix}, or raise --max-bad-fraction)"
            )

    def fit(self) -> dict:
        """Run the remaining epochs; returns the last epoch's metrics and the output paths."""
        cfg, dd, out = self.cfg, self.dd, self.out
        self.record = resume_run(cfg, dd, self.net, self.optimizer, self.scheduler, self.log)
        model = dd.wrap(self.net, self.device)
        if cfg.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        metrics = MetricsLog(out) if dd.main else None
        if self.record.epoch >= cfg.epochs:
            self.log(f"{out / 'last.pt'} already holds {self.record.epoch} epoch(s): nothing to do")
        with progress_bar(
            unit="steps", enabled=cfg.progress and dd.main, info=True, transient=True
        ) as bar:
            for epoch in range(self.record.epoch, cfg.epochs):
                bad_before, seen_before = self.record.bad_total, self.seen
                row = {"epoch": epoch + 1, **train_epoch(self, model, epoch, bar)}
                row.update(evaluate(self, epoch, bar))
                bad, seen = dd.all_sum(
                    [self.record.bad_total - bad_before, self.seen - seen_before], self.device
                )
                row["bad_samples"] = int(bad)
                self.check_epoch(row, int(seen))  # before anything of this epoch is saved
                best = self.record.add(row)
                if metrics is not None:  # rank 0: checkpoints, CSV, TensorBoard, the log
                    save_epoch(
                        run_state(
                            cfg,
                            self.record,
                            self.net,
                            self.optimizer,
                            self.scheduler,
                            self.data.train.region_size,
                            self.scale,
                        ),
                        out,
                        best,
                    )
                    metrics.write(self.record.history)
                    self.log(epoch_line(row, cfg.epochs, best))
        if metrics is not None:
            metrics.close()
        dd.barrier()
        best_pt = out / "best.pt"
        return {
            "history": self.record.history,
            "last": str(out / "last.pt"),
            "best": str(best_pt) if best_pt.exists() else None,
            "metrics": str(out / "metrics.csv"),
        }


def train_epoch(run: Trainer, model: torch.nn.Module, epoch: int, bar: Any) -> dict:
    """One epoch of optimiser steps on this rank's share; its row of metrics (all ranks)."""
    cfg, dev, rank = run.cfg, run.device, run.dd.rank
    model.train()
    stream = run.data.train_stream(epoch)
    gen = torch.Generator(device=dev).manual_seed(seed_for(cfg.seed, epoch, rank, 1))
    order_gen = None  # on CUDA the jitter order is drawn on the host (see draw_jitter)
    if dev.type == "cuda":
        order_gen = torch.Generator().manual_seed(seed_for(cfg.seed, epoch, rank, 2))
    task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs} train", total=len(stream), info="")
    sums = torch.zeros(2, device=dev, dtype=torch.float64)  # loss, patches
    keys: list[str] = []
    steps, clock = 0, DataClock()
    batches = run.data.batches(stream, generator=gen, order_generator=order_gen)
    try:
        for batch in clock.timed(batches):
            run.note_bad(batch, epoch)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.amp):
                logits = model(batch.x).flatten()
            loss, total, n = masked_bce(logits, batch.y, batch.weight)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            run.scheduler.step()
            sums += torch.stack([total, n])
            steps += 1
            if cfg.record_keys:
                keys += [
                    k
                    for k, ok in zip(batch.regions.keys, batch.regions.valid.tolist(), strict=True)
                    if ok
                ]
            if not bar.disable and (steps % 10 == 0 or steps == len(stream)):
                bar.update(task, completed=steps, info=f"loss {float(loss.detach()):.4f}")
    finally:  # stops a prefetching thread when a step fails
        batches.close()
    if dev.type == "cuda":  # the host runs ahead of the GPU: count the queued steps too
        torch.cuda.synchronize(dev)
    seconds = clock.elapsed()
    bar.remove_task(task)
    if cfg.record_keys:
        write_keys(run.out, epoch, rank, keys)
    loss_total, patches = run.dd.all_sum(sums.tolist(), dev)
    least, most = run.dd.spread(steps, dev)
    if most != least:  # cannot happen by construction; say so loudly if it does
        run.log(f"warning: ranks ran different step counts ({least:.0f}..{most:.0f})")
    return {
        "train_loss": loss_total / max(patches, 1.0),
        "train_patches": int(patches),
        "train_steps": steps,
        "seconds": seconds,
        "patches_per_s": patches / max(seconds, 1e-9),
        "data_wait": clock.wait / max(seconds, 1e-9),
        "startup_s": clock.startup,
        "lr": run.optimizer.param_groups[0]["lr"],
    }


def evaluate(run: Trainer, epoch: int, bar: Any) -> dict:
    """Validation loss, accuracy and patch AUC over all ranks (centre crops, no augment)."""
    if run.data.val is None:
        return {}
    run.net.eval()
    stream = run.data.val_stream()
    task = bar.add_task(f"epoch {epoch + 1}/{run.cfg.epochs} val", total=len(stream), info="")

    def seen(batch: PatchBatch) -> None:
        run.note_bad(batch, epoch)
        bar.advance(task)

    p, t, loss = score_patches(run.net, run.data.batches(stream), amp=run.amp, on_batch=seen)
    bar.remove_task(task)
    p, t = run.dd.gather_arrays((p, t))
    m = patch_metrics(p, t, run.dd.all_sum([loss], run.device)[0])
    return {
        "val_loss": m["loss"],
        "val_acc": m["accuracy"],
        "val_auc": m["auc"],
        "val_patches": m["patches"],
    }


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train as configured (single process, or one rank under torchrun)."""
    trainer = Trainer(cfg, log=log)
    try:
        return trainer.fit()
    finally:
        trainer.dd.close()
