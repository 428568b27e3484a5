"""FCResNet18: fully convolutional output sizes, pretrained loading, checkpoint safety."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from training.checkpoint import load_checkpoint
from training.infer.predictor import Predictor
from training.model import (
    CheckpointError,
    DeviceError,
    build_model,
    load_model,
    load_pretrained,
    output_size,
    resolve_device,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model().eval()


@torch.no_grad()
@pytest.mark.parametrize(
    "size, expected", [(224, 1), (256, 2), (320, 4), (416, 7), (32, 1), (64, 1), (96, 1)]
)
def test_output_is_one_logit_per_32px_step(model, size, expected):
    out = model(torch.zeros(1, 3, size, size))
    assert out.shape == (1, 1, expected, expected)
    assert output_size(size) == expected
    if size >= 224:
        assert expected == (size - 224) // 32 + 1


def test_pretrained_torchvision_weights_load_without_fc(tmp_path):
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(pretrained=path)
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (1, 512, 1, 1)  # our head, not ImageNet's 1000 classes
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_model(pretrained=tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match=r"junk\.pth.*not a ResNet18"):
        load_pretrained(build_model(), tmp_path / "junk.pth")


def test_state_dict_round_trips_with_weights_only(tmp_path, model):
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    clone = build_model()
    clone.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(clone.eval()(x), model(x))


@torch.no_grad()
def test_forward_is_the_trunk_then_the_head_and_dense_inference_uses_both(model):
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(model(x), model.classify(model.features(x)))
    pixels = (torch.rand(2, 64, 64, 3) * 255).to(torch.uint8).numpy()
    pred = Predictor(model, 64, 32, torch.device("cpu"), channels_last=False)
    expected = torch.sigmoid(model(pred._input(pixels))).flatten()
    torch.testing.assert_close(torch.from_numpy(pred.patches(pixels)), expected)


def test_every_weight_file_problem_is_one_error_that_names_the_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save(
        {"format": 1, "model": {"fc.weight": torch.zeros(2, 512, 1, 1)}}, tmp_path / "other.pt"
    )
    loaders = {
        "load_model": load_model,
        "load_checkpoint": load_checkpoint,
        "load_pretrained": lambda p: load_pretrained(build_model(), p),
    }
    for name, load in loaders.items():
        with pytest.raises(CheckpointError, match=r"missing\.pt: no such file"):
            load(tmp_path / "missing.pt")
        with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable torch checkpoint"):
            load(tmp_path / "junk.pt")
        if name != "load_checkpoint":  # a training checkpoint's weights are checked on restore
            with pytest.raises(CheckpointError, match=r"other\.pt: not a (checkpoint|ResNet18)"):
                load(tmp_path / "other.pt")


def test_device_names_are_checked_and_cuda_must_exist():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="use auto, cpu or cuda"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceError, match="no CUDA device is available; use --device cpu"):
            resolve_device("cuda")
