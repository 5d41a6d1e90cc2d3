r"""
TeacherCache
^^^^^^^^^^^^

Offline distillation: the teacher's logits computed once, on ``views`` seeded augmented views of every training
row, and the student trained from them with no teacher forward pass (:mod:`kd_lightning.data.teacher_cache` has
the replay rule and the file format). Add it to a KD run's ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: kd_lightning.callbacks.TeacherCache
          init_args: {dirpath: logs/flowers_transfer/teacher_cache, views: 8}

At ``setup`` of a fit, before anything trains, it fingerprints the teacher's weights, the training data, the
transform, the cache seed, ``views``, the storage, the teacher's precision and the mixing (the MixUp/CutMix
settings, when on). A matching, complete cache in ``dirpath`` is used as it is; anything else (none yet, a partial
build, another teacher, other data, transforms or mixing, a damaged file) is rebuilt there, with one message that
says why. Runs that start together on one cache (a study's seeds as parallel jobs) build it once: the first
holds a lock on the folder while it builds, the others wait for it; a run whose settings differ is refused, in one
line, while another run trains from the cache it would replace. Under DDP every rank computes its share of the
rows (rows ``r::world``) into one memory-mapped file; rank 0 writes the manifest last. Validation and test still
run the teacher (``teacher_acc``, ``agreement`` and ``kl`` stay measured on clean images).

With ``views: K`` an epoch shows each row in one of its K views, so K epochs see K different crops; past K epochs
the views repeat (online KD draws a fresh crop every time). Every head of a multi-head teacher (GoogLeNet's
auxiliary heads) is cached, so a term sees offline exactly what it would see online, whatever its
``teacher_weights``. Refused with a clear error: terms that tap teacher layers (their features are not cached),
noise added on the device (``noise_std``) and transforms that cannot be replayed from a seed.

Function matching offline (Beyer et al., CVPR 2022): with the DataModule's ``mixup_alpha`` / ``cutmix_alpha`` on,
the K views of a row are MixUp/CutMix views, each mixed with a partner row's view by draws replayed from a seed,
and the student gets exactly those mixed images with their soft labels (the batch-level mixing of online training is
replaced by it). The same YAML means function matching online and offline; the mixing settings are a part of the
fingerprint, so a cache built for other ones is rebuilt. See :mod:`kd_lightning.data.teacher_cache`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from filelock import FileLock
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from kd_lightning.core import TEACHER_PRECISIONS, Distiller, dry_run
from kd_lightning.data.base import ClassificationDataModule
from kd_lightning.data.teacher_cache import (
    TeacherLogitsStore,
    ViewsToCache,
    check_replayable,
    describe_part,
    fingerprint,
)
from kd_lightning.file_locks import held_elsewhere, try_lock

BUILD_LOCK = ".build.lock"  # in the cache's folder; an OS lock, released when its process ends (kill -9 included)
READERS = "readers"  # in the cache's folder: one lock file per run training from it


class TeacherCache(Callback):
    """Train a :class:`~kd_lightning.DistillationModule` from cached teacher logits; see the module docstring.

    Args:
        dirpath: the cache's folder (built there when missing or stale).
        views: K, the seeded augmented views cached per training row (1 for data without random augmentation).
        seed: the views' seed, independent of the run's seed, so that the runs of a multi-seed study share one
            cache (each seed still walks the views in its own order).
        dtype: storage of the logits, ``float16`` (half the disk) or ``float32`` (bit-exact).
        top_k: keep only the ``top_k`` largest logits per view; the other classes share the rest of the
            probability mass evenly (exact at T = 1 only). None: every logit.
        batch_size: the teacher's batch while building (default: the DataModule's).
        precision: the teacher's autocast while building: ``"32"``, ``"bf16"`` or ``"16"`` (a GPU's choice).
    """

    def __init__(self, dirpath: str, views: int = 1, seed: int = 0,
                 dtype: Literal["float16", "float32"] = "float16", top_k: int | None = None,
                 batch_size: int | None = None, precision: Literal["32", "bf16", "16"] = "32") -> None:
        super().__init__()
        if not dirpath:
            raise ValueError("TeacherCache: dirpath is required, e.g. logs/<experiment>/teacher_cache.")
        if views < 1:
            raise ValueError(f"TeacherCache: views must be >= 1 (augmented views cached per row), got {views}.")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"TeacherCache: dtype must be 'float16' or 'float32', got {dtype!r}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"TeacherCache: top_k must be >= 1 or null (every logit), got {top_k}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"TeacherCache: batch_size must be >= 1 or null (the DataModule's), got {batch_size}.")
        if precision not in TEACHER_PRECISIONS:
            raise ValueError(f"TeacherCache: precision must be '32', 'bf16' or '16', got {precision!r}.")
        self.dirpath, self.views, self.seed = str(dirpath), int(views), int(seed)
        self.dtype, self.top_k, self.batch_size, self.precision = dtype, top_k, batch_size, precision
        self.fingerprint: str | None = None
        self._random_views = True  # whether the training transform is random (checked by check_settings)
        self._reader: FileLock | None = None  # held while this run trains from the cache

    # -- checks ---------------------------------------------------------------------------------------------------
    def check_settings(self, pl_module: pl.LightningModule, datamodule: Any = None, stage: str = "fit") -> None:
        """A clear error for a run the cache cannot serve, before anything is built or written (the
        ``kd-lightning`` command calls it before the trainer starts; ``setup`` again). Only a fit uses the cache."""
        if stage != "fit":
            return
        if not isinstance(pl_module, Distiller) or pl_module.teacher is None:
            raise ValueError(f"TeacherCache caches a teacher's logits: it needs a DistillationModule with a teacher, "
                             f"got {type(pl_module).__name__}" + (" without one" if isinstance(pl_module, Distiller)
                                                                  else "") + ". Remove it from this run's callbacks.")
        tapping = [t.name for t in pl_module.terms.values() if t.teacher_layers]
        if tapping:
            raise ValueError(f"TeacherCache: the term(s) {tapping} tap teacher layers, which the cache does not hold, "
                             "so the teacher would run anyway. Distil them online (remove TeacherCache), or use "
                             "logit terms only (HintonKD, DKD, CrossEntropy).")
        if not isinstance(datamodule, ClassificationDataModule):
            raise ValueError("TeacherCache needs a kd_lightning ClassificationDataModule (it serves the cached views "
                             f"through the training loader), got {type(datamodule).__name__}.")
        datamodule.check_teacher_cache()
        if datamodule.train_set is None:
            datamodule.setup("fit")
        self._random_views = check_replayable(datamodule.train_set, self.seed)

    def parts(self, pl_module: Any, datamodule: Any) -> dict[str, str]:
        """The fingerprint's parts: what a cache was built for."""
        description = datamodule.teacher_cache_description()
        parts = {"teacher": pl_module.teacher_fingerprint(), "data": describe_part(description["data"]),
                 "transform": describe_part(description["transform"]), "seed": str(self.seed),
                 "views": str(self.views), "storage": f"{self.dtype}, top_k={self.top_k}",
                 # the logits' precision: this build's autocast and the module's own teacher_precision
                 "precision": f"build {self.precision}, teacher {pl_module.hparams.get('teacher_precision', '32')}",
                 "classes": str(pl_module.num_classes)}
        mixing = datamodule.teacher_cache_mixing()
        if mixing is not None:  # only when on: a cache without mixing keeps the fingerprint it always had
            parts["mixing"] = mixing.describe()
        return parts

    # -- hooks -----------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.attach(pl_module, trainer.datamodule, trainer)

    def attach(self, pl_module: Any, datamodule: Any, trainer: pl.Trainer | None = None) -> None:
        """Check, build the cache when it is missing or stale, and have ``datamodule``'s training loader serve the
        cached views. ``trainer`` gives the ranks and the device; None: one process, the teacher's device."""
        self.check_settings(pl_module, datamodule)
        train_set = datamodule.train_set
        if not self._random_views and self.views > 1 and datamodule.teacher_cache_mixing() is None:
            rank_zero_warn(f"TeacherCache: the training transform is not random, so the {self.views} views of a row "
                           "are the same image; views: 1 caches the same information at 1/K of the cost.")
        parts = self.parts(pl_module, datamodule)
        self.fingerprint = fingerprint(parts)
        kind = "views" if "mixing" not in parts else "MixUp/CutMix views"
        ranks = _Ranks(trainer, pl_module)
        with self.build_lock(ranks):
            store = TeacherLogitsStore(self.dirpath)
            reason = ranks.broadcast(store.stale_reason(parts) if ranks.is_global_zero else None)
            if reason is None:
                rank_zero_info(f"TeacherCache: using the cached teacher logits in '{self.dirpath}' "
                               f"({len(train_set)} rows x {self.views} {kind}).")
            else:
                readers = ranks.broadcast(self.other_readers() if ranks.is_global_zero else 0)
                if readers:
                    raise RuntimeError(
                        f"TeacherCache: '{self.dirpath}' holds a cache of other settings ({reason}) that {readers} "
                        "other run(s) are training from; rebuilding it would change their logits under them. Give "
                        "this run its own folder (the TeacherCache's dirpath), or start it when they have finished.")
                rank_zero_info(f"TeacherCache: building the teacher cache in '{self.dirpath}' ({len(train_set)} rows "
                               f"x {self.views} {kind}) because {reason}.")
                self.build(ranks, pl_module, datamodule, parts)
            self.register_reader()  # under the build lock: no rebuild can start between the check and this
        datamodule.attach_teacher_cache(TeacherLogitsStore(self.dirpath), self.seed, self.views)

    # A run training from the cache holds a lock file of its own in <dirpath>/readers/ until its fit ends (the OS
    # releases it if the process dies); a build that would replace a complete cache first checks that none is held.
    def register_reader(self) -> None:
        folder = Path(self.dirpath) / READERS
        folder.mkdir(parents=True, exist_ok=True)
        self._reader = FileLock(folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.lock")
        self._reader.acquire()

    def release_reader(self) -> None:
        if self._reader is not None:
            self._reader.release()
            Path(self._reader.lock_file).unlink(missing_ok=True)
            self._reader = None

    def other_readers(self) -> int:
        """How many other runs hold a reader lock in this cache's folder (a lock left by a dead process is removed)."""
        held = 0
        for path in sorted((Path(self.dirpath) / READERS).glob("*.lock")):
            if held_elsewhere(path):
                held += 1
            else:
                path.unlink(missing_ok=True)
        return held

    @contextmanager
    def build_lock(self, ranks: "_Ranks") -> Iterator[None]:
        """Held by rank 0 from the staleness check to the end of a build: runs that start together on one cache
        (the seeds of a study under ``--launcher local``) build it once; the others wait, then find it complete.
        Without it each would truncate and rewrite the file the first one is already reading from."""
        if not ranks.is_global_zero:  # the other ranks follow rank 0 through broadcast and barriers
            yield
            return
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        lock = try_lock(Path(self.dirpath) / BUILD_LOCK)
        if lock is None:
            rank_zero_info(f"TeacherCache: another run is building the cache in '{self.dirpath}'; waiting for it.")
            lock = FileLock(Path(self.dirpath) / BUILD_LOCK)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def build(self, ranks: "_Ranks", pl_module: Any, datamodule: Any, parts: dict[str, str]) -> None:
        """Every rank runs the teacher on its rows' views (rows ``rank::world``) into the shared memory-mapped
        file; rank 0 creates it first and writes the manifest last."""
        start = time.perf_counter()
        train_set = datamodule.train_set
        rows = len(train_set)
        store = TeacherLogitsStore(self.dirpath)
        heads = len(dry_run(pl_module.teacher, datamodule.input_shape))
        if ranks.is_global_zero:
            store.create(rows, self.views, heads, pl_module.num_classes, self.dtype, self.top_k)
        ranks.barrier("teacher_cache_created")
        store.open_for_writing(self.top_k)
        device = ranks.device
        pl_module.teacher.to(device)  # under a trainer, the strategy moves the whole module there next anyway
        pairs = [(i, v) for i in range(ranks.rank, rows, ranks.world) for v in range(self.views)]
        views = ViewsToCache(train_set, pairs, self.seed, datamodule.teacher_cache_mixing())
        loader = DataLoader(views, batch_size=self.batch_size or
                            datamodule.batch_size, shuffle=False, num_workers=datamodule.num_workers)
        dtype = TEACHER_PRECISIONS[self.precision]
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.no_grad(), autocast:
            for images, index, view in loader:
                store.write(index.tolist(), view.tolist(), pl_module.teacher_logits(images.to(device)), self.top_k)
        store.flush()
        ranks.barrier("teacher_cache_written")
        if ranks.is_global_zero:
            store.finish(rows, self.views, heads, pl_module.num_classes, self.dtype, self.top_k, parts)
        ranks.barrier("teacher_cache_finished")
        rank_zero_info(f"TeacherCache: {rows * self.views} views cached in {time.perf_counter() - start:.1f} s.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage == "fit":
            self.release_reader()
            if hasattr(datamodule, "attach_teacher_cache"):
                datamodule.attach_teacher_cache(None)  # a later trainer.test() or a fit without it goes online

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release_reader()

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # restored after setup() fingerprinted this run's cache
        saved = state_dict.get("fingerprint")
        if saved is not None and self.fingerprint is not None and saved != self.fingerprint:
            rank_zero_warn("TeacherCache: this run was checkpointed with another teacher cache (fingerprint "
                           f"{saved[:12]} != {self.fingerprint[:12]}): the resumed run distils from other logits "
                           "than the interrupted one.")


class _Ranks:
    """The trainer's ranks, device, barrier and broadcast; one process on the teacher's device without one."""

    def __init__(self, trainer: pl.Trainer | None, pl_module: Any) -> None:
        self.trainer = trainer
        self.rank, self.world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.is_global_zero = self.rank == 0
        if trainer is not None:
            self.device = trainer.strategy.root_device
        else:
            param = next(pl_module.teacher.parameters(), None)
            self.device = param.device if param is not None else torch.device("cpu")

    def barrier(self, name: str) -> None:
        if self.trainer is not None:
            self.trainer.strategy.barrier(name)

    def broadcast(self, value: Any) -> Any:
        return value if self.trainer is None else self.trainer.strategy.broadcast(value, src=0)
