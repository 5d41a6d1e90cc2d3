"""The model zoo: networks chosen by name from YAML.

``build_model("resnet18", num_classes=5)`` builds a network with a fresh head of ``num_classes`` outputs.
The zoo is a plain dict filled here, in one place (no registration by import side effect); add an entry
to ``MODELS`` to add a model. Every builder takes ``num_classes`` first and returns an ``nn.Module`` whose
forward gives logits ``(B, num_classes)`` -- or, for a multi-head network such as GoogLeNet with its
auxiliary heads, a tuple of logits with the main head first.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from kd_lightning.models.cifar_resnet import resnet8x4, resnet20, resnet32x4, resnet56
from kd_lightning.models.googlenet import googlenet
from kd_lightning.models.small import digits_cnn, flowers_article_cnn, flowers_cnn, mlp
from kd_lightning.models.torchvision_models import (
    efficientnet_b0,
    mobilenet_v3_small,
    resnet18,
    resnet34,
    resnet50,
)
from kd_lightning.models.wrn import wrn_16_2, wrn_40_2

MODELS: dict[str, Callable[..., nn.Module]] = {
    # torchvision ImageNet architectures (any input size >= 32 px); `pretrained=True` loads ImageNet weights
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "googlenet": googlenet,
    "mobilenet_v3_small": mobilenet_v3_small,
    "efficientnet_b0": efficientnet_b0,
    # CIFAR networks of the CRD / DKD benchmark tables (CIFAR stem, 32x32 input)
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "wrn_16_2": wrn_16_2,
    "wrn_40_2": wrn_40_2,
    # small students
    "flowers_article_cnn": flowers_article_cnn,  # the flowers article's student (linear sized by image_size)
    "flowers_cnn": flowers_cnn,  # its global-pooling variant
    "digits_cnn": digits_cnn,
    "mlp": mlp,
}


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the zoo model ``name`` with a ``num_classes``-way head; ``kwargs`` go to its builder."""
    if name not in MODELS:
        raise ValueError(f"Unknown model name {name!r}. Known models: {', '.join(sorted(MODELS))}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    try:
        return MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as err:  # an unknown keyword for this builder
        raise ValueError(f"Cannot build model {name!r} with arguments {kwargs}: {err}") from err


__all__ = ["MODELS", "build_model"]
