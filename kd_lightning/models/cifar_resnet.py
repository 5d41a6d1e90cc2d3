"""CIFAR ResNets (He et al., 2016, Sec. 4.2) as used in the CRD / RepDistiller and DKD (mdistiller) tables.

3x3-conv stem without max-pool, three stages of ``n`` BasicBlocks (depth = 6n + 2), strides 1/2/2,
1x1-conv + BN shortcut where the shape changes. ``resnet8x4``/``resnet32x4`` are the 4x-wide variants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of ``depth`` = 6n + 2 layers; ``widths`` = (stem, stage1, stage2, stage3) channels."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, in_channels = [], widths[0]
        for out_channels, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [BasicBlock(in_channels, out_channels, stride)]
            blocks += [BasicBlock(out_channels, out_channels) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, widths[0], 32, 32)
        x = self.stages(x)  # (B, widths[3], 8, 8)
        x = torch.flatten(self.pool(x), 1)  # (B, widths[3])
        return self.fc(x)  # (B, num_classes)


def resnet20(num_classes: int) -> nn.Module:
    """ResNet-20, widths 16/32/64 (~0.27M parameters at 100 classes)."""
    return CifarResNet(20, (16, 16, 32, 64), num_classes)


def resnet56(num_classes: int) -> nn.Module:
    """ResNet-56, widths 16/32/64 (~0.86M parameters at 100 classes)."""
    return CifarResNet(56, (16, 16, 32, 64), num_classes)


def resnet8x4(num_classes: int) -> nn.Module:
    """ResNet-8x4: 32-channel stem, stages 64/128/256 (~1.23M parameters at 100 classes)."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int) -> nn.Module:
    """ResNet-32x4: 32-channel stem, stages 64/128/256 (~7.43M parameters at 100 classes)."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes)
