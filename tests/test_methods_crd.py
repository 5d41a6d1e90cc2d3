"""CRD (Tian et al. 2020): the loss and the memory bank against a reference written from the authors' code
(RepDistiller's ContrastMemory / ContrastLoss / Embed), the negatives' sampling, exact resume of the bank, DDP equal
to one process on the same global batches, and the data contract (dataset indices) checked before training."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from kd_lightning import DistillationModule
from kd_lightning.data import DigitsDataModule
from kd_lightning.distillers import CRD, CrossEntropy, StepOutputs
from kd_lightning.losses import crd_nce_loss
from kd_lightning.models.small import MLP


# -- the reference: the authors' forward pass, re-derived ----------------------------------------------------------
def reference_embed(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    x = linear(x.view(x.shape[0], -1))
    norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
    return x.div(norm)


def reference_contrast_loss(x: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1.0 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


def reference_crd(v1, v2, memory_v1, memory_v2, idx, y, t, momentum, n_data):
    """Returns the loss, and updates the memories in place (memory_v1: the student's, memory_v2: the teacher's)."""
    bsz, k1 = idx.shape
    d = memory_v1.size(1)
    weight_v1 = torch.index_select(memory_v1, 0, idx.view(-1)).detach().view(bsz, k1, d)
    out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(bsz, d, 1)), t))
    weight_v2 = torch.index_select(memory_v2, 0, idx.view(-1)).detach().view(bsz, k1, d)
    out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(bsz, d, 1)), t))
    z_v1 = (out_v1.mean() * n_data).detach().item()
    z_v2 = (out_v2.mean() * n_data).detach().item()
    out_v1, out_v2 = torch.div(out_v1, z_v1).contiguous(), torch.div(out_v2, z_v2).contiguous()
    with torch.no_grad():
        for memory, v in ((memory_v1, v1), (memory_v2, v2)):
            l_pos = torch.index_select(memory, 0, y.view(-1))
            l_pos.mul_(momentum).add_(torch.mul(v, 1 - momentum))
            memory.index_copy_(0, y, l_pos.div(l_pos.pow(2).sum(1, keepdim=True).pow(0.5)))
    loss = reference_contrast_loss(out_v1.squeeze(-1), n_data) + reference_contrast_loss(out_v2.squeeze(-1), n_data)
    return loss.squeeze()


def _bound_term(n: int = 40, classes: int = 4, negatives: int = 12, **kwargs) -> tuple[CRD, torch.Tensor]:
    torch.manual_seed(0)
    term = CRD(embed_dim=8, negatives=negatives, **kwargs)
    term.build({"pool": torch.zeros(2, 6, 1, 1)}, {"pool": torch.zeros(2, 10, 1, 1)})
    labels = torch.arange(n) % classes
    term.bind_train_rows(labels)
    return term.train(), labels


def test_crd_loss_gradients_and_bank_update_equal_the_authors_forward():
    term, labels = _bound_term()
    gen = torch.Generator().manual_seed(1)
    feat_s = torch.randn(5, 6, 1, 1, generator=gen, requires_grad=True)
    feat_t = torch.randn(5, 10, 1, 1, generator=gen)
    index = torch.tensor([3, 17, 22, 8, 39])
    contrast = torch.cat([index[:, None], term.draw_negatives(index)], 1)  # the draw forward will make
    # the reference's copies of everything
    lin_s, lin_t = nn.Linear(6, 8), nn.Linear(10, 8)
    lin_s.load_state_dict(term.embed_student.linear.state_dict())
    lin_t.load_state_dict(term.embed_teacher.linear.state_dict())
    mem_s, mem_t = term.memory_student.clone(), term.memory_teacher.clone()
    ref_feat_s = feat_s.detach().clone().requires_grad_(True)

    loss = term(StepOutputs(torch.zeros(5, 4), [], labels[index], {"pool": feat_s}, {"pool": feat_t},
                            index=index))["crd"]
    ref = reference_crd(reference_embed(lin_s, ref_feat_s), reference_embed(lin_t, feat_t), mem_s, mem_t,
                        contrast, index, 0.07, 0.5, 40)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(feat_s.grad, ref_feat_s.grad)
    torch.testing.assert_close(term.embed_student.linear.weight.grad, lin_s.weight.grad)
    torch.testing.assert_close(term.embed_teacher.linear.weight.grad, lin_t.weight.grad)
    torch.testing.assert_close(term.memory_student, mem_s)  # the banks moved exactly as the authors' do
    torch.testing.assert_close(term.memory_teacher, mem_t)
    assert not torch.equal(term.memory_student[index], _bound_term()[0].memory_student[index])
    assert int(term.draws) == 1 and term.normalizers.min() > 0
    # the bank's initialisation: uniform in +-1/sqrt(D/3), as the authors'
    fresh, _ = _bound_term()
    bound = 1 / math.sqrt(8 / 3)
    assert fresh.memory_student.abs().max() <= bound and fresh.memory_student.abs().max() > 0.9 * bound


def test_nce_loss_by_hand():
    p = torch.tensor([[0.5, 0.1, 0.2]])  # one row, positive then K = 2 negatives, N = 4: K * Pn = 0.5
    expected = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.6) + math.log(0.5 / 0.7))
    assert crd_nce_loss(p, 4, eps=0.0).item() == pytest.approx(expected)


def test_negatives_come_from_other_classes_and_cover_them_uniformly():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, -100, -100])  # two unlabelled rows
    term = CRD(embed_dim=4, negatives=20000)
    term.build({"pool": torch.zeros(2, 3)}, {"pool": torch.zeros(2, 3)})
    term.bind_train_rows(labels)
    index = torch.tensor([0, 3, 5, 6])
    negatives = term.draw_negatives(index)  # (4, K)
    for row, anchor in zip(negatives, index):
        drawn = torch.bincount(row, minlength=8).float() / row.numel()
        if labels[anchor] >= 0:
            allowed = labels != labels[anchor]
            assert drawn[~allowed].sum() == 0  # never a row of the anchor's own class
        else:
            allowed = torch.ones(8, dtype=torch.bool)  # an unlabelled anchor: any row
        torch.testing.assert_close(drawn[allowed], torch.full((int(allowed.sum()),), 1 / int(allowed.sum())),
                                   atol=0.015, rtol=0)
    # seeded by the steps taken: the same draw again, another one after a step
    assert torch.equal(negatives, term.draw_negatives(index))
    term.draws += 1
    assert not torch.equal(negatives, term.draw_negatives(index))


def test_crd_needs_dataset_indices_and_says_so_before_training(tmp_path):
    module = _digits_module()
    with pytest.raises(ValueError, match=r"\['crd'\] read each training row's dataset index.*return_index: true"):
        module.check_data(DigitsDataModule())
    for bad, message in [(dict(negatives=0), "negatives must be an integer >= 1"),
                         (dict(nce_temperature=0.0), "nce_temperature must be > 0"),
                         (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
                         (dict(embed_dim=2.5), "embed_dim must be an integer")]:
        with pytest.raises(ValueError, match=message):
            CRD(**bad)


# -- exact resume: the bank, Z and the draws come back from the checkpoint -----------------------------------------
def _digits_module() -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(student=MLP(10, 64, (16,), 0.0), teacher=MLP(10, 64, (32,), 0.0), num_classes=10,
                              optim=dict(lr=0.05, lr_scheduler="none"),
                              terms={"ce": CrossEntropy(), "crd": CRD(weight=0.8, student_layer="net.1",
                                                                     teacher_layer="net.1", embed_dim=8,
                                                                     negatives=32)})


CRD_RUN = """
name: digits/crd
data: {init_args: {return_index: true}}
model:
  init_args:
    terms:
      ce: {class_path: kd_lightning.distillers.CrossEntropy}
      crd:
        class_path: kd_lightning.distillers.CRD
        init_args: {student_layer: net.2, teacher_layer: net.5, embed_dim: 16, negatives: 64}
"""


@pytest.mark.skipif(sys.platform != "linux", reason="signals and fork as on a Linux cluster")
def test_crd_killed_and_resumed_is_the_uninterrupted_run(tmp_path):
    from test_resume import assert_same_run, fit, kd_args, kill_at, load

    config = tmp_path / "crd.yaml"
    config.write_text(CRD_RUN)
    full = fit(tmp_path, *kd_args("full", 3, config=config))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = fit(tmp_path, *kd_args("cut", 3, kill_at(2, 5), config=config))
    assert killed.returncode != 0
    last = tmp_path / "logs/cut/version_0/checkpoints/last.ckpt"
    saved = load(last)["state_dict"]
    data = DigitsDataModule(return_index=True)
    data.setup("fit")
    assert saved["terms.crd.memory_student"].shape == (len(data.train_set), 16)  # one bank row per training row
    assert int(saved["terms.crd.draws"]) == load(last)["global_step"] > 0 and saved["terms.crd.normalizers"].min() > 0
    resumed = fit(tmp_path, *kd_args("cut", 3, f"--ckpt_path={last}", config=config))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "logs/cut/version_0", tmp_path / "logs/full/version_0")  # banks and draws included
    # a module loaded without the data takes the bank's size from the checkpoint
    module = _digits_module()
    module.terms["crd"] = CRD(student_layer="net.1", teacher_layer="net.1", embed_dim=16, negatives=64)
    module.terms["crd"].rename("crd")
    module.terms["crd"].build({"net.1": torch.zeros(2, 16)}, {"net.1": torch.zeros(2, 32)})
    state = {k: v for k, v in saved.items() if k.startswith("terms.crd.memory")}
    module.terms["crd"].load_state_dict({k.removeprefix("terms.crd."): v for k, v in state.items()}, strict=False)
    assert torch.equal(module.terms["crd"].memory_teacher, saved["terms.crd.memory_teacher"])


# -- DDP: two processes equal one on the same global batches -----------------------------------------------------
class _RankMajor(Sampler):
    """Per step of 2 x 8 rows: under DDP rank r takes rows r, r + 2, ...; in one process the 16 rows come in the
    order the two ranks' rows are gathered (rank 0's, then rank 1's), so the draws for the global batch agree."""

    def __init__(self, n: int, per_rank: int = 8) -> None:
        self.n, self.per_rank = n, per_rank

    def _world(self) -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def _rows(self) -> list[int]:
        rank, world = self._world()
        rows = []
        for start in range(0, self.n, 2 * self.per_rank):
            block = list(range(start, start + 2 * self.per_rank))
            ranks = [block[r::2] for r in range(2)]
            rows += ranks[rank] if world == 2 else ranks[0] + ranks[1]
        return rows

    def __iter__(self):
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self._rows())


class _Save(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.out)


def _ddp_run(tmp_path: Path, devices: int) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    net = lambda c: nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(c * 64, 4))
    module = DistillationModule(student=net(3), teacher=net(6), num_classes=4,
                                optim=dict(lr=0.1, lr_scheduler="none", weight_decay=0.0),
                                terms=[CrossEntropy(), CRD(weight=1.0, student_layer="2", teacher_layer="2",
                                                           embed_dim=8, negatives=16)])
    module.build_terms((1, 8, 8))
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (64,), generator=gen)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=gen), labels, torch.arange(64))
    module.bind_train_rows(labels)
    out = tmp_path / f"crd_{devices}.pt"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                         max_steps=4, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[_Save(out)])
    trainer.fit(module, DataLoader(data, batch_size=16 // devices, sampler=_RankMajor(64)))
    return torch.load(out, weights_only=True)


@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                    reason="needs fork and torch.distributed (gloo)")
def test_crd_under_ddp_equals_one_process(tmp_path):
    two = _ddp_run(tmp_path, devices=2)
    one = _ddp_run(tmp_path, devices=1)
    assert int(one["terms.crd.draws"]) == int(two["terms.crd.draws"]) == 4
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(one[key].float(), two[key].float(), atol=1e-5, rtol=1e-5, msg=key)
