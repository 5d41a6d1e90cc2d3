"""Offline distillation: the teacher's logits on K seeded augmented views of every training row, stored once.

Online KD pays a teacher forward pass on every step. A cache pays it once per *view*: view ``v`` of training
row ``i`` is the DataModule's own training transform, run with torch's CPU generator and Python's ``random``
seeded to ``derive_seed(cache_seed, "view", i, v)``; the teacher's logits for exactly that image are stored at
``[i, v]``. In epoch ``e`` the student gets view ``v = (e + offset_i) % K`` of row ``i``
(``offset_i = derive_seed(run_seed, "view offset", i) % K``, so every view is used once every K epochs and
different run seeds walk the views in different orders), **re-made from the image with the same seed**, with the
logits the teacher gave for that very view. A cached clean-image logit is never paired with a random crop.

That replay needs transforms whose randomness comes from torch's or Python's generator (every
``torchvision.transforms.v2`` op does); :func:`check_replayable` refuses any other. Noise added on the device
changes the image after the teacher saw it: the DataModule refuses the cache with it.

**Function matching** (Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR
2022: teacher and student see the very same MixUp'ed / CutMix'ed image). With the DataModule's ``mixup_alpha`` /
``cutmix_alpha`` on, the cached views are mixed views (:class:`ViewMixing`), replayed per sample from seeds instead
of the batch-level mixing of online training: view ``v`` of row ``i`` is the row's view ``v`` (as above) mixed with
view ``v`` of a partner row ``j`` (made with its own seed ``view_seed(cache_seed, j, v)``). The partner ``j``
(uniform over the *other* training rows; ``i`` itself only in a one-row set), the choice MixUp or CutMix (50/50 when
both are on, as torchvision's ``RandomChoice``), ``lam ~ Beta(alpha, alpha)`` and CutMix's box (torchvision's rule,
with ``lam`` corrected to the box's actual area) are drawn from torch's CPU generator seeded to
``derive_seed(cache_seed, "mix", i, v)`` (:func:`mix_seed`). The image is ``lam * x_i + (1 - lam) * x_j`` (MixUp)
or ``x_i`` with the box pasted from ``x_j`` (CutMix), and the target is the soft label
``lam * onehot(y_i) + (1 - lam) * onehot(y_j)`` ``(K,)`` float32, an unlabelled row (``-100``) contributing zeros
(:mod:`kd_lightning.labels`): two labelled rows sum to 1; a labelled row with an unlabelled partner gives
``lam * onehot(y_i)`` (sums to ``lam``: labelled, its hard term weighted by the labelled share; likewise
``(1 - lam) * onehot(y_j)`` for an unlabelled row with a labelled partner); two unlabelled rows give all zeros
(unlabelled: distillation terms only). The teacher is run on exactly that mixed image when the cache is built, and
the student's loader re-makes it from the same seeds, so ``[i, v]`` holds the teacher's logits on the image the
student gets. The mixing settings (:meth:`ViewMixing.describe`) are a part of the fingerprint (only when mixing is
on, so that caches without mixing keep their fingerprint); with mixing off everything is as without it.

On disk (``folder/``): ``manifest.json`` (format, shape, storage, the fingerprint's parts) and ``logits.npy``
``(N, K, H, C)`` float16 (or float32) for the teacher's H heads (GoogLeNet: 3), memory-mapped, so that offline
distillation sees exactly the heads online distillation would; with ``top_k``, ``topk_logits.npy`` /
``topk_classes.npy`` ``(N, K, H, k)`` and ``rest_logit.npy`` ``(N, K, H)``: the other classes share the rest of the
probability mass evenly (exact at T = 1, an approximation at other temperatures). The manifest is written last, after every rank's
rows, so a cache without one is partial. The fingerprint covers the teacher's weights, the data files, the
transform, the cache seed, K, the storage and the mixing: :func:`stale_reason` names whatever changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.labels import UNLABELLED
from kd_lightning.seeding import derive_seed, seeded_cpu_rng

FORMAT_VERSION = 2  # 2: every teacher head is stored (N, K, H, C)
MANIFEST = "manifest.json"


def view_seed(cache_seed: int, index: int, view: int) -> int:
    """The seed of the training transform that makes view ``view`` of row ``index``."""
    return derive_seed(cache_seed, "view", index, view)


def view_of_epoch(run_seed: int, index: int, epoch: int, views: int) -> int:
    """Which of the ``views`` cached views row ``index`` shows in ``epoch``: each one once every ``views`` epochs."""
    return (epoch + derive_seed(run_seed, "view offset", index)) % views


def make_view(dataset: Dataset, index: int, seed: int) -> tuple[Any, ...]:
    """Row ``index`` of ``dataset`` with its transforms seeded to ``seed`` (the caller's generators restored)."""
    with seeded_cpu_rng(seed):
        return tuple(dataset[index])


def mix_seed(cache_seed: int, index: int, view: int) -> int:
    """The seed of view ``view`` of row ``index``'s mixing: its partner row, MixUp or CutMix, lambda and box."""
    return derive_seed(cache_seed, "mix", index, view)


@dataclass(frozen=True)
class MixParams:
    """One mixed view's draws: the ``partner`` row, ``kind`` (``"mixup"`` or ``"cutmix"``), ``lam`` (the row's own
    share of the image and of the label; CutMix: corrected to the box's area) and CutMix's ``box``
    ``(x1, y1, x2, y2)``, where the partner's pixels go (None for MixUp)."""

    partner: int
    kind: str
    lam: float
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ViewMixing:
    """Per-sample MixUp/CutMix of the cached views, replayed from seeds (function matching offline; the rule is in
    the module docstring). ``mixup_alpha`` / ``cutmix_alpha``: Beta(alpha, alpha) of each (0: off, at least one on;
    both on: one of the two per view, 50/50)."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    RULE = "per-sample replay 1: partner uniform over the other rows, its view v; MixUp/CutMix 50/50"

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or not (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError(f"ViewMixing needs mixup_alpha >= 0 and cutmix_alpha >= 0, at least one > 0; got "
                             f"{self.mixup_alpha} and {self.cutmix_alpha}.")
        if self.num_classes < 1:
            raise ValueError(f"ViewMixing needs num_classes >= 1, got {self.num_classes}.")

    def describe(self) -> str:
        """The fingerprint's ``mixing`` part (the sampling's library version included: Beta draws may change)."""
        return (f"mixup_alpha={float(self.mixup_alpha)}, cutmix_alpha={float(self.cutmix_alpha)}; {self.RULE}; "
                f"torch {torch.__version__}")

    def params(self, cache_seed: int, index: int, view: int, rows: int, height: int, width: int) -> MixParams:
        """The draws of view ``view`` of row ``index`` (of ``rows``, images ``height`` x ``width``), all from torch's
        CPU generator seeded to :func:`mix_seed` (the caller's generator state restored), in this order: partner,
        MixUp or CutMix (both on only), lam, CutMix's box centre (x, then y)."""
        with seeded_cpu_rng(mix_seed(cache_seed, index, view)):
            if rows > 1:
                partner = int(torch.randint(rows - 1, ()))
                partner += int(partner >= index)  # uniform over the rows other than ``index``
            else:
                partner = index
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                kind = "mixup" if float(torch.rand(())) < 0.5 else "cutmix"
            else:
                kind = "mixup" if self.mixup_alpha > 0 else "cutmix"
            alpha = self.mixup_alpha if kind == "mixup" else self.cutmix_alpha
            lam = float(torch.distributions.Beta(torch.tensor([float(alpha)]), torch.tensor([float(alpha)])).sample(()))
            if kind == "mixup":
                return MixParams(partner, kind, lam)
            # torchvision.transforms.v2.CutMix's box: centre uniform, half sides r * W and r * H with r = sqrt(1-lam)/2,
            # clipped to the image; lam becomes the share of the image outside the box
            r_x, r_y = int(torch.randint(width, ())), int(torch.randint(height, ()))
            r = 0.5 * (1.0 - lam) ** 0.5
            r_w, r_h = int(r * width), int(r * height)
            x1, y1 = max(r_x - r_w, 0), max(r_y - r_h, 0)
            x2, y2 = min(r_x + r_w, width), min(r_y + r_h, height)
            return MixParams(partner, kind, float(1.0 - (x2 - x1) * (y2 - y1) / (width * height)), (x1, y1, x2, y2))

    def mix_images(self, image: Tensor, partner: Tensor, p: MixParams) -> Tensor:
        """The row's ``image`` mixed with its ``partner``'s (both ``(C, H, W)``) by ``p``."""
        if not (isinstance(image, Tensor) and isinstance(partner, Tensor) and image.shape == partner.shape):
            raise ValueError("The teacher cache's MixUp/CutMix needs training images that are tensors of one shape; "
                             f"got {tuple(getattr(image, 'shape', ()))} and {tuple(getattr(partner, 'shape', ()))}. "
                             "Use a training transform that ends at a fixed size.")
        if p.kind == "mixup":
            return partner.mul(1.0 - p.lam).add_(image.mul(p.lam))  # torchvision's MixUp, on one pair
        x1, y1, x2, y2 = p.box  # type: ignore[misc]
        out = image.clone()
        out[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
        return out

    def soft_label(self, label: Any, partner_label: Any, lam: float) -> Tensor:
        """``lam * onehot(label) + (1 - lam) * onehot(partner_label)``, ``(K,)`` float32; an unlabelled
        (``-100``) side contributes zeros (see the module docstring for what a half-labelled mix gives)."""
        out = torch.zeros(self.num_classes, dtype=torch.float32)
        for y, weight in ((int(partner_label), 1.0 - lam), (int(label), lam)):
            if y != UNLABELLED:
                out[y] += weight
        return out


def make_cached_view(dataset: Dataset, index: int, view: int, cache_seed: int,
                     mixing: ViewMixing | None = None) -> tuple[Any, ...]:
    """View ``view`` of row ``index``: the row made with :func:`view_seed` (``mixing`` None), or that view mixed with
    its partner's by ``mixing`` (image and soft label replaced, any further fields of the row as they are)."""
    row = make_view(dataset, index, view_seed(cache_seed, index, view))
    if mixing is None:
        return row
    image = row[0]
    p = mixing.params(cache_seed, index, view, len(dataset), image.shape[-2], image.shape[-1])  # type: ignore[arg-type]
    other = make_view(dataset, p.partner, view_seed(cache_seed, p.partner, view))
    return (mixing.mix_images(image, other[0], p), mixing.soft_label(row[1], other[1], p.lam), *row[2:])


def check_replayable(dataset: Dataset, cache_seed: int, rows: int = 3) -> bool:
    """Raise when the training transform cannot be replayed from a seed (two runs of the same seed differ);
    return whether it is random at all (False: every view of a row is the same image)."""
    count = min(rows, len(dataset))  # type: ignore[arg-type]
    random_views = False
    for i in range(count):
        first = make_view(dataset, i, view_seed(cache_seed, i, 0))[0]
        again = make_view(dataset, i, view_seed(cache_seed, i, 0))[0]
        if not (isinstance(first, Tensor) and first.shape == again.shape and torch.equal(first, again)):
            raise ValueError(
                "The teacher cache cannot replay this DataModule's training transform: row "
                f"{i} made twice from the same seed gives two different images. Cached logits would then be paired "
                "with views the teacher never saw. Use transforms whose randomness comes from torch's or Python's "
                "generator (every torchvision.transforms.v2 op does; numpy's generator is not seeded), or distil "
                "online (remove the TeacherCache callback).")
        other = make_view(dataset, i, view_seed(cache_seed, i, 1))[0]
        random_views = random_views or not (first.shape == other.shape and torch.equal(first, other))
    return random_views


def fingerprint(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def describe_part(value: Any) -> str:
    """A short, stable text for one part of the fingerprint (long texts hashed)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 200 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def array_files(top_k: int | None) -> dict[str, str]:
    """The ``.npy`` files of a cache: every logit, or the top k with the logit that spreads the rest of the mass."""
    if top_k is None:
        return {"logits": "logits.npy"}
    return {"values": "topk_logits.npy", "classes": "topk_classes.npy", "rest": "rest_logit.npy"}


class TeacherLogitsStore:
    """The cached logits in ``folder``: read lazily (memory-mapped, once per process, so DataLoader workers
    pickle only the path), written row by row by :meth:`create` / :meth:`write` / :meth:`finish`."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._arrays: dict[str, np.ndarray] | None = None
        self._manifest: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_arrays": None, "_manifest": None}

    # -- reading ------------------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = json.loads((self.folder / MANIFEST).read_text())
        return self._manifest

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: np.load(self.folder / file, mmap_mode="r")
                            for name, file in array_files(self.manifest["top_k"]).items()}
        return self._arrays

    def logits(self, index: int, view: int) -> Tensor:
        """float32 logits of view ``view`` of row ``index``: ``(C,)`` for a one-head teacher, else ``(H, C)``."""
        a = self.arrays()
        if "logits" in a:
            full = np.array(a["logits"][index, view], dtype=np.float32)  # (H, C)
        else:
            full = np.repeat(np.asarray(a["rest"][index, view], dtype=np.float32)[:, None],
                             self.manifest["num_classes"], axis=1)  # (H, C)
            np.put_along_axis(full, a["classes"][index, view].astype(np.int64), a["values"][index, view], axis=1)
        return torch.from_numpy(full[0] if full.shape[0] == 1 else full)

    def stale_reason(self, parts: dict[str, str]) -> str | None:
        """Why this folder cannot serve a cache of ``parts`` (missing, partial, stale, damaged), or None."""
        if not (self.folder / MANIFEST).is_file():
            if self.folder.is_dir() and any(self.folder.iterdir()):
                return f"'{self.folder}' holds a partial cache (no {MANIFEST}: its build did not finish)"
            return f"no cache in '{self.folder}' yet"
        try:
            manifest = self.manifest
        except (OSError, ValueError) as err:
            return f"its {MANIFEST} cannot be read ({err})"
        if manifest.get("format") != FORMAT_VERSION:
            return f"it was written in cache format {manifest.get('format')}, this version reads {FORMAT_VERSION}"
        saved = manifest.get("parts", {})
        changed = [name for name in parts if saved.get(name) != parts[name]] + \
                  [name for name in saved if name not in parts]  # e.g. mixing, built on, now off
        if changed:
            return "it was built for a different " + ", ".join(changed)
        n, k, h = manifest["rows"], manifest["views"], manifest["heads"]
        try:
            for name, array in self.arrays().items():
                if tuple(array.shape[:3]) != (n, k, h):
                    file = self.folder / array_files(manifest["top_k"])[name]
                    return f"'{file}' has shape {tuple(array.shape)}, expected ({n}, {k}, {h}, ...)"
        except (OSError, ValueError) as err:  # np.load of a truncated .npy: "mmap length is greater than file size"
            self._arrays = None
            return f"a cache file is damaged or truncated ({err})"
        return None

    # -- writing (rank 0 creates and finishes; every rank writes its rows) --------------------------------------
    def create(self, rows: int, views: int, heads: int, num_classes: int, dtype: str, top_k: int | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # partial from now until finish()
        for stale in [*array_files(None).values(), *array_files(1).values()]:
            (self.folder / stale).unlink(missing_ok=True)
        shapes = {"logits": (rows, views, heads, num_classes)} if top_k is None else \
            {"values": (rows, views, heads, top_k), "classes": (rows, views, heads, top_k), "rest": (rows, views, heads)}
        types = {"logits": dtype, "values": dtype, "classes": "int32", "rest": "float32"}
        for name, file in array_files(top_k).items():
            np.lib.format.open_memmap(self.folder / file, mode="w+", dtype=types[name], shape=shapes[name]).flush()

    def open_for_writing(self, top_k: int | None) -> None:
        self._arrays = {name: np.load(self.folder / file, mmap_mode="r+") for name, file in array_files(top_k).items()}

    def write(self, index: Sequence[int], view: Sequence[int], heads: Sequence[Tensor], top_k: int | None) -> None:
        """Store the teacher's heads, each ``(B, C)``, for rows ``index`` and views ``view``."""
        a = self.arrays()
        i, v = np.asarray(index), np.asarray(view)
        logits = torch.stack([h.detach().float().cpu() for h in heads], dim=1)  # (B, H, C)
        if top_k is None:
            a["logits"][i, v] = logits.numpy()
            return
        values, classes = logits.topk(top_k, dim=-1)  # (B, H, k)
        log_p = logits.log_softmax(-1)
        rest = (1 - log_p.gather(-1, classes).exp().sum(-1)).clamp_min(1e-12)  # the mass outside the top k
        spread = rest / max(1, logits.shape[-1] - top_k)
        a["values"][i, v] = values.numpy()
        a["classes"][i, v] = classes.numpy()
        a["rest"][i, v] = (spread.log() + logits.logsumexp(-1)).numpy()  # the logit that gives that share at T=1

    def flush(self) -> None:
        for array in (self._arrays or {}).values():
            if isinstance(array, np.memmap):
                array.flush()
        self._arrays = None

    def finish(self, rows: int, views: int, heads: int, num_classes: int, dtype: str, top_k: int | None,
               parts: dict[str, str]) -> None:
        manifest = {"format": FORMAT_VERSION, "rows": rows, "views": views, "heads": heads, "num_classes": num_classes,
                    "dtype": dtype, "top_k": top_k, "fingerprint": fingerprint(parts), "parts": parts}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.folder / MANIFEST)  # atomic: a reader sees no manifest or the whole one
        self._manifest, self._arrays = None, None


class ViewsToCache(Dataset):
    """``(image, row, view)`` for the given ``(row, view)`` pairs: what the teacher is run on to fill the cache
    (the mixed image when ``mixing`` is given)."""

    def __init__(self, dataset: Dataset, pairs: Sequence[tuple[int, int]], cache_seed: int,
                 mixing: ViewMixing | None = None) -> None:
        self.dataset, self.pairs, self.cache_seed, self.mixing = dataset, list(pairs), cache_seed, mixing

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> tuple[Any, int, int]:
        i, v = self.pairs[j]
        return make_cached_view(self.dataset, i, v, self.cache_seed, self.mixing)[0], i, v


class CachedViews(Dataset):
    """The training rows as ``(image, target, index, teacher_logits)`` (the batch contract of
    :mod:`kd_lightning.data.batch`), read by the ``(epoch, index)`` keys of the resumable training sampler: the
    row's view of that epoch, re-made from its seed, with the logits the teacher gave for it. With ``mixing``,
    the view is the mixed one and the target its soft label ``(K,)``."""

    def __init__(self, dataset: Dataset, store: TeacherLogitsStore, cache_seed: int, run_seed: int,
                 views: int, mixing: ViewMixing | None = None) -> None:
        self.dataset, self.store = dataset, store
        self.cache_seed, self.run_seed, self.views, self.mixing = cache_seed, run_seed, views, mixing

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any, int, Tensor]:
        epoch, i = key
        v = view_of_epoch(self.run_seed, i, epoch, self.views)
        row = make_cached_view(self.dataset, i, v, self.cache_seed, self.mixing)
        return row[0], row[1], i, self.store.logits(i, v)
