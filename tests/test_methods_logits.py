"""Logit methods beyond KD and DKD: DIST, logit standardisation (for KD, DKD and CTKD) and CTKD's learned
temperature, each against an independent reference written in the style of the authors' published code (values and
gradients), by hand where a value is easy to derive, and inside a training run."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kd_lightning import DistillationModule
from kd_lightning.data import DigitsDataModule
from kd_lightning.distillers import CTKD, DIST, DKD, CrossEntropy, HintonKD, StepOutputs
from kd_lightning.losses import (
    cosine_curriculum,
    ctkd_temperature,
    dist_loss,
    dkd_loss,
    reverse_gradient,
    soft_kd_loss,
    standardize_logits,
)


# -- independent references, re-derived in the authors' style ----------------------------------------------------
def ref_pearson_rows(a, b, eps=1e-8):
    """hunto/DIST_KD (image_classification_sota lib/models/losses/dist_kd.py): rows centred, then cosine."""
    a = a - a.mean(1).unsqueeze(1)
    b = b - b.mean(1).unsqueeze(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def ref_dist(z_s, z_t, beta, gamma, tau):
    """The authors' DIST(beta, gamma, tau).forward: softmax(z / tau), tau^2 * (1 - mean Pearson), rows then columns."""
    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = tau ** 2 * (1 - ref_pearson_rows(y_s, y_t).mean())
    intra = tau ** 2 * (1 - ref_pearson_rows(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
    return beta * inter + gamma * intra, inter, intra


def ref_zscore(z):
    """sunshangquan/logit-standardization-KD `normalize`: (z - mean) / (1e-7 + std), std unbiased (torch default);
    written out by hand here rather than with torch.std."""
    mean = z.sum(-1, keepdim=True) / z.shape[-1]
    std = (((z - mean) ** 2).sum(-1, keepdim=True) / (z.shape[-1] - 1)).sqrt()
    return (z - mean) / (1e-7 + std)


def ref_kd(s, t, T, logit_stand=False):
    """The logit-standardization repo's kd_loss (mdistiller style): KL with a probability target, summed over
    classes, mean over rows, times T^2."""
    if logit_stand:
        s, t = ref_zscore(s), ref_zscore(t)
    log_pred_student = F.log_softmax(s / T, dim=1)
    pred_teacher = F.softmax(t / T, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * T ** 2


def ref_dkd(s, t, target, alpha, beta, T, logit_stand=False):
    """mdistiller / logit-standardization `dkd_loss`: binary [p_gt, p_rest] KL and the non-target KL computed with
    the target logit pushed down by 1000, each summed and divided by the batch size, times T^2."""
    if logit_stand:
        s, t = ref_zscore(s), ref_zscore(t)
    gt = torch.zeros_like(s).scatter_(1, target.unsqueeze(1), 1).bool()
    other = ~gt
    p_s, p_t = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)

    def cat(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], dim=1)

    b_s, b_t = cat(p_s), cat(p_t)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T ** 2 / target.shape[0]
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, dim=1), F.softmax(t / T - 1000.0 * gt, dim=1),
                    reduction="sum") * T ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def ref_cosine_decay(i, max_value, min_value, num_loops):
    """zhengli97/CTKD train_student.py CosineDecay.get_value: the factor the authors' GRL multiplies gradients by."""
    i = min(max(i, 0), num_loops)
    return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


def _logits(b=6, k=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g) * scale, torch.randn(b, k, generator=g) * scale


# -- DIST ----------------------------------------------------------------------------------------------------------
def test_dist_by_hand_two_classes():
    # with two classes every row (and every column over two rows) is perfectly correlated or anti-correlated
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # rows prefer class 0, class 1
    t = torch.tensor([[0.0, 1.0], [3.0, 0.0]])  # rows prefer class 1, class 0: both rows anti-correlated
    out = dist_loss(s, t, beta=1.0, gamma=1.0, temperature=1.0)
    assert out["inter"].item() == pytest.approx(2.0, abs=1e-6)  # 1 - mean(-1, -1)
    assert out["intra"].item() == pytest.approx(2.0, abs=1e-6)  # p(class 0) falls down the batch for s, rises for t
    assert out["dist"].item() == pytest.approx(4.0, abs=1e-6)
    same = dist_loss(s, s, temperature=4.0)
    assert same["dist"].item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_the_authors_loss_values_and_gradients(beta, gamma, tau):
    s0, t = _logits()
    s = s0.clone().requires_grad_(True)
    out = dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau)
    ref_s = s0.clone().requires_grad_(True)
    ref, inter, intra = ref_dist(ref_s, t, beta, gamma, tau)
    assert_close(out["dist"], ref)
    assert_close(out["inter"], inter)
    assert_close(out["intra"], intra)
    out["dist"].backward()
    ref.backward()
    assert s.grad.abs().sum() > 0
    assert_close(s.grad, ref_s.grad)


def test_dist_term_uses_the_main_head_and_every_row():
    s, t = _logits()
    other_head = torch.randn_like(t)
    term = DIST(weight=2.0, temperature=4.0)
    labelled = term(StepOutputs(s, [t, other_head], torch.arange(6) % 7))
    unlabelled = term(StepOutputs(s, [t], torch.full((6,), -100)))
    assert set(labelled) == {"dist"}
    expected = ref_dist(s, t, 1.0, 1.0, 4.0)[0]
    assert_close(labelled["dist"], expected)  # unweighted; the module applies the weight
    assert_close(unlabelled["dist"], expected)  # labels play no part
    assert DIST().temperature == 1.0 and DIST().beta == 1.0 and DIST().gamma == 1.0  # the authors' defaults


# -- logit standardisation -----------------------------------------------------------------------------------------
def test_standardize_logits_by_hand_uses_the_unbiased_std():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 2.0, 4.0]])  # means 2, unbiased std 1 and 2
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-2.0 / 2, 0.0, 2.0 / 2]]) / (1 + 1e-7)
    assert_close(standardize_logits(z), expected)
    two = standardize_logits(torch.tensor([[0.0, 2.0]]))  # unbiased std sqrt(2) (the biased one would give +-1)
    assert_close(two, torch.tensor([[-1.0, 1.0]]) / math.sqrt(2))
    s, _ = _logits(seed=3)
    assert_close(standardize_logits(s), ref_zscore(s))
    assert standardize_logits(s.half()).dtype == torch.float32


def test_standardize_false_is_bit_identical_to_the_old_terms():
    s, t = _logits(seed=1)
    t2 = torch.randn_like(t)
    y = torch.tensor([0, 1, 2, -100, 4, 5])
    out = StepOutputs(s, [t, t2], y, epoch=2)
    # HintonKD: the old forward was soft_kd_loss(student, heads, T, teacher_weights)
    for weights in (None, [1.0, 0.3]):
        new = HintonKD(temperature=3.0, teacher_weights=weights)(out)["kd"]
        assert torch.equal(new, soft_kd_loss(s, [t, t2], 3.0, weights))
        assert torch.equal(HintonKD(temperature=3.0, teacher_weights=weights, standardize=False)(out)["kd"], new)
    # DKD: the old forward was warmup_factor(epoch) * dkd_loss(student, main head, targets, alpha, beta, T)["dkd"]
    term = DKD(alpha=1.0, beta=8.0, temperature=4.0, warmup=4)
    old = term.warmup_factor(2) * dkd_loss(s, t, y, 1.0, 8.0, 4.0)["dkd"]
    assert torch.equal(term(out)["dkd"], old)
    assert torch.equal(DKD(warmup=4, standardize=False)(out)["dkd"], old)
    assert not torch.equal(DKD(warmup=4, standardize=True)(out)["dkd"], old)


def test_kd_with_standardization_matches_the_authors_values_and_gradients():
    s0, t = _logits(seed=2)
    s = s0.clone().requires_grad_(True)
    loss = HintonKD(temperature=2.0, standardize=True)(StepOutputs(s, [t], torch.zeros(6, dtype=torch.long)))["kd"]
    ref_s = s0.clone().requires_grad_(True)
    ref = ref_kd(ref_s, t, 2.0, logit_stand=True)
    assert_close(loss, ref)
    assert not torch.allclose(loss, ref_kd(s0, t, 2.0))  # standardising changes the loss
    loss.backward()
    ref.backward()
    assert_close(s.grad, ref_s.grad)
    # only the relations count: the student's logits may be scaled and shifted row by row
    moved = HintonKD(temperature=2.0, standardize=True)(StepOutputs(3.0 * s0 + 5.0, [t], torch.zeros(6)))["kd"]
    assert_close(moved, loss.detach())


def test_dkd_with_standardization_matches_the_authors_values_and_gradients():
    s0, t = _logits(seed=4)
    y = torch.tensor([0, 3, 6, 2, 2, 5])
    s = s0.clone().requires_grad_(True)
    term = DKD(alpha=9.0, beta=72.0, temperature=2.0, warmup=20, standardize=True)
    loss = term(StepOutputs(s, [t], y, epoch=4))["dkd"]  # warm-up (4 + 1) / 20 as the authors' epoch 5
    ref_s = s0.clone().requires_grad_(True)
    ref = min(5 / 20, 1.0) * ref_dkd(ref_s, t, y, 9.0, 72.0, 2.0, logit_stand=True)
    assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref.backward()
    assert_close(s.grad, ref_s.grad, rtol=1e-4, atol=1e-6)
    # an unlabelled row adds nothing (it has no target class)
    more = term(StepOutputs(torch.cat([s0, s0[:1]]), [torch.cat([t, t[:1]])], torch.cat([y, torch.tensor([-100])]),
                            epoch=4))["dkd"]
    assert_close(more, loss.detach())


# -- CTKD ----------------------------------------------------------------------------------------------------------
def test_cosine_curriculum_is_the_authors_cosine_decay_reversed():
    for epoch in range(0, 14):  # the authors' loop counts epochs from 1; their factor runs from 0 to -1
        assert cosine_curriculum(epoch, 0.0, 1.0, 10) == pytest.approx(-ref_cosine_decay(epoch, 0.0, -1.0, 10))
    assert cosine_curriculum(5, 0.0, 1.0, 10) == pytest.approx(0.5)
    assert cosine_curriculum(3, 0.2, 0.7, 0) == 0.7
    term = CTKD()
    assert [term.strength(e) for e in (0, 4, 9, 30)] == [cosine_curriculum(e + 1) for e in (0, 4, 9, 30)]
    assert term.strength(9) == 1.0


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.tensor([0.5, -2.0], requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    assert_close(x.grad, torch.tensor([-0.6, -1.5]))


@pytest.mark.parametrize("standardize", [False, True])
def test_ctkd_temperature_gets_the_reversed_gradient_and_the_student_plain_kd(standardize):
    s0, t = _logits(seed=5)
    term = CTKD(standardize=standardize)
    with torch.no_grad():
        term.raw_temperature.fill_(0.3)
    temperature = 1.0 + 20.0 * torch.sigmoid(torch.tensor(0.3)).item()
    assert term.learned_temperature == pytest.approx(temperature)
    s = s0.clone().requires_grad_(True)
    epoch = 4
    lam = -ref_cosine_decay(epoch + 1, 0.0, -1.0, 10)  # the authors' factor at their epoch 5
    loss = term(StepOutputs(s, [t], torch.zeros(6, dtype=torch.long), epoch=epoch))["ctkd"]
    loss.backward()
    # reference without reversal: the authors' t_start + t_end * sigmoid(global_T), KL * T * T
    raw = torch.tensor(0.3, requires_grad=True)
    ref_s = s0.clone().requires_grad_(True)
    T = 1.0 + 20.0 * torch.sigmoid(raw)
    ref = ref_kd(ref_s, t, T, logit_stand=standardize)
    ref.backward()
    assert_close(loss, ref)
    assert raw.grad.abs() > 0
    assert_close(term.raw_temperature.grad, -lam * raw.grad)
    # the student's gradient is plain KD at that (fixed) temperature
    plain_s = s0.clone().requires_grad_(True)
    ref_kd(plain_s, t, temperature, logit_stand=standardize).backward()
    assert_close(s.grad, plain_s.grad)
    assert_close(s.grad, ref_s.grad)


def test_ctkd_full_reversal_and_the_temperature_is_no_schedulable_temperature():
    s, t = _logits(seed=6)
    term = CTKD(curriculum_epochs=0, min_temperature=2.0, temperature_range=4.0)
    raw = torch.tensor(1.0, requires_grad=True)
    ref_kd(s, t, 2.0 + 4.0 * torch.sigmoid(raw)).backward()
    term(StepOutputs(s, [t], torch.zeros(6, dtype=torch.long), epoch=0))["ctkd"].backward()
    assert_close(term.raw_temperature.grad, -raw.grad)  # lambda_end = 1 from the first epoch
    assert not hasattr(term, "temperature")
    assert ctkd_temperature(torch.tensor(1.0), 1.0, 2.0, 4.0).item() == pytest.approx(2.0 + 4.0 / (1 + math.exp(-1)))


# -- clear errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: DIST(temperature=0.0), r"DIST: temperature must be a number > 0"),
    (lambda: DIST(beta=-1.0), r"DIST: beta .* must be a number >= 0"),
    (lambda: DIST(gamma="2"), r"DIST: gamma .* must be a number >= 0"),
    (lambda: CTKD(min_temperature=0.0), r"CTKD: min_temperature must be a number > 0"),
    (lambda: CTKD(temperature_range=-1.0), r"CTKD: temperature_range .* >= 0"),
    (lambda: CTKD(lambda_end=-0.5), r"CTKD: lambda_end .* >= 0"),
    (lambda: CTKD(curriculum_epochs=2.5), r"CTKD: curriculum_epochs must be a whole number"),
    (lambda: CTKD(standardize="yes"), r"CTKD: standardize must be true or false"),
    (lambda: HintonKD(standardize=1), r"HintonKD: standardize must be true or false"),
    (lambda: DKD(standardize=None), r"DKD: standardize must be true or false"),
])
def test_bad_arguments_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- inside a training run -----------------------------------------------------------------------------------------
def test_the_terms_train_inside_a_distillation_module(tmp_path):
    torch.manual_seed(0)
    terms = {"ce": CrossEntropy(weight=1.0), "dist": DIST(weight=2.0, temperature=4.0),
             "ctkd": CTKD(weight=0.5), "kd": HintonKD(weight=1.0, temperature=2.0, standardize=True),
             "dkd": DKD(weight=1.0, temperature=2.0, warmup=1, standardize=True)}
    module = DistillationModule(student="digits_cnn", student_kwargs={"channels": 4}, teacher="digits_cnn",
                                teacher_kwargs={"channels": 8}, num_classes=10, terms=terms,
                                optim=dict(optimizer="adamw", lr=1e-2, weight_decay=0.0, lr_scheduler="none"))
    assert set(module.temperatures()) == {"dist", "kd", "dkd"}  # CTKD's learned temperature is not one of them
    before = module.terms["ctkd"].learned_temperature
    student_before = module.student.conv1.weight.detach().clone()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, max_steps=3)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    for name in terms:
        assert torch.isfinite(trainer.callback_metrics[f"train/loss_{name}"])
    assert [k for k in trainer.callback_metrics if "ctkd" in k] == ["train/loss_ctkd"]  # nothing else from CTKD
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and [id(p) for p in groups[1]["params"]] == [id(module.terms["ctkd"].raw_temperature)]
    assert module.terms["ctkd"].learned_temperature != before  # the temperature is trained (reversed gradient)
    assert not torch.equal(module.student.conv1.weight, student_before)
    assert "terms.ctkd.raw_temperature" in module.state_dict()
