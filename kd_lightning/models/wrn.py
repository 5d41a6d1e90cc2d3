"""Wide ResNets (Zagoruyko & Komodakis, 2016) as used in the CRD / RepDistiller and DKD tables.

WRN-d-k: 3x3 stem of 16 channels, three stages of (d - 4) / 6 pre-activation blocks of widths
16k/32k/64k (strides 1/2/2), then BN-ReLU, global average pool and the classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        # a projection shortcut sees the pre-activated input, an identity shortcut the raw one
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` with dropout ``dropout`` inside each block."""

    def __init__(self, depth: int, widen: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        stages, in_channels = [], 16
        for out_channels, stride in zip((16 * widen, 32 * widen, 64 * widen), (1, 2, 2)):
            blocks = [PreActBlock(in_channels, out_channels, stride, dropout)]
            blocks += [PreActBlock(out_channels, out_channels, 1, dropout) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, 16, 32, 32)
        x = self.stages(x)  # (B, 64k, 8, 8)
        x = F.relu(self.bn(x))
        x = torch.flatten(self.pool(x), 1)  # (B, 64k)
        return self.fc(x)  # (B, num_classes)


def wrn_16_2(num_classes: int, dropout: float = 0.0) -> nn.Module:
    """WRN-16-2 (~0.70M parameters at 100 classes)."""
    return WideResNet(16, 2, num_classes, dropout)


def wrn_40_2(num_classes: int, dropout: float = 0.0) -> nn.Module:
    """WRN-40-2 (~2.26M parameters at 100 classes)."""
    return WideResNet(40, 2, num_classes, dropout)
