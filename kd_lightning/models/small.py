"""Small student networks: the flowers article's five-layer CNN and a global-pooling variant of it, a tiny CNN
for 8x8 digits, and an MLP."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn


class FlowersArticleCNN(nn.Module):
    """The flowers article's five-layer student, as published: conv 7x7/2 (32) - ReLU - max-pool 3x3/2 -
    conv 3x3/2 (32) - ReLU - max-pool 3x3/2 - flatten - dropout 0.4 - linear. It keeps the spatial layout up to
    the classifier (5,408 inputs at 224 px), which is what lets it follow a teacher's class scores.

    ``image_size`` sizes the linear layer for square images of that side; ``None`` sizes it from the first batch
    it sees (``nn.LazyLinear``; kd-lightning runs a zero batch of the data's shape before training, so the
    weights exist before the optimizer is made and a checkpoint loads into a fresh network of any size).
    """

    def __init__(self, num_classes: int, image_size: int | None = None, channels: int = 32,
                 dropout: float = 0.4) -> None:
        super().__init__()
        side = None if image_size is None else _article_feature_side(image_size)
        if side is not None and side < 1:
            raise ValueError(f"flowers_article_cnn needs images of at least 32 px, got image_size={image_size}.")
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 7, stride=2, padding=3), nn.ReLU(inplace=True),  # (B, C, S/2, S/2)
            nn.MaxPool2d(3, stride=2),  # (B, C, ~S/4, ~S/4)
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),  # (B, C, ~S/8, ~S/8)
            nn.MaxPool2d(3, stride=2),  # (B, C, side, side): 13 x 13 at 224 px
        )
        self.dropout = nn.Dropout(dropout)
        if side is None:
            with warnings.catch_warnings():  # "lazy modules are a new feature": the one we use is stable
                warnings.simplefilter("ignore", UserWarning)
                self.fc: nn.Module = nn.LazyLinear(num_classes)
        else:
            self.fc = nn.Linear(channels * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.features(x), 1)  # (B, C * side * side)
        return self.fc(self.dropout(x))  # (B, num_classes)


def _article_feature_side(image_size: int) -> int:
    """Height (= width) of the article student's last feature map for square ``image_size`` inputs."""
    side = (image_size + 2 * 3 - 7) // 2 + 1  # conv 7x7/2, padding 3
    side = (side - 3) // 2 + 1  # max-pool 3x3/2
    side = (side + 2 * 1 - 3) // 2 + 1  # conv 3x3/2, padding 1
    return (side - 3) // 2 + 1  # max-pool 3x3/2


class FlowersCNN(nn.Module):
    """A global-pooling variant of the article's student (not the article's network): conv7x7/2-ReLU, max-pool 2,
    conv3x3/2-ReLU, global average pool, dropout-fc. Any input size, fewer weights, but pooling away the spatial
    layout leaves it less able to follow a teacher."""

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


def flowers_article_cnn(num_classes: int, image_size: int | None = None, channels: int = 32,
                        dropout: float = 0.4) -> nn.Module:
    """The flowers article's five-layer student; its linear layer is sized for ``image_size`` (square) inputs,
    or from the first batch when ``image_size`` is None."""
    return FlowersArticleCNN(num_classes, image_size, channels, dropout)


def flowers_cnn(num_classes: int, channels: tuple[int, int] = (24, 48), dropout: float = 0.5) -> nn.Module:
    """A global-average-pooling variant of the article's student (any input >= 32 px, < 100 KB of weights)."""
    return FlowersCNN(num_classes, tuple(channels), dropout)


def digits_cnn(num_classes: int, channels: int = 16) -> nn.Module:
    """Tiny CNN for (B, 1, 8, 8) digit images."""
    return DigitsCNN(num_classes, channels)


def mlp(num_classes: int, in_features: int = 64, hidden: tuple[int, ...] = (128,), dropout: float = 0.0) -> nn.Module:
    """MLP on flattened inputs of ``in_features`` values with hidden widths ``hidden``."""
    return MLP(num_classes, in_features, tuple(hidden), dropout)
