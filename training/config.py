"""Options of `train` and `infer`: each option and its default are defined once, here.

Defaults are the full-size (GPU) settings; `validate` names the option and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass

from training.errors import InferError, TrainError

# Settings that change what a checkpoint means; a resume with other values is refused.
FIXED_ON_RESUME = ("grid", "patch_size", "batch_size", "optimizer", "seed", "epochs")
MODES = ("dense", "patch")
# The ResNet trunk's output stride (torch-free here, so the CLI builds without torch).
FEATURE_STRIDE = 32


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults are the full-size (GPU) settings."""

    train: str  # split folder with manifest.json, or a brace pattern of shards
    val: str | None = None
    out: str = "runs/train"
    epochs: int = 10
    batch_size: int = 512  # patches per step (rounded down to whole regions)
    grid: int = 3
    patch_size: int = 224
    optimizer: str = "sgd"  # sgd (momentum 0.9) | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    workers: int | None = None  # DataLoader workers per rank; None: min(8, cpus per rank)
    shuffle_buffer: int = 1000  # regions per worker
    decode: str = "auto"  # auto | cpu | cuda
    device: str = "auto"  # auto | cpu | cuda
    amp: bool | None = None  # bf16 autocast; None: on for CUDA only
    channels_last: bool = True
    compile: bool = False
    prefetch: bool = True  # CUDA: make the next batch on a side stream while the model runs
    augment: bool = True
    pretrained: str | None = None
    resume: bool = False
    seed: int = 0
    max_bad: int = 100
    progress: bool = True
    record_keys: bool = False  # write the keys each rank trained on (audit of the splitting)

    def validate(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise TrainError(f"--optimizer {self.optimizer!r}: use sgd or adamw")
        if self.decode not in ("auto", "cpu", "cuda"):
            raise TrainError(f"--decode {self.decode!r}: use auto, cpu or cuda")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.batch_size < self.grid * self.grid:
            raise TrainError(f"--batch-size {self.batch_size} is smaller than one region "
                             f"({self.grid}x{self.grid} = {self.grid ** 2} patches)")
        if self.epochs < 1 or self.patch_size < 16:
            raise TrainError("--epochs must be >= 1 and --patch-size >= 16")

    @property
    def regions_per_batch(self) -> int:
        return self.batch_size // (self.grid * self.grid)


@dataclass
class InferConfig:
    """Options of a run (the CLI's options; defaults are the full-size settings)."""

    checkpoint: str = "runs/train/best.pt"
    out: str = "runs/infer"
    mode: str = "dense"  # dense | patch
    level: int = 0
    stride: int = 32  # level px per map pixel (a multiple of 32)
    patch_size: int | None = None  # None: the checkpoint's patch size, else 224
    tile_size: int = 2048  # level px of map area per tile (rounded down to a stride multiple)
    margin: int = 224  # dense: level px of context around each tile (a multiple of 32)
    batch_size: int = 256  # patch mode: patches per forward pass
    tiles_per_batch: int | None = None  # dense: tiles per forward pass; None: 4 CUDA, 1 CPU
    workers: int = 4  # reading threads
    prefetch: int | None = None  # tiles read ahead of the model; None: 2 * workers
    device: str = "auto"  # auto | cpu | cuda
    amp: bool | None = None  # bf16 autocast; None: on CUDA only
    channels_last: bool = True
    tissue_downsample: float = 32.0
    tissue_threshold: float | None = None  # saturation in [0, 1]; None: Otsu
    tissue_min_area: float = 256 * 256  # level-0 px^2
    nms_radius: float = 768.0  # level-0 px (NCRF: 12 px at level 6)
    nms_threshold: float = 0.5
    thumbnail_side: int = 2048
    slide_backend: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode {self.mode!r}: use dense or patch")
        if self.stride < FEATURE_STRIDE or self.stride % FEATURE_STRIDE:
            problems.append(f"--stride {self.stride}: use a multiple of {FEATURE_STRIDE} "
                            "(the model's output step)")
        if self.patch_size is not None and (self.patch_size < FEATURE_STRIDE
                                            or self.patch_size % FEATURE_STRIDE):
            problems.append(f"--patch-size {self.patch_size}: use a multiple of "
                            f"{FEATURE_STRIDE} (e.g. 224)")
        if self.margin < 0 or self.margin % FEATURE_STRIDE:
            problems.append(f"--margin {self.margin}: use 0 or a multiple of {FEATURE_STRIDE}")
        if self.tile_size < self.stride:
            problems.append(f"--tile-size {self.tile_size}: use at least --stride {self.stride}")
        if self.level < 0:
            problems.append(f"--level {self.level}: use 0 or more")
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
