"""Tiny generated image folders, for tests and smoke runs (no download, a fraction of a second).

Each class gets its own colour plus noise, so a model can learn it in a few steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

PALETTE = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 210, 40), (200, 40, 210), (40, 210, 210),
           (240, 140, 30), (120, 120, 120), (250, 250, 250), (20, 20, 20)]


def write_images(folder: str | Path, count: int, size: int = 32, color: Sequence[int] = (128, 128, 128),
                 seed: int = 0, ext: str = "jpg", prefix: str = "img") -> list[Path]:
    """``count`` noisy ``size`` x ``size`` RGB images of ``color`` in ``folder`` (created), named ``prefix_i.ext``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        noise = rng.normal(0, 30, (size, size, 3))
        array = np.clip(np.asarray(color, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        path = folder / f"{prefix}_{i:04d}.{ext}"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def write_class_folders(root: str | Path, classes: Sequence[str] | int = 3, per_class: int | Sequence[int] = 8,
                        size: int = 32, seed: int = 0, ext: str = "jpg") -> Path:
    """``root/<class>/*.<ext>``: one folder per class (names, or ``class_0`` ... for an int), returns ``root``."""
    root = Path(root)
    names = [f"class_{k}" for k in range(classes)] if isinstance(classes, int) else list(classes)
    counts = [per_class] * len(names) if isinstance(per_class, int) else list(per_class)
    for k, (name, count) in enumerate(zip(names, counts)):
        write_images(root / name, count, size, PALETTE[k % len(PALETTE)], seed=seed + k, ext=ext)
    return root
