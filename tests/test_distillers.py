"""Distillation terms: each loss against hand-computed values, feature taps in the same forward passes, adapters
that belong to the run (optimised, checkpointed, restored) and not to the student, and clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
from in_process import run_cli
import torch
import torch.nn.functional as F

from kd_lightning import DistillationModule
from kd_lightning.callbacks import ScalarScheduler, TemperatureScheduler
from kd_lightning.data import DigitsDataModule
from kd_lightning.distillers import DKD, AttentionTransfer, CrossEntropy, Hint, HintonKD, StepOutputs
from kd_lightning.losses import (
    attention_map,
    attention_transfer_loss,
    channel_normalize,
    distillation_loss,
    dkd_loss,
    hint_loss,
    match_spatial,
)

ROOT = Path(__file__).resolve().parents[1]


# -- the loss functions, by hand ------------------------------------------------------------------------------
def test_hint_loss_is_the_elementwise_mse():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert hint_loss(s, t).item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    with pytest.raises(ValueError, match="equal shapes"):
        hint_loss(s, t[:, :1])


def test_attention_map_and_transfer_by_hand():
    # one row, two channels, 1x2 positions: mean over channels of a^2 at each position, then L2-normalised
    s = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # (1, 2, 1, 2): q = [(1+1)/2, (0+4)/2] = [1, 2]
    t = torch.tensor([[[[3.0, 0.0]]]])  # (1, 1, 1, 2): q = [9, 0]
    qs = torch.tensor([1.0, 2.0]) / math.sqrt(5)
    qt = torch.tensor([1.0, 0.0])
    assert torch.allclose(attention_map(s)[0], qs)
    assert torch.allclose(attention_map(t)[0], qt)
    expected = ((qs - qt) ** 2).mean().item()
    assert attention_transfer_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_attention_transfer_pools_the_larger_map():
    s = torch.arange(16.0).reshape(1, 1, 4, 4)
    t = torch.ones(1, 3, 2, 2)
    pooled = F.avg_pool2d(s, 2)
    assert attention_transfer_loss(s, t).item() == pytest.approx(attention_transfer_loss(pooled, t).item())


def test_dkd_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[3.0, 1.0, 0.0]])
    y = torch.tensor([0])
    T, alpha, beta = 2.0, 1.0, 8.0
    ps, pt = torch.softmax(s / T, -1)[0].tolist(), torch.softmax(t / T, -1)[0].tolist()
    bs, bt = [ps[0], 1 - ps[0]], [pt[0], 1 - pt[0]]
    tckd = sum(b * math.log(b / a) for a, b in zip(bs, bt)) * T * T
    hs = torch.softmax(s[0, 1:] / T, -1).tolist()  # non-target classes only
    ht = torch.softmax(t[0, 1:] / T, -1).tolist()
    nckd = sum(b * math.log(b / a) for a, b in zip(hs, ht)) * T * T
    out = dkd_loss(s, t, y, alpha, beta, T)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert out["dkd"].item() == pytest.approx(alpha * tckd + beta * nckd, rel=1e-5)
    # an unlabelled row adds nothing; soft labels use their argmax
    both = dkd_loss(torch.cat([s, s]), torch.cat([t, t]), torch.tensor([0, -100]), alpha, beta, T)
    assert both["dkd"].item() == pytest.approx(out["dkd"].item(), rel=1e-6)
    soft = dkd_loss(s, t, torch.tensor([[0.7, 0.3, 0.0]]), alpha, beta, T)
    assert soft["dkd"].item() == pytest.approx(out["dkd"].item(), rel=1e-6)


def test_dkd_term_warms_up_linearly():
    term = DKD(weight=1.0, warmup=4)
    assert [term.warmup_factor(e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    full = dkd_loss(s, t, y, 1.0, 8.0, 4.0)["dkd"]
    assert term(StepOutputs(s, [t], y, epoch=1))["dkd"].item() == pytest.approx(0.5 * full.item(), rel=1e-6)


def test_channel_normalize_and_match_spatial():
    f = torch.randn(3, 2, 4, 4) * 5 + 7
    n = channel_normalize(f)
    assert torch.allclose(n.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(n.var(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-3)
    assert match_spatial(f, (2, 2)).shape == (3, 2, 2, 2)
    assert torch.allclose(match_spatial(f, (2, 2)), F.avg_pool2d(f, 2))
    assert match_spatial(f, (8, 8)).shape == (3, 2, 8, 8)
    assert match_spatial(f, (4, 4)) is f


# -- the module ------------------------------------------------------------------------------------------------
def _module(terms=None, **kwargs) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(student="digits_cnn", student_kwargs={"channels": 4}, teacher="digits_cnn",
                              teacher_kwargs={"channels": 8}, num_classes=10, terms=terms, optim=dict(optimizer="adamw", lr=1e-2, weight_decay=0.0, lr_scheduler="none"), **kwargs)


def _feature_terms():
    return [CrossEntropy(weight=1.0), HintonKD(weight=0.5, temperature=4.0),
            # student conv2: 8 channels at 8x8; teacher pool: 16 channels at 4x4 -> adapter + pooling
            Hint(student_layer="conv2", teacher_layer="pool", weight=10.0),
            AttentionTransfer(student_layers=["conv1", "conv2"], teacher_layers=["conv1", "pool"], weight=100.0)]


def test_shorthand_is_translated_into_terms_with_exactly_the_old_numbers():
    module = _module(temperature=3.0, alpha=0.7)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, -100, 4, 5])
    out = module.step((x, y))
    new = module.losses(out)
    old = distillation_loss(out.student_logits, out.teacher_logits, y, 3.0, 0.7)
    assert torch.equal(new["loss"], old["loss"])
    assert torch.equal(new["loss_kd"], 0.7 * old["kd"]) and torch.equal(new["loss_ce"], (1 - 0.7) * old["ce"])
    assert [type(t).__name__ for t in module.terms.values()] == ["HintonKD", "CrossEntropy"]
    assert module.temperature == 3.0 and module.terms["kd"].weight == 0.7
    assert module.hparams["temperature"] == 3.0 and module.hparams["terms"] is None  # saved as given


def test_gradients_reach_student_and_adapters_never_the_teacher():
    module = _module(_feature_terms())
    module.build_terms((1, 8, 8))
    assert module.terms["hint"].adapter[0].weight.shape == (16, 8, 1, 1)  # teacher's 16 channels from 8
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    losses = module.losses(module.step((x, y)))
    assert set(losses) == {"loss", "loss_ce", "loss_kd", "loss_hint", "loss_at"}
    assert torch.allclose(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.terms["hint"].parameters())
    assert module.student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


def test_adapters_are_not_part_of_the_student():
    module = _module(_feature_terms())
    module.build_terms((1, 8, 8))
    fresh = _module(None)
    assert set(module.student.state_dict()) == set(fresh.student.state_dict())
    assert sum(p.numel() for p in module.student.parameters()) == sum(p.numel() for p in fresh.student.parameters())
    assert any(k.startswith("terms.hint.adapter.") for k in module.state_dict())
    assert not any(k.startswith("teacher.") for k in module.state_dict())


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=tmp_path, **kwargs)


class _ForwardCounter(L.Callback):
    """Counts forward calls of student and teacher inside each training step."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int]] = []
        self._now = [0, 0]

    def on_fit_start(self, trainer, pl_module) -> None:
        def counter(i):
            def hook(module, args):
                self._now[i] += 1
            return hook
        pl_module.student.register_forward_pre_hook(counter(0))
        pl_module.teacher.register_forward_pre_hook(counter(1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._now = [0, 0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counts.append(tuple(self._now))


def test_one_forward_per_network_per_step_and_adapters_trained(tmp_path):
    module = _module(_feature_terms())
    counter = _ForwardCounter()
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[counter])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert counter.counts == [(1, 1)] * 3
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.terms.parameters()}
    assert "train/loss_hint" in trainer.callback_metrics and "train/loss_at" in trainer.callback_metrics


def test_adapters_saved_in_checkpoint_and_restored_on_resume(tmp_path):
    module = _module(_feature_terms())
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    adapter = {k: v for k, v in state.items() if k.startswith("terms.hint.adapter.")}
    assert adapter and not any(k.startswith("student.") and "adapter" in k for k in state)
    # load_from_checkpoint: the adapters are built from the saved input shape before their weights load
    loaded = DistillationModule.load_from_checkpoint(ckpt, student=module.student.__class__(10, 4),
                                                     teacher=module.teacher, terms=_feature_terms())
    for key, value in adapter.items():
        assert torch.equal(loaded.state_dict()[key], value)
    # resume: a fresh module (adapters unbuilt) continues from the checkpoint with the saved adapter weights
    resumed = _module(_feature_terms())
    seen = {}

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.state_dict().items() if k.startswith("terms.")})

    trainer = _trainer(tmp_path, max_steps=4, callbacks=[Grab()])
    trainer.fit(resumed, DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    assert set(seen) == set(adapter) and all(torch.equal(seen[k], adapter[k]) for k in adapter)
    assert trainer.global_step == 4


def test_scheduler_drives_a_term_float_by_dotted_name(tmp_path):
    module = _module(_feature_terms())
    scheduler = ScalarScheduler(attribute="terms.hint.weight", schedule="linear", start=10.0, end=0.0, duration=2)
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=2, callbacks=[scheduler])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert module.terms["hint"].weight == 0.0
    assert "train/terms.hint.weight" in trainer.callback_metrics
    # the default still schedules the (first) temperature
    legacy = TemperatureScheduler(schedule="constant", start=2.0)
    module = _module(None)
    _trainer(tmp_path, max_steps=1, callbacks=[legacy]).fit(module, DigitsDataModule(batch_size=32))
    assert module.temperature == 2.0 and module.terms["kd"].temperature == 2.0


def test_bad_terms_are_clear_errors():
    with pytest.raises(ValueError, match=r"taps the student layer\(s\) \['layer3'\].*Valid layer names: conv1, conv2"):
        _module([Hint(student_layer="layer3", teacher_layer="pool")])
    with pytest.raises(ValueError, match=r"teacher layer\(s\) \['features.4'\]"):
        _module([AttentionTransfer(student_layers=["conv1"], teacher_layers=["features.4"])])
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        HintonKD(weight=-0.1)
    with pytest.raises(ValueError, match="unique"):
        _module([HintonKD(), HintonKD()])
    with pytest.raises(ValueError, match="temperature is the shorthand for terms"):
        _module([HintonKD()], temperature=2.0)
    module = _module([Hint(student_layer="conv2", teacher_layer="pool")])
    with pytest.raises(ValueError, match="not built yet"):
        module.trainable_parameters()


def _cli(tmp_path: Path, *args: str):
    return run_cli(tmp_path, *args)


@pytest.mark.parametrize("term,message", [
    ("{class_path: kd_lightning.distillers.Hint, init_args: {student_layer: layer3, teacher_layer: net.0}}",
     "taps the student layer(s) ['layer3'], but the student (MLP) has no such submodule. Valid layer names: net"),
    ("{class_path: kd_lightning.distillers.HintonKD, init_args: {weight: -1}}", "weight must be a number >= 0"),
])
def test_bad_terms_from_yaml_stop_before_anything_is_written(tmp_path, term, message):
    config = tmp_path / "terms.yaml"
    config.write_text(f"model:\n  init_args:\n    terms:\n      kd: {term}\n")
    result = _cli(tmp_path, "fit", f"--config={ROOT / 'experiments/digits/base.yaml'}",
                  f"--config={ROOT / 'experiments/digits/kd.yaml'}", f"--config={config}", "--teacher_run=null")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_hint_run_through_the_command_line_trains_tests_and_resumes(tmp_path):
    """A YAML run with a hint term (2-d features: linear + BN adapter): fit, test its checkpoint, resume it."""
    config = tmp_path / "hint.yaml"
    config.write_text(
        "teacher_run: null\nname: digits/hint\nmodel:\n  init_args:\n    terms:\n"
        "      ce: {class_path: kd_lightning.distillers.CrossEntropy, init_args: {weight: 0.1}}\n"
        "      kd: {class_path: kd_lightning.distillers.HintonKD, init_args: {weight: 0.9, temperature: 4.0}}\n"
        "      hint:\n        class_path: kd_lightning.distillers.Hint\n"
        "        init_args: {weight: 1.0, student_layer: net.1, teacher_layer: net.1, normalize: true}\n"
        "trainer:\n  max_epochs: 1\n  limit_train_batches: 3\n"
        "  limit_val_batches: 2\n  enable_progress_bar: false\n")
    configs = [f"--config={ROOT / 'experiments/digits/base.yaml'}", f"--config={ROOT / 'experiments/digits/kd.yaml'}",
               f"--config={config}"]
    fit = _cli(tmp_path, "fit", *configs)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "logs/digits/hint/version_0"
    ckpt = next((run_dir / "checkpoints").glob("last*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert "terms.hint.adapter.0.weight" in state and state["terms.hint.adapter.0.weight"].shape == (256, 32)
    test = _cli(tmp_path, "test", *configs, f"--ckpt_path={ckpt}")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/loss_hint" in test.stdout
    resumed = _cli(tmp_path, "fit", *configs, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = torch.load(next((run_dir / "checkpoints").glob("last*.ckpt")), weights_only=True)
    assert after["epoch"] == 1 and not torch.equal(after["state_dict"]["terms.hint.adapter.0.weight"],
                                                   state["terms.hint.adapter.0.weight"])


def test_mixup_refuses_extra_per_sample_fields():
    from types import SimpleNamespace

    dm = DigitsDataModule(batch_size=4, mixup_alpha=0.4)
    dm.trainer = SimpleNamespace(training=True, current_epoch=0, is_last_batch=False, global_rank=0)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed = dm.on_after_batch_transfer([x, y], 0)
    assert mixed[1].shape == (4, 10)  # mixed into soft labels
    with pytest.raises(ValueError, match=r"1 more per-sample field\(s\) \(index\)"):
        dm.on_after_batch_transfer([x, y, torch.arange(4)], 0)
    noisy = DigitsDataModule(batch_size=4, noise_std=0.1)  # noise pairs no rows: extra fields pass through
    noisy.trainer = dm.trainer
    out = noisy.on_after_batch_transfer([x, y, torch.arange(4)], 0)
    assert torch.equal(out[2], torch.arange(4))


def test_num_classes_from_networks_given_as_modules():
    from kd_lightning.models import build_model

    module = DistillationModule(student=build_model("digits_cnn", 7, channels=4),
                                teacher=build_model("digits_cnn", 7, channels=8))
    assert module.num_classes == 7
    with pytest.raises(ValueError, match="student's head gives 5 class scores but the teacher's gives 7"):
        DistillationModule(student=build_model("digits_cnn", 5), teacher=build_model("digits_cnn", 7))


def test_batch_contract_index_reaches_terms_and_cached_teacher_logits_skip_the_teacher(tmp_path):
    from kd_lightning.distillers import DistillationTerm

    class Recorder(DistillationTerm):
        """A stand-in for a memory-bank method: it sees the rows' dataset indices."""

        default_name = "rec"

        def __init__(self) -> None:
            super().__init__(weight=0.0)
            self.seen: list[list[int]] = []

        def forward(self, out):
            self.seen.append(out.index.tolist())
            return {self.name: out.student_logits.sum() * 0}

    recorder = Recorder()
    module = _module([CrossEntropy(), recorder])
    dm = DigitsDataModule(batch_size=16, return_index=True)
    _trainer(tmp_path, max_epochs=1, limit_train_batches=3).fit(module, dm)
    assert len(recorder.seen) == 3 and all(len(rows) == 16 for rows in recorder.seen)
    seen = [i for rows in recorder.seen for i in rows]
    assert len(set(seen)) == len(seen) and all(0 <= i < len(dm.train_set) for i in seen)
    # offline distillation: cached teacher logits in the batch, no teacher forward pass
    module = _module([HintonKD(weight=1.0, temperature=2.0)])
    calls = []
    module.teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    x, y, cached = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.randn(4, 10)
    out = module.step((x, y, None, cached))
    assert not calls and out.teacher_logits[0] is not None and torch.equal(out.teacher_logits[0], cached)
    assert module.losses(out)["loss_kd"].item() == pytest.approx(
        distillation_loss(out.student_logits, cached, y, 2.0, 1.0)["kd"].item(), rel=1e-6)


# -- the seam: a new method is one file plus a YAML file --------------------------------------------------------
FIFTH_METHOD = '''
"""Similarity-preserving KD (Tung & Mori, ICCV 2019): match the row-normalised (B, B) similarity matrices of a
student and a teacher layer over the batch, ||norm(S S^T) - norm(T T^T)||_F^2 / B^2."""
import torch.nn.functional as F

from kd_lightning.distillers import DistillationTerm


def similarity_preserving_loss(student, teacher):
    s, t = student.flatten(1), teacher.flatten(1)  # (B, C*H*W)
    gs, gt = F.normalize(s @ s.T, dim=1), F.normalize(t @ t.T, dim=1)  # (B, B)
    return (gs - gt).pow(2).sum() / s.shape[0] ** 2


class SimilarityPreserving(DistillationTerm):
    default_name = "sp"

    def __init__(self, weight=1.0, student_layer="", teacher_layer="", name=None):
        super().__init__(weight, name, [student_layer], [teacher_layer])

    def forward(self, out):
        s, t = out.student_features[self.student_layers[0]], out.teacher_features[self.teacher_layers[0]]
        return {self.name: similarity_preserving_loss(s, t)}
'''


def test_a_fifth_method_is_one_python_file_plus_a_yaml_file(tmp_path, monkeypatch):
    """A method kd_lightning does not ship, written in the user's own file and named by class_path from YAML: no
    kd_lightning file is edited, and its feature taps, logging and weight work as for the built-in terms."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kd_lightning.commands.cli import cli_main

    (tmp_path / "my_methods.py").write_text(FIFTH_METHOD)
    (tmp_path / "sp.yaml").write_text("""
teacher_run: null   # a random teacher: the test is about the seam, not about what is learnt
model:
  class_path: kd_lightning.DistillationModule
  init_args:
    student: mlp
    student_kwargs: {hidden: [32]}
    teacher: mlp
    teacher_kwargs: {hidden: [64, 64]}
    terms:
      - {class_path: kd_lightning.distillers.CrossEntropy, init_args: {weight: 1.0}}
      - class_path: my_methods.SimilarityPreserving
        init_args: {weight: 3.0, student_layer: net.1, teacher_layer: net.3}
""")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", f"--config={ROOT / 'experiments/digits/base.yaml'}", "--config=sp.yaml",
                    "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
                    "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.devices=1"])
    term = cli.model.terms["sp"]
    assert type(term).__module__ == "my_methods" and term.weight == 3.0
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    sp = [e.value for e in events.Scalars("train/loss_sp")]
    ce = [e.value for e in events.Scalars("train/loss_ce")]
    total = [e.value for e in events.Scalars("train/loss")]
    assert len(sp) == 3 and all(v > 0 for v in sp)
    assert total == pytest.approx([a + b for a, b in zip(ce, sp)], rel=1e-5)
