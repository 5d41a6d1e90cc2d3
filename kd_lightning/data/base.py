"""What every kd_lightning DataModule shares: class count known at construction (the CLI links it into the
model), loader settings, partial labelling for transfer sets, and batch-level augmentation on the device.

A subclass sets ``num_classes``, ``class_names`` and ``input_shape`` in ``__init__`` (so bad paths fail before
anything is written) and implements ``build_datasets()``, returning the train/val/test datasets of ``(x, y)``
and the train set's labels; it may implement ``build_unlabelled()`` to add extra unlabelled training rows.
Unlabelled rows carry the label ``-100`` (cross-entropy's ignore index); the distillation loss gives them the
soft term only.

Batch-level augmentation (``mixup_alpha``, ``cutmix_alpha``, ``noise_std``) runs in ``on_after_batch_transfer``,
on the training device and on training batches only. MixUp/CutMix turn the labels into soft labels ``(B, K)``:
each row is one-hot (all zero for an unlabelled row) and rows are mixed in pairs, so

* labelled x labelled gives ``lam * onehot(a) + (1 - lam) * onehot(b)`` (sums to 1);
* labelled (weight ``lam``) x unlabelled gives ``lam * onehot(a)`` (sums to ``lam``): the hard term of that row
  is ``lam * CE(a)``, i.e. only the labelled share of the mixed image has a hard target, while the soft
  (teacher) term covers the whole mixed image;
* unlabelled x unlabelled gives an all-zero row: unlabelled, soft term only.

With a teacher cache attached (offline distillation, :class:`kd_lightning.callbacks.TeacherCache`), MixUp/CutMix
are not done here on the batch: the cache's views are mixed per sample, replayed from seeds, with the same
settings and the same label rule (function matching: the teacher's cached logits are for the very mixed image the
student gets; :mod:`kd_lightning.data.teacher_cache`). ``noise_std`` stays refused with a cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from kd_lightning.data.batch import Batch, WithIndex, as_batch
from kd_lightning.data.resumable import EpochShuffleSampler, LoaderProgress, ResumableLoader, SeededSamples
from kd_lightning.data.splits import labelled_subset
from kd_lightning.exceptions import InputError
from kd_lightning.labels import UNLABELLED, one_hot_targets
from kd_lightning.seeding import derive_seed, run_seed, seeded_rng


def fetch(download: Callable[[], Any], root: str | Path, what: str) -> None:
    """Run ``download`` (which fills ``root``); when it fails (no internet, a broken archive), remove the folders it
    created, so nothing half-written stays, and raise one :class:`InputError` that says what to do instead."""
    root = Path(root)
    created = next((p for p in [*reversed(root.parents), root] if not p.exists()), None)
    try:
        download()
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError; torchvision raises RuntimeError
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{what}: the download into '{root}' failed ({type(err).__name__}: {reason}). Without "
                         "internet, fetch the files on a machine that has it and set data.init_args.root to the copy "
                         "(with download: false).") from None


class PartiallyLabelled(Dataset):
    """``dataset`` with the labels of all rows outside ``labelled`` replaced by ``-100``."""

    def __init__(self, dataset: Dataset, labelled: Sequence[int]) -> None:
        self.dataset = dataset
        self.labelled = frozenset(labelled)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, y = self.dataset[i]
        return x, (int(y) if i in self.labelled else UNLABELLED)


class BatchMix:
    """MixUp and/or CutMix (torchvision.transforms.v2) on a batch ``(x, y)``, unlabelled rows allowed.

    torchvision one-hots index labels itself and rejects ``-100``; here the labels are one-hot encoded first
    (:func:`kd_lightning.labels.one_hot_targets`), which torchvision mixes as given. With both alphas > 0 each batch gets one of the
    two, chosen at random.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> None:
        from torchvision.transforms import v2

        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0: off), got {mixup_alpha} and "
                             f"{cutmix_alpha}.")
        mixers = ([v2.MixUp(alpha=mixup_alpha)] if mixup_alpha > 0 else []) + \
                 ([v2.CutMix(alpha=cutmix_alpha)] if cutmix_alpha > 0 else [])
        if not mixers:
            raise ValueError("BatchMix needs mixup_alpha > 0 or cutmix_alpha > 0.")
        self.num_classes = num_classes
        self.mixer = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.mixer(x, one_hot_targets(y, self.num_classes))


class ClassificationDataModule(LightningDataModule):
    """Base class; see the module docstring.

    Args:
        batch_size: per-process batch size.
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        labelled_fraction: fraction of each training class that keeps its label (seeded, stratified, the same on
            every rank); the rest become unlabelled rows. Validation and test sets keep every label.
        use_unlabelled: keep the unlabelled rows in the training set (distillation) or drop them (the scratch
            baseline, which can learn nothing from them). Also decides whether ``unlabelled_dir`` images are used.
        split_seed: seed of the train/val/test split and of the labelled subset.
        noise_std: standard deviation of Gaussian noise added to training inputs on the device (0: off); it is
            added after normalization, e.g. 0.1 as in the KD literature.
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameter of batch-level MixUp / CutMix on training batches
            (0: off; both > 0: one of the two per batch). Labels become soft ``(B, K)``; see the module docstring.
            With a teacher cache, the cached views are mixed per sample instead (function matching offline).
        return_index: training batches carry each row's dataset index as a third field
            (:mod:`kd_lightning.data.batch`); MixUp/CutMix refuse such batches.
        predict_split: the split ``kd-lightning predict`` runs on: ``test`` (the validation split when there is no
            test split) or ``val``.
    """

    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, labelled_fraction: float = 1.0, use_unlabelled: bool = True,
                 split_seed: int = 0, noise_std: float = 0.0, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, return_index: bool = False,
                 predict_split: Literal["test", "val"] = "test") -> None:
        super().__init__()
        # the settings as given (the subclass's too): TensorBoard's HPARAMS compares runs by them
        self.save_hyperparameters(logger=False)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if not 0.0 < labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction}.")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}.")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0: off), got {mixup_alpha} and "
                             f"{cutmix_alpha}.")
        if predict_split not in ("test", "val"):
            raise ValueError(f"predict_split must be 'test' or 'val', got {predict_split!r}.")
        self.predict_split = predict_split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.labelled_fraction = labelled_fraction
        self.use_unlabelled = use_unlabelled
        self.split_seed = split_seed
        self.noise_std = noise_std
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.return_index = return_index
        self._mix: BatchMix | None = None
        self._teacher_cache: tuple[Any, int, int] | None = None  # (store, cache seed, views): see attach_teacher_cache
        self.train_progress = LoaderProgress()  # batches the training step consumed: the train loader's state
        self._resume_progress: dict[str, Any] | None = None  # from a checkpoint, for the next train loader
        self.train_set: Dataset | None = None
        self.train_row_labels: Tensor | None = None  # (N,) after setup: each training row's class (-100: none)
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset | None, Sequence[int]]:
        """``(train, val, test, train_labels)``; ``test`` may be None."""
        raise NotImplementedError

    def build_unlabelled(self) -> Dataset | None:
        """Extra training rows without labels (label ``-100``), or None. Used only when ``use_unlabelled``."""
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, self.val_set, self.test_set, train_labels = self.build_datasets()
        row_labels = [int(y) for y in train_labels]  # the label of every training row, by dataset index
        if self.labelled_fraction < 1.0:
            labelled = labelled_subset(train_labels, self.labelled_fraction, self.split_seed)
            train = PartiallyLabelled(train, labelled) if self.use_unlabelled else Subset(train, labelled)
            kept = set(labelled)
            row_labels = ([y if i in kept else UNLABELLED for i, y in enumerate(row_labels)] if self.use_unlabelled
                          else [row_labels[i] for i in labelled])
        if self.use_unlabelled:
            extra = self.build_unlabelled()
            if extra is not None:
                train = ConcatDataset([train, extra])
                row_labels += [UNLABELLED] * len(extra)  # type: ignore[arg-type]
        else:
            extra_dir = getattr(self, "unlabelled_dir", None)
            if extra_dir:
                rank_zero_info(f"use_unlabelled is false: the images in unlabelled_dir={extra_dir} are not used.")
        self.train_row_labels = torch.tensor(row_labels, dtype=torch.long)  # (N,); -100: unlabelled
        self.train_set = WithIndex(train) if self.return_index else train

    # -- loaders --------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no such split; call setup() first or check the data.")
        settings: dict[str, Any] = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                                        pin_memory=self.pin_memory, persistent_workers=self.persistent_workers)
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **settings)
        # Training: an order that is a function of (seed, epoch), per-sample augmentation seeds, and a state that
        # checkpoints carry, so that a resumed run replays the uninterrupted one (see kd_lightning.seeding).
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffleSampler(dataset, num_replicas=replicas, rank=rank, seed=run_seed())  # type: ignore[arg-type]
        if self._teacher_cache is not None:  # offline KD: each row's view of the epoch, with its cached logits
            from kd_lightning.data.teacher_cache import CachedViews

            store, cache_seed, views = self._teacher_cache
            samples: Dataset = CachedViews(dataset, store, cache_seed, run_seed(), views, self.teacher_cache_mixing())
        else:
            samples = SeededSamples(dataset, run_seed())
        loader = ResumableLoader(samples, sampler=sampler, progress=self.train_progress,
                                 drop_last=len(sampler) > self.batch_size, **settings)
        if self._resume_progress is not None:
            loader.load_state_dict(self._resume_progress)
            self._resume_progress = None
        return loader

    # -- offline distillation (kd_lightning.callbacks.TeacherCache) ------------------------------------------
    def teacher_cache_description(self) -> dict[str, Any]:
        """What makes the training rows and their views: ``{"data": ..., "transform": ...}``, JSON-able. A teacher
        cache built for one description is stale for any other (see :mod:`kd_lightning.data.teacher_cache`).
        Subclasses describe their files and transform; the rows kept come from the settings below."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot describe its training data for a teacher cache: implement "
            "teacher_cache_description() (the data files and the training transform), or distil online.")

    def train_rows_description(self) -> dict[str, Any]:
        """The settings that decide which rows the training set holds, and in what order."""
        return {"labelled_fraction": self.labelled_fraction, "use_unlabelled": self.use_unlabelled,
                "split_seed": self.split_seed, "return_index": self.return_index}

    def teacher_cache_mixing(self) -> Any:
        """The teacher cache's per-sample MixUp/CutMix (function matching offline), from ``mixup_alpha`` and
        ``cutmix_alpha``: a :class:`~kd_lightning.data.teacher_cache.ViewMixing`, or None when both are off."""
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            return None
        from kd_lightning.data.teacher_cache import ViewMixing

        return ViewMixing(self.num_classes, float(self.mixup_alpha), float(self.cutmix_alpha))

    def check_teacher_cache(self) -> None:
        """Refuse settings under which cached logits would describe another image than the one trained on (MixUp
        and CutMix are fine: with a cache they mix the cached views, see :meth:`teacher_cache_mixing`)."""
        if self.noise_std > 0:
            raise ValueError(
                f"{type(self).__name__}: a teacher cache cannot be used with noise added on the device "
                f"(noise_std={self.noise_std}): it changes each image after the teacher's logits were cached for it. "
                "Turn it off (0) for offline distillation, or distil online (remove the TeacherCache callback). "
                "(MixUp/CutMix are fine: the cache's views are mixed per sample.)")

    def attach_teacher_cache(self, store: Any, cache_seed: int = 0, views: int = 1) -> None:
        """Serve training batches as ``(images, targets, index, teacher_logits)`` from ``store``
        (:class:`~kd_lightning.data.teacher_cache.TeacherLogitsStore`); None detaches (online again)."""
        if store is None:
            self._teacher_cache = None
            return
        self.check_teacher_cache()
        self._teacher_cache = (store, cache_seed, views)

    def state_dict(self) -> dict[str, Any]:
        return {"train_progress": self.train_progress.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the DataModule before it builds the train loader of a resumed fit.
        self._resume_progress = state_dict.get("train_progress")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader() if self.predict_split == "val" else self.test_dataloader()

    # -- batch-level augmentation, on the device -------------------------------------------------------------
    def augment_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """MixUp/CutMix, then Gaussian noise, on one training batch (a no-op when all are off)."""
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            if self._mix is None:
                self._mix = BatchMix(self.num_classes, self.mixup_alpha, self.cutmix_alpha)
            x, y = self._mix(x, y)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return x, y

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        epoch = trainer.current_epoch
        self.train_progress.count(epoch, trainer.is_last_batch)
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0 and self.noise_std == 0:
            return batch
        if self._teacher_cache is not None:  # the cached views come mixed (per sample, replayed); noise is refused
            return batch
        typed = as_batch(batch)
        x, y = typed.images, typed.targets
        extra = typed.extra_fields()
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and extra:
            # MixUp/CutMix pair rows and weight them by lambda; a per-sample field left unmixed (a sample index, cached
            # teacher logits) would silently describe another image than the mixed one.
            raise ValueError(f"{type(self).__name__}: MixUp/CutMix (mixup_alpha={self.mixup_alpha}, cutmix_alpha="
                             f"{self.cutmix_alpha}) mix images and targets only, but the batch has {len(extra)} "
                             f"more per-sample field(s) ({', '.join(extra)}) that would stay unmixed. Turn "
                             "MixUp/CutMix off for this data, or drop the extra fields (return_index: false).")
        # seeded by position, like everything random in training, so that a resumed run mixes the same pairs
        with seeded_rng(derive_seed(run_seed(), "batch", trainer.global_rank, epoch, self.train_progress.batches),
                        x.device):
            x, y = self.augment_batch(x, y)
        if isinstance(batch, Batch):
            return batch._replace(images=x, targets=y)
        return [x, y, *batch[2:]] if isinstance(batch, list) else (x, y, *batch[2:])
