r"""The distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

.. math::

    \mathcal{L} = \alpha \cdot T^2 \,\mathrm{KL}\!\left(\sigma(z_t/T) \,\|\, \sigma(z_s/T)\right)
                + (1-\alpha) \cdot \mathrm{CE}(z_s, y)

with student logits :math:`z_s`, teacher logits :math:`z_t`, temperature :math:`T` and softmax
:math:`\sigma`. The :math:`T^2` factor keeps the soft term's gradients at the scale of the hard term's
as :math:`T` changes (Hinton et al., section 2).

The loss sees logits only, never models: teacher logits from a forward pass, from a cache on disk or from
several heads are all the same to it. Both KL arguments are log-probabilities (``log_softmax``, with
``log_target=True``), computed in float32; passing probabilities to ``kl_div`` is the classic KD bug.

Targets are class indices ``(B,)`` -- where ``-100`` marks an unlabelled row, which then gets the distillation
term only -- or soft labels ``(B, C)`` such as MixUp/CutMix produce, where an all-zero row is unlabelled
(:mod:`kd_lightning.labels` owns that rule).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.labels import UNLABELLED, labelled_mask, labelled_rows

Logits = Union[Tensor, Sequence[Tensor]]


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> Tensor:
    r""":math:`\mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T))` in float32, without the :math:`T^2` factor.

    ``reduction``: ``"batchmean"`` (sum over classes, mean over rows; a scalar) or ``"none"`` (one value
    per row, shape ``(B,)``).
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    if reduction == "batchmean":
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    if reduction == "none":
        return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    raise ValueError(f"reduction must be 'batchmean' or 'none', got {reduction!r}.")


def soft_kd_loss(student_logits: Tensor, teacher_logits: Logits, temperature: float,
                 teacher_weights: Sequence[float] | None = None) -> Tensor:
    r"""The soft term :math:`T^2\,\mathrm{KL}`; for several teacher heads, :math:`\sum_i w_i T^2 \mathrm{KL}_i`.

    Heads are weighted as given (GoogLeNet's main and auxiliary heads: 1, 0.3, 0.3); pass weights that sum
    to one for a weighted mean. Without weights, a sequence of heads is averaged.
    """
    heads = [teacher_logits] if isinstance(teacher_logits, Tensor) else list(teacher_logits)
    if not heads:
        raise ValueError("teacher_logits is an empty sequence: pass a tensor or at least one head.")
    if teacher_weights is None:
        teacher_weights = [1.0 / len(heads)] * len(heads)
    if len(teacher_weights) != len(heads):
        raise ValueError(f"{len(heads)} teacher heads but {len(teacher_weights)} teacher_weights.")
    t2 = temperature * temperature
    return sum(w * t2 * kl_divergence(student_logits, t, temperature) for w, t in zip(teacher_weights, heads))


def hard_loss(student_logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy averaged over the labelled rows only; 0 (never NaN) when no row has a label.

    ``targets``: class indices ``(B,)`` (``-100``: unlabelled) or soft labels ``(B, C)`` whose all-zero rows are
    unlabelled. ``label_smoothing`` applies to class indices only (soft labels are already soft).
    """
    logits = student_logits.float()
    if targets.ndim == logits.ndim:  # soft labels (MixUp / CutMix)
        row_loss = -(targets.float() * F.log_softmax(logits, dim=-1)).sum(-1)  # (B,)
        return row_loss.sum() / labelled_mask(targets).sum().clamp(min=1)
    total = F.cross_entropy(logits, targets, ignore_index=UNLABELLED, reduction="sum", label_smoothing=label_smoothing)
    return total / labelled_mask(targets).sum().clamp(min=1)  # stays on device: no host sync


def distillation_loss(student_logits: Tensor, teacher_logits: Logits, targets: Tensor,
                      temperature: float = 4.0, alpha: float = 0.9,
                      teacher_weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    r"""Hinton et al. (2015) knowledge-distillation loss, as a dict of named terms.

    .. math::
        \mathrm{kd} = T^2 \,\mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T)) \quad\text{(batchmean, all rows)}

        \mathrm{ce} = \mathrm{CE}(z_s, y) \quad\text{(mean over labelled rows)}

        \mathrm{loss} = \alpha\,\mathrm{kd} + (1 - \alpha)\,\mathrm{ce}

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, or a sequence of heads each ``(B, C)`` (see ``soft_kd_loss``).
        targets: ``(B,)`` class indices (``-100``: unlabelled) or ``(B, C)`` soft labels.
        temperature: ``T > 0``.
        alpha: weight of the soft term, in ``[0, 1]``.

    Returns:
        ``{"loss", "kd", "ce"}``, float32 scalars; only ``loss`` is meant for ``backward``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    kd = soft_kd_loss(student_logits, teacher_logits, temperature, teacher_weights)
    ce = hard_loss(student_logits, targets)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


class DistillationLoss(nn.Module):
    """Module form of :func:`distillation_loss`; ``temperature`` and ``alpha`` may be changed in place."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9,
                 teacher_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_weights = None if teacher_weights is None else list(teacher_weights)

    def forward(self, student_logits: Tensor, teacher_logits: Logits, targets: Tensor) -> dict[str, Tensor]:
        return distillation_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha,
                                 self.teacher_weights)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, teacher_weights={self.teacher_weights}"


# -- feature and logit methods beyond Hinton KD ---------------------------------------------------------------
# Each is a plain function of tensors; kd_lightning.distillers wraps each in a term module that YAML can name.


def channel_normalize(features: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Per-channel standardisation of a feature map, before comparing two networks' features.

    .. math:: \hat f_{b,c,\dots} = (f_{b,c,\dots} - \mu_c) / \sqrt{\sigma_c^2 + \epsilon}

    with :math:`\mu_c`, :math:`\sigma^2_c` the mean and (biased) variance of channel :math:`c` over the batch and
    all spatial positions (BatchNorm's statistics without its affine part). ``features``: ``(B, C)`` or
    ``(B, C, H, W)``; computed in float32.
    """
    f = features.float()
    dims = [d for d in range(f.ndim) if d != 1]
    mean = f.mean(dim=dims, keepdim=True)
    var = f.var(dim=dims, unbiased=False, keepdim=True)
    return (f - mean) / torch.sqrt(var + eps)


def match_spatial(features: Tensor, size: Sequence[int]) -> Tensor:
    """``(B, C, H, W)`` features resized to ``size`` = (H', W'): adaptive average pooling when shrinking,
    bilinear interpolation when growing, unchanged when equal. ``(B, C)`` features are returned as they are."""
    if features.ndim != 4 or tuple(features.shape[-2:]) == tuple(size):
        return features
    if features.shape[-2] >= size[0] and features.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(features, tuple(size))
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


def hint_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    r"""FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    .. math:: \mathcal{L}_{hint} = \frac{1}{N} \sum \big(r(f_s) - f_t\big)^2

    the mean squared error over every element (batch, channels, positions) between the teacher's hint layer
    :math:`f_t` and the student's guided layer after its regressor :math:`r` (an adapter to the teacher's shape,
    applied by the caller: :class:`kd_lightning.distillers.Hint` uses a 1x1 conv + BatchNorm). Both tensors
    must have the same shape; float32.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"hint_loss needs equal shapes, got student {tuple(student_features.shape)} and teacher "
                         f"{tuple(teacher_features.shape)}: adapt the student's features first.")
    return F.mse_loss(student_features.float(), teacher_features.float())


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    r"""Spatial attention map of Zagoruyko & Komodakis (2017): :math:`Q = \mathrm{vec}(\frac{1}{C}\sum_c |A_c|^p)`,
    L2-normalised per row. ``features`` ``(B, C, H, W)`` -> ``(B, H*W)``; ``(B, C)`` -> ``(B, C)`` (each unit its
    own "position"); float32."""
    f = features.float()
    if f.ndim == 4:
        q = f.abs().pow(p).mean(1).flatten(1)  # (B, H*W)
    elif f.ndim == 2:
        q = f.abs().pow(p)  # (B, C)
    else:
        raise ValueError(f"attention_map needs (B, C, H, W) or (B, C) features, got shape {tuple(f.shape)}.")
    return F.normalize(q, p=2, dim=1)


def attention_transfer_loss(student_features: Tensor, teacher_features: Tensor, p: float = 2.0) -> Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    .. math::
        Q = \frac{\mathrm{vec}(\frac{1}{C}\sum_c |A_c|^p)}{\|\mathrm{vec}(\frac{1}{C}\sum_c |A_c|^p)\|_2},
        \qquad \mathcal{L}_{AT} = \frac{1}{B\,HW} \sum_b \sum_j (Q_{s,bj} - Q_{t,bj})^2

    with :math:`p = 2` (the paper's choice), i.e. the squared difference of the L2-normalised maps of mean squared
    activations, averaged over rows and positions (the authors' code; the paper's beta = 1000 is the term's
    weight). Channel counts may differ; when the spatial sizes differ, the larger map is average-pooled to the
    smaller size before normalising.
    """
    s, t = student_features, teacher_features
    if s.ndim == 4 and t.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = match_spatial(s.float(), size), match_spatial(t.float(), size)
    qs, qt = attention_map(s, p), attention_map(t, p)
    if qs.shape != qt.shape:
        raise ValueError(f"attention_transfer_loss: attention maps of shapes {tuple(qs.shape)} and "
                         f"{tuple(qt.shape)} cannot be compared.")
    return (qs - qt).pow(2).mean()


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> dict[str, Tensor]:
    r"""Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

    With :math:`p = \sigma(z/T)`, the target class :math:`y`, :math:`b = [p_y, 1 - p_y]` (binary target vs rest)
    and :math:`\hat p = \sigma(z_{\setminus y}/T)` (the distribution over the non-target classes):

    .. math::
        \mathrm{TCKD} = T^2\,\mathrm{KL}(b_t \| b_s), \qquad
        \mathrm{NCKD} = T^2\,\mathrm{KL}(\hat p_t \| \hat p_s), \qquad
        \mathrm{DKD} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}

    each KL summed over classes and averaged over the labelled rows (unlabelled rows have no target class and
    are left out; 0 when no row is labelled). Float32. The paper's linear warm-up of the loss weight is applied
    by :class:`kd_lightning.distillers.DKD`.

    Returns:
        ``{"dkd", "tckd", "nckd"}`` with ``dkd = alpha * tckd + beta * nckd``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature  # (B, C)
    labels, labelled = labelled_rows(targets)
    target_mask = F.one_hot(labels, s.shape[-1]).bool()  # (B, C)
    rows = labelled.float()  # (B,)
    n = rows.sum().clamp(min=1)
    # target vs rest: log of [p_y, 1 - p_y] from logsumexp, numerically stable
    def binary_log(z: Tensor) -> Tensor:
        log_all = torch.logsumexp(z, dim=-1)  # (B,)
        log_target = z.masked_fill(~target_mask, float("-inf")).logsumexp(-1)
        log_rest = z.masked_fill(target_mask, float("-inf")).logsumexp(-1)
        return torch.stack([log_target - log_all, log_rest - log_all], dim=-1)  # (B, 2)

    b_s, b_t = binary_log(s), binary_log(t)
    tckd = (F.kl_div(b_s, b_t, reduction="none", log_target=True).sum(-1) * rows).sum() / n
    # non-target classes: softmax with the target class removed (its logit pushed to -inf-like)
    neg = torch.finfo(s.dtype).min / 4
    log_hat_s = F.log_softmax(s.masked_fill(target_mask, neg), dim=-1)
    log_hat_t = F.log_softmax(t.masked_fill(target_mask, neg), dim=-1)
    kl_rows = F.kl_div(log_hat_s, log_hat_t, reduction="none", log_target=True)  # (B, C)
    nckd = (kl_rows.masked_fill(target_mask, 0.0).sum(-1) * rows).sum() / n
    t2 = temperature * temperature
    tckd, nckd = t2 * tckd, t2 * nckd
    return {"dkd": alpha * tckd + beta * nckd, "tckd": tckd, "nckd": nckd}


# -- logit methods beyond KD and DKD: DIST, logit standardisation, CTKD ----------------------------------------


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024): the
    Z-score of each row of logits, applied to teacher and student before dividing by the (base) temperature.

    .. math:: \mathcal{Z}(z)_k = \frac{z_k - \bar z}{\epsilon + s(z)}, \qquad
              \bar z = \frac{1}{K}\sum_{k} z_k, \qquad s(z) = \sqrt{\frac{1}{K-1}\sum_k (z_k - \bar z)^2}

    :math:`s` is the unbiased (Bessel-corrected) standard deviation, ``torch.std``'s default, as in the authors'
    code; :math:`\epsilon = 10^{-7}` is added to it (not under the root). ``(..., K)`` -> ``(..., K)``, float32.
    """
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (eps + z.std(dim=-1, keepdim=True))


def mean_pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Mean over rows of the Pearson correlation of the rows of ``a`` and ``b`` (both ``(N, M)``), as DIST
    computes it: each row centred, then its cosine similarity with the other's, :math:`\epsilon` added to the
    product of the norms:

    .. math:: \bar\rho = \frac{1}{N}\sum_{i=1}^{N}
              \frac{\langle a_i - \bar a_i,\, b_i - \bar b_i\rangle}{\|a_i - \bar a_i\|\,\|b_i - \bar b_i\| + \epsilon}

    A scalar, float32.
    """
    a, b = a.float(), b.float()
    a = a - a.mean(dim=1, keepdim=True)  # (N, M)
    b = b - b.mean(dim=1, keepdim=True)  # (N, M)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> dict[str, Tensor]:
    r"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022): match the relations
    between predictions by correlation instead of the predictions themselves.

    With :math:`P = \sigma(Z/\tau)` row-wise (``(B, C)``, for student and teacher) and :math:`\rho` the Pearson
    correlation (:func:`mean_pearson_correlation`, the authors' :math:`\epsilon = 10^{-8}`):

    .. math::
        \mathrm{inter} = \tau^2 \Big(1 - \frac{1}{B}\sum_{i=1}^{B} \rho(P^s_{i,:}, P^t_{i,:})\Big), \qquad
        \mathrm{intra} = \tau^2 \Big(1 - \frac{1}{C}\sum_{j=1}^{C} \rho(P^s_{:,j}, P^t_{:,j})\Big)

    .. math:: \mathrm{DIST} = \beta\,\mathrm{inter} + \gamma\,\mathrm{intra}

    inter-class relations (each row: one sample over the classes) and intra-class relations (each column: one class
    over the batch), as the authors' ``dist_kd.py`` (``tau = 1`` in their ImageNet setting, ``dist_t4`` i.e.
    ``tau = 4`` in their CIFAR-100 one; ``beta = gamma = 1`` inside the loss, weighted 2 against the CE). Labels are
    not used: every row counts. Float32.

    Returns:
        ``{"dist", "inter", "intra"}`` with ``dist = beta * inter + gamma * intra`` (both parts include
        :math:`\tau^2`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    p_s = F.softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    t2 = temperature * temperature
    inter = t2 * (1.0 - mean_pearson_correlation(p_s, p_t))
    intra = t2 * (1.0 - mean_pearson_correlation(p_s.T, p_t.T))  # (C, B): one row per class
    return {"dist": beta * inter + gamma * intra, "inter": inter, "intra": intra}


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the incoming gradient times ``-strength`` backward (see :func:`reverse_gradient`)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    r"""The gradient reversal layer (Ganin & Lempitsky, ICML 2015), as CTKD uses it: the identity forward,

    .. math:: \frac{\partial \mathcal{L}}{\partial x} \leftarrow -\lambda\, \frac{\partial \mathcal{L}}{\partial y}

    backward, with :math:`\lambda` = ``strength`` (a float, no gradient).
    """
    return _GradientReversal.apply(x, float(strength))


def cosine_curriculum(epoch: int, start: float = 0.0, end: float = 1.0, epochs: int = 10) -> float:
    r"""CTKD's curriculum of the gradient-reversal strength (Li et al., AAAI 2023, eq. 8): from ``start`` to ``end``
    along half a cosine over the first ``epochs`` epochs, then ``end``:

    .. math:: \lambda_e = \lambda_{\mathrm{start}} + (\lambda_{\mathrm{end}} - \lambda_{\mathrm{start}})\,
              \frac{1 - \cos(\pi \min(e, E) / E)}{2}

    ``epoch`` :math:`e` counts from 1 as in the authors' training loop (their ``CosineDecay`` over
    ``decay_loops = 10`` epochs, from 0 to -1, the sign being the reversal); ``epochs = 0`` gives ``end`` throughout.
    """
    import math

    if epochs <= 0:
        return float(end)
    progress = min(max(epoch, 0), epochs) / epochs
    return float(start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * progress)))


def ctkd_temperature(raw: Tensor, strength: float, min_temperature: float = 1.0,
                     temperature_range: float = 20.0) -> Tensor:
    r"""The learned global temperature of CTKD (Li et al., "Curriculum Temperature for Knowledge Distillation",
    AAAI 2023), as the authors' code maps its parameter:

    .. math:: T = T_{\min} + T_{\mathrm{range}}\;\sigma\big(\mathrm{GRL}_\lambda(\theta)\big)

    with :math:`\theta` the raw scalar parameter, :math:`\sigma` the logistic sigmoid (so
    :math:`T \in (T_{\min}, T_{\min} + T_{\mathrm{range}})`; the authors' ``t_start = 1``, ``t_end = 20``) and
    :math:`\mathrm{GRL}_\lambda` the gradient reversal of :func:`reverse_gradient`: the KD loss computed at
    :math:`T` is minimised by the student and, through the reversal, maximised by :math:`\theta`. Float32;
    a 0-dim tensor when ``raw`` is one.
    """
    return min_temperature + temperature_range * torch.sigmoid(reverse_gradient(raw.float(), strength))


# -- relations between samples: similarity-preserving KD, RKD, PKT, NST -----------------------------------------
# Losses on the relations between the samples of a batch (so they need B >= 2 to say anything). They switch
# autocast off and compute in float32: the (B, B) Gram matrices of wide flattened maps overflow float16.


def _no_autocast(like: Tensor) -> torch.autocast:
    """A context without autocast on ``like``'s device (its matmuls stay float32); a device autocast does not
    know (``meta``) gets the CPU's switched off, which changes nothing for it."""
    device = like.device.type if torch.amp.is_autocast_available(like.device.type) else "cpu"
    return torch.autocast(device_type=device, enabled=False)


def similarity_preserving_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    r"""Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

    With :math:`Q = \mathrm{vec}(f)` the features of each sample flattened, ``(B, C*H*W)``, the batch's
    similarity matrix is row-normalised, :math:`G = \mathrm{rownorm}(Q Q^\top)` ``(B, B)`` (each row divided by
    its L2 norm), and

    .. math:: \mathcal{L}_{SP} = \frac{1}{B^2}\,\| G_s - G_t \|_F^2

    for one layer pair (the paper sums over pairs and weights the sum by :math:`\gamma`; the CRD benchmark uses
    the last stage's output with weight 3000). The widths and spatial sizes may differ. Float32.
    """
    with _no_autocast(student_features):
        s = student_features.float().flatten(1)  # (B, Ds)
        t = teacher_features.float().detach().flatten(1)  # (B, Dt)
        g_s = F.normalize(s @ s.T, p=2, dim=1)  # (B, B)
        g_t = F.normalize(t @ t.T, p=2, dim=1)  # (B, B)
        return (g_s - g_t).pow(2).sum() / (s.shape[0] ** 2)


def pairwise_distances(embeddings: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    r"""Euclidean distances between the rows of ``embeddings`` ``(B, D)``: ``(B, B)`` with a zero diagonal.

    .. math:: d_{ij} = \sqrt{\max(\|x_i\|^2 + \|x_j\|^2 - 2 x_i^\top x_j,\ \epsilon)}, \qquad d_{ii} = 0

    (the expansion of RKD's code; the clamp keeps the square root's gradient finite, the diagonal is exactly 0 and
    passes no gradient). ``squared``: :math:`d_{ij}^2` instead. Float32.
    """
    with _no_autocast(embeddings):
        x = embeddings.float()
        sq_norms = x.pow(2).sum(dim=1)  # (B,)
        d = (sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2.0 * x @ x.T).clamp(min=eps)  # (B, B)
        if not squared:
            d = d.sqrt()
        off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        return d * off_diagonal


def rkd_loss(student_embeddings: Tensor, teacher_embeddings: Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> dict[str, Tensor]:
    r"""Relational knowledge distillation (Park et al., "Relational Knowledge Distillation", CVPR 2019): the
    distance-wise and angle-wise potentials of the embeddings, compared with the smooth L1 (Huber, :math:`\delta=1`)
    loss :math:`\ell_\delta`.

    .. math::
        \psi_D(i, j) = \frac{\|x_i - x_j\|_2}{\mu}, \quad \mu = \mathrm{mean}\{\|x_k - x_l\|_2 > 0\}, \qquad
        \mathrm{distance} = \frac{1}{B^2}\sum_{i,j} \ell_\delta(\psi^s_D(i,j), \psi^t_D(i,j))

        \psi_A(i, j, k) = \Big\langle \frac{x_j - x_i}{\|x_j - x_i\|_2}, \frac{x_k - x_i}{\|x_k - x_i\|_2}
            \Big\rangle, \qquad
        \mathrm{angle} = \frac{1}{B^3}\sum_{i,j,k} \ell_\delta(\psi^s_A(i,j,k), \psi^t_A(i,j,k))

        \mathrm{rkd} = w_D\,\mathrm{distance} + w_A\,\mathrm{angle}

    (the paper's :math:`w_D = 25`, :math:`w_A = 50`). As in the authors' code the means run over every entry,
    the diagonal and the degenerate triplets (an angle at a repeated point is 0) included, and the distances come
    from :func:`pairwise_distances` (squared distances clamped at 1e-12 before the square root). ``(B, D)``
    embeddings (anything else is flattened per row); the dimensions may differ. Float32; ``angle`` holds a
    ``(B, B, B)`` tensor.

    Returns:
        ``{"rkd", "distance", "angle"}``.
    """
    with _no_autocast(student_embeddings):
        s = student_embeddings.float().flatten(1)  # (B, Ds)
        t = teacher_embeddings.float().detach().flatten(1)  # (B, Dt)

        def distance_potential(x: Tensor) -> Tensor:
            d = pairwise_distances(x)  # (B, B), zero diagonal
            positive = d > 0
            mean = (d * positive).sum() / positive.sum().clamp(min=1)
            return d / mean.clamp(min=torch.finfo(d.dtype).tiny)

        def angle_potential(x: Tensor) -> Tensor:
            unit = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # (B, B, D): [i, j] = (x_j - x_i)/norm
            return torch.bmm(unit, unit.transpose(1, 2))  # (B, B, B): [i, j, k] = cosine of the angle j-i-k

        distance = F.smooth_l1_loss(distance_potential(s), distance_potential(t))
        angle = F.smooth_l1_loss(angle_potential(s), angle_potential(t))
        return {"rkd": distance_weight * distance + angle_weight * angle, "distance": distance, "angle": angle}


def pkt_loss(student_embeddings: Tensor, teacher_embeddings: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with Probabilistic
    Knowledge Transfer", ECCV 2018), with the cosine-similarity kernel of the authors' code.

    Rows are scaled to unit norm (:math:`x / (\|x\| + \epsilon)`), their cosine similarities mapped to
    :math:`[0, 1]` and each row normalised into a conditional distribution over the batch:

    .. math::
        p_{ij} = \frac{(1 + \cos(x_i, x_j))/2}{\sum_k (1 + \cos(x_i, x_k))/2}, \qquad
        \mathcal{L}_{PKT} = \frac{1}{B^2}\sum_{i,j} p^t_{ij} \log\frac{p^t_{ij} + \epsilon}{p^s_{ij} + \epsilon}

    i.e. the KL divergence of the student's from the teacher's distributions, averaged over all :math:`B^2`
    entries (not summed per row), :math:`\epsilon = 10^{-7}` as in the authors' code. ``(B, D)`` embeddings
    (anything else is flattened per row); the dimensions may differ. Float32.
    """
    if eps <= 0:
        raise ValueError(f"pkt_loss: eps must be > 0, got {eps}.")
    with _no_autocast(student_embeddings):
        s = student_embeddings.float().flatten(1)  # (B, Ds)
        t = teacher_embeddings.float().detach().flatten(1)  # (B, Dt)

        def conditional(x: Tensor) -> Tensor:
            x = x / (x.norm(dim=1, keepdim=True) + eps)
            similarity = (x @ x.T + 1.0) / 2.0  # (B, B), in [0, 1]
            return similarity / similarity.sum(dim=1, keepdim=True)  # rows sum to 1

        p_s, p_t = conditional(s), conditional(t)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def nst_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    r"""Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer", 2017): the squared MMD between the sets of channel maps, polynomial kernel :math:`d = 2, c = 0`.

    Each channel's spatial map :math:`f_{b,i} \in \mathbb{R}^{HW}` is L2-normalised; with
    :math:`k(x, y) = (x^\top y)^2`, per sample :math:`b`

    .. math::
        \mathcal{L}_{NST} = \frac{1}{B}\sum_b \Big[\frac{1}{C_t^2}\sum_{i,j} k(t_{b,i}, t_{b,j})
            + \frac{1}{C_s^2}\sum_{i,j} k(s_{b,i}, s_{b,j}) - \frac{2}{C_s C_t}\sum_{i,j} k(s_{b,i}, t_{b,j})\Big]

    (the three kernel means of the CRD benchmark's NSTLoss; the teacher-only term is a constant without gradient).
    ``(B, C, H, W)`` maps, channel counts may differ; when the spatial sizes differ the larger map is
    average-pooled to the smaller one. Float32.
    """
    if student_features.ndim != 4 or teacher_features.ndim != 4:
        raise ValueError(f"nst_loss needs (B, C, H, W) feature maps, got student {tuple(student_features.shape)} "
                         f"and teacher {tuple(teacher_features.shape)}.")
    with _no_autocast(student_features):
        s, t = student_features.float(), teacher_features.float().detach()
        if s.shape[-2:] != t.shape[-2:]:
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            s, t = match_spatial(s, size), match_spatial(t, size)
        s = F.normalize(s.flatten(2), dim=2)  # (B, Cs, HW): each channel's map of unit norm
        t = F.normalize(t.flatten(2), dim=2)  # (B, Ct, HW)

        def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
            return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()  # (B, Ca, Cb) -> mean of (a_i . b_j)^2

        return kernel_mean(t, t) + kernel_mean(s, s) - 2.0 * kernel_mean(s, t)


# -- features through learned modules: VID, ReviewKD ------------------------------------------------------------


def vid_loss(pred_mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Variational information distillation (Ahn et al., "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019): the negative log-likelihood of the teacher's features :math:`t` under a Gaussian whose
    mean :math:`\mu` the student predicts (through a regressor, applied by the caller) and whose variance is a
    learned per-channel :math:`\sigma_c^2 = \mathrm{softplus}(\alpha_c) + \epsilon`:

    .. math::
        \mathcal{L}_{VID} = \frac{1}{N} \sum_{b,c,h,w} \frac{1}{2}\Big(\log \sigma_c^2
            + \frac{(\mu_{b,c,h,w} - t_{b,c,h,w})^2}{\sigma_c^2}\Big)

    the mean over every element (batch, channels, positions), without the constant :math:`\frac12\log 2\pi`, as
    in the authors' code (RepDistiller ``VIDLoss``, :math:`\epsilon = 10^{-5}`). ``pred_mean``, ``target``:
    ``(B, C, H, W)`` or ``(B, C)`` of equal shapes; ``log_scale``: :math:`\alpha`, ``(C,)``. Float32; the
    teacher's features pass no gradient.
    """
    if pred_mean.shape != target.shape or pred_mean.ndim < 2 or log_scale.shape != (pred_mean.shape[1],):
        raise ValueError(f"vid_loss needs pred_mean and target of equal shapes (B, C, ...) and log_scale (C,), got "
                         f"{tuple(pred_mean.shape)}, {tuple(target.shape)} and {tuple(log_scale.shape)}.")
    mu, t = pred_mean.float(), target.float().detach()  # (B, C, ...)
    var = F.softplus(log_scale.float()) + eps  # (C,)
    var = var.view(1, -1, *([1] * (mu.ndim - 2)))  # (1, C, 1, 1)
    return (0.5 * ((mu - t).pow(2) / var + var.log())).mean()


def hcl_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    r"""The hierarchical context loss of ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review",
    CVPR 2021), summed over the pairs of ``(B, C, H, W)`` maps of equal shapes (the student's after its fusion
    modules, the teacher's):

    .. math::
        \mathcal{L}_{HCL} = \sum_{\text{pairs}} \frac{\mathrm{MSE}(F_s, F_t) + \sum_k w_k\,
            \mathrm{MSE}(P_{l_k}(F_s), P_{l_k}(F_t))}{1 + \sum_k w_k}, \qquad w_k = 2^{-k}

    with :math:`P_l` adaptive average pooling to :math:`l \times l` over the ``levels`` :math:`l_1, l_2, \dots`
    = 4, 2, 1 smaller than the map's height :math:`H` (others skipped; :math:`k` counts the used levels from 1),
    each MSE a mean over every element. As in the authors' code (dvlab-research/ReviewKD and mdistiller
    ``hcl_loss``): an 8x8 map gets weights 1, 1/2, 1/4, 1/8 divided by 15/8, a 1x1 map the plain MSE. Float32;
    the teacher's maps pass no gradient.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"hcl_loss needs the same non-zero number of student and teacher maps, got "
                         f"{len(student_features)} and {len(teacher_features)}.")
    total = None
    for fs, ft in zip(student_features, teacher_features):
        if fs.ndim != 4 or fs.shape != ft.shape:
            raise ValueError(f"hcl_loss needs (B, C, H, W) maps of equal shapes, got student {tuple(fs.shape)} and "
                             f"teacher {tuple(ft.shape)}.")
        s, t = fs.float(), ft.float().detach()  # (B, C, H, W)
        loss = F.mse_loss(s, t)
        weight, weights = 1.0, 1.0
        for level in levels:
            if level >= s.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
            weights += weight
        loss = loss / weights
        total = loss if total is None else total + loss
    assert total is not None
    return total


# -- contrastive representation distillation (CRD) --------------------------------------------------------------


def crd_scores(anchors: Tensor, memory_rows: Tensor, temperature: float) -> Tensor:
    r"""CRD's unnormalised scores of each anchor against its positive and negatives in a memory bank.

    .. math:: h_{bk} = \exp(\langle m_{bk}, a_b \rangle / \tau)

    ``anchors`` ``(B, D)`` (L2-normalised embeddings of one network), ``memory_rows`` ``(B, K+1, D)`` (the other
    network's stored embeddings of row ``b``'s positive, then its ``K`` negatives); returns ``(B, K+1)``, float32.
    """
    logits = torch.bmm(memory_rows.float(), anchors.float().unsqueeze(-1)).squeeze(-1)  # (B, K+1)
    return torch.exp(logits / temperature)


def crd_nce_loss(probabilities: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    r"""The NCE loss of contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive
    Representation Distillation", ICLR 2020, eq. 10 and the authors' ``ContrastLoss``).

    With the positive's probability :math:`P_{b0}` and the negatives' :math:`P_{bk}` (scores divided by the
    normalising constant :math:`Z`), :math:`K` negatives drawn from the noise distribution :math:`P_n = 1/N`:

    .. math::
        \mathcal{L} = -\frac{1}{B} \sum_b \Big[\log \frac{P_{b0}}{P_{b0} + K P_n + \epsilon}
                      + \sum_{k=1}^{K} \log \frac{K P_n}{P_{bk} + K P_n + \epsilon}\Big]

    ``probabilities`` ``(B, K+1)``, positive first; ``num_data`` :math:`N`, the rows of the memory bank.
    """
    p = probabilities.float()
    m = p.shape[1] - 1
    noise = m / float(num_data)  # K * Pn
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + eps))  # (B,)
    log_neg = torch.log(noise / (p[:, 1:] + noise + eps))  # (B, K)
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]
