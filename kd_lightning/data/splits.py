"""Seeded, stratified index splits: the same on every run and every DDP rank (no global RNG is touched)."""

from __future__ import annotations

from typing import Sequence

import torch


def _class_indices(labels: Sequence[int], seed: int) -> dict[int, list[int]]:
    """Indices of each class, each list shuffled by a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    return {y: [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
            for y, idx in sorted(by_class.items())}


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int = 0) -> list[list[int]]:
    """Split indices into ``len(fractions)`` parts with each class in the given proportions.

    ``fractions`` must sum to 1; every class with at least ``len(fractions)`` samples gets at least one sample
    in each part. Returns sorted index lists.
    """
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}.")
    parts: list[list[int]] = [[] for _ in fractions]
    for idx in _class_indices(labels, seed).values():
        n = len(idx)
        # sizes of all parts but the first; the first (train) takes the rest
        sizes = [round(n * f) for f in fractions[1:]]
        if n >= len(fractions):
            sizes = [max(1, s) if f > 0 else 0 for s, f in zip(sizes, fractions[1:])]
        start = n - sum(sizes)
        parts[0].extend(idx[:start])
        for k, size in enumerate(sizes, 1):
            parts[k].extend(idx[start:start + size])
            start += size
    return [sorted(p) for p in parts]


def labelled_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """Positions (into ``labels``) that keep their label: ``fraction`` of each class, at least one per class."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {fraction}.")
    if fraction == 1.0:
        return list(range(len(labels)))
    keep: list[int] = []
    for idx in _class_indices(labels, seed + 1).values():  # its own stream: independent of the split
        keep.extend(idx[:max(1, round(len(idx) * fraction))])
    return sorted(keep)
