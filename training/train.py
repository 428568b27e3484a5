"""The training loop: shards -> device batches -> FCResNet18, with checkpoints and metrics.

Single process (`patchetl train ...`) or DDP under torchrun (`torchrun --nproc_per_node N
-m training.cli train ...`: nccl on CUDA, gloo on CPU). Per epoch it logs train loss, validation
loss, accuracy, patch-level AUC, patches/s and the share of time spent waiting for data to
`<out>/metrics.csv` (and TensorBoard when installed), and writes `<out>/last.pt` atomically;
`<out>/best.pt` is the epoch with the best validation AUC (lowest validation loss when the
AUC is undefined). Checkpoints hold tensors and plain Python values only, so they load with
`torch.load(path, weights_only=True)`.

Reproducibility: every random draw of an epoch (shard order, shuffle buffers, crop offsets,
augmentations) is seeded from (seed, epoch, rank), so `--resume` from an epoch's checkpoint
continues exactly as the uninterrupted run would (model, optimiser, scheduler and the global
RNG states are restored too).
"""
from __future__ import annotations

import csv
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from etl.atomic import atomic_file, atomic_path
from etl.progress import progress_bar
from etl.evaluate.froc import binary_auc  # rank AUC, shared with slide-level evaluation
from training.data.augment import Augment, make_patches
from training.data.stream import (PatchSpec, RegionBatch, RegionStream, ShardSet, make_loader,
                           open_shards, seed_for, to_device)
from training.config import FIXED_ON_RESUME, TrainConfig
from training.errors import TrainError
from training.model import build_model
from training.data.prefetch import prefetched

CHECKPOINT_FORMAT = 1
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_patches", "train_steps", "patches_per_s",
              "data_wait", "startup_s", "val_loss", "val_acc", "val_auc", "val_patches",
              "bad_samples", "seconds")


# --------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_kind: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(values: list[float], dd: Dist, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dd.active:
        dist.all_reduce(t)
    return t.tolist()


def gather_arrays(arrays: tuple[np.ndarray, ...], dd: Dist) -> tuple[np.ndarray, ...]:
    """Concatenate per-rank arrays (any lengths) on every rank."""
    if not dd.active:
        return arrays
    parts: list = [None] * dd.world
    dist.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))


# --------------------------------------------------------------------------- pieces
def resolve_device(cfg: TrainConfig, dd: Dist) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(dd.local_rank)
        return torch.device("cuda", dd.local_rank)
    return torch.device("cpu")


def default_workers(dd_world: int) -> int:
    per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", dd_world)))
    return max(1, min(8, per_rank))


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def rng_state() -> dict:
    """Global RNG states as tensors / plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through a temporary file: a visible checkpoint is always complete."""
    with atomic_file(path) as fh:
        torch.save(obj, fh)


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def load_checkpoint(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a patchetl training checkpoint (format "
                         f"{CHECKPOINT_FORMAT}); use another --out or delete it")
    return ckpt


def write_csv(path: Path, history: list[dict]) -> None:
    """Rewrite the metrics CSV from the history (so a resumed run never duplicates rows)."""
    with atomic_file(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(out / "tensorboard"))


# --------------------------------------------------------------------------- one epoch
@dataclass
class EpochData:
    train: ShardSet
    val: ShardSet | None
    workers: int
    decode_in_worker: bool
    pin_memory: bool
    patches_in_workers: bool  # CPU training: the workers crop and augment too


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor):
    """Per-patch BCE; bad slots (weight 0) add nothing. Returns (mean loss, sum, count)."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    total = (losses * weight).sum()
    count = weight.sum()
    return total / count.clamp(min=1.0), total.detach(), count


@dataclass
class PatchBatch:
    """Model-ready patches: inputs in [-1, 1], labels, weights (0 for bad slots)."""

    x: torch.Tensor  # (N, 3, p, p) float32
    y: torch.Tensor  # (N,) float32
    weight: torch.Tensor  # (N,) float32
    regions: RegionBatch


def patch_batches(loader: Iterable[dict], device: torch.device, region_size: int, *, grid: int,
                  patch: int, train: bool, aug: Augment, generator: torch.Generator | None = None,
                  order_generator: torch.Generator | None = None,
                  channels_last: bool = True) -> Iterator[PatchBatch]:
    """Worker batches -> device -> grid crops (+ augmentation when training) -> PatchBatches.

    This is everything between the shards and the model; the benchmark can time it alone.
    Batches the workers already turned into patches (CPU training, `RegionStream(patches=...)`)
    are passed on as they are; `grid`, `patch`, `aug` and `generator` then served the workers.
    """
    for batch in loader:
        regions = to_device(batch, device, region_size)
        if regions.regions is None:
            x = batch["patches"].to(device, non_blocking=True)
            y = batch["patch_labels"].to(device, non_blocking=True)
        else:
            x, y = make_patches(regions.regions, regions.labels, grid=grid, patch=patch,
                                train=train, aug=aug, generator=generator,
                                order_generator=order_generator, channels_last=channels_last)
        weight = regions.valid.repeat_interleave(grid * grid).to(torch.float32)
        yield PatchBatch(x, y, weight, regions)


class Trainer:
    """State of a run: model, optimiser, schedule, history; `fit` runs the epochs."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.dd = init_distributed("cuda" if cfg.device == "cuda" or (
            cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.log = log if self.dd.main else (lambda message: None)
        self.device = resolve_device(cfg, self.dd)
        cuda = self.device.type == "cuda"
        decode = cfg.decode if cfg.decode != "auto" else ("cuda" if cuda else "cpu")
        if decode == "cuda" and not cuda:
            raise TrainError("--decode cuda needs --device cuda; use --decode cpu")
        self.amp = cuda if cfg.amp is None else cfg.amp
        self.grid, self.patch = cfg.grid, cfg.patch_size
        self.data = EpochData(
            train=open_shards(cfg.train), val=open_shards(cfg.val) if cfg.val else None,
            workers=cfg.workers if cfg.workers is not None else default_workers(self.dd.world),
            decode_in_worker=decode == "cpu", pin_memory=cuda, patches_in_workers=not cuda)
        for name, shards in (("train", self.data.train), ("val", self.data.val)):
            if shards is not None and shards.region_size // cfg.grid < cfg.patch_size:
                raise TrainError(f"--{name} {shards.source}: regions of {shards.region_size} px "
                                 f"split {cfg.grid}x{cfg.grid} give cells of "
                                 f"{shards.region_size // cfg.grid} px, smaller than --patch-size "
                                 f"{cfg.patch_size}")
        self.augment = Augment() if cfg.augment else Augment.off()
        torch.manual_seed(cfg.seed)
        self.net = build_model(cfg.pretrained).to(self.device)
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(cfg, self.net.parameters())
        self.steps_per_epoch = len(self.train_stream(0))
        total = cfg.epochs * self.steps_per_epoch
        warmup = min(round(cfg.warmup_epochs * self.steps_per_epoch), max(0, total - 1))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total, warmup))
        self.epoch, self.history, self.best, self.bad_total = 0, [], -math.inf, 0
        if cuda:
            torch.backends.cudnn.benchmark = True

    # ----------------------------------------------------------------------- state
    def state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "epoch": self.epoch, "model": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                "history": self.history, "best": self.best, "bad_total": self.bad_total,
                "config": asdict(self.cfg),
                "arch": "FCResNet18", "grid": self.grid, "patch_size": self.patch,
                "region_size": self.data.train.region_size}

    def restore(self, ckpt: dict) -> None:
        old = ckpt.get("config", {})
        changed = [k for k in FIXED_ON_RESUME if k in old and old[k] != getattr(self.cfg, k)]
        if changed:
            raise TrainError(f"{self.out / 'last.pt'}: --resume with changed "
                             + ", ".join(f"--{k.replace('_', '-')} ({old[k]} -> "
                                         f"{getattr(self.cfg, k)})" for k in changed)
                             + "; use the checkpoint's values or a new --out")
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.history = int(ckpt["epoch"]), list(ckpt["history"])
        self.best, self.bad_total = float(ckpt["best"]), int(ckpt["bad_total"])

    def prepare_out(self) -> None:
        """Refuse to clobber a previous run; with --resume continue it when there is one."""
        last = self.out / "last.pt"
        if last.exists() and not self.cfg.resume:
            raise TrainError(f"{last} exists: pass --resume to continue that run, or choose "
                             "another --out")
        if self.dd.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for torn in self.out.glob("*.tmp-*"):  # left by a run killed while writing
                torn.unlink(missing_ok=True)
        if self.dd.active:
            dist.barrier()
        if last.exists():
            self.restore(load_checkpoint(last))
            self.log(f"resumed from {last} after epoch {self.epoch}")
        elif self.cfg.resume:
            self.log(f"no checkpoint at {last}: starting a new run")

    # ----------------------------------------------------------------------- data
    def train_stream(self, epoch: int) -> RegionStream:
        d = self.data
        return RegionStream(d.train, epoch=epoch, seed=self.cfg.seed, train=True,
                            regions_per_batch=self.cfg.regions_per_batch, grid=self.grid,
                            rank=self.dd.rank, world=self.dd.world, workers=d.workers,
                            decode_in_worker=d.decode_in_worker,
                            shuffle_buffer=self.cfg.shuffle_buffer,
                            patches=self.patch_spec(self.augment))

    def val_stream(self) -> RegionStream:
        d = self.data
        return RegionStream(d.val, epoch=0, seed=self.cfg.seed, train=False,
                            regions_per_batch=self.cfg.regions_per_batch, grid=self.grid,
                            rank=self.dd.rank, world=self.dd.world, workers=d.workers,
                            decode_in_worker=d.decode_in_worker,
                            patches=self.patch_spec(Augment.off()))

    def patch_spec(self, aug: Augment) -> PatchSpec | None:
        """On a CPU the DataLoader workers make the patches (all cores work); else the device."""
        if not self.data.patches_in_workers:
            return None
        return PatchSpec(self.patch, aug, self.cfg.channels_last)

    def note_bad(self, bad: list[str], epoch: int) -> None:
        if not bad:
            return
        self.bad_total += len(bad)
        with open(self.out / f"bad-samples-rank{self.dd.rank}.txt", "a") as fh:
            fh.writelines(f"epoch {epoch + 1}\t{b}\n" for b in bad)
        if self.bad_total > self.cfg.max_bad:
            raise TrainError(f"{self.bad_total} corrupt or unreadable samples so far (limit "
                             f"--max-bad {self.cfg.max_bad}), e.g. {bad[0]}; all are listed in "
                             f"{self.out}/bad-samples-rank*.txt. Check the shards with "
                             "`patchetl verify FOLDER`, or raise --max-bad")

    # ----------------------------------------------------------------------- epochs
    def batches(self, stream: RegionStream, *, train: bool, aug: Augment,
                generator: torch.Generator | None = None,
                order_generator: torch.Generator | None = None) -> Iterator[PatchBatch]:
        """The stream's PatchBatches on the device; on CUDA (unless --no-prefetch) made by a
        background thread on its own stream while the model runs (`training.data.prefetch`)."""
        # the loader's worker processes start here, in this thread: forking while another
        # thread (the prefetcher) runs could copy a lock it holds into the children
        loader = iter(make_loader(stream, self.data.pin_memory))

        def make() -> Iterator[PatchBatch]:
            return patch_batches(loader, self.device,
                                 stream.shards.region_size, grid=self.grid, patch=self.patch,
                                 train=train, aug=aug, generator=generator,
                                 order_generator=order_generator,
                                 channels_last=self.cfg.channels_last)

        if self.device.type == "cuda" and self.cfg.prefetch:
            return prefetched(make, self.device)
        return make()

    def train_epoch(self, model, epoch: int, bar) -> dict:
        cfg, dev = self.cfg, self.device
        model.train()
        stream = self.train_stream(epoch)
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed_for(cfg.seed, epoch, self.dd.rank, 1))
        task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs} train", total=len(stream), info="")
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        count = torch.zeros((), device=dev, dtype=torch.float64)
        keys: list[str] = []
        steps, wait, start, startup = 0, 0.0, time.perf_counter(), 0.0
        order_gen = None
        if dev.type == "cuda":  # the jitter order is drawn on the host (see draw_jitter)
            order_gen = torch.Generator().manual_seed(seed_for(cfg.seed, epoch, self.dd.rank, 2))
        batches = self.batches(stream, train=True, aug=self.augment, generator=gen,
                               order_generator=order_gen)
        try:
            while True:
                t0 = time.perf_counter()  # data wait: loader, transfer, decode, crops, augment
                batch = next(batches, None)
                wait += time.perf_counter() - t0
                if steps == 0:  # worker start and the first batch: paid once per epoch
                    startup = time.perf_counter() - start
                if batch is None:
                    break
                self.note_bad(batch.regions.bad, epoch)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = model(batch.x).flatten()
                loss, total, n = masked_bce(logits, batch.y, batch.weight)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                loss_sum += total
                count += n
                steps += 1
                if cfg.record_keys:
                    keys += [k for k, ok in zip(batch.regions.keys, batch.regions.valid.tolist())
                             if ok]
                if not bar.disable and (steps % 10 == 0 or steps == len(stream)):
                    bar.update(task, completed=steps, info=f"loss {float(loss.detach()):.4f}")
        finally:  # stops a prefetching thread when a step fails
            batches.close()
        if dev.type == "cuda":  # the host runs ahead of the GPU: count the queued steps too
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        bar.remove_task(task)
        if cfg.record_keys:
            folder = self.out / "keys"
            folder.mkdir(exist_ok=True)
            (folder / f"train-epoch{epoch + 1:03d}-rank{self.dd.rank}.txt").write_text(
                "".join(f"{k}\n" for k in keys))
        loss_total, patches = all_sum([loss_sum.item(), count.item()], self.dd, dev)
        most, neg_least = self.step_spread(steps)
        if most != -neg_least:  # cannot happen by construction; say so loudly if it does
            self.log(f"warning: ranks ran different step counts ({-neg_least:.0f}..{most:.0f})")
        return {"train_loss": loss_total / max(patches, 1.0), "train_patches": int(patches),
                "train_steps": steps, "seconds": seconds,
                "patches_per_s": patches / max(seconds, 1e-9),
                "data_wait": wait / max(seconds, 1e-9), "startup_s": startup,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def step_spread(self, steps: int) -> list[float]:
        """[max, -min] of the step counts over ranks (equal by construction)."""
        t = torch.tensor([steps, -steps], dtype=torch.float64, device=self.device)
        if self.dd.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    @torch.no_grad()
    def evaluate(self, epoch: int, bar) -> dict:
        """Validation loss, accuracy and patch AUC over all ranks (centre crops, no augment)."""
        if self.data.val is None:
            return {}
        net, dev = self.net, self.device
        net.eval()
        stream = self.val_stream()
        task = bar.add_task(f"epoch {epoch + 1}/{self.cfg.epochs} val", total=len(stream), info="")
        probs, labels = [], []
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        for batch in self.batches(stream, train=False, aug=Augment.off()):
            self.note_bad(batch.regions.bad, epoch)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = net(batch.x).flatten().float()
            loss_sum += masked_bce(logits, batch.y, batch.weight)[1]
            keep = batch.weight > 0
            probs.append(torch.sigmoid(logits[keep]).cpu())
            labels.append(batch.y[keep].cpu())
            bar.advance(task)
        bar.remove_task(task)
        p = torch.cat(probs).double().numpy() if probs else np.zeros(0)
        t = torch.cat(labels).numpy() if labels else np.zeros(0)
        p, t = gather_arrays((p, t), self.dd)
        (loss,) = all_sum([loss_sum.item()], self.dd, dev)
        n = len(p)
        return {"val_loss": loss / n if n else math.nan,
                "val_acc": float(np.mean((p >= 0.5) == (t >= 0.5))) if n else math.nan,
                "val_auc": binary_auc(t, p), "val_patches": n}

    def fit(self) -> dict:
        """Run the remaining epochs; returns the last epoch's metrics and the output paths."""
        self.prepare_out()
        cfg, dd = self.cfg, self.dd
        model = self.net
        if dd.active:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            model = torch.compile(model)
        writer = tensorboard_writer(self.out) if dd.main else None
        if self.epoch >= cfg.epochs:
            self.log(f"{self.out / 'last.pt'} already holds {self.epoch} epoch(s): nothing to do")
        with progress_bar(unit="steps", enabled=cfg.progress and dd.main, info=True,
                          transient=True) as bar:
            for epoch in range(self.epoch, cfg.epochs):
                bad_before = self.bad_total
                row = {"epoch": epoch + 1, **self.train_epoch(model, epoch, bar)}
                row.update(self.evaluate(epoch, bar))
                row["bad_samples"] = int(all_sum([self.bad_total - bad_before], dd,
                                                 self.device)[0])
                self.epoch = epoch + 1
                self.history.append(row)
                self.end_epoch(row, writer)
        if writer is not None:
            writer.close()
        if dd.active:
            dist.barrier()
        best = self.out / "best.pt"
        return {"history": self.history, "last": str(self.out / "last.pt"),
                "best": str(best) if best.exists() else None,
                "metrics": str(self.out / "metrics.csv")}

    def end_epoch(self, row: dict, writer) -> None:
        """Rank 0: log, write the CSV and TensorBoard, checkpoint, keep the best apart."""
        if not self.dd.main:
            return
        auc, vloss = row.get("val_auc", math.nan), row.get("val_loss", math.nan)
        score = auc if not math.isnan(auc) else -vloss
        improved = not math.isnan(score) and score > self.best
        if improved:
            self.best = score
        save_atomic(self.state(), self.out / "last.pt")
        if improved:
            copy_atomic(self.out / "last.pt", self.out / "best.pt")
        write_csv(self.out / "metrics.csv", self.history)
        if writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and not math.isnan(v):
                    writer.add_scalar(k, v, row["epoch"])
        fmt = lambda k, spec: format(row[k], spec) if k in row else "-"  # noqa: E731
        self.log(f"epoch {row['epoch']}/{self.cfg.epochs}: train loss {fmt('train_loss', '.4f')}"
                 f"  val loss {fmt('val_loss', '.4f')} acc {fmt('val_acc', '.3f')} "
                 f"auc {fmt('val_auc', '.3f')}  {row['patches_per_s']:.1f} patches/s  "
                 f"data wait {100 * row['data_wait']:.0f}%  bad {row['bad_samples']}"
                 + ("  (best)" if improved else ""))


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train as configured (single process, or one rank under torchrun)."""
    trainer = Trainer(cfg, log=log)
    try:
        return trainer.fit()
    finally:
        if trainer.dd.active and dist.is_initialized():
            dist.destroy_process_group()

