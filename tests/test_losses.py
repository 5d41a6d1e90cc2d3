"""The distillation loss against hand-computed values and its defining properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import DistillationLoss, distillation_loss, hard_loss, kl_divergence, soft_kd_loss

S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])  # student logits (B=2, C=3)
T_ = torch.tensor([[1.5, 1.0, -0.5], [-1.0, 0.0, 2.0]])  # teacher logits
Y = torch.tensor([0, 2])


def _softmax(row, temp):
    exps = [math.exp(v / temp) for v in row]
    return [e / sum(exps) for e in exps]


def _hand_kd(student, teacher, temp):
    """T^2 * mean over rows of sum_c p_t log(p_t / p_s), written out with plain floats."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_s, p_t = _softmax(s_row, temp), _softmax(t_row, temp)
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    return temp * temp * total / len(student)


def _hand_ce(student, targets):
    rows = [(s, y) for s, y in zip(student.tolist(), targets.tolist()) if y != -100]
    if not rows:
        return 0.0
    return sum(-math.log(_softmax(s, 1.0)[y]) for s, y in rows) / len(rows)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_matches_hand_computed_values(temp, alpha):
    out = distillation_loss(S, T_, Y, temperature=temp, alpha=alpha)
    kd, ce = _hand_kd(S, T_, temp), _hand_ce(S, Y)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)
    assert set(out) == {"loss", "kd", "ce"}


def test_zero_for_equal_logits():
    out = distillation_loss(S, S.clone(), Y, temperature=3.0, alpha=1.0)
    assert out["kd"].abs().item() < 1e-6
    assert out["loss"].abs().item() < 1e-6


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_scaled_kl():
    assert distillation_loss(S, T_, Y, 4.0, alpha=0.0)["loss"].item() == pytest.approx(
        F.cross_entropy(S, Y).item(), rel=1e-6)
    kl = F.kl_div(F.log_softmax(S / 4, -1), F.softmax(T_ / 4, -1), reduction="batchmean")
    assert distillation_loss(S, T_, Y, 4.0, alpha=1.0)["loss"].item() == pytest.approx(16 * kl.item(), rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 2.0, 8.0])
def test_gradient_is_t_squared_scaled(temp):
    """d kd / d s = (T / B) (softmax(s/T) - softmax(t/T)): the T^2 factor cancels the 1/T^2 shrinkage."""
    s = S.clone().requires_grad_(True)
    distillation_loss(s, T_, Y, temperature=temp, alpha=1.0)["loss"].backward()
    expected = (temp / len(S)) * (F.softmax(S / temp, -1) - F.softmax(T_ / temp, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)
    # and without T^2 the gradient would be T^2 times smaller
    s2 = S.clone().requires_grad_(True)
    kl_divergence(s2, T_, temp).backward()
    torch.testing.assert_close(s.grad, temp * temp * s2.grad, rtol=1e-5, atol=1e-7)


def test_teacher_gets_no_gradient_and_loss_is_float32_for_half_inputs():
    s = S.to(torch.bfloat16).requires_grad_(True)
    t = T_.to(torch.bfloat16).requires_grad_(True)
    out = distillation_loss(s, t.detach(), Y)
    assert all(v.dtype == torch.float32 for v in out.values())
    out["loss"].backward()
    assert s.grad is not None and t.grad is None


def test_per_row_kl_sums_to_batchmean():
    per_row = kl_divergence(S, T_, 2.0, reduction="none")
    assert per_row.shape == (2,)
    assert per_row.mean().item() == pytest.approx(kl_divergence(S, T_, 2.0).item(), rel=1e-6)
    assert (per_row >= 0).all()
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence(S, T_, 2.0, reduction="sum")


def test_several_teacher_heads_are_weighted():
    aux = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, -1.0]])
    out = distillation_loss(S, [T_, aux, aux * 2], Y, temperature=2.0, alpha=1.0, teacher_weights=[1.0, 0.3, 0.3])
    expected = _hand_kd(S, T_, 2.0) + 0.3 * _hand_kd(S, aux, 2.0) + 0.3 * _hand_kd(S, aux * 2, 2.0)
    assert out["kd"].item() == pytest.approx(expected, rel=1e-5)
    # one head in a list is the same as the tensor itself
    assert distillation_loss(S, [T_], Y)["loss"].item() == pytest.approx(distillation_loss(S, T_, Y)["loss"].item())
    with pytest.raises(ValueError, match="teacher_weights"):
        soft_kd_loss(S, [T_, aux], 2.0, teacher_weights=[1.0])


def test_fully_labelled_batch_gives_exactly_the_core_loss():
    out = distillation_loss(S, T_, Y, 4.0, 0.7)
    ref = 0.7 * 16 * F.kl_div(F.log_softmax(S / 4, -1), F.log_softmax(T_ / 4, -1), reduction="batchmean",
                              log_target=True) + 0.3 * F.cross_entropy(S, Y)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_fully_unlabelled_batch_gives_alpha_kd_with_finite_gradients():
    s = S.clone().requires_grad_(True)
    out = distillation_loss(s, T_, torch.tensor([-100, -100]), 4.0, 0.6)
    assert out["ce"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.6 * _hand_kd(S, T_, 4.0), rel=1e-5)
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_mixed_labelled_and_unlabelled_rows():
    y = torch.tensor([-100, 1])
    out = distillation_loss(S, T_, y, 2.0, 0.25)
    kd = _hand_kd(S, T_, 2.0)  # over all rows
    ce = -math.log(_softmax(S[1].tolist(), 1.0)[1])  # labelled row only
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.25 * kd + 0.75 * ce, rel=1e-5)


def test_soft_labels_from_mixup():
    one_hot = F.one_hot(Y, 3).float()
    assert hard_loss(S, one_hot).item() == pytest.approx(F.cross_entropy(S, Y).item(), rel=1e-6)
    mixed = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    assert hard_loss(S, mixed).item() == pytest.approx(F.cross_entropy(S, mixed).item(), rel=1e-6)
    # an all-zero row is unlabelled: CE averages over the labelled row only
    partial = torch.stack([torch.zeros(3), one_hot[1]])
    assert hard_loss(S, partial).item() == pytest.approx(F.cross_entropy(S[1:], Y[1:]).item(), rel=1e-6)
    assert torch.isfinite(distillation_loss(S, T_, mixed)["loss"])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(S, T_, Y, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(S, T_, Y, alpha=1.5)


def test_module_form_follows_attribute_changes():
    loss = DistillationLoss(temperature=4.0, alpha=0.5)
    first = loss(S, T_, Y)["loss"].item()
    loss.temperature = 2.0
    assert loss(S, T_, Y)["loss"].item() == pytest.approx(distillation_loss(S, T_, Y, 2.0, 0.5)["loss"].item())
    assert loss(S, T_, Y)["loss"].item() != pytest.approx(first)
