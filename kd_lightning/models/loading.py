"""Build a network from the zoo and fill it with trained weights.

Weights come from a Lightning checkpoint of a :class:`~kd_lightning.ClassifierModule` or a
:class:`~kd_lightning.DistillationModule` (a distilled student can teach in turn), from a plain ``state_dict`` file
(``torch.save(net.state_dict(), path)``, DDP's ``module.`` prefix allowed), or, for torchvision architectures,
from ImageNet weights (``pretrained=True``; needs internet on first use). Files are read by
:mod:`kd_lightning.checkpoints`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from kd_lightning.checkpoints import check_state_fits, network_state_dict, read_checkpoint
from kd_lightning.models import build_model


def load_weights(model: nn.Module, path: str | os.PathLike, num_classes: int | None = None,
                 role: str = "checkpoint", blob: Any = None) -> nn.Module:
    """Load the network weights in ``path`` (or in ``blob``, what was read from it) into ``model``, strictly; a
    head of the wrong size is reported as a class-count mismatch, any other difference names the keys."""
    state = network_state_dict(read_checkpoint(path, role) if blob is None else blob, path)
    check_state_fits(state, model.state_dict(), f"{role} {os.fspath(path)!r}", type(model).__name__, num_classes)
    model.load_state_dict(state)
    return model


def load_model(name: str, num_classes: int, checkpoint: str | None = None, pretrained: bool = False,
               role: str = "checkpoint", **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` and load ``checkpoint`` (a .ckpt or state_dict file) or ImageNet weights."""
    if checkpoint is not None and pretrained:
        raise ValueError("Give either a checkpoint or pretrained=True, not both.")
    blob = None if checkpoint is None else read_checkpoint(checkpoint, role)  # a bad file fails before building
    if pretrained:
        kwargs["pretrained"] = True
    model = build_model(name, num_classes, **kwargs)
    return model if blob is None else load_weights(model, checkpoint, num_classes, role, blob)
