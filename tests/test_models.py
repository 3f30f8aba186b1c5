"""Tests for the image classifiers in localsgd.harness.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localsgd.harness.models import MODELS, build_model

# Exact trainable-parameter counts for 10 classes and 3 input channels.
PARAM_COUNTS = {
    "resnet8": 78_042,  # 1 block per stage
    "resnet14": 175_258,  # 2 blocks per stage
    "resnet20": 272_474,  # 269,722 with option-A shortcuts + 2,752 for the two 1x1 conv + BN projections
    "resnet32": 466_906,  # 464,154 + 2,752
    "resnet56": 855_770,  # 853,018 + 2,752
    "densenet40": 1_059_298,  # growth 12, no bottleneck, compression 1.0
    "wrn28_10": 36_479_194,
}
SMALL = ("resnet20", "resnet32", "resnet56", "densenet40")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts(name: str) -> None:
    """Each model has exactly the parameter count its architecture implies (10 classes, RGB input)."""
    assert n_params(build_model(name, 10)) == PARAM_COUNTS[name]


def test_every_model_has_a_count() -> None:
    """The count table covers exactly the public model names."""
    assert set(PARAM_COUNTS) == set(MODELS)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
@pytest.mark.parametrize("train", [True, False])
def test_output_shape(name: str, shape: tuple[int, int, int], train: bool) -> None:
    """Output is (N, num_classes) for CIFAR and MNIST-sized inputs, in train and eval mode."""
    torch.manual_seed(0)
    model = build_model(name, 7, in_channels=shape[0]).train(train)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_wrn_output_shape(shape: tuple[int, int, int]) -> None:
    """WRN-28-10 gives (N, num_classes) for both input sizes, in train and eval mode (2 images only)."""
    torch.manual_seed(0)
    model = build_model("wrn28_10", 10, in_channels=shape[0])
    x = torch.randn(2, *shape)
    for train in (True, False):
        assert model.train(train)(x).shape == (2, 10)


def test_channels_last_matches_contiguous() -> None:
    """In eval mode, a channels_last resnet20 computes the same outputs as a contiguous one (1e-5)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_train_forward(name: str) -> None:
    """Every small model runs forward and backward in channels_last memory format in train mode."""
    torch.manual_seed(0)
    model = build_model(name, 10).to(memory_format=torch.channels_last).train()
    out = model(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last))
    out.sum().backward()
    assert out.shape == (2, 10)


def test_backward_reaches_every_parameter() -> None:
    """One backward pass through resnet20 gives a finite, non-zero gradient for every parameter."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_batchnorm_is_the_only_normalisation() -> None:
    """All normalisation layers are nn.BatchNorm2d (the harness finds BN parameters by module type)."""
    for name in SMALL:
        model = build_model(name, 10)
        norms = [m for m in model.modules() if "Norm" in type(m).__name__]
        assert norms and all(type(m) is nn.BatchNorm2d for m in norms), name


def test_init() -> None:
    """BN weights start at 1, biases at 0; conv weights are He-normal, fan_out (std ~ sqrt(2/fan_out))."""
    torch.manual_seed(0)
    model = build_model("resnet56", 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    conv = model.blocks[-1].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name", SMALL)
def test_deterministic(name: str) -> None:
    """The same seed builds identical parameters."""
    torch.manual_seed(3)
    a = build_model(name, 10)
    torch.manual_seed(3)
    b = build_model(name, 10)
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(pa, pb), ka


def test_unknown_name() -> None:
    """An unknown model name raises ValueError naming the bad value and the allowed ones."""
    with pytest.raises(
        ValueError, match=r"unknown model 'resnet18'; choose one of resnet8, resnet14, resnet20, .*wrn28_10"
    ):
        build_model("resnet18", 10)


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_bad_num_classes(num_classes: int) -> None:
    """num_classes below 2 raises ValueError naming the value."""
    with pytest.raises(ValueError, match=rf"num_classes must be at least 2, got {num_classes}\b"):
        build_model("resnet20", num_classes)
