"""The trainer's data-pipeline policy: where each step from shards to patches runs.

On CUDA the DataLoader workers read regions (decoding them on the CPU with `--decode cpu`),
the device decodes JPEGs in batches (nvJPEG), crops and augments, and a background thread
prepares the next batch on a side stream while the model runs (`training.data.prefetch`).
On a CPU the workers also make the patches, so that every core works and the main process
only receives ready float32 patches. Either way the loop sees the same `PatchBatch`es, and
every random draw is seeded from (seed, epoch, rank), so an epoch is reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass

import torch

from training.config import TrainConfig
from training.data.augment import Augment, make_patches
from training.data.prefetch import prefetched
from training.data.stream import (
    PatchSpec,
    RegionBatch,
    RegionStream,
    ShardSet,
    make_loader,
    open_shards,
    to_device,
)
from training.distributed import Dist
from training.errors import TrainError


@dataclass
class PatchBatch:
    """Model-ready patches: inputs in [-1, 1], labels, weights (0 for bad slots)."""

    x: torch.Tensor  # (N, 3, p, p) float32
    y: torch.Tensor  # (N,) float32
    weight: torch.Tensor  # (N,) float32
    regions: RegionBatch


def patch_batches(
    loader: Iterable[dict],
    device: torch.device,
    region_size: int,
    *,
    grid: int,
    patch: int,
    train: bool,
    aug: Augment,
    generator: torch.Generator | None = None,
    order_generator: torch.Generator | None = None,
    channels_last: bool = True,
) -> Generator[PatchBatch, None, None]:
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
            x, y = make_patches(
                regions.regions,
                regions.labels,
                grid=grid,
                patch=patch,
                train=train,
                aug=aug,
                generator=generator,
                order_generator=order_generator,
                channels_last=channels_last,
            )
        weight = regions.valid.repeat_interleave(grid * grid).to(torch.float32)
        yield PatchBatch(x, y, weight, regions)


def default_workers(local_world: int) -> int:
    """DataLoader workers per rank: this machine's CPUs shared by its ranks, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_world)))


@dataclass(frozen=True)
class EpochData:
    """Where a run's data steps run, and its streams of `PatchBatch`es per epoch."""

    cfg: TrainConfig
    dd: Dist
    device: torch.device
    train: ShardSet
    val: ShardSet | None
    workers: int
    decode_in_worker: bool
    augment: Augment  # training batches; validation is never augmented

    @classmethod
    def from_config(cls, cfg: TrainConfig, dd: Dist, device: torch.device) -> EpochData:
        """Open the splits and choose where decoding runs; refuse regions too small."""
        cuda = device.type == "cuda"
        decode = cfg.decode if cfg.decode != "auto" else ("cuda" if cuda else "cpu")
        if decode == "cuda" and not cuda:
            raise TrainError("--decode cuda needs --device cuda; use --decode cpu")
        retry = cfg.reads.retry  # URLs: attempts, timeouts, backoff
        data = cls(
            cfg,
            dd,
            device,
            train=open_shards(cfg.train, retry),
            val=open_shards(cfg.val, retry) if cfg.val else None,
            workers=cfg.workers if cfg.workers is not None else default_workers(dd.local_world),
            decode_in_worker=decode == "cpu",
            augment=Augment() if cfg.augment else Augment.off(),
        )
        for name, shards in (("train", data.train), ("val", data.val)):
            if shards is not None and shards.region_size // cfg.grid < cfg.patch_size:
                raise TrainError(
                    f"--{name} {shards.source}: regions of {shards.region_size} px "
                    f"split {cfg.grid}x{cfg.grid} give cells of "
                    f"{shards.region_size // cfg.grid} px, smaller than --patch-size "
                    f"{cfg.patch_size}"
                )
        return data

    def train_stream(self, epoch: int) -> RegionStream:
        """This rank's share of the training split in `epoch` (shuffled, augmented)."""
        return self._stream(self.train, epoch, train=True)

    def val_stream(self) -> RegionStream:
        """This rank's share of the validation split (in order, centre crops)."""
        if self.val is None:
            raise ValueError("EpochData.val_stream: this run has no validation split (--val)")
        return self._stream(self.val, 0, train=False)

    def _stream(self, shards: ShardSet, epoch: int, train: bool) -> RegionStream:
        cfg = self.cfg
        spec = None
        if self.device.type != "cuda":  # CPU: the workers crop and augment too (all cores work)
            spec = PatchSpec(
                cfg.patch_size, self.augment if train else Augment.off(), cfg.channels_last
            )
        return RegionStream(
            shards,
            epoch=epoch,
            seed=cfg.seed,
            train=train,
            regions_per_batch=cfg.regions_per_batch,
            grid=cfg.grid,
            rank=self.dd.rank,
            world=self.dd.world,
            workers=self.workers,
            decode_in_worker=self.decode_in_worker,
            shuffle_buffer=cfg.shuffle_buffer,
            patches=spec,
        )

    def batches(
        self,
        stream: RegionStream,
        generator: torch.Generator | None = None,
        order_generator: torch.Generator | None = None,
    ) -> Generator[PatchBatch, None, None]:
        """The stream's PatchBatches on the device; on CUDA (unless --no-prefetch) made by a
        background thread on its own stream while the model runs (`training.data.prefetch`)."""
        # the loader's worker processes start here, in this thread: forking while another
        # thread (the prefetcher) runs could copy a lock it holds into the children
        loader = iter(make_loader(stream, pin_memory=self.device.type == "cuda"))
        cfg = self.cfg
        aug = self.augment if stream.train else Augment.off()

        def make() -> Generator[PatchBatch, None, None]:
            return patch_batches(
                loader,
                self.device,
                stream.shards.region_size,
                grid=cfg.grid,
                patch=cfg.patch_size,
                train=stream.train,
                aug=aug,
                generator=generator,
                order_generator=order_generator,
                channels_last=cfg.channels_last,
            )

        if self.device.type == "cuda" and cfg.prefetch:
            return prefetched(make, self.device)
        return make()
