"""Checkpoint files: the one reader, the key layout, and whether a file fits a network or a module.

* **Reading**: :func:`read_checkpoint` is the only ``torch.load`` of the package: on the CPU, memory-mapped, and
  ``weights_only=True`` (tensors and plain containers: a checkpoint cannot run code). A missing, truncated or
  foreign file is one clear ``ValueError``/``FileNotFoundError`` that names the file and its role.
* **Layout**: a Lightning checkpoint of kd_lightning keeps the trained network under one prefix of its
  ``state_dict`` and records the network's architecture in ``hyper_parameters`` under the same name:
  ``model.*`` / ``model`` + ``model_kwargs`` for a :class:`~kd_lightning.ClassifierModule` (a teacher),
  ``student.*`` / ``student`` + ``student_kwargs`` for a :class:`~kd_lightning.DistillationModule` (a KD or scratch
  student). The frozen teacher is never saved. :data:`NETWORK_PREFIXES` is that layout; nothing else spells it.
* **Fitting**: :func:`check_state_fits` compares a saved state_dict with the one of the network or module it is
  meant for, and names what differs (the class count, the architecture, the module class).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

# state_dict prefix (and hyper_parameters name) of the trained network -> what holds it
NETWORK_PREFIXES: dict[str, str] = {
    "model": "ClassifierModule (a teacher run: model.* weights)",
    "student": "DistillationModule (a KD or scratch student: student.* weights)",
}


def read_checkpoint(path: str | os.PathLike, role: str = "checkpoint") -> Any:
    """What ``torch.save`` wrote to ``path``, read on the CPU with ``weights_only=True``; ``role`` names the file
    in errors (e.g. ``"--ckpt_path"``, ``"teacher_checkpoint"``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{role} {path!r} does not exist (resolved from {os.getcwd()!r}). Pass a .ckpt written by "
            "`kd-lightning fit` (logs/<name>/version_<n>/checkpoints/best.ckpt or last.ckpt) or a file saved with "
            "torch.save(model.state_dict(), path).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any reason the file cannot be read is the same input error
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{role} {path!r} cannot be read as a checkpoint ({type(err).__name__}: {first_line}). "
                         "Is it truncated (a copy or a run that did not finish), or not a file written by "
                         "torch.save / Lightning?") from None


def is_lightning_checkpoint(blob: Any) -> bool:
    return isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict)


def network_state_dict(blob: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint (a Lightning checkpoint's network prefix stripped) or a plain
    state_dict (DDP's ``module.`` prefix stripped)."""
    lightning = is_lightning_checkpoint(blob)
    state = blob["state_dict"] if lightning else blob
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{os.fspath(path)!r} holds no state_dict of tensors (got {type(blob).__name__}).")
    if lightning:
        for prefix in NETWORK_PREFIXES:
            network = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if network:
                return network
        raise ValueError(f"Lightning checkpoint {os.fspath(path)!r} has no "
                         f"{' or '.join(p + '.*' for p in NETWORK_PREFIXES)} weights: was it written by a "
                         "kd_lightning ClassifierModule or DistillationModule?")
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


def checkpoint_architecture(blob: Any) -> Architecture | None:
    """The network a kd-lightning checkpoint holds, from its ``hyper_parameters`` (``model``/``model_kwargs`` or
    ``student``/``student_kwargs``); None for a plain state_dict or a module built from ``nn.Module`` objects."""
    hparams = blob.get("hyper_parameters") if isinstance(blob, dict) else None
    if not isinstance(hparams, dict):
        return None
    for prefix in NETWORK_PREFIXES:
        if isinstance(hparams.get(prefix), str):
            classes = hparams.get("num_classes")
            return Architecture(hparams[prefix], dict(hparams.get(f"{prefix}_kwargs") or {}),
                                classes if isinstance(classes, int) else None)
    return None


def architecture_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The settings among ``hparams`` that decide the trained network's shapes (``student``, ``model_kwargs``...)."""
    keys = [k for prefix in NETWORK_PREFIXES for k in (prefix, f"{prefix}_kwargs")]
    return {k: hparams[k] for k in keys if k in hparams}


def check_state_fits(saved: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str, target: str,
                     num_classes: int | None = None) -> None:
    """A clear ``ValueError`` unless ``saved`` (read from ``source``, e.g. ``"--ckpt_path 'x.ckpt'"``) has exactly
    the keys and shapes of ``own`` (the state_dict of ``target``, e.g. ``"a DistillationModule"``). A file whose head
    alone differs is a class-count mismatch; a module checkpoint of another module class (other network prefix)
    says which class wrote it."""
    saved_roots, own_roots = {k.split(".", 1)[0] for k in saved}, {k.split(".", 1)[0] for k in own}
    if own_roots & set(NETWORK_PREFIXES) and saved_roots != own_roots:
        found = " / ".join(NETWORK_PREFIXES.get(r, f"{r}.*") for r in sorted(saved_roots)) or "no weights"
        wanted = " / ".join(NETWORK_PREFIXES.get(r, f"{r}.*") for r in sorted(own_roots))
        raise ValueError(f"{source} holds a {found}, but the config trains {target}: {wanted}. Use the config the "
                         "checkpoint was trained with.")
    # an empty tensor of ``own`` is sized by the data at setup (a CRD memory bank): any saved size fits it
    wrong = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in saved.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape) and own[k].numel() > 0}
    heads = {k: shapes for k, shapes in wrong.items() if num_classes and shapes[1][0] == num_classes != shapes[0][0]}
    if wrong and len(heads) == len(wrong):  # only the classifier head differs: other data
        key, (found_shape, _) = next(iter(heads.items()))
        raise ValueError(f"Class count mismatch: {source} holds a network with {found_shape[0]} classes (its head "
                         f"{key} has shape {found_shape}), but the data has {num_classes} classes. Teacher, student "
                         "and data must agree on the classes.")
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if wrong or missing or unexpected:
        details = "; ".join([f"{k}: {a} in the file, {b} in {target}" for k, (a, b) in list(wrong.items())[:3]]
                            + ([f"missing {missing[:3]}"] if missing else [])
                            + ([f"unexpected {unexpected[:3]}"] if unexpected else []))
        raise ValueError(f"{source} was trained with another architecture than {target} ({details}). Are the model "
                         "name and its *_kwargs the ones it was trained with?")
