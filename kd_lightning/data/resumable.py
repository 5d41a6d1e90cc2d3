"""A training DataLoader that a resumed run replays exactly, also from a checkpoint taken mid-epoch.

* :class:`EpochShuffleSampler` is a ``DistributedSampler`` (one replica on a single device, so Lightning keeps
  it as it is under DDP too): the order of epoch ``e`` is a pure function of ``(seed, e)``. It yields
  ``(epoch, index)`` keys, so that
* :class:`SeededSamples` can seed each sample's random augmentation from ``(seed, epoch, index)``: the same
  crop for the same sample in the same epoch, whichever worker process loads it, with or without persistent
  workers, before or after a resume.
* :class:`ResumableLoader` is a ``DataLoader`` whose state is :class:`LoaderProgress`, the epoch and number of
  batches the training step has consumed (counted by the DataModule when a batch reaches the device); loading
  a state makes the next pass skip the batches already trained on. The DataModule carries that state in
  checkpoints (``LightningDataModule.state_dict``) and hands it to the loader it builds on resume: Lightning's
  own stateful-loader restore comes too late when the loader was built early, as ``estimated_stepping_batches``
  (a per-step LR schedule) does. The loader keeps ``state_dict``/``load_state_dict`` so that Lightning knows
  it is resumable mid-epoch (loading the same state twice is harmless).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sized

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kd_lightning.seeding import derive_seed, seeded_cpu_rng


@dataclass
class LoaderProgress:
    """Where training is in the data: ``batches`` of ``epoch`` consumed; ``epoch_done`` once its last one was."""

    epoch: int = 0
    batches: int = 0
    epoch_done: bool = False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def count(self, epoch: int, is_last_batch: bool) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1
        self.epoch_done = is_last_batch


class EpochShuffleSampler(DistributedSampler):
    """Shuffled indices of this rank for the epoch set by ``set_epoch`` (Lightning calls it), as
    ``(epoch, index)`` keys; ``skip_next(n)`` leaves out the first ``n`` of the next pass (a resumed epoch)."""

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self._skip = 0

    def skip_next(self, n: int) -> None:
        self._skip = n

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        skip, self._skip, epoch = self._skip, 0, self.epoch
        for position, index in enumerate(super().__iter__()):
            if position >= skip:
                yield epoch, index


class SeededSamples(Dataset):
    """``dataset`` read by ``(epoch, index)`` keys, each sample's transforms seeded from ``(seed, epoch, index)``
    (torch's CPU generator and Python's ``random``; both restored afterwards). Plain indices read unseeded."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        epoch, index = key
        with seeded_cpu_rng(derive_seed(self.seed, "sample", epoch, index)):
            return self.dataset[index]


class ResumableLoader(DataLoader):
    """The training ``DataLoader``: its state is the shared :class:`LoaderProgress`; loading a state points the
    :class:`EpochShuffleSampler` at the first batch not yet trained on."""

    def __init__(self, *args: Any, progress: LoaderProgress, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochShuffleSampler):
            raise TypeError("ResumableLoader needs an EpochShuffleSampler.")
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        return self.progress.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = LoaderProgress(**state)
        sampler = self.sampler
        assert isinstance(sampler, EpochShuffleSampler)
        if saved.epoch_done:  # the checkpoint closed its epoch: the next one starts from its first batch
            sampler.set_epoch(saved.epoch + 1)
            self.progress.epoch, self.progress.batches, self.progress.epoch_done = saved.epoch + 1, 0, False
        else:
            sampler.set_epoch(saved.epoch)
            sampler.skip_next(saved.batches * (self.batch_size or 1))
            self.progress.epoch, self.progress.batches, self.progress.epoch_done = saved.epoch, saved.batches, False
