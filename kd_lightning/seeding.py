"""Randomness as a pure function of where the run is, so that a resumed run replays the uninterrupted one.

A run killed after any step and resumed from its checkpoint must draw the same random numbers as the run that
was never stopped. Restoring saved RNG states is not enough: between the save and the next training step the
two runs do different work (a sanity-check validation, a fresh DataLoader iterator, new worker processes), and
each of those draws from the global generators. Instead, every random draw of training is seeded from the run's
seed and its position:

* the shuffle order of epoch ``e``:                 ``(seed, e)`` (``DistributedSampler``'s own rule);
* the augmentation of sample ``i`` in epoch ``e``:  ``derive_seed(seed, "sample", e, i)``;
* batch-level augmentation (MixUp, noise):          ``derive_seed(seed, "batch", rank, e, b)``;
* the training step itself (dropout):               ``derive_seed(seed, "step", rank, e, b)`` (:func:`seed_step`).

The seed is the one ``seed_everything`` set (``PL_GLOBAL_SEED``, as Lightning's own distributed sampler reads it).
"""

from __future__ import annotations

import hashlib
import os
import random
from contextlib import contextmanager
from typing import Iterator

import torch


def run_seed() -> int:
    """The run's seed: what ``lightning.seed_everything`` (the CLI's ``seed_everything``) set, else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derive_seed(*keys: object) -> int:
    """A 63-bit seed from ``keys`` (ints and strings); different keys give independent-looking streams."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator and Python's ``random`` seeded to ``seed``, then put both back,
    so the caller's own stream (e.g. the training step's) is not disturbed."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)  # CPU only: a CUDA stream of the main process stays as is
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a training step on ``device`` draws from (dropout): the CPU's and, on an accelerator,
    that device's. Cheaper than ``torch.manual_seed``, which seeds every backend and, for backends not initialised,
    records a stack trace per call (a CPU run paid over a millisecond a step for it)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device's generator, the one the step uses
    elif device.type != "cpu":
        getattr(torch, device.type).manual_seed(seed)


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with every torch generator that ``device`` uses seeded to ``seed``, then restore them."""
    devices = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield
