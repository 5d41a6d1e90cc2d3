"""Terms on the relations between samples: similarity-preserving KD, RKD, PKT and NST."""

from __future__ import annotations

__all__: list[str] = []
