"""The tumor detector: torchvision ResNet18 with a 1x1 convolution head (fully convolutional).

Same architecture as MONAI's `TorchVisionFCModel("resnet18", num_classes=1, use_conv=True)`:
the trunk (conv1 .. layer4, stride 32), a 7x7 average pool with stride 1, then a 1x1 convolution
512 -> 1 in place of the fully connected layer. At 224 px the 7x7 feature map pools to one logit
(the same as global pooling); a larger input of side n gives a map of (n - 224) / 32 + 1 logits,
one per 32 px step, so the same weights run dense inference over a slide.

Inputs smaller than 224 px (tests, smoke runs) give a feature map smaller than 7x7; the pool
then shrinks to the feature map (kernel = min(7, size)), so that a 32-224 px patch still gives
one logit. State dict keys are torchvision's, except that `fc` is now a 1x1 conv.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

POOL = 7  # the avgpool kernel of torchvision's ResNet at 224 px


class ClampedAvgPool(nn.Module):
    """Average pool `size` x `size` with stride 1; the kernel shrinks to fit smaller maps."""

    def __init__(self, size: int = POOL) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (min(self.size, x.shape[-2]), min(self.size, x.shape[-1]))
        return F.avg_pool2d(x, kernel, stride=1)


class FCResNet18(ResNet):
    """ResNet18 trunk + 7x7/1 average pool + 1x1 conv to `num_classes` logit maps."""

    def __init__(self, num_classes: int = 1) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2])
        self.avgpool = ClampedAvgPool(POOL)
        self.fc = nn.Conv2d(512, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> logits (N, num_classes, (H - 224) // 32 + 1, ...)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x))


def build_model(pretrained: str | Path | None = None) -> FCResNet18:
    """The detector, random or with a local torchvision ResNet18 trunk (never downloads)."""
    model = FCResNet18(num_classes=1)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: FCResNet18, path: str | Path) -> None:
    """Load the trunk from a torchvision ResNet18 state dict file (`resnet18-*.pth`).

    The 1000-class `fc` layer of an ImageNet file is dropped (our head stays random); a file
    written by this trainer (a checkpoint or a bare state dict with the 1x1 head) loads whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained {path}: no such file (give a local torchvision "
                                "resnet18 state dict; nothing is downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # one of our checkpoints
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--pretrained {path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    if any(k.startswith("fc.") and v.shape != own[k].shape for k, v in state.items() if k in own):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # ImageNet head
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        raise ValueError(f"--pretrained {path}: not a ResNet18 state dict (shape mismatch "
                         f"{wrong[:3]}, missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         "use torchvision's resnet18 weights")
    model.load_state_dict(state, strict=False)


def output_size(input_size: int) -> int:
    """Side of the logit map for a square input of `input_size` px (>= 32)."""
    feature = -(-input_size // 32)  # the trunk rounds up at each stride-2 step for sizes >= 32
    return feature - min(POOL, feature) + 1
