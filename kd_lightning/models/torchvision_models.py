"""ImageNet architectures from torchvision, with a ``num_classes``-way head.

``pretrained=False`` builds the network with ``num_classes`` outputs directly. ``pretrained=True`` loads
torchvision's DEFAULT ImageNet weights (downloaded on first use) and, unless ``num_classes == 1000``,
swaps the final Linear for a freshly initialised one.
"""

from __future__ import annotations

import torchvision.models as tvm
from torch import nn

IMAGENET_CLASSES = 1000

# dotted path of the final classifier Linear in each architecture
HEADS: dict[str, str] = {
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "mobilenet_v3_small": "classifier.3",
    "efficientnet_b0": "classifier.1",
}


def replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    """Replace the Linear at dotted ``path`` (e.g. ``"fc"``, ``"classifier.3"``) by a fresh one with ``num_classes`` outputs."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"expected a Linear head at {path!r}, found {type(old).__name__}")
    setattr(parent, name, nn.Linear(old.in_features, num_classes))


def _build(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    if not pretrained:
        return tvm.get_model(arch, weights=None, num_classes=num_classes)
    model = tvm.get_model(arch, weights="DEFAULT")
    if num_classes != IMAGENET_CLASSES:
        replace_head(model, HEADS[arch], num_classes)
    return model


def resnet18(num_classes: int, pretrained: bool = False) -> nn.Module:
    """ResNet-18 (He et al., 2016)."""
    return _build("resnet18", num_classes, pretrained)


def resnet34(num_classes: int, pretrained: bool = False) -> nn.Module:
    """ResNet-34 (He et al., 2016)."""
    return _build("resnet34", num_classes, pretrained)


def resnet50(num_classes: int, pretrained: bool = False) -> nn.Module:
    """ResNet-50, bottleneck blocks (He et al., 2016)."""
    return _build("resnet50", num_classes, pretrained)


def mobilenet_v3_small(num_classes: int, pretrained: bool = False) -> nn.Module:
    """MobileNetV3-Small (Howard et al., 2019)."""
    return _build("mobilenet_v3_small", num_classes, pretrained)


def efficientnet_b0(num_classes: int, pretrained: bool = False) -> nn.Module:
    """EfficientNet-B0 (Tan & Le, 2019)."""
    return _build("efficientnet_b0", num_classes, pretrained)
