"""Options of `train`, `infer`, `check-dense` and `evaluate`'s patch-level part, each with
its default and help defined once, here (the CLI is derived from them; `etl.options`).

Defaults are the full-size (GPU) settings; `validate` names the option and the fix. Torch-free,
so the CLI builds without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from etl.config import Progress, SlideBackend
from etl.errors import OptionError
from etl.options import arg, opt
from etl.storage import Retry
from training.errors import InferError, TrainError

# Settings that change what a checkpoint means; a resume with other values is refused.
FIXED_ON_RESUME = ("grid", "patch_size", "batch_size", "optimizer", "seed", "epochs")
MODES = ("dense", "patch")
# The ResNet trunk's output stride (torch-free here, so the CLI builds without torch).
FEATURE_STRIDE = 32

Device = Annotated[str, opt("auto, cpu or cuda.")]
Amp = Annotated[bool | None, opt("bf16 autocast (default: on CUDA).")]


@dataclass(frozen=True)
class ShardReads:
    """How shards are read from URLs (http(s)://, s3://, pipe:) by `train` and `evaluate`."""

    read_attempts: Annotated[
        int,
        opt(
            "Connections per shard read; a dropped read resumes at its byte, and once they are "
            "spent the shard's remaining samples become bad slots."
        ),
    ] = 4
    read_timeout: Annotated[
        float,
        opt("Seconds a network wait (connect, each read) may take before the attempt fails."),
    ] = 60.0
    read_backoff: Annotated[
        float, opt("Seconds before the first retry; doubled for each further one (30 at most).")
    ] = 1.0

    def validate(self) -> None:
        if self.read_attempts < 1 or self.read_timeout <= 0 or self.read_backoff < 0:
            raise OptionError(
                f"--read-attempts {self.read_attempts} / --read-timeout {self.read_timeout} / "
                f"--read-backoff {self.read_backoff}: use at least 1 attempt, a timeout > 0 "
                "and a backoff >= 0"
            )

    @property
    def retry(self) -> Retry:
        return Retry(self.read_attempts, self.read_timeout, self.read_backoff)


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults are the full-size (GPU) settings."""

    train: Annotated[
        str,
        opt(
            "Training split: a folder or URL prefix (http(s)://, s3://) holding manifest.json, "
            "or a brace pattern of shard files, URLs or pipe: commands."
        ),
    ] = "shards/training"
    val: Annotated[
        str | None,
        opt("Validation split, as --train (e.g. shards/validation); none: no validation metrics."),
    ] = None
    out: Annotated[str, opt("Checkpoints (last.pt, best.pt) and metrics.csv.")] = "runs/train"
    epochs: Annotated[int, opt("Epochs (the cosine schedule spans them all).")] = 10
    batch_size: Annotated[int, opt("Patches per step, rounded down to whole regions.")] = 512
    grid: Annotated[int, opt("Cells per region side; one patch per cell.")] = 3
    patch_size: Annotated[int, opt("Patch side in px, cropped inside each cell.")] = 224
    optimizer: Annotated[str, opt("sgd (momentum 0.9) or adamw.")] = "sgd"
    lr: Annotated[float, opt("Peak learning rate.")] = 1e-3
    weight_decay: Annotated[float, opt("Weight decay.")] = 0.0
    warmup_epochs: Annotated[float, opt("Linear warm-up before the cosine decay.")] = 1.0
    workers: Annotated[
        int | None,
        opt(
            "DataLoader workers per rank (default min(8, CPUs per rank)); 0 reads in the training "
            "process."
        ),
    ] = None
    shuffle_buffer: Annotated[int, opt("Sample shuffle buffer per worker (regions).")] = 1000
    decode: Annotated[
        str,
        opt(
            "Where JPEGs decode: cpu (workers), cuda (batched nvJPEG), auto (cuda when training on "
            "CUDA)."
        ),
    ] = "auto"
    device: Device = "auto"
    amp: Amp = None
    channels_last: Annotated[bool, opt("channels_last memory format.")] = True
    compile: Annotated[bool, opt("torch.compile the model.", "--compile")] = False
    prefetch: Annotated[
        bool,
        opt(
            "CUDA: transfer, decode, crop and augment the next batch on a side stream while the "
            "model runs."
        ),
    ] = True
    augment: Annotated[bool, opt("ColorJitter, flips, rot90 and random crops.")] = True
    pretrained: Annotated[str | None, opt("Local torchvision resnet18 state dict (.pth).")] = None
    resume: Annotated[
        bool, opt("Continue <out>/last.pt if it exists (epoch, optimiser, scheduler, RNG).")
    ] = False
    seed: Annotated[int, opt("Seed of every random draw.")] = 0
    max_bad: Annotated[int, opt("Stop when more corrupt samples than this were skipped.")] = 100
    max_bad_fraction: Annotated[
        float,
        opt(
            "Stop after an epoch whose share of corrupt samples (training and validation) is "
            "above this."
        ),
    ] = 0.05
    progress: Progress = True
    record_keys: Annotated[
        bool,
        opt(
            "Write the keys each rank trained on per epoch to <out>/keys/ (audits the DDP/worker "
            "splitting)."
        ),
    ] = False
    reads: ShardReads = field(default_factory=ShardReads)  # `train`'s --read-* options

    def validate(self) -> None:
        self.reads.validate()
        if self.optimizer not in ("sgd", "adamw"):
            raise TrainError(f"--optimizer {self.optimizer!r}: use sgd or adamw")
        if self.decode not in ("auto", "cpu", "cuda"):
            raise TrainError(f"--decode {self.decode!r}: use auto, cpu or cuda")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.batch_size < self.grid * self.grid:
            raise TrainError(
                f"--batch-size {self.batch_size} is smaller than one region "
                f"({self.grid}x{self.grid} = {self.grid**2} patches)"
            )
        if not 0 <= self.max_bad_fraction <= 1 or self.max_bad < 0:
            raise TrainError(
                f"--max-bad-fraction {self.max_bad_fraction} / --max-bad {self.max_bad}: use a "
                "fraction in [0, 1] and a count >= 0"
            )
        if self.epochs < 1 or self.patch_size < 16:
            raise TrainError("--epochs must be >= 1 and --patch-size >= 16")

    @property
    def regions_per_batch(self) -> int:
        return self.batch_size // (self.grid * self.grid)


@dataclass
class InferConfig:
    """Options of an inference run. Defaults are the full-size settings."""

    checkpoint: Annotated[
        str, opt("Checkpoint written by `patchetl train`.", "--checkpoint", "--ckpt")
    ] = "runs/train/best.pt"
    out: Annotated[
        str,
        opt(
            "Output folder; files are named after each slide (<name>.prob.npy, .prob.json, "
            ".heatmap.png, .heatmap.tif, .candidates.csv, .candidates.geojson)."
        ),
    ] = "runs/infer"
    mode: Annotated[
        str,
        opt("dense (fully convolutional tiles) or patch (classic sliding window, the reference)."),
    ] = "dense"
    level: Annotated[int, opt("Pyramid level to run the model on.")] = 0
    mpp: Annotated[
        float | None,
        opt(
            "Run the model at this physical scale (um/px): tiles read from the coarsest level "
            "at least as fine and area-averaged to it (default: the checkpoint's training mpp "
            "when it records one, else --level as is)."
        ),
    ] = None
    assume_mpp: Annotated[
        float | None,
        opt("Pixel size (um/px) of slides that record none, for --mpp or the training mpp."),
    ] = None
    stride: Annotated[
        int, opt("Model px per map pixel (a multiple of 32): level px, or px at --mpp.")
    ] = 32
    patch_size: Annotated[
        int | None,
        opt("Patch side in level px (multiple of 32); default: the checkpoint's, else 224."),
    ] = None
    tile_size: Annotated[
        int, opt("Level px of map area per tile (rounded down to a multiple of --stride).")
    ] = 2048
    margin: Annotated[
        int,
        opt(
            "Dense: context px around each tile (224 covers ResNet18's receptive field: no seams)."
        ),
    ] = 224
    batch_size: Annotated[int, opt("Patch mode: patches per forward pass.")] = 256
    tiles_per_batch: Annotated[
        int | None, opt("Dense: tiles per forward pass (default 4 on CUDA, 1 on CPU).")
    ] = None
    workers: Annotated[int, opt("Threads reading tiles ahead of the model.")] = 4
    prefetch: int | None = None  # tiles read ahead of the model; None: 2 * workers
    device: Device = "auto"
    amp: Amp = None
    channels_last: bool = True
    tissue_downsample: Annotated[
        float, opt("Tissue mask resolution, level-0 px per mask pixel.")
    ] = 32.0
    tissue_threshold: Annotated[
        float | None, opt("Saturation threshold in [0, 1] (default: Otsu).")
    ] = None
    tissue_min_area: Annotated[
        float, opt("Drop tissue pieces smaller than this (level-0 px^2).")
    ] = 65536.0
    nms_radius: Annotated[
        float, opt("NMS radius in level-0 px (NCRF: 12 px at level 6 = 768).")
    ] = 768.0
    nms_threshold: Annotated[float, opt("Keep candidates with probability >= this.")] = 0.5
    thumbnail_side: int = 2048
    slide_backend: SlideBackend = "auto"
    progress: Progress = True
    rank: Annotated[
        int | None,
        opt(
            "This process's share of the slides, with --world (default: RANK from torchrun, "
            "else 0)."
        ),
    ] = None
    world: Annotated[
        int | None,
        opt(
            "Processes sharing the slides, largest first (default: WORLD_SIZE from torchrun, "
            "else 1)."
        ),
    ] = None

    def validate(self) -> None:
        problems = []
        if (self.rank is None) != (self.world is None) or (
            self.world is not None and not 0 <= (self.rank or 0) < self.world
        ):
            problems.append(
                f"--rank {self.rank} --world {self.world}: give both, with 0 <= rank < world"
            )
        if self.mode not in MODES:
            problems.append(f"--mode {self.mode!r}: use dense or patch")
        if self.stride < FEATURE_STRIDE or self.stride % FEATURE_STRIDE:
            problems.append(
                f"--stride {self.stride}: use a multiple of {FEATURE_STRIDE} "
                "(the model's output step)"
            )
        if self.patch_size is not None and (
            self.patch_size < FEATURE_STRIDE or self.patch_size % FEATURE_STRIDE
        ):
            problems.append(
                f"--patch-size {self.patch_size}: use a multiple of {FEATURE_STRIDE} (e.g. 224)"
            )
        if self.margin < 0 or self.margin % FEATURE_STRIDE:
            problems.append(f"--margin {self.margin}: use 0 or a multiple of {FEATURE_STRIDE}")
        if self.tile_size < self.stride:
            problems.append(f"--tile-size {self.tile_size}: use at least --stride {self.stride}")
        if self.level < 0:
            problems.append(f"--level {self.level}: use 0 or more")
        for name, value in (("--mpp", self.mpp), ("--assume-mpp", self.assume_mpp)):
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} {value}: give a pixel size in um/px, > 0 (e.g. 0.5)")
        if self.mpp is not None and self.level != 0:
            problems.append(
                f"--mpp {self.mpp} with --level {self.level}: --mpp chooses the level itself; "
                "give one of them"
            )
        if self.batch_size < 1 or (self.tiles_per_batch is not None and self.tiles_per_batch < 1):
            problems.append("--batch-size and --tiles-per-batch must be >= 1")
        if self.workers < 1:
            problems.append(f"--workers {self.workers}: use at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"--device {self.device!r}: use auto, cpu or cuda")
        if not 0 < self.nms_threshold <= 1 or self.nms_radius < 0:
            problems.append("--nms-threshold must be in (0, 1] and --nms-radius >= 0")
        if problems:
            raise InferError("; ".join(problems))


@dataclass
class SlideInputs:
    """The slides of `infer` and `check-dense`."""

    slides: Annotated[list[Path], arg("Slide files, or folders of slides.")]


@dataclass
class AgreementOptions:
    """What `check-dense` demands of the dense maps, and where it writes its numbers."""

    min_r: Annotated[
        float, opt("Exit 1 when the pooled Pearson r inside tissue is below this.")
    ] = 0.95
    report: Annotated[Path | None, opt("Also write the numbers to this JSON file.")] = None


@dataclass
class PatchEvalOptions:
    """The patch-level AUC of `evaluate`: a checkpoint scored on a validation split."""

    checkpoint: Annotated[
        str | None, opt("Checkpoint for the patch-level AUC (with --shards).")
    ] = None
    shards: Annotated[
        str | None,
        opt(
            "Validation split (folder, URL prefix or shard pattern, as train's --val) for the "
            "patch-level AUC (with --checkpoint)."
        ),
    ] = None
    device: Annotated[str, opt("Patch-level evaluation device: auto, cpu or cuda.")] = "auto"
    workers: Annotated[int, opt("DataLoader workers for the patch-level evaluation.")] = 0

    def validate(self) -> None:
        if (self.checkpoint is None) != (self.shards is None):
            raise OptionError(
                "the patch-level evaluation needs both --checkpoint and --shards (or neither)"
            )
