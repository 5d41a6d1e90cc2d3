"""Small student networks: the flowers study's five-layer CNN, a tiny CNN for 8x8 digits, and an MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FlowersCNN(nn.Module):
    """Five-layer student: conv7x7/2-ReLU, max-pool 2, conv3x3/2-ReLU, global average pool, dropout-fc."""

    def __init__(self, num_classes: int, channels: tuple[int, int] = (24, 48), dropout: float = 0.5) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(3, c1, 7, stride=2, padding=3)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # (B, c1, H/4, W/4)
        x = torch.relu(self.conv2(x))  # (B, c2, H/8, W/8)
        x = x.mean(dim=(2, 3))  # (B, c2)
        return self.fc(self.dropout(x))  # (B, num_classes)


class DigitsCNN(nn.Module):
    """Two 3x3 conv-ReLU layers and a 2x2 max-pool for 1x8x8 digit images (sklearn's digits), then fc."""

    def __init__(self, num_classes: int, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * channels * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))  # (B, C, 8, 8)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 2C, 4, 4)
        return self.fc(torch.flatten(x, 1))  # (B, num_classes)


class MLP(nn.Module):
    """Flatten, then Linear-ReLU(-Dropout) per hidden width, then a Linear head."""

    def __init__(self, num_classes: int, in_features: int, hidden: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]  # (B, in_features)
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))  # (B, num_classes)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def flowers_cnn(num_classes: int, channels: tuple[int, int] = (24, 48), dropout: float = 0.5) -> nn.Module:
    """The flowers study's five-layer student CNN (any input >= 32 px, < 100 KB of weights)."""
    return FlowersCNN(num_classes, tuple(channels), dropout)


def digits_cnn(num_classes: int, channels: int = 16) -> nn.Module:
    """Tiny CNN for (B, 1, 8, 8) digit images."""
    return DigitsCNN(num_classes, channels)


def mlp(num_classes: int, in_features: int = 64, hidden: tuple[int, ...] = (128,), dropout: float = 0.0) -> nn.Module:
    """MLP on flattened inputs of ``in_features`` values with hidden widths ``hidden``."""
    return MLP(num_classes, in_features, tuple(hidden), dropout)
