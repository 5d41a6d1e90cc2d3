"""Relation-based methods of the CRD benchmark (SP, RKD, PKT, NST): values and gradients against references
re-derived in the test from the papers and the authors' code (RepDistiller's distiller_zoo), the terms, their
errors, and one short training run inside DistillationModule."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kd_lightning import DistillationModule
from kd_lightning.data import DigitsDataModule
from kd_lightning.distillers import NST, PKT, RKD, CrossEntropy, SimilarityPreserving, StepOutputs
from kd_lightning.losses import nst_loss, pairwise_distances, pkt_loss, rkd_loss, similarity_preserving_loss

TOL = dict(rtol=1e-4, atol=1e-6)


# -- references, in the authors' style (float64, loops where their code vectorises) ---------------------------
def ref_sp(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Tung & Mori: G = Q Q^T, each row divided by its L2 norm; ||G_t - G_s||_F^2 / bsz^2."""
    bsz = f_s.shape[0]
    q_s, q_t = f_s.reshape(bsz, -1), f_t.detach().reshape(bsz, -1)  # the teacher ran under no_grad
    g_s, g_t = q_s @ q_s.t(), q_t @ q_t.t()
    g_s = g_s / g_s.norm(dim=1, keepdim=True)
    g_t = g_t / g_t.norm(dim=1, keepdim=True)
    diff = g_t - g_s
    return (diff * diff).sum() / (bsz * bsz)


def _huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smooth L1 with beta = 1 of one pair of numbers."""
    x = (a - b).abs()
    return 0.5 * x * x if x < 1 else x - 0.5


def ref_rkd(f_s: torch.Tensor, f_t: torch.Tensor, w_d: float = 25.0, w_a: float = 50.0):
    """Park et al. with RepDistiller's conventions: distances divided by their mean over the pairs with d > 0, smooth
    L1 averaged over all B^2 pairs (diagonal included); angles at anchor i of (j, k), 0 when j or k is i, averaged
    over all B^3 triplets. The teacher's side without gradient."""
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1).detach()
    n = s.shape[0]

    def distances(e):
        d = torch.zeros(n, n, dtype=e.dtype)
        for i, j in itertools.product(range(n), repeat=2):
            if i != j:
                d[i, j] = (e[i] - e[j]).norm()
        return d / d[d > 0].mean()

    def angles(e):
        a = torch.zeros(n, n, n, dtype=e.dtype)
        for i, j, k in itertools.product(range(n), repeat=3):
            if j != i and k != i:
                u, v = e[j] - e[i], e[k] - e[i]
                a[i, j, k] = (u @ v) / (u.norm() * v.norm())
        return a

    d_s, d_t = distances(s), distances(t)
    a_s, a_t = angles(s), angles(t)
    loss_d = sum(_huber(d_s[i, j], d_t[i, j]) for i, j in itertools.product(range(n), repeat=2)) / n ** 2
    loss_a = sum(_huber(a_s[i, j, k], a_t[i, j, k]) for i, j, k in itertools.product(range(n), repeat=3)) / n ** 3
    return w_d * loss_d + w_a * loss_a, loss_d, loss_a


def ref_pkt(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas (their code, as in RepDistiller's PKT.py): rows / (norm + eps), cosine mapped to (c+1)/2,
    rows normalised to sum 1, mean over the B^2 entries of t * log((t + eps) / (s + eps))."""
    def probabilities(x):
        x = x.reshape(x.shape[0], -1)
        x = x / (torch.sqrt((x ** 2).sum(dim=1, keepdim=True)) + eps)
        sim = (torch.mm(x, x.t()) + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    p_s, p_t = probabilities(f_s), probabilities(f_t.detach())
    n = p_s.shape[0]
    total = sum(p_t[i, j] * math.log((p_t[i, j].item() + eps)) - p_t[i, j] * torch.log(p_s[i, j] + eps)
                for i, j in itertools.product(range(n), repeat=2))
    return total / n ** 2


def ref_nst(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Huang & Wang with RepDistiller's NSTLoss: pool the larger map (square) to the smaller, each channel's map
    L2-normalised, poly kernel k(x, y) = (x.y)^2; mean k(t, t) + mean k(s, s) - 2 mean k(s, t), the means over
    the batch and all channel pairs."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    f_t = f_t.detach()
    s = f_s.reshape(f_s.shape[0], f_s.shape[1], -1)
    t = f_t.reshape(f_t.shape[0], f_t.shape[1], -1)
    s = s / s.norm(dim=2, keepdim=True)
    t = t / t.norm(dim=2, keepdim=True)

    def poly_mean(a, b):
        values = [(a[n, i] @ b[n, j]) ** 2 for n in range(a.shape[0]) for i in range(a.shape[1])
                  for j in range(b.shape[1])]
        return sum(values) / len(values)

    return poly_mean(t, t) + poly_mean(s, s) - 2 * poly_mean(s, t)


def _value_and_grad(fn, s: torch.Tensor, t: torch.Tensor, dtype=torch.float32):
    """fn(s, t) and d fn / d s, with s (and t, to see that no gradient reaches it) as leaves of ``dtype``."""
    s = s.detach().to(dtype).requires_grad_(True)
    t = t.detach().to(dtype).requires_grad_(True)
    value = fn(s, t)
    value.backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0  # the teacher's side is a constant
    return value.detach().double(), s.grad.double()


def _check_against_reference(ours, ref, s, t):
    v, g = _value_and_grad(ours, s, t)
    v_ref, g_ref = _value_and_grad(ref, s, t, torch.float64)
    assert v_ref.abs() > 1e-4 and g_ref.abs().max() > 1e-6  # the comparison is of real numbers
    assert_close(v, v_ref, **TOL)
    assert_close(g, g_ref, **TOL)


# -- the loss functions ----------------------------------------------------------------------------------------
def test_sp_by_hand():
    # G_s = [[1, 1], [1, 2]] -> rows [1, 1]/sqrt2, [1, 2]/sqrt5; G_t = I
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    r2, r5 = 1 / math.sqrt(2), 1 / math.sqrt(5)
    expected = ((r2 - 1) ** 2 + r2 ** 2 + r5 ** 2 + (2 * r5 - 1) ** 2) / 4
    assert similarity_preserving_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert similarity_preserving_loss(s, s).item() == 0.0


def test_sp_value_and_gradient_match_the_reference():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4, 3, 3), torch.randn(6, 8, 2, 2)  # widths and sizes differ: only (B, B) is compared
    _check_against_reference(similarity_preserving_loss, ref_sp, s, t)


def test_pairwise_distances():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 0.0]])
    expected = torch.tensor([[0.0, 5.0, 3.0], [5.0, 0.0, 4.0], [3.0, 4.0, 0.0]])
    assert_close(pairwise_distances(x), expected)
    assert_close(pairwise_distances(x, squared=True), expected ** 2)
    x.requires_grad_(True)
    pairwise_distances(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rkd_value_parts_and_gradient_match_the_reference():
    torch.manual_seed(1)
    s, t = torch.randn(5, 6), torch.randn(5, 3) * 4
    out = rkd_loss(s, t)
    total, loss_d, loss_a = ref_rkd(s.double(), t.double())
    assert_close(out["distance"].double(), loss_d, **TOL)
    assert_close(out["angle"].double(), loss_a, **TOL)
    assert_close(out["rkd"].double(), total, **TOL)
    _check_against_reference(lambda a, b: rkd_loss(a, b)["rkd"], lambda a, b: ref_rkd(a, b)[0], s, t)
    # the weights are the two parts' factors
    other = rkd_loss(s, t, distance_weight=2.0, angle_weight=0.5)
    assert_close(other["rkd"], 2.0 * out["distance"] + 0.5 * out["angle"])


def test_rkd_is_scale_invariant_and_zero_for_a_scaled_copy():
    torch.manual_seed(2)
    t = torch.randn(6, 5)
    s = 3.0 * t + 1.0  # distances scale (and the mean takes it out), angles are unchanged
    out = rkd_loss(s, t)
    assert out["rkd"].item() == pytest.approx(0.0, abs=1e-5)
    # a large-scale embedding (huber's linear regime) stays finite with finite gradients
    s = (torch.randn(6, 5) * 1e3).requires_grad_(True)
    rkd_loss(s, t)["rkd"].backward()
    assert torch.isfinite(s.grad).all()


def test_pkt_value_and_gradient_match_the_reference():
    torch.manual_seed(3)
    s, t = torch.randn(6, 5), torch.randn(6, 9)
    _check_against_reference(pkt_loss, ref_pkt, s, t)
    assert pkt_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    # (B, C, 1, 1) pooled maps are the same embeddings
    assert_close(pkt_loss(s[:, :, None, None], t[:, :, None, None]), pkt_loss(s, t))
    # a zero row (a dead embedding) gives a finite loss and gradient, as the eps of the authors' code ensures
    z = torch.cat([torch.zeros(1, 5), s[1:]]).requires_grad_(True)
    pkt_loss(z, t).backward()
    assert torch.isfinite(z.grad).all()


def test_nst_value_and_gradient_match_the_reference():
    torch.manual_seed(4)
    s, t = torch.randn(3, 4, 4, 4), torch.randn(3, 6, 2, 2)  # student pooled to the teacher's 2x2
    _check_against_reference(nst_loss, ref_nst, s, t)
    s, t = torch.randn(3, 5, 2, 2), torch.randn(3, 2, 4, 4)  # teacher pooled to the student's 2x2
    _check_against_reference(nst_loss, ref_nst, s, t)
    assert nst_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        nst_loss(torch.randn(3, 4), torch.randn(3, 4))


def test_losses_compute_in_float32_under_autocast():
    torch.manual_seed(5)
    maps_s, maps_t = torch.randn(4, 8, 4, 4) * 30, torch.randn(4, 8, 4, 4) * 30
    emb_s, emb_t = torch.randn(4, 16) * 30, torch.randn(4, 16) * 30
    calls = [lambda: similarity_preserving_loss(maps_s, maps_t), lambda: nst_loss(maps_s, maps_t),
             lambda: rkd_loss(emb_s, emb_t)["rkd"], lambda: pkt_loss(emb_s, emb_t)]
    plain = [c() for c in calls]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = [c() for c in calls]
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32
        assert_close(b, a)


# -- the terms -------------------------------------------------------------------------------------------------
def _outputs(**features) -> StepOutputs:
    """Student features ``s_<layer>``, teacher features ``t_<layer>``; no labels at all (-100): the relation terms
    do not use them."""
    student = {k[2:]: v for k, v in features.items() if k.startswith("s_")}
    teacher = {k[2:]: v for k, v in features.items() if k.startswith("t_")}
    return StepOutputs(torch.randn(4, 3), [torch.randn(4, 3)], torch.full((4,), -100), student, teacher)


def test_terms_sum_their_layer_pairs_and_return_one_named_value():
    torch.manual_seed(6)
    a_s, b_s, a_t, b_t = (torch.randn(4, c, h, h) for c, h in ((2, 4), (3, 2), (5, 4), (6, 2)))
    out = _outputs(s_a=a_s, s_b=b_s, t_a=a_t, t_b=b_t)
    sp = SimilarityPreserving(student_layers=["a", "b"], teacher_layers=["a", "b"])
    assert sp.name == "sp" and sp.weight == 3000.0
    got = sp(out)
    assert list(got) == ["sp"]
    assert_close(got["sp"].double(), ref_sp(a_s.double(), a_t.double()) + ref_sp(b_s.double(), b_t.double()), **TOL)
    nst = NST(student_layers=["a", "b"], teacher_layers=["b", "a"], name="selectivity")
    assert nst.weight == 50.0
    got = nst(out)
    assert list(got) == ["selectivity"]
    assert_close(got["selectivity"].double(), ref_nst(a_s.double(), b_t.double()) + ref_nst(b_s.double(),
                                                                                          a_t.double()), **TOL)


def test_embedding_terms_flatten_the_pooled_features():
    torch.manual_seed(7)
    p_s, p_t = torch.randn(4, 6, 1, 1), torch.randn(4, 10, 1, 1)
    out = _outputs(s_pool=p_s, t_pool=p_t)
    rkd = RKD(distance_weight=10.0, angle_weight=20.0)
    assert (rkd.student_layers, rkd.teacher_layers, rkd.weight) == (("pool",), ("pool",), 1.0)
    got = rkd(out)
    assert list(got) == ["rkd"]
    assert_close(got["rkd"].double(), ref_rkd(p_s.double(), p_t.double(), 10.0, 20.0)[0], **TOL)
    pkt = PKT()
    assert pkt.weight == 30000.0 and pkt.eps == 1e-7
    assert_close(pkt(out)["pkt"].double(), ref_pkt(p_s.double(), p_t.double()), **TOL)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"SimilarityPreserving: student_layers \['a'\] and teacher_layers "
                                         r"\['a', 'b'\] must be .* same length"):
        SimilarityPreserving(student_layers=["a"], teacher_layers=["a", "b"])
    with pytest.raises(ValueError, match="NST: .* non-empty"):
        NST(student_layers=[], teacher_layers=[])
    with pytest.raises(ValueError, match="RKD: angle_weight must be a number >= 0"):
        RKD(angle_weight=-1.0)
    with pytest.raises(ValueError, match="RKD: distance_weight and angle_weight are both 0"):
        RKD(distance_weight=0.0, angle_weight=0.0)
    with pytest.raises(ValueError, match="RKD: student_layer must be one layer name"):
        RKD(student_layer=["pool", "fc"])
    with pytest.raises(ValueError, match=r"PKT: eps must be a small number in \(0, 1\)"):
        PKT(eps=0.0)
    with pytest.raises(ValueError, match="SimilarityPreserving: weight must be a number >= 0"):
        SimilarityPreserving(student_layers=["a"], teacher_layers=["a"], weight=-3.0)
    nst = NST(student_layers=["pool"], teacher_layers=["pool"])
    with pytest.raises(ValueError, match=r"NST 'nst': the student's 'pool' gives \(4, 6\).*channel maps"):
        nst(_outputs(s_pool=torch.randn(4, 6), t_pool=torch.randn(4, 6)))


# -- end to end ------------------------------------------------------------------------------------------------
def _relation_terms():
    # digits_cnn: conv1 (B, C, 8, 8), conv2 (B, 2C, 8, 8), pool (B, 2C, 4, 4); student C = 4, teacher C = 8
    return {"ce": CrossEntropy(weight=1.0),
            "sp": SimilarityPreserving(student_layers=["conv2"], teacher_layers=["conv2"], weight=30.0),
            "rkd": RKD(weight=1.0),
            "pkt": PKT(weight=300.0),
            "nst": NST(student_layers=["conv1", "conv2"], teacher_layers=["conv1", "pool"], weight=5.0)}


def _module() -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(student="digits_cnn", student_kwargs={"channels": 4}, teacher="digits_cnn",
                              teacher_kwargs={"channels": 8}, num_classes=10, terms=_relation_terms(),
                              optim=dict(optimizer="adamw", lr=1e-2, weight_decay=0.0, lr_scheduler="none"))


def test_relation_terms_reach_the_student_never_the_teacher():
    module = _module()
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, -100, 4, 5, -100, 7])
    losses = module.losses(module.step((x, y)))
    assert set(losses) == {"loss", "loss_ce", "loss_sp", "loss_rkd", "loss_pkt", "loss_nst"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    for name in ("sp", "rkd", "pkt", "nst"):  # each term alone moves the student
        module.zero_grad()
        module.losses(module.step((x, y)))[f"loss_{name}"].backward()
        assert module.student.conv1.weight.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


def test_relation_terms_train_inside_distillation_module(tmp_path):
    module = _module()
    before = module.student.conv1.weight.detach().clone()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, max_steps=3)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    metrics = trainer.callback_metrics
    for name in ("ce", "sp", "rkd", "pkt", "nst"):
        value = metrics[f"train/loss_{name}"]
        assert torch.isfinite(value) and value > 0, name
    parts = sum(metrics[f"train/loss_{n}"] for n in ("ce", "sp", "rkd", "pkt", "nst"))
    assert_close(metrics["train/loss"], parts, rtol=1e-5, atol=1e-6)
    assert not torch.equal(module.student.conv1.weight, before)
