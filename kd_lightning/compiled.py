"""``torch.compile`` of the trained network for the training, validation and test steps, kept out of the module's
children: ``state_dict()`` keys stay the plain network's (no ``_orig_mod.``) and exports use the plain network."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn


def compile_options(value: bool | Mapping[str, Any] | None, arg: str) -> dict[str, Any] | None:
    """``compile_student``/``compile_model`` as ``torch.compile`` keyword arguments: ``False`` -> None (no
    compilation), ``True`` -> ``{}`` (torch's defaults), a mapping -> its items, checked against ``torch.compile``'s
    parameters so that a typo is an error at construction, not at the first step."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, Mapping):
        raise ValueError(f"{arg} must be true, false or a dict of torch.compile arguments (e.g. "
                         f"{{mode: max-autotune}}), got {value!r}.")
    valid = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = [key for key in value if key not in valid]
    if unknown:
        raise ValueError(f"{arg}: {unknown} are not torch.compile arguments; valid: {', '.join(valid)}.")
    return dict(value)


class CompiledNetwork:
    """Calls a network through its ``torch.compile`` wrapper, made at the first call (and again if the network was
    replaced), or plainly when compilation is off. Not an ``nn.Module``: a wrapper held as a module attribute would
    register as a child. The wrapper shares the network's parameters, so the optimizer and DDP see them once."""

    def __init__(self, value: bool | Mapping[str, Any] | None, arg: str) -> None:
        self.kwargs = compile_options(value, arg)
        self._wrapped: tuple[nn.Module, Callable[..., Any]] | None = None

    def __call__(self, network: nn.Module, x: Tensor) -> Any:
        if self.kwargs is None:
            return network(x)
        if self._wrapped is None or self._wrapped[0] is not network:
            self._wrapped = (network, torch.compile(network, **self.kwargs))
        return self._wrapped[1](x)

    def __getstate__(self) -> dict[str, Any]:
        return {"kwargs": self.kwargs, "_wrapped": None}  # compiled code does not pickle; remade at the next call
