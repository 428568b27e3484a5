"""Shards -> batches of labelled regions on the device (the trainer's input pipeline).

Splitting for DDP and DataLoader workers is by *sample range*, not by whole shard: each epoch
the shard order is shuffled with a seed shared by all ranks (`shardshuffle`, explicit), the
shards are laid end to end as one sequence of N samples (counts from `manifest.json`), and
rank r of W reads the contiguous range [r * n, (r + 1) * n) with n = ceil(N / W), which its
DataLoader workers cut again into contiguous pieces. A worker therefore streams whole shards
except for at most two boundary shards, where it skips the samples before its range (bytes
are read, nothing is decoded). Consequences:

- every rank gets the same number of samples and so the same number of steps, whatever the
  shard sizes, and no rank can run dry and hang the others;
- every sample is seen exactly once per epoch when W divides N; otherwise the last rank's
  range wraps around and repeats the first W * n - N (< W) samples of this epoch's sequence,
  as torch's DistributedSampler pads. Validation does not pad: ranks then differ by at most
  one sample, which is fine because evaluation runs no collective per step;
- fewer shards than ranks x workers is fine: a shard is shared by several workers, each
  reading its own part of it; a worker with an empty range yields nothing.

Inside a worker, samples go through a webdataset shuffle buffer (seeded per epoch, rank and
worker), are decoded on the CPU (`decode="cpu"`) or passed on as JPEG bytes for a batched
`torchvision.io.decode_jpeg(..., device="cuda")` in the main process (`decode="cuda"`), and are
grouped into batches of regions.

When the model runs on the CPU, the workers also make the patches (`RegionStream(patches=...)`:
grid split, augmentation, scaling, in `training.data.augment`), single-threaded, each on its own
batches, so that every core works and the main process only receives ready float32 patches
(written into shared memory, so the hand-over costs no extra copy). Their random draws come from
a generator seeded per (seed, epoch, rank, worker), so an epoch is reproducible and a resumed
run continues exactly. On a GPU the workers hand over regions and the device makes the patches.

Sources (`open_shards`) are split folders, URL prefixes (`http(s)://`, `s3://`) holding
`manifest.json`, or brace patterns of shard files, URLs or `pipe:` commands; every shard is
found before a run starts, and shards are read through `etl.storage` (timeouts on every network
wait; a read that fails mid-shard resumes at its byte, at most `ShardReads.read_attempts`
connections per shard read).

A corrupt sample (bad image, bad json, missing member) or a shard that cannot be read to its
manifest count (after those retries) becomes a *bad slot*: the batch keeps its place (a blank
image, `valid=False`, excluded from loss and metrics) and carries the reason. Batches and step
counts therefore never depend on corruption, so a bad sample cannot make ranks disagree and
hang; the trainer counts the bad slots and stops beyond `--max-bad`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from etl.errors import PatchetlError
from etl.storage import (
    Retry,
    basename,
    check_objects,
    check_url,
    is_url,
    join,
    open_url,
    parent,
    read_manifest,
    redact,
)
from training.config import ShardReads
from training.data.augment import Augment, empty_patches, make_patches

IMAGE_EXTS = ("jpg", "jpeg", "png")


class ShardError(PatchetlError, ValueError):
    """A shard folder or pattern that cannot be used; the message says how to fix it."""


# --------------------------------------------------------------------------- shard sets
@dataclass(frozen=True)
class ShardSet:
    """Shard URLs with their sample counts (the contract for equal epochs on every rank), and
    how to read them (`retry`: attempts, timeouts, backoff; `etl.storage`)."""

    source: str  # as given, redacted (safe to print)
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    region_size: int
    retry: Retry = field(default_factory=lambda: ShardReads().retry)

    @property
    def total(self) -> int:
        return sum(self.counts)


def open_shards(spec: str | Path, retry: Retry | None = None) -> ShardSet:
    """A split (a folder or URL prefix holding `manifest.json`) or a brace pattern of shards.

    Local patterns take counts from a `manifest.json` next to the shards when there is one,
    else from the tar headers; URL patterns need that manifest; `pipe:` patterns are counted
    by reading them through once. Every shard is found before this returns (a missing one is a
    `ShardError` naming it), so a run never starts on an incomplete split.
    """
    retry = retry or ShardReads().retry
    text = str(spec)
    if is_url(text):
        shards = _remote_shards(text, retry)
    elif Path(text).is_dir():
        shards = _split(text, read_manifest(str(_local_manifest(Path(text))), retry), retry)
    else:
        shards = _local_pattern(text, retry)
    if shards.total == 0:
        raise ShardError(f"{shards.source}: the shards hold no samples")
    return shards


def _local_manifest(path: Path) -> Path:
    manifest = path / "manifest.json"
    if not manifest.exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "manifest.json").exists())
        if splits:
            raise ShardError(
                f"{path} holds split folders {splits}: pass one of them, e.g. {path / splits[0]}"
            )
        raise ShardError(
            f"{manifest}: missing; the extraction into {path} did not finish "
            "(rerun the same `patchetl extract` command), or pass a brace pattern "
            "such as 'dir/training-{000000..000009}.tar'"
        )
    return manifest


def _split(
    prefix: str, manifest: dict, retry: Retry, urls: Sequence[str] | None = None
) -> ShardSet:
    """The shards of a manifest at ``prefix`` (all it lists, or ``urls`` among them), checked."""
    listed = {s["name"]: int(s["count"]) for s in manifest["shards"]}
    if urls is None:
        urls = [join(prefix, name) for name, count in listed.items() if count > 0]
    unlisted = [u for u in urls if basename(u) not in listed]
    if unlisted:
        raise ShardError(
            f"{redact(unlisted[0])}: not listed in {redact(join(prefix, 'manifest.json'))}"
            " (a shard pattern must match the split's shard names)"
        )
    _check_present(redact(prefix), urls, retry)
    try:
        region = int(manifest["params"]["region_size"])
    except (KeyError, TypeError, ValueError):
        raise ShardError(
            f"{redact(join(prefix, 'manifest.json'))}: no params.region_size; "
            "not a patchetl manifest"
        ) from None
    return ShardSet(
        redact(prefix), tuple(urls), tuple(listed[basename(u)] for u in urls), region, retry
    )


def _check_present(source: str, urls: Sequence[str], retry: Retry) -> None:
    problems = check_objects(urls, retry)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShardError(
            f"{source}: {len(problems)} of {len(urls)} shard(s) cannot be read: "
            + "; ".join(problems[:3])
            + more
            + " (extract or upload the split "
            "again, or fix the URL)"
        )


def _remote_shards(spec: str, retry: Retry) -> ShardSet:
    """A URL prefix of a split, a brace pattern of shard URLs, or of `pipe:` commands."""
    check_url(spec)
    if spec.startswith("pipe:"):
        urls = tuple(braceexpand.braceexpand(spec))
        counts = tuple(_count_samples(u, retry) for u in urls)
        return ShardSet(redact(spec), urls, counts, _first_region_size(urls, retry), retry)
    if "{" in spec:
        expanded = list(braceexpand.braceexpand(spec))
        prefix = parent(expanded[0])
        return _split(prefix, read_manifest(prefix, retry), retry, expanded)
    return _split(spec, read_manifest(spec, retry), retry)


def _local_pattern(spec: str, retry: Retry) -> ShardSet:
    from etl.extract.shards import index_tar  # no torch there; reuse the shard reader's tar index

    urls = tuple(braceexpand.braceexpand(spec))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ShardError(
            f"{spec}: {len(missing)} shard(s) not found, e.g. {missing[0]} "
            "(give a split folder or URL prefix holding manifest.json, or a brace "
            "pattern of existing .tar files)"
        )
    listed = {}
    manifest_path = Path(urls[0]).parent / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        listed = {s["name"]: int(s["count"]) for s in manifest["shards"]}
    counts = tuple(listed.get(Path(u).name) or len(index_tar(Path(u))) for u in urls)
    return ShardSet(spec, urls, counts, _first_region_size(urls, retry), retry)


def tar_samples(url: str, retry: Retry, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """The samples of one shard, read through `etl.storage` (timeouts, resuming retries).
    Errors go to ``handler`` (webdataset's convention: True to continue, False to stop)."""
    stream = open_url(url, retry)
    try:
        files = wds.tariterators.tar_file_expander(
            [{"url": url, "stream": stream}], handler=handler
        )
        yield from wds.tariterators.group_by_keys(files, handler=handler)
    finally:
        stream.close()


def _count_samples(url: str, retry: Retry) -> int:
    return sum(1 for _ in tar_samples(url, retry, wds.handlers.reraise_exception))


def _first_region_size(urls: Iterable[str], retry: Retry) -> int:
    for url in urls:
        for sample in tar_samples(url, retry, wds.handlers.reraise_exception):
            if "json" in sample:
                return int(json.loads(sample["json"])["region_size"])
    raise ShardError(
        f"no sample with a json member in {[redact(u) for u in urls][:3]}...: not patchetl shards"
    )


# --------------------------------------------------------------------------- epoch plan
@dataclass(frozen=True)
class Slice:
    """Samples [start, stop) of one shard, in the shard's order."""

    url: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def seed_for(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (seed, epoch, rank, worker, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def shard_order(shards: ShardSet, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """This epoch's shard order: the same permutation on every rank (seeded by seed, epoch)."""
    order = list(range(len(shards.urls)))
    if shuffle:
        order = [int(i) for i in np.random.default_rng(seed_for(seed, epoch)).permutation(order)]
    return order


def _cut(pieces: list[Slice], start: int, stop: int) -> list[Slice]:
    """Samples [start, stop) of the sequence formed by `pieces`."""
    out, pos = [], 0
    for p in pieces:
        lo, hi = max(start, pos), min(stop, pos + p.size)
        if lo < hi:
            out.append(Slice(p.url, p.start + lo - pos, p.start + hi - pos))
        pos += p.size
    return out


def rank_slices(
    shards: ShardSet, rank: int, world: int, epoch: int, seed: int, shuffle: bool, pad: bool
) -> list[Slice]:
    """The samples rank `rank` of `world` reads this epoch (see the module docstring)."""
    sequence = [
        Slice(shards.urls[i], 0, shards.counts[i])
        for i in shard_order(shards, epoch, seed, shuffle)
    ]
    n = shards.total
    if pad:
        size = math.ceil(n / world)
        out, pos, stop = [], rank * size, (rank + 1) * size
        while pos < stop:  # positions past the end wrap around to the start of the sequence
            lap = pos % n
            take = min(stop - pos, n - lap)
            out += _cut(sequence, lap, lap + take)
            pos += take
        return out
    return _cut(sequence, rank * n // world, (rank + 1) * n // world)


def worker_slices(slices: list[Slice], worker: int, workers: int) -> list[Slice]:
    """Contiguous share of a rank's samples for DataLoader worker `worker` of `workers`."""
    n = sum(s.size for s in slices)
    return _cut(slices, worker * n // workers, (worker + 1) * n // workers)


def count_batches(n: int, workers: int, batch: int) -> int:
    """Batches a rank yields for n samples: each worker batches its share, the last partial."""
    workers = max(1, workers)
    return sum(
        math.ceil(((w + 1) * n // workers - w * n // workers) / batch) for w in range(workers)
    )


# --------------------------------------------------------------------------- worker side
def read_slice(piece: Slice, retry: Retry) -> Iterator[dict]:
    """Samples of one slice; missing or unreadable samples come out as `_bad` placeholders
    (after the retries `retry` allows, for a read that fails mid-shard)."""
    problem: list[str] = []

    def handler(exn: Exception) -> bool:  # webdataset handler: note the error, stop the shard
        # webdataset appends the stream and the raw URL to the arguments: keep the message
        what = exn.args[0] if exn.args and isinstance(exn.args[0], str) else str(exn)
        problem.append(redact(f"{type(exn).__name__}: {what}"))
        return False

    i = -1
    for i, sample in enumerate(tar_samples(piece.url, retry, handler)):
        if i >= piece.stop:
            break
        if i >= piece.start:
            yield sample
    read = min(i + 1, piece.stop)
    if read < piece.stop:
        why = (
            problem[0]
            if problem
            else f"the shard ends after {read} samples, the manifest says {piece.stop} or more"
        )
        for j in range(max(read, piece.start), piece.stop):
            yield {"__key__": f"{basename(piece.url)}#{j}", "_bad": f"{redact(piece.url)}: {why}"}


def label_grid(meta: dict, grid: int) -> np.ndarray:
    """The row-major (grid, grid) labels of a sample; a 1x1 grid labels every cell."""
    labels = np.asarray(meta["labels"], dtype=np.uint8)
    if labels.ndim != 2 or labels.shape[0] != labels.shape[1]:
        raise ValueError(f"labels {meta['labels']} are not a square grid")
    if labels.shape[0] == 1:
        return np.broadcast_to(labels, (grid, grid)).copy()
    if labels.shape[0] != grid:
        raise ValueError(
            f"labels are a {labels.shape[0]}x{labels.shape[0]} grid; train with "
            f"--grid {labels.shape[0]} (or 1-value labels) for these shards"
        )
    return labels


def prepare_sample(sample: dict, grid: int, region_size: int, decode: bool) -> dict:
    """Parse one raw sample into {key, image, labels, bad}; errors become a bad slot.

    `image` is a decoded (3, R, R) uint8 tensor, or (decode=False, JPEG) the encoded bytes as
    a 1-D uint8 tensor for a batched device decode.
    """
    key = sample.get("__key__", "?")
    try:
        if "_bad" in sample:
            raise ValueError(sample["_bad"])
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "json" not in sample:
            raise ValueError(
                f"members {sorted(k for k in sample if not k.startswith('_'))} lack "
                "an image (.jpg/.png) or .json"
            )
        labels = label_grid(json.loads(sample["json"]), grid)
        data = torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8)
        if decode or ext == "png":
            image = decode_image(data, mode=ImageReadMode.RGB)
            check_size(image, region_size)
        else:
            image = data
        return {"key": key, "image": image, "labels": labels, "bad": None}
    except Exception as exc:  # any corruption: keep the slot, report it
        return bad_slot(key, f"{type(exc).__name__}: {exc}", grid, region_size)


def check_size(image: torch.Tensor, region_size: int) -> None:
    if tuple(image.shape) != (3, region_size, region_size):
        raise ValueError(
            f"image is {tuple(image.shape)}, expected (3, {region_size}, "
            f"{region_size}) as in the manifest"
        )


def bad_slot(key: str, reason: str, grid: int, region_size: int) -> dict:
    return {
        "key": key,
        "image": torch.zeros(3, region_size, region_size, dtype=torch.uint8),
        "labels": np.zeros((grid, grid), np.uint8),
        "bad": reason,
    }


def batch_info(items: list[dict]) -> dict:
    """What every worker batch carries besides its pixels: label grids, validity, keys, reasons."""
    return {
        "labels": torch.from_numpy(np.stack([it["labels"] for it in items])),
        "valid": torch.tensor([it["bad"] is None for it in items]),
        "keys": [it["key"] for it in items],
        "bad": [f"{it['key']}: {it['bad']}" for it in items if it["bad"] is not None],
    }


def collate(items: list[dict]) -> dict:
    """Worker-side batch: stacked images when decoded, else a list for the device decoder."""
    images = [it["image"] for it in items]
    decoded = all(im.ndim == 3 for im in images)
    return {"images": torch.stack(images) if decoded else images, **batch_info(items)}


@dataclass(frozen=True)
class PatchSpec:
    """Patches made in the DataLoader workers (CPU training): size, augmentation, layout."""

    patch: int
    aug: Augment
    channels_last: bool = True


# Extra seed part that keeps the workers' patch draws apart from their shuffle buffers.
PATCH_DRAWS = 1


def collate_patches(
    items: list[dict],
    *,
    grid: int,
    train: bool,
    spec: PatchSpec,
    generator: torch.Generator,
    shared: bool,
) -> dict:
    """Worker-side batch of ready patches: `make_patches` on the decoded regions.

    `patches` (N, 3, p, p) float32 in [-1, 1] and `patch_labels` (N,) float32, with
    N = regions * grid * grid; bad slots give patches of their blank regions (weight 0 later).
    shared=True (in a worker process) writes the patches into shared memory directly.
    """
    info = batch_info(items)
    out = empty_patches(len(items) * grid * grid, spec.patch, spec.channels_last, shared)
    x, y = make_patches(
        [it["image"] for it in items],
        info["labels"],
        grid=grid,
        patch=spec.patch,
        train=train,
        aug=spec.aug,
        generator=generator,
        out=out,
    )
    return {"patches": x, "patch_labels": y, **info}


class RegionStream(IterableDataset):
    """One rank's epoch of region batches (iterate it through `make_loader`).

    With `patches`, the workers also make the patches (`collate_patches`): batches then hold
    ready `patches` instead of `images` (training crops and augments when `train`).
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        epoch: int,
        seed: int,
        train: bool,
        regions_per_batch: int,
        grid: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        decode_in_worker: bool = True,
        shuffle_buffer: int = 1000,
        patches: PatchSpec | None = None,
    ):
        super().__init__()
        if patches is not None and not decode_in_worker:
            raise ValueError("RegionStream: patches made in the workers need decode_in_worker")
        self.shards, self.epoch, self.seed, self.train = shards, epoch, seed, train
        self.batch, self.grid, self.rank, self.world = regions_per_batch, grid, rank, world
        self.workers, self.decode, self.buffer = max(1, workers), decode_in_worker, shuffle_buffer
        self.patches = patches
        self.slices = rank_slices(shards, rank, world, epoch, seed, shuffle=train, pad=train)
        self.samples = sum(s.size for s in self.slices)

    def __len__(self) -> int:
        return count_batches(self.samples, self.workers, self.batch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise RuntimeError(
                f"RegionStream planned for {self.workers} workers, runs in "
                f"{workers}: iterate it through make_loader()"
            )
        pieces = worker_slices(self.slices, worker, workers)
        retry = self.shards.retry
        samples: Iterator[dict] = (s for p in pieces for s in read_slice(p, retry))
        if self.train and self.buffer > 1:
            seed = seed_for(self.seed, self.epoch, self.rank, worker)
            samples = wds.filters.shuffle(self.buffer, initial=min(self.buffer, 100), seed=seed)(
                iter(samples)
            )
        size = self.shards.region_size
        items = (prepare_sample(s, self.grid, size, self.decode) for s in samples)
        collation = collate
        if self.patches is not None:
            generator = torch.Generator().manual_seed(
                seed_for(self.seed, self.epoch, self.rank, worker, PATCH_DRAWS)
            )
            collation = partial(
                collate_patches,
                grid=self.grid,
                train=self.train,
                spec=self.patches,
                generator=generator,
                shared=info is not None,
            )
        yield from wds.filters.batched(self.batch, collation_fn=collation, partial=True)(items)


def make_loader(stream: RegionStream, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a RegionStream; `stream.workers` processes (0 or 1: in this process)."""
    workers = stream.workers if stream.workers > 1 else 0
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory)


# --------------------------------------------------------------------------- device side
@dataclass
class RegionBatch:
    """A batch of regions on the device. Invalid (bad) slots hold blank regions.

    `regions` is None when the workers already made the patches (`RegionStream(patches=...)`).
    """

    regions: torch.Tensor | None  # (B, 3, R, R) uint8
    labels: torch.Tensor  # (B, g, g) uint8, row-major
    valid: torch.Tensor  # (B,) bool
    keys: list[str]
    bad: list[str] = field(default_factory=list)


def decode_on_device(
    images: list[torch.Tensor], device: torch.device, region_size: int
) -> tuple[list[torch.Tensor], list[str | None]]:
    """Decode 1-D JPEG byte tensors in one batched nvJPEG call; other entries just move.

    On a decoding error the batch is decoded one by one, and the failures become blank
    images with their reason.
    """
    out: list[torch.Tensor | None] = [None] * len(images)
    errors: list[str | None] = [None] * len(images)
    encoded = [i for i, im in enumerate(images) if im.ndim == 1]
    if encoded:
        if device.type == "cuda":
            # torchvision's nvJPEG decoder writes into freshly allocated blocks before the
            # kernels already queued on this stream have run, so it can overwrite memory they
            # are still reading (wrong values, NaN losses: pytorch/vision#9606,
            # meta-pytorch/torchcodec#1634). Let the queued work finish first.
            torch.cuda.current_stream(device).synchronize()
        try:
            decoded = decode_jpeg(
                [images[i] for i in encoded], mode=ImageReadMode.RGB, device=device
            )
        except RuntimeError:
            decoded = []
            for i in encoded:
                try:
                    decoded.append(decode_jpeg(images[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError as exc:
                    decoded.append(None)
                    errors[i] = f"RuntimeError: {exc}"
        for i, im in zip(encoded, decoded, strict=True):
            if im is not None:
                try:
                    check_size(im, region_size)
                    out[i] = im
                except ValueError as exc:
                    errors[i] = f"ValueError: {exc}"

    def final(i: int) -> torch.Tensor:  # decoded, blank for a failure, or moved as it is
        done = out[i]
        if done is not None:
            return done
        if errors[i]:
            return torch.zeros(3, region_size, region_size, dtype=torch.uint8, device=device)
        return images[i].to(device, non_blocking=True)

    return [final(i) for i in range(len(images))], errors


def to_device(batch: dict, device: torch.device, region_size: int) -> RegionBatch:
    """Move a worker batch to the device, decoding JPEG bytes there when they came encoded.

    A batch of ready patches (`collate_patches`) keeps `regions` None: take its `patches`.
    """
    valid = batch["valid"].to(device, non_blocking=True)
    bad = list(batch["bad"])
    if "patches" in batch:
        regions = None
    elif isinstance(batch["images"], torch.Tensor):
        regions = batch["images"].to(device, non_blocking=True)
    else:
        images, errors = decode_on_device(batch["images"], device, region_size)
        regions = torch.stack(images)
        failed = [i for i, e in enumerate(errors) if e]
        if failed:
            valid[failed] = False
            bad += [f"{batch['keys'][i]}: {errors[i]}" for i in failed]
    labels = batch["labels"].to(device, non_blocking=True)
    return RegionBatch(regions, labels, valid, list(batch["keys"]), bad)
