"""The model on slide pixels: dense tiles -> probability grids, single patches -> values.

Pixels are scaled exactly as in training (`to_unit_range` then `to_model_range`: [-1, 1]).
Both modes run the model's own trunk (`FCResNet18.features`) and head (`classify`), so the
maps follow any change of the model. The trunk has stride 32, so in a dense tile the logit of
the patch at offset 32*m is the head's pooled window at feature m: a patch of p px pools p/32
features, every `stride_level / 32` features. The `margin` of context around a tile is cropped
off the features before the pool. On CUDA the model runs in bf16 autocast.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from training.config import FEATURE_STRIDE, InferConfig
from training.data.augment import to_model_range, to_unit_range
from training.errors import InferError
from training.model import FCResNet18, load_model, resolve_device


class Predictor:
    """Runs the model on uint8 pixels: dense tiles -> probability grids, patches -> values."""

    def __init__(
        self,
        model: FCResNet18,
        patch: int,
        stride_level: int,
        device: torch.device,
        amp: bool = False,
        channels_last: bool = True,
    ) -> None:
        self.model, self.patch, self.device, self.amp = model, patch, device, amp
        self.pool = patch // FEATURE_STRIDE  # features per patch side
        self.step = stride_level // FEATURE_STRIDE  # features per map pixel
        self.channels_last = channels_last
        self.training_scale: dict[str, Any] | None = None  # the checkpoint's `scale`
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _input(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1] on the device (training scaling)."""
        t = torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = to_model_range(to_unit_range(t))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        # The model's own pool is 7x7 (224 px); a patch of p px pools p/32 features, so a
        # 64 px checkpoint gives the same logits dense as patch by patch.
        logits = self.model.classify(f, window=self.pool, step=self.step)
        return torch.sigmoid(logits.float())[:, 0]

    @torch.inference_mode()
    def dense(self, tiles: np.ndarray, margin: int) -> np.ndarray:
        """(B, h, w, 3) tiles, ``margin`` px of context around their patches -> (B, rows, cols)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            f = self.model.features(self._input(tiles))
            m = margin // FEATURE_STRIDE
            if m:
                f = f[:, :, m:-m, m:-m]
            return self._head(f).cpu().numpy()

    @torch.inference_mode()
    def patches(self, patches: np.ndarray) -> np.ndarray:
        """(N, p, p, 3) patches -> (N,) probabilities, each patch on its own."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self._head(self.model.features(self._input(patches))).reshape(-1).cpu().numpy()


def make_predictor(cfg: InferConfig) -> tuple[InferConfig, Predictor]:
    """Validate the options, load the checkpoint on the device; returns the options with the
    patch size filled in (the checkpoint's when not given) and the predictor."""
    cfg.validate()
    device = resolve_device(cfg.device)
    model, info = load_model(cfg.checkpoint, device)
    patch = cfg.patch_size
    if patch is None:
        patch = int(info.get("patch_size", 224))
        if patch % FEATURE_STRIDE:
            raise InferError(
                f"--checkpoint {cfg.checkpoint}: trained on {patch} px "
                f"patches; give --patch-size as a multiple of {FEATURE_STRIDE}"
            )
        cfg = replace(cfg, patch_size=patch)
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    predictor = Predictor(
        model, patch, cfg.stride, device, amp=amp, channels_last=cfg.channels_last
    )
    predictor.training_scale = info.get("scale")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return cfg, predictor
