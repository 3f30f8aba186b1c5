"""Image classifiers for the experiments, in plain ``torch.nn`` (no torchvision).

* ``resnet20`` / ``resnet32`` / ``resnet56``: the CIFAR ResNets of He et al. (2016), with 1x1 conv + BN
  projection shortcuts where the shape changes ("option B"), as in the code of Lin et al. (ICLR 2020).
  ``resnet8`` and ``resnet14`` are the same family with 1 and 2 blocks per stage (for short studies).
* ``densenet40``: DenseNet-40 with growth rate 12 (Huang et al., 2017), no bottleneck, compression 1.0.
* ``wrn28_10``: the pre-activation WideResNet-28-10 (Zagoruyko & Komodakis, 2016), dropout 0.

Every model ends with adaptive average pooling, so it takes 32x32 (CIFAR) and 28x28 (MNIST) inputs alike.
Normalisation is always ``nn.BatchNorm2d`` (the training harness finds BN parameters by module type).
"""

from __future__ import annotations

import torch
from torch import nn

MODELS: tuple[str, ...] = (
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet56",
    "densenet40",
    "wrn28_10",
)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _init(model: nn.Module) -> nn.Module:
    """He-normal conv weights (fan_out), BN weight 1 and bias 0; Linear keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class _Head(nn.Module):
    """Global average pool and a linear classifier."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


# --- CIFAR ResNet ------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut (1x1 conv + BN if the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = _conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for CIFAR: stem (16 ch), 3 stages of (depth-2)/6 blocks (16/32/64 ch), head."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        c_in = 16
        for i, c_out in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if i > 0 and j == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = _Head(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# --- DenseNet ----------------------------------------------------------------------------------------


def _bn_relu_conv(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
    )


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` channels, concatenated to its input."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.body = _bn_relu_conv(c_in, growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    """Plain DenseNet for CIFAR (no bottleneck): depth = 3 * layers_per_block + 4.

    ``compression`` scales the channels at each transition; 1.0 (the default here, as in the DenseNet
    paper's plain "DenseNet (L=40, k=12)") keeps them all. Note the paper authors' code defaults to 0.5.
    """

    def __init__(
        self, depth: int, growth: int, num_classes: int, in_channels: int = 3, compression: float = 1.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3
        c = 2 * growth
        layers: list[nn.Module] = [_conv3x3(in_channels, c)]
        for block in range(3):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if block < 2:  # transition: BN-ReLU-conv1x1-avgpool2
                c_out = int(c * compression)
                layers += [_bn_relu_conv(c, c_out, 1), nn.AvgPool2d(2)]
                c = c_out
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = _Head(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --- WideResNet --------------------------------------------------------------------------------------


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a shortcut.

    The shortcut is the identity, or a 1x1 conv of the pre-activated input when the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), _conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), _conv3x3(c_out, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: stem (16 ch), 3 stages of (depth-4)/6 blocks, final BN-ReLU, head."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        layers: list[nn.Module] = [_conv3x3(in_channels, 16)]
        c_in = 16
        for i, c_out in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for j in range(n):
                layers.append(WideBlock(c_in, c_out, stride=2 if i > 0 and j == 0 else 1))
                c_in = c_out
        layers += [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = _Head(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --- factory -----------------------------------------------------------------------------------------


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build one of ``MODELS`` with initialised weights (seed ``torch.manual_seed`` for determinism)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet56"):
        model: nn.Module = CifarResNet(int(name[len("resnet") :]), num_classes, in_channels)
    elif name == "densenet40":
        model = DenseNet(40, 12, num_classes, in_channels, compression=1.0)
    elif name == "wrn28_10":
        model = WideResNet(28, 10, num_classes, in_channels)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return _init(model)
