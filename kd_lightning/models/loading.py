"""Build a network from the zoo and fill it with trained weights.

Weights come from a Lightning checkpoint of a :class:`~kd_lightning.ClassifierModule` (``model.*`` keys) or a
:class:`~kd_lightning.DistillationModule` (``student.*`` keys: a distilled student can teach in turn), from a
plain ``state_dict`` file (``torch.save(net.state_dict(), path)``, DDP's ``module.`` prefix allowed), or, for
torchvision architectures, from ImageNet weights (``pretrained=True``; needs internet on first use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kd_lightning.models import build_model

# a Lightning checkpoint names the network by the attribute that holds it in the LightningModule
_LIGHTNING_PREFIXES = ("model.", "student.")


def _load_file(path: str | os.PathLike) -> Any:
    """What ``torch.save`` wrote to ``path`` (tensors and plain containers only), on the CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint file not found: {os.fspath(path)!r} (resolved from {os.getcwd()!r}). Pass the path of "
            "a Lightning .ckpt written by `kd-lightning fit` (its checkpoint.dirpath, by default "
            "logs/<name>/version_<n>/checkpoints/*.ckpt) or of a "
            "file saved with torch.save(model.state_dict(), path)."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network weights in ``path`` (a Lightning checkpoint or a plain state_dict), prefix stripped."""
    blob = _load_file(path)
    is_lightning = isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict)
    state = blob["state_dict"] if is_lightning else blob
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{os.fspath(path)!r} holds no state_dict of tensors (got {type(blob).__name__}).")
    if is_lightning:
        for prefix in _LIGHTNING_PREFIXES:
            network = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if network:
                return network
        raise ValueError(f"Lightning checkpoint {os.fspath(path)!r} has no {' or '.join(_LIGHTNING_PREFIXES)}* "
                         "weights: was it written by ClassifierModule or DistillationModule?")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped network
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


@dataclass(frozen=True)
class Architecture:
    """A zoo network as built: ``build_model(name, num_classes, **kwargs)``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None

    def __str__(self) -> str:
        classes = "" if self.num_classes is None else f" with {self.num_classes} classes"
        return f"{self.name!r} {self.kwargs}{classes}"


def checkpoint_architecture(path: str | os.PathLike) -> Architecture | None:
    """The network a kd-lightning checkpoint holds, read from its saved ``hyper_parameters``: ``model`` and
    ``model_kwargs`` of a ClassifierModule, ``student`` and ``student_kwargs`` of a DistillationModule (the
    network its weights are). ``None`` for a plain state_dict, or a module built from an ``nn.Module`` object
    (whose architecture no name records)."""
    blob = _load_file(path)
    hparams = blob.get("hyper_parameters") if isinstance(blob, dict) else None
    if not isinstance(hparams, dict):
        return None
    for name_key, kwargs_key in (("model", "model_kwargs"), ("student", "student_kwargs")):
        if isinstance(hparams.get(name_key), str):
            classes = hparams.get("num_classes")
            return Architecture(hparams[name_key], dict(hparams.get(kwargs_key) or {}),
                                classes if isinstance(classes, int) else None)
    return None


def load_weights(model: nn.Module, path: str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """Load ``path`` into ``model`` strictly; a head of the wrong size is reported as a class-count mismatch."""
    state = read_state_dict(path)
    own = model.state_dict()
    wrong_shape = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                   if k in own and v.shape != own[k].shape}
    if wrong_shape:
        heads = {k: (a, b) for k, (a, b) in wrong_shape.items() if num_classes and b[0] == num_classes != a[0]}
        if heads and len(heads) == len(wrong_shape):  # only the classifier head differs: other data
            key, (found, _) = next(iter(heads.items()))
            raise ValueError(f"Class count mismatch: {os.fspath(path)!r} holds a network with {found[0]} classes "
                             f"(its head {key} has shape {found}), but the data has {num_classes} classes. "
                             "Teacher, student and data must agree on the classes.")
        found = ", ".join(f"{k}: {a} in the file, {b} in the model" for k, (a, b) in wrong_shape.items())
        raise ValueError(f"Weights in {os.fspath(path)!r} do not fit {type(model).__name__}: {found}. "
                         "Are the model name and its arguments the ones it was trained with?")
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise ValueError(
            f"Weights in {os.fspath(path)!r} are for another architecture than {type(model).__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}. Is the model name right?"
        )
    model.load_state_dict(state)
    return model


def load_model(name: str, num_classes: int, checkpoint: str | None = None, pretrained: bool = False,
               **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` and load ``checkpoint`` (a .ckpt or state_dict file) or ImageNet weights."""
    if checkpoint is not None and pretrained:
        raise ValueError("Give either a checkpoint or pretrained=True, not both.")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        read_state_dict(checkpoint)  # raises the clear FileNotFoundError before any model is built
    if pretrained:
        kwargs["pretrained"] = True
    model = build_model(name, num_classes, **kwargs)
    return model if checkpoint is None else load_weights(model, checkpoint, num_classes)
