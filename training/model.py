"""The tumor detector, its weight files and its device: the one home of each.

Model: torchvision ResNet18 with a 1x1 convolution head, fully convolutional, as MONAI's
`TorchVisionFCModel("resnet18", num_classes=1, use_conv=True)`. `features` is the trunk
(conv1 .. layer4, stride 32); `classify` is the head: a `window` x `window` average pool with
stride `step` (7 and 1: torchvision's pool at 224 px), then a 1x1 convolution 512 -> 1 in place
of the fully connected layer; `forward` is their composition. At 224 px the 7x7 feature map
pools to one logit; a larger input of side n gives (n - 224) / 32 + 1 logits, one per 32 px
step, so dense inference runs the same trunk and head with the window of its patch size.
Inputs smaller than 224 px (tests, smoke runs) give a feature map smaller than 7x7; the pool
then shrinks to the map, so that a 32-224 px patch still gives one logit. State dict keys are
torchvision's, except that `fc` is a 1x1 conv.

Weight files are read only through `read_weights` (`torch.load(weights_only=True)`: tensors and
plain values, never arbitrary pickles); every problem with one (missing, unreadable, not
weights of this model) is a `CheckpointError` naming the file and the fix. `resolve_device`
is the one reading of `--device`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from etl.errors import PatchetlError

POOL = 7  # the avgpool kernel of torchvision's ResNet at 224 px
DEVICES = ("auto", "cpu", "cuda")


class CheckpointError(PatchetlError, ValueError):
    """A weight file that is missing, unreadable or not weights of this model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The weight file does not exist."""


class DeviceError(PatchetlError, ValueError):
    """`--device` names no device, or one this machine does not have."""


class FCResNet18(ResNet):
    """ResNet18 trunk (`features`) + average pool and 1x1 conv head (`classify`)."""

    def __init__(self, num_classes: int = 1) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2])
        del self.avgpool  # the pool is part of `classify`: its window follows the patch size
        self.fc = nn.Conv2d(512, num_classes, kernel_size=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> the trunk's (N, 512, ceil(H / 32), ceil(W / 32)) map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def classify(self, f: torch.Tensor, window: int = POOL, step: int = 1) -> torch.Tensor:
        """Feature map -> logits: mean of each `window` x `window` block of features (shrunk to
        fit a smaller map), every `step` features, through the 1x1 conv."""
        kernel = (min(window, f.shape[-2]), min(window, f.shape[-1]))
        return self.fc(F.avg_pool2d(f, kernel, stride=step))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> logits (N, num_classes, (H - 224) // 32 + 1, ...)."""
        return self.classify(self.features(x))


def build_model(pretrained: str | Path | None = None) -> FCResNet18:
    """The detector, random or with a local torchvision ResNet18 trunk (never downloads)."""
    model = FCResNet18(num_classes=1)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def output_size(input_size: int) -> int:
    """Side of the logit map for a square input of `input_size` px (>= 32)."""
    feature = -(-input_size // 32)  # the trunk rounds up at each stride-2 step for sizes >= 32
    return feature - min(POOL, feature) + 1


# --------------------------------------------------------------------------- weight files
def read_weights(
    path: str | Path,
    option: str = "--checkpoint",
    fix: str = "train one with `patchetl train`, then pass <out>/best.pt or last.pt",
) -> Any:
    """The object in a weight file, loaded safely on the CPU (`weights_only=True`).

    `option` and `fix` name the file's role and what to do in the error, which reads
    `<file>: <what> (<option>: <fix>)`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file ({option}: {fix})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and format errors all mean "not a weight file"
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, {_unreadable(path, exc)} ({option}: {fix})"
        ) from None


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch could not load ``path``, in a few words."""
    text = str(exc)
    if path.stat().st_size == 0:
        return "the file is empty"
    if "central directory" in text or "zip archive" in text:
        return "the file is truncated or damaged (its zip archive is incomplete)"
    if "Weights only load failed" in text:
        return (
            "the file is not a torch file, or holds more than tensors and plain values "
            "(loaded weights-only, for safety)"
        )
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"the file is not a torch file ({type(exc).__name__}{': ' + first if first else ''})"


def _state_dict(obj: Any) -> Any:
    """The state dict inside a checkpoint (ours: `model`; others: `state_dict`), wrapper
    prefixes (DDP `module.`, torch.compile `_orig_mod.`) removed."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def _mismatch(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], optional: tuple[str, ...] = ()
) -> str:
    """What keeps `state` from loading into a model with state dict `own` ('' when nothing);
    keys starting with one of `optional` may be missing."""
    wrong = [
        f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    return "; ".join(
        f"{name} {items[:3]}{' ...' if len(items) > 3 else ''}"
        for name, items in (
            ("shape mismatch", wrong),
            ("missing", missing),
            ("unexpected", unexpected),
        )
        if items
    )


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[FCResNet18, dict[str, Any]]:
    """The detector from a training checkpoint (or a bare state dict), in eval mode on `device`.

    Returns `(model, info)`; `info` holds the checkpoint's `patch_size`, `grid`, `epoch`,
    `arch` and `scale` (the training shards' physical scale, `training.shard_scale`) where it
    records them.
    """
    ckpt = read_weights(path)
    state = _state_dict(ckpt)
    if state is None:
        raise CheckpointError(
            f"{path}: expected a patchetl checkpoint or a state dict, got "
            f"{type(ckpt).__name__} (--checkpoint: use a checkpoint written by `patchetl train`)"
        )
    model = build_model()
    problem = _mismatch(state, model.state_dict())
    if problem:
        raise CheckpointError(
            f"{path}: not a checkpoint of this model (FCResNet18, 1 output): {problem} "
            "(--checkpoint: use a checkpoint written by `patchetl train`)"
        )
    model.load_state_dict(state)
    info = (
        {k: ckpt[k] for k in ("patch_size", "grid", "epoch", "arch", "scale") if k in ckpt}
        if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
        else {}
    )
    return model.to(device).eval(), info


def load_pretrained(model: FCResNet18, path: str | Path) -> None:
    """Load the trunk from a torchvision ResNet18 state dict file (`resnet18-*.pth`).

    The 1000-class `fc` layer of an ImageNet file is dropped (our head stays random); a file
    written by this trainer (a checkpoint or a bare state dict with the 1x1 head) loads whole.
    """
    fix = "give a local torchvision resnet18 state dict; nothing is downloaded"
    ckpt = read_weights(path, "--pretrained", fix)
    state = _state_dict(ckpt)
    if state is None:
        raise CheckpointError(
            f"{path}: expected a state dict, got {type(ckpt).__name__} (--pretrained: {fix})"
        )
    own = model.state_dict()
    if any(k.startswith("fc.") and v.shape != own[k].shape for k, v in state.items() if k in own):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # ImageNet head
    problem = _mismatch(state, own, optional=("fc.",))
    if problem:
        raise CheckpointError(f"{path}: not a ResNet18 state dict: {problem} (--pretrained: {fix})")
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- device
def resolve_device(name: str, index: int | None = None) -> torch.device:
    """`--device` (auto, cpu, cuda) -> the device; auto is CUDA when there is one.

    With `index` (the local rank under torchrun) CUDA work goes to that GPU.
    """
    if name not in DEVICES:
        raise DeviceError(f"--device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available; use --device cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if index is None:
        return torch.device("cuda")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
