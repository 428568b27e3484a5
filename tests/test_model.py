"""FCResNet18: fully convolutional output sizes, pretrained loading, checkpoint safety."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from training.model import build_model, load_pretrained, output_size


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model().eval()


@torch.no_grad()
@pytest.mark.parametrize("size, expected", [(224, 1), (256, 2), (320, 4), (416, 7), (32, 1),
                                            (64, 1), (96, 1)])
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
    with pytest.raises(ValueError, match="junk.pth.*not a ResNet18"):
        load_pretrained(build_model(), tmp_path / "junk.pth")


def test_state_dict_round_trips_with_weights_only(tmp_path, model):
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    clone = build_model()
    clone.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(clone.eval()(x), model(x))
