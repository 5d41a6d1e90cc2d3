"""Contrastive representation distillation (CRD): a memory bank of negatives and the NCE loss.

Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020). Each network's penultimate
features are embedded (linear + L2 normalisation, 128-d) and contrasted against the *other* network's embeddings
of the same training row (the positive) and of ``negatives`` rows of other classes, kept in a memory bank of one
row per training sample and updated with momentum after every step (:func:`kd_lightning.losses.crd_nce_loss`).

What makes it exact here:

* the positive is the row's dataset index (``return_index: true``: :attr:`StepOutputs.index`);
* the negatives of a step are drawn from a generator seeded by ``(run seed, "crd negatives", draws)``, ``draws``
  being the number of training steps the term has taken (a buffer); with the bank and the normalising constants
  also buffers, a checkpoint resumes the very same draws and bank;
* under DDP, the draws are made for the global batch (gathered indices) and each rank takes its rows, and the bank
  is updated with every rank's embeddings, so N processes match one process on the same global batches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.distillers.base import DistillationTerm, StepOutputs
from kd_lightning.labels import UNLABELLED
from kd_lightning.losses import crd_nce_loss, crd_scores
from kd_lightning.seeding import derive_seed, run_seed


def _world() -> tuple[int, int]:
    """``(world size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(x: Tensor) -> Tensor:
    """``x`` of every rank, concatenated in rank order along dim 0 (equal shapes on every rank); ``x`` alone
    without a process group."""
    world, _ = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _mean_over_ranks(x: Tensor) -> Tensor:
    world, _ = _world()
    if world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world


class Embed(nn.Module):
    """CRD's embedding: flatten, linear to ``dim``, L2-normalise each row."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)  # (B, dim)


class CRD(DistillationTerm):
    """Contrastive representation distillation (see the module docstring): ``NCE(student anchors vs the
    teacher's bank) + NCE(teacher anchors vs the student's bank)``. Returns ``{"crd"}`` in training, nothing in
    validation and test (the bank holds training rows only).

    Args:
        student_layer, teacher_layer: the penultimate features (``pool`` in the CIFAR ResNets), flattened.
        embed_dim: the embedding's width (the paper: 128).
        negatives: K, negatives per row (16384), drawn uniformly from the training rows of other classes (any row
            for an unlabelled anchor), as the authors' ``exact`` sampling.
        nce_temperature: tau of the scores ``exp(<m, a> / tau)`` (0.07); not the distillation temperature, so a
            temperature schedule leaves it alone.
        momentum: of the bank's update ``m <- normalise(momentum * m + (1 - momentum) * a)`` (0.5).
    """

    default_name = "crd"
    needs_index = True

    def __init__(self, weight: float = 0.8, student_layer: str = "pool", teacher_layer: str = "pool",
                 embed_dim: int = 128, negatives: int = 16384, nce_temperature: float = 0.07, momentum: float = 0.5,
                 name: str | None = None) -> None:
        super().__init__(weight, name, [student_layer], [teacher_layer])
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"CRD: embed_dim must be an integer >= 1, got {embed_dim!r}.")
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1:
            raise ValueError(f"CRD: negatives must be an integer >= 1 (the paper: 16384), got {negatives!r}.")
        if not nce_temperature > 0:
            raise ValueError(f"CRD: nce_temperature must be > 0 (the paper: 0.07), got {nce_temperature}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"CRD: momentum must be in [0, 1) (the paper: 0.5), got {momentum}.")
        self.embed_dim, self.negatives = embed_dim, negatives
        self.nce_temperature, self.momentum = float(nce_temperature), float(momentum)
        self.embed_student: Embed | None = None
        self.embed_teacher: Embed | None = None
        # the banks (N, D), sized by bind_train_rows (or by a checkpoint being loaded); Z of the student's and the
        # teacher's scores (-1: set from the first batch); training steps taken (the negatives' seed)
        self.register_buffer("memory_student", torch.empty(0, embed_dim))
        self.register_buffer("memory_teacher", torch.empty(0, embed_dim))
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("row_labels", torch.empty(0, dtype=torch.long), persistent=False)
        self._pools: tuple[Tensor, Tensor, Tensor] | None = None  # rows sorted by class, class starts and sizes
        self.built = False

    # -- setup --------------------------------------------------------------------------------------------------
    def build(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        s = student_features[self.student_layers[0]].flatten(1)
        t = teacher_features[self.teacher_layers[0]].flatten(1)
        self.embed_student = Embed(s.shape[1], self.embed_dim)
        self.embed_teacher = Embed(t.shape[1], self.embed_dim)
        self.built = True

    def bind_train_rows(self, labels: Tensor) -> None:
        labels = labels.detach().to("cpu", torch.long)
        n = labels.numel()
        if n < 2:
            raise ValueError(f"CRD {self.name!r}: the memory bank needs at least 2 training rows, got {n}.")
        self.row_labels = labels.to(self.memory_student.device)
        order = torch.argsort(labels, stable=True)  # rows grouped by class; unlabelled (-100) first
        classes = labels.clamp(min=0).max().item() + 1
        counts = torch.bincount(labels[labels != UNLABELLED], minlength=classes)  # (C,)
        unlabelled = int((labels == UNLABELLED).sum())
        starts = unlabelled + torch.cumsum(counts, 0) - counts  # (C,) where class c begins in `order`
        self._pools = (order, starts, counts)
        if self.memory_student.shape[0] != n:  # a new bank (a resumed run loads the saved one over it)
            stdv = 1.0 / math.sqrt(self.embed_dim / 3)
            gen = torch.Generator().manual_seed(derive_seed(run_seed(), "crd memory"))
            device = self.memory_student.device
            self.memory_student = (torch.rand(n, self.embed_dim, generator=gen) * 2 * stdv - stdv).to(device)
            self.memory_teacher = (torch.rand(n, self.embed_dim, generator=gen) * 2 * stdv - stdv).to(device)
            self.normalizers.fill_(-1.0)
            self.draws.zero_()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A module built without the data (load_from_checkpoint, evaluate) takes the bank's size from the checkpoint.
        for name in ("memory_student", "memory_teacher"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the step -----------------------------------------------------------------------------------------------
    def draw_negatives(self, index: Tensor) -> Tensor:
        """``(G, K)`` negatives for the rows ``index`` ``(G,)``: for a row of class c, uniform over the training
        rows of other classes (unlabelled rows included); for an unlabelled row, over all rows. Seeded by the
        run's seed and :attr:`draws`."""
        if self._pools is None:
            raise RuntimeError(f"CRD {self.name!r}: bind_train_rows(labels) must run before training (the module's "
                               "setup does it from the DataModule).")
        order, starts, counts = self._pools
        rows = index.cpu()  # the draws are made on the CPU: one copy, which also checks the indices
        if int(rows.max()) >= order.numel():
            raise ValueError(f"CRD {self.name!r}: a batch holds dataset index {int(rows.max())}, but the memory "
                             f"bank has {order.numel()} rows: bind_train_rows(labels of every training row) first.")
        labels = self.row_labels.cpu()[rows]  # (G,)
        own = labels != UNLABELLED
        size = torch.where(own, counts[labels.clamp(min=0)], 0)  # (G,) rows of the anchor's class
        start = torch.where(own, starts[labels.clamp(min=0)], order.numel())  # (G,)
        gen = torch.Generator().manual_seed(derive_seed(run_seed(), "crd negatives", int(self.draws)))
        u = torch.rand(index.numel(), self.negatives, generator=gen, dtype=torch.float64)  # (G, K)
        pos = (u * (order.numel() - size).unsqueeze(1)).long()  # (G, K) positions among the other classes' rows
        pos = pos + size.unsqueeze(1) * (pos >= start.unsqueeze(1))  # skip the anchor's own class block
        return order[pos].to(index.device)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if not self.training:
            return {}  # the bank holds training rows: validation and test rows have no positive in it
        if self.embed_student is None or self.embed_teacher is None:
            raise RuntimeError(f"CRD {self.name!r}: its embeddings are not built; DistillationModule.build_terms("
                               "input_shape) builds them (done at setup from the DataModule).")
        if out.index is None:
            raise ValueError(f"CRD {self.name!r} needs each training row's dataset index: set "
                             "data.init_args.return_index: true.")
        n = self.memory_student.shape[0]
        index = out.index.long()  # (B,)
        if n == 0:
            raise ValueError(f"CRD {self.name!r}: the memory bank is empty: bind_train_rows(labels of every training "
                             "row) first (the module's setup does it from the DataModule).")
        f_s = self.embed_student(out.student_features[self.student_layers[0]])  # (B, D)
        f_t = self.embed_teacher(out.teacher_features[self.teacher_layers[0]].float())  # (B, D)
        world, rank = _world()
        global_index = _gather(index)  # (G,)
        b = index.numel()
        negatives = self.draw_negatives(global_index)[rank * b:(rank + 1) * b]  # (B, K)
        rows = torch.cat([index.unsqueeze(1), negatives], dim=1)  # (B, K+1): the positive first
        scores_s = crd_scores(f_s, self.memory_teacher[rows], self.nce_temperature)  # student vs teacher bank
        scores_t = crd_scores(f_t, self.memory_student[rows], self.nce_temperature)  # teacher vs student bank
        if self.normalizers[0] < 0:  # Z from the first batch, as the authors: mean score times N
            z = torch.stack([scores_s.detach().mean(), scores_t.detach().mean()]) * n
            self.normalizers.copy_(_mean_over_ranks(z))
        loss = crd_nce_loss(scores_s / self.normalizers[0], n) + crd_nce_loss(scores_t / self.normalizers[1], n)
        with torch.no_grad():  # the banks move towards this step's embeddings of every rank's rows
            all_s, all_t = _gather(f_s.detach().float()), _gather(f_t.detach().float())
            for memory, new in ((self.memory_student, all_s), (self.memory_teacher, all_t)):
                moved = memory[global_index] * self.momentum + new * (1.0 - self.momentum)
                memory.index_copy_(0, global_index, F.normalize(moved, dim=1))
            self.draws += 1
        return {self.name: loss}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, embed_dim={self.embed_dim}, negatives={self.negatives}, "
                f"nce_temperature={self.nce_temperature}, momentum={self.momentum}, "
                f"rows={self.memory_student.shape[0]}")


__all__ = ["CRD"]
