"""What TensorBoard's HPARAMS tab shows for a run: the settings that tell runs apart, flat and readable.

A run is its seed, its data (the DataModule's settings: labelled fraction, split seed, augmentation...), its model
(networks, terms, teacher), its optimizer recipe, its trainer length and its schedules (callbacks that change a
value during training say how). Values that say nothing (``None``, empty lists, the CLI's internal
``_class_path``/``_instantiator``) are left out; a list of numbers becomes one text value (``[150, 180, 210]``).
"""

from __future__ import annotations

from typing import Any, Mapping

from kd_lightning.seeding import run_seed

_INTERNAL = ("_class_path", "_instantiator")
_TRAINER_SETTINGS = ("max_steps", "max_epochs", "accumulate_grad_batches", "precision")


def flat_settings(params: Any, prefix: str = "") -> dict[str, Any]:
    """``params`` (mappings, lists, jsonargparse Namespaces) flattened to ``a/b/c`` keys; ints, floats, bools and
    strings kept, other values as text; empty and None values left out."""
    if hasattr(params, "as_dict"):
        params = params.as_dict()
    out: dict[str, Any] = {}
    items = params.items() if isinstance(params, Mapping) else enumerate(params)
    for key, value in items:
        if key in _INTERNAL:
            continue
        name = f"{prefix}{key}"
        if hasattr(value, "as_dict"):
            value = value.as_dict()
        if value is None or (isinstance(value, (list, tuple, dict)) and not value):
            continue
        if isinstance(value, Mapping) or (isinstance(value, (list, tuple))
                                          and all(isinstance(v, Mapping) or hasattr(v, "as_dict") for v in value)):
            if isinstance(value, Mapping) and "class_path" in value:  # a class_path object: its class and settings
                out[name] = str(value["class_path"]).rsplit(".", 1)[-1]
                out.update(flat_settings(value.get("init_args") or {}, f"{name}/"))
            else:
                out.update(flat_settings(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            out[name] = value.item()
        else:
            out[name] = str(list(value) if isinstance(value, tuple) else value)
    return out


def comparable_hparams(trainer: Any) -> dict[str, Any]:
    """The HPARAMS of the run ``trainer`` fits: seed, data, model (with its terms and optimizer recipe), trainer
    length and schedules."""
    module, datamodule = trainer.lightning_module, trainer.datamodule
    params: dict[str, Any] = {"seed": run_seed(), "model": type(module).__name__}
    # the terms as built (also when given by the temperature/alpha shorthand), not as written
    written = ("num_classes", "terms", "temperature", "alpha", "teacher_weights")
    params.update(flat_settings({k: v for k, v in dict(module.hparams).items() if k not in written}, "model/"))
    for name, term in module.terms.items():
        params[f"model/terms/{name}"] = type(term).__name__
        params.update(flat_settings({k: v for k, v in vars(term).items() if not k.startswith("_")
                                     and k not in ("training", "name", "built")}, f"model/terms/{name}/"))
    if datamodule is not None:
        params["data"] = type(datamodule).__name__
        params.update(flat_settings(dict(getattr(datamodule, "hparams", {}) or {}), "data/"))
    params.update({f"trainer/{k}": v for k in _TRAINER_SETTINGS
                   if isinstance(v := _trainer_setting(trainer, k), (int, float, str)) and v is not None})
    for callback in trainer.callbacks:
        describe = getattr(callback, "describe_for_hparams", None)
        if callable(describe):
            params.update(describe())
    return params


def _trainer_setting(trainer: Any, key: str) -> Any:
    if key == "precision":
        return str(trainer.precision)
    if key == "accumulate_grad_batches":
        return trainer.accumulate_grad_batches
    return getattr(trainer, key, None) if key == "max_epochs" else trainer.max_steps
