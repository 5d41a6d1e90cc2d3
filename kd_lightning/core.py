"""The training step without Lightning: a trainable network, an optional frozen teacher, and loss terms.

    distiller = Distiller(student, {"kd": HintonKD(0.9, 4.0), "ce": CrossEntropy(0.1)}, teacher=teacher)
    out = distiller.step(batch)          # StepOutputs: logits, teacher heads, targets, tapped features
    losses = distiller.losses(out)       # {"loss", "loss_kd", "loss_ce"}: each term times its weight, and the sum
    losses["loss"].backward()

Everything a distillation step computes lives here, in plain PyTorch; :class:`kd_lightning.module.DistillationModule`
adds Lightning's loop, logging, metrics and checkpoints around it, and a training without a teacher (a teacher
run, the scratch baseline) is the same step with ``teacher=None`` and a cross-entropy term.

The teacher is frozen (``requires_grad_(False)``), kept in eval mode whatever ``train()`` asks, run under
``torch.no_grad()``, ignored by DDP, and left out of ``state_dict()``: a checkpoint holds the network and the
terms' adapters only; the teacher is rebuilt from its own weights. Terms that tap layers get those layers'
outputs from forward hooks in the same passes that give the logits.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kd_lightning.data.batch import as_batch
from kd_lightning.distillers import DistillationTerm, StepOutputs

# teacher_precision -> the autocast dtype of the teacher's forward pass (None: no autocast of its own)
TEACHER_PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def as_heads(output: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A network's output as a list of logits, main head first (GoogLeNet gives (main, aux2, aux1))."""
    return [output] if isinstance(output, Tensor) else list(output)


@contextmanager
def capture_features(network: nn.Module, layers: Sequence[str], into: dict[str, Tensor]) -> Iterator[None]:
    """Forward hooks on ``network``'s submodules ``layers`` that store each one's output in ``into[name]`` during
    the forward passes run inside the block; removed on exit."""
    modules = dict(network.named_modules())
    handles = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            into[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    try:
        for name in dict.fromkeys(layers):
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_layer_names(network: nn.Module, layers: Sequence[str], role: str, term: str) -> None:
    """A clear error naming the valid layers when ``network`` has no submodule called one of ``layers``."""
    valid = [name for name, _ in network.named_modules() if name]
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise ValueError(f"The distillation term {term!r} taps the {role} layer(s) {unknown}, but the {role} "
                         f"({type(network).__name__}) has no such submodule. Valid layer names: {', '.join(valid)}.")


def head_width(network: nn.Module) -> int | None:
    """The output width of ``network``'s last ``nn.Linear`` (its classifier head), or None when it has none."""
    last = None
    for module in network.modules():
        if isinstance(module, nn.Linear):
            last = module
    return None if last is None else last.out_features


def dry_run(network: nn.Module, input_shape: Sequence[int]) -> list[Tensor]:
    """``network``'s heads on a zero batch of 2 inputs of ``input_shape``, in eval mode (no BatchNorm statistic
    moves) and without gradients; its train/eval mode is restored."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            param = next(network.parameters(), None)
            return as_heads(network(torch.zeros(2, *input_shape, device=None if param is None else param.device)))
    finally:
        network.train(was_training)


def as_term_dict(terms: Mapping[str, DistillationTerm] | Sequence[DistillationTerm]) -> dict[str, DistillationTerm]:
    """``terms`` keyed by name: a mapping's keys become the terms' names; a list keys each term by its ``name``.
    A clear error for an empty collection, a duplicate name or an object that is not a term."""
    items = list(terms.items()) if isinstance(terms, Mapping) else [(None, t) for t in terms]
    if not items:
        raise ValueError("terms is empty: give at least one loss term, e.g. "
                         "{ce: {class_path: kd_lightning.distillers.CrossEntropy}}.")
    out: dict[str, DistillationTerm] = {}
    for key, term in items:
        if not isinstance(term, DistillationTerm):
            raise ValueError(f"every term must be a kd_lightning.distillers.DistillationTerm, got "
                             f"{type(term).__name__}" + (f" for {key!r}." if key else "."))
        if key is not None:
            term.rename(key)
        if term.name in out:
            raise ValueError(f"two terms are named {term.name!r}: term names must be unique (they name the log keys "
                             "loss_<name> and the dotted paths terms.<name>.*); give one of them another name.")
        out[term.name] = term
    return out


class Distiller(nn.Module):
    """A trainable network taught by ``terms`` (and a frozen ``teacher``, if any); see the module docstring.

    The network is the attribute named by :attr:`network_attr` (``student``), so that its weights are saved as
    ``student.*`` (:mod:`kd_lightning.checkpoints`); :attr:`network` reads it whatever its name.
    """

    network_attr = "student"

    def __init__(self, network: nn.Module, terms: Mapping[str, DistillationTerm] | Sequence[DistillationTerm],
                 teacher: nn.Module | None = None, teacher_precision: str = "32") -> None:
        super().__init__()
        teacher_precision = str(teacher_precision)  # YAML may give 32 or 16 as a number
        if teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(f"teacher_precision must be one of {', '.join(map(repr, TEACHER_PRECISIONS))} "
                             f"(float32, bfloat16 or float16 autocast of the teacher), got {teacher_precision!r}.")
        self._teacher_dtype = TEACHER_PRECISIONS[teacher_precision]
        self.add_module(self.network_attr, network)
        self.teacher = teacher
        named = as_term_dict(terms)
        for term in named.values():
            check_layer_names(network, term.student_layers, "student", term.name)
            if term.teacher_layers and teacher is None:
                raise ValueError(f"The term {term.name!r} taps teacher layers {list(term.teacher_layers)}, but this "
                                 "run has no teacher.")
            if teacher is not None:
                check_layer_names(teacher, term.teacher_layers, "teacher", term.name)
        self.terms = nn.ModuleDict(named)
        self._student_layers = list(dict.fromkeys(n for t in named.values() for n in t.student_layers))
        self._teacher_layers = list(dict.fromkeys(n for t in named.values() for n in t.teacher_layers))
        self._input_shape: tuple[int, ...] | None = None
        self._teacher_fingerprint: str | None = None
        if teacher is not None:
            teacher.requires_grad_(False).eval()
            # DDP must neither broadcast nor reduce the frozen teacher (every rank builds the same one); ignoring it
            # also spares the per-step broadcast of its BatchNorm buffers. torch's only way, pinned by
            # tests/test_pinned_internals.py.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self, [f"teacher.{name}" for name in teacher.state_dict()])

    @property
    def network(self) -> nn.Module:
        """The trained network (``student``; ``model`` in a :class:`~kd_lightning.ClassifierModule`)."""
        return getattr(self, self.network_attr)

    def forward(self, x: Tensor) -> Tensor:
        """The network's logits (its main head): what ships."""
        return as_heads(self.network(x))[0]

    # -- the temperature: one value for every term that has one --------------------------------------------------
    def temperatures(self) -> dict[str, float]:
        """``{term name: temperature}`` of the terms that have a temperature (Hinton KD, DKD)."""
        return {name: float(t.temperature) for name, t in self.terms.items() if hasattr(t, "temperature")}

    def common_temperature(self) -> float | None:
        """The temperature shared by every term that has one (1.0 when none has); None when they differ."""
        values = set(self.temperatures().values())
        return 1.0 if not values else values.pop() if len(values) == 1 else None

    @property
    def temperature(self) -> float:
        """The distillation temperature; setting it moves every term's. A ``ValueError`` names the terms when they
        hold different temperatures (then name one: ``terms.<name>.temperature``)."""
        value = self.common_temperature()
        if value is None:
            raise ValueError(f"The terms hold different temperatures {self.temperatures()}: name one of them, e.g. "
                             f"terms.{next(iter(self.temperatures()))}.temperature.")
        return value

    @temperature.setter
    def temperature(self, value: float) -> None:
        terms = [t for t in self.terms.values() if hasattr(t, "temperature")]
        if not terms:
            raise ValueError("No term of this run has a temperature (Hinton KD and DKD have one).")
        for term in terms:
            term.temperature = float(value)

    def schedulable_floats(self) -> list[str]:
        """Dotted names of the floats a scheduler may drive: ``temperature`` (all of them) and ``terms.<name>.<x>``."""
        names = ["temperature"] if self.temperatures() else []
        for term_name, term in self.terms.items():
            names += [f"terms.{term_name}.{k}" for k, v in vars(term).items()
                      if not k.startswith("_") and isinstance(v, float)]
        return names

    # -- shapes, adapters ------------------------------------------------------------------------------------------
    def check_input_shape(self, input_shape: Sequence[int], num_classes: int | None = None) -> None:
        """Run the networks on a zero batch of ``input_shape`` (a clear error before training, not mid-epoch), check
        their class count and the terms' head weights, and build the terms' adapters. Idempotent."""
        networks = {self.network_attr: self.network}
        if self.teacher is not None:
            networks["teacher"] = self.teacher
        for role, net in networks.items():
            try:
                heads = dry_run(net, input_shape)
            except RuntimeError as err:
                raise ValueError(f"The {role} ({type(net).__name__}) cannot run on inputs of shape "
                                 f"{tuple(input_shape)} (channels, height, width): {err}. Is the image size too small "
                                 "for this model, or the channel count wrong?") from err
            if num_classes is not None and heads[0].shape[-1] != num_classes:
                raise ValueError(f"The {role} gives {heads[0].shape[-1]} class scores but the data has {num_classes} "
                                 "classes: teacher, student and data must agree on the class count.")
            for term in self.terms.values():
                term.check_heads(role, len(heads))
        self.build_terms(input_shape)

    def build_terms(self, input_shape: Sequence[int]) -> None:
        """Build the terms' adapters from a dry run of both networks (eval mode, no gradient, BatchNorm statistics
        untouched) on a zero batch of ``input_shape`` (channels, height, width). Idempotent."""
        self._input_shape = tuple(int(d) for d in input_shape)
        unbuilt = [t for t in self.terms.values() if not t.built]
        if not unbuilt:
            return
        student_features: dict[str, Tensor] = {}
        teacher_features: dict[str, Tensor] = {}
        with capture_features(self.network, self._student_layers, student_features):
            dry_run(self.network, self._input_shape)
        if self.teacher is not None:
            with capture_features(self.teacher, self._teacher_layers, teacher_features):
                dry_run(self.teacher, self._input_shape)
        param = next(self.network.parameters(), None)
        for term in unbuilt:
            term.build(student_features, teacher_features)
            term.to(None if param is None else param.device)

    def index_terms(self) -> list[str]:
        """Names of the terms that read each training row's dataset index (a memory bank: CRD)."""
        return [name for name, term in self.terms.items() if term.needs_index]

    def bind_train_rows(self, labels: Tensor) -> None:
        """Give the terms that read dataset indices the class of every training row (``(N,)``, -100: unlabelled)."""
        for term in self.terms.values():
            if term.needs_index:
                term.bind_train_rows(labels)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the network's trainable parameters, then the terms' adapters."""
        unbuilt = [t.name for t in self.terms.values() if not t.built]
        if unbuilt:
            raise ValueError(f"The distillation term(s) {unbuilt} have adapters that are not built yet: use a "
                             "DataModule with an `input_shape`, or call build_terms(input_shape) first.")
        groups = [{"params": [p for p in self.network.parameters() if p.requires_grad]}]
        adapters = [p for p in self.terms.parameters() if p.requires_grad]
        return groups + ([{"params": adapters}] if adapters else [])

    # -- the step --------------------------------------------------------------------------------------------------
    def teacher_autocast(self, x: Tensor) -> ContextManager[Any]:
        """The autocast of the teacher's forward pass on ``x`` (``teacher_precision``); none for ``"32"``."""
        if self._teacher_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self._teacher_dtype)

    def teacher_logits(self, x: Tensor) -> list[Tensor]:
        """The teacher's heads on ``x`` (main first), float32 when a low ``teacher_precision`` ran them."""
        assert self.teacher is not None
        with torch.no_grad(), self.teacher_autocast(x):
            heads = as_heads(self.teacher(x))
        return heads if self._teacher_dtype is None else [head.float() for head in heads]

    def step(self, batch: Any, epoch: int = 0, run_network: Callable[[Tensor], Any] | None = None) -> StepOutputs:
        """One forward pass of each network on ``batch`` (:mod:`kd_lightning.data.batch`); tapped layers come from
        hooks in those passes. Cached ``teacher_logits`` (``(B, C)`` or ``(B, H, C)`` for H heads) replace the
        teacher's pass unless a term taps teacher layers. ``run_network``: how to call the network (e.g. its
        ``torch.compile`` wrapper); default the network itself."""
        b = as_batch(batch)
        x = b.images
        student_features: dict[str, Tensor] = {}
        teacher_features: dict[str, Tensor] = {}
        teacher_heads: list[Tensor] = []
        with ExitStack() as stack:
            if self._teacher_layers:
                stack.enter_context(capture_features(self.teacher, self._teacher_layers, teacher_features))
            if self._student_layers:
                stack.enter_context(capture_features(self.network, self._student_layers, student_features))
            if b.teacher_logits is not None and not self._teacher_layers:  # offline distillation
                cached = b.teacher_logits.detach()
                teacher_heads = [cached] if cached.ndim == 2 else list(cached.unbind(1))
            elif self.teacher is not None:
                teacher_heads = self.teacher_logits(x)
            student_heads = as_heads((run_network or self.network)(x))  # each (B, K)
        return StepOutputs(student_heads[0], teacher_heads, b.targets, student_features, teacher_features,
                           epoch=epoch, index=b.index, student_heads=student_heads)

    def losses(self, out: StepOutputs) -> dict[str, Tensor]:
        """``{"loss", "loss_<name>", ...}``: each term's values times its weight, and their sum."""
        losses: dict[str, Tensor] = {}
        total: Tensor | None = None
        for term in self.terms.values():
            for name, value in term(out).items():
                weighted = term.weight * value
                losses[f"loss_{name}"] = weighted
                total = weighted if total is None else total + weighted
        if total is None:  # every term is a training-only one (CRD) and this is validation
            total = out.student_logits.new_zeros(())
        return {"loss": total, **losses}

    # -- the teacher stays frozen, in eval mode, and out of checkpoints --------------------------------------------
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Dropout off and BatchNorm statistics fixed, whatever the trainer asks
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix + "teacher.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        # Checkpoints hold no teacher: keep the teacher we built, and stay strict about everything else.
        state_dict = dict(state_dict)
        if self.teacher is not None:
            for key, value in self.teacher.state_dict(prefix="teacher.").items():
                state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def teacher_fingerprint(self) -> str | None:
        """sha256 of the teacher's weights and buffers (None without a teacher): checkpoints record which teacher
        trained the student."""
        if self.teacher is not None and self._teacher_fingerprint is None:  # frozen: computed once
            digest = hashlib.sha256()
            for key, value in sorted(self.teacher.state_dict().items()):
                digest.update(key.encode())
                digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            self._teacher_fingerprint = digest.hexdigest()
        return self._teacher_fingerprint
