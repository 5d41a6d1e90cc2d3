"""A decoded-image cache: image files decoded once into one memory-mapped file, so that JPEG decoding is not
what limits a CPU loader (once cached teacher logits have taken the teacher's forward out of the step).

:class:`DecodedImages` keeps the images of a list of files in a folder::

    <folder>/images.u8      every image's uint8 pixels, (C, H, W) order, one after the other, at its original
                            size (ragged), so a cached image is bit-identical to decode_image_file(path)
    <folder>/index.npy      int64 (N, 4): offset, C, H, W of image i (C = 0: the file could not be decoded)
    <folder>/manifest.json  format version, count, data size and a fingerprint of the inputs (every path with
                            its size and mtime_ns), written last

The data and the index are written under temporary names and renamed, and the manifest is written after them
(and deleted before a rebuild starts), so an interrupted build leaves no manifest and is never used. Opening
checks the manifest against the files as they are now, and the data file's size against the index: a missing,
partial or stale cache is rebuilt, with one info message that says why.

The object is the ``load`` of a :class:`~kd_lightning.data.images.Split`: ``cache(path)`` returns the image of
``path`` as a ``uint8`` ``(3, H, W)`` tensor that owns its memory. It pickles without the memory map (each
DataLoader worker opens its own, read-only, on first use; the operating system shares the pages).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from kd_lightning.data.files import decode_image_file, file_entries

FORMAT_VERSION = 1
DATA, INDEX, MANIFEST = "images.u8", "index.npy", "manifest.json"


def fingerprint(entries: list[list[Any]]) -> str:
    """sha256 of the entries (paths, sizes, mtimes, in order) and the format version."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION}\n".encode())
    for path, size, mtime in entries:
        digest.update(f"{path}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


def _what_changed(old: list[list[Any]], new: list[list[Any]]) -> str:
    """A short account of the differences between two entry lists, for the rebuild message."""
    before, after = {e[0]: e[1:] for e in old}, {e[0]: e[1:] for e in new}
    parts = []
    for word, names in (("changed", [p for p in after if p in before and before[p] != after[p]]),
                        ("new", [p for p in after if p not in before]),
                        ("gone", [p for p in before if p not in after])):
        if names:
            parts.append(f"{len(names)} file(s) {word} (e.g. {names[0]})")
    return ", ".join(parts) or "the same files in another order"


class DecodedImages:
    """The decoded images of ``paths``, cached in ``folder``; see the module docstring.

    Use :meth:`open` (checks the cache, builds it when needed); the constructor itself reads nothing.

    Args:
        folder: where the cache lives (created); one folder per list of files.
        paths: the image files, in the order of the cache's rows.
    """

    def __init__(self, folder: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> None:
        self.folder = Path(folder)
        self.paths = [os.fspath(p) for p in paths]
        self.row = {p: i for i, p in enumerate(self.paths)}
        if len(self.row) != len(self.paths):
            raise ValueError(f"DecodedImages: {len(self.paths) - len(self.row)} path(s) are listed twice; give each "
                             "file once.")
        self.index: np.ndarray | None = None  # (N, 4) once opened
        self.rebuilt: str | None = None  # why open() built the cache, None when it was reused
        self._data: np.ndarray | None = None  # the memory map, opened lazily in each process

    # -- checking and building ------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> "DecodedImages":
        """The cache of ``paths`` in ``folder``, built first when it is missing, partial or stale."""
        cache = cls(folder, paths)
        entries = file_entries(cache.paths)
        reason = cache.problem(entries)
        if reason is not None:
            rank_zero_info(f"Decoded-image cache {cache.folder}: {reason}; decoding {len(cache.paths)} images "
                           "into it.")
            cache.build(entries)
            cache.rebuilt = reason
        cache.index = np.load(cache.folder / INDEX)
        return cache

    def problem(self, entries: list[list[Any]]) -> str | None:
        """Why the cache on disk cannot be used for files in the state ``entries``, or None when it can."""
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            return "no cache yet" if not self.folder.exists() else "no manifest (a new or unfinished cache)"
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("version") != FORMAT_VERSION:
                return f"format version {manifest.get('version')}, this code writes {FORMAT_VERSION}"
            if manifest.get("count") != len(entries) or manifest.get("fingerprint") != fingerprint(entries):
                return f"the image files differ from the cached ones: {_what_changed(manifest['files'], entries)}"
            index = np.load(self.folder / INDEX)
            data_size = os.path.getsize(self.folder / DATA)
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"unreadable cache files ({type(err).__name__}: {err})"
        expected = int((index[:, 1] * index[:, 2] * index[:, 3]).sum()) if len(index) else 0
        if index.shape != (len(entries), 4) or data_size != expected or data_size != manifest.get("data_bytes"):
            return f"{DATA} holds {data_size} bytes, the index describes {expected} (a partial or damaged cache)"
        return None

    def build(self, entries: list[list[Any]] | None = None) -> None:
        """Decode every file into the cache (temporary names, renamed; the manifest last)."""
        entries = entries if entries is not None else file_entries(self.paths)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # a crash from here on leaves no manifest: not used
        tag = f".tmp-{socket.gethostname()}-{os.getpid()}"  # several nodes may build into a shared folder
        index = np.zeros((len(self.paths), 4), dtype=np.int64)
        offset = 0
        with open(self.folder / (DATA + tag), "wb") as out:
            for i, path in enumerate(self.paths):
                try:
                    image = decode_image_file(path)
                except Exception:  # noqa: BLE001 -- kept as C = 0; reading it raises, as decoding would
                    index[i] = (offset, 0, 0, 0)
                    continue
                out.write(image.contiguous().numpy().tobytes())
                index[i] = (offset, *image.shape)
                offset += image.numel()
            out.flush()
            os.fsync(out.fileno())
        with open(self.folder / (INDEX + tag), "wb") as f:
            np.save(f, index)
        os.replace(self.folder / (DATA + tag), self.folder / DATA)
        os.replace(self.folder / (INDEX + tag), self.folder / INDEX)
        manifest = {"version": FORMAT_VERSION, "count": len(entries), "data_bytes": offset,
                    "fingerprint": fingerprint(entries), "files": entries}
        (self.folder / (MANIFEST + tag)).write_text(json.dumps(manifest))
        os.replace(self.folder / (MANIFEST + tag), self.folder / MANIFEST)
        self._data = None

    # -- reading --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> Tensor:
        """Row ``i`` as a ``uint8`` ``(C, H, W)`` tensor with its own memory (a copy out of the memory map)."""
        if self.index is None:
            raise RuntimeError("DecodedImages: use DecodedImages.open(folder, paths), which checks the cache.")
        if self._data is None:
            self._data = np.memmap(self.folder / DATA, dtype=np.uint8, mode="r")
        offset, c, h, w = (int(v) for v in self.index[i])
        if c == 0:
            raise ValueError(f"{self.paths[i]} could not be decoded when the cache was built.")
        return torch.from_numpy(np.array(self._data[offset:offset + c * h * w])).view(c, h, w)

    def __call__(self, path: str | os.PathLike) -> Tensor:
        """The image of ``path`` (one of the cached paths), as :func:`decode_image_file` returns it."""
        try:
            i = self.row[os.fspath(path)]
        except KeyError:
            raise KeyError(f"{path} is not in the decoded-image cache {self.folder} ({len(self)} files).") from None
        return self.read(i)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # each process maps the file itself
