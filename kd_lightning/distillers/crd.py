"""Contrastive representation distillation (CRD): a memory bank of negatives and the NCE loss."""

from __future__ import annotations

__all__: list[str] = []
