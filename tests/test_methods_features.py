"""Feature distillation through learned modules: VID, ReviewKD and the FitNets regressor with a ReLU, each against a
reference written here in the style of the authors' code (RepDistiller's VIDLoss and ConvReg, ReviewKD's ABF and
hcl), given the same module weights; values and gradients, the variance's start, the modules trained and saved."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning import DistillationModule
from kd_lightning.data import DigitsDataModule
from kd_lightning.distillers import VID, CrossEntropy, Hint, ReviewKD, StepOutputs
from kd_lightning.losses import hcl_loss, vid_loss
from kd_lightning.models.cifar_resnet import CifarResNet


def _leaves(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone().requires_grad_(True) for k, v in tensors.items()}


def _out(student: dict, teacher: dict, epoch: int = 0) -> StepOutputs:
    b = next(iter(student.values())).shape[0]
    return StepOutputs(torch.zeros(b, 3), [torch.zeros(b, 3)], torch.zeros(b, dtype=torch.long), student, teacher,
                       epoch=epoch)


# -- VID: the authors' VIDLoss (RepDistiller distiller_zoo/VID.py), re-derived ----------------------------------
class RefVIDLoss(nn.Module):
    def __init__(self, num_input_channels, num_mid_channel, num_target_channels, init_pred_var=5.0, eps=1e-5):
        super().__init__()

        def conv1x1(i, o):
            return nn.Conv2d(i, o, kernel_size=1, padding=0, bias=False)

        self.regressor = nn.Sequential(conv1x1(num_input_channels, num_mid_channel), nn.ReLU(),
                                       conv1x1(num_mid_channel, num_mid_channel), nn.ReLU(),
                                       conv1x1(num_mid_channel, num_target_channels))
        self.log_scale = nn.Parameter(np.log(np.exp(init_pred_var - eps) - 1.0) * torch.ones(num_target_channels))
        self.eps = eps

    def forward(self, input, target):
        s_H, t_H = input.shape[2], target.shape[2]
        if s_H > t_H:
            input = F.adaptive_avg_pool2d(input, (t_H, t_H))
        elif s_H < t_H:
            target = F.adaptive_avg_pool2d(target, (s_H, s_H))
        pred_mean = self.regressor(input)
        pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
        return torch.mean(neg_log_prob)


def _vid_features():
    g = torch.Generator().manual_seed(0)
    # pair 0: the student's map is larger (pooled before the regressor); pair 1: the teacher's is larger
    student = {"a": torch.randn(3, 3, 8, 8, generator=g).relu(), "b": torch.randn(3, 5, 4, 4, generator=g).relu()}
    teacher = {"x": torch.randn(3, 4, 4, 4, generator=g), "y": torch.randn(3, 6, 8, 8, generator=g)}
    return student, teacher


def test_vid_matches_the_authors_loss_in_value_and_gradients():
    student, teacher = _vid_features()
    torch.manual_seed(1)
    term = VID(student_layers=["a", "b"], teacher_layers=["x", "y"])
    term.build(student, teacher)
    refs = [RefVIDLoss(3, 4, 4), RefVIDLoss(5, 6, 6)]
    # the variance starts at init_pred_var = 5 in both, from the same log-scale
    for i, ref in enumerate(refs):
        assert torch.equal(term.log_scales[i].detach(), ref.log_scale.detach().float())
        torch.testing.assert_close(F.softplus(term.log_scales[i]) + 1e-5, torch.full((ref.log_scale.numel(),), 5.0))
    assert term.regressors[0][0].weight.shape == (4, 3, 1, 1) and term.regressors[1][2].weight.shape == (6, 6, 1, 1)
    # move the variances off their start, then give the references the term's weights
    with torch.no_grad():
        for p in term.log_scales:
            p.add_(torch.linspace(-2.0, 3.0, p.numel()))
    for i, ref in enumerate(refs):
        ref.regressor.load_state_dict(term.regressors[i].state_dict())
        ref.log_scale.data = term.log_scales[i].detach().clone().double()
        ref.float()

    ours_s, ref_s = _leaves(student), _leaves(student)
    value = term(_out(ours_s, teacher))["vid"]
    expected = refs[0](ref_s["a"], teacher["x"]) + refs[1](ref_s["b"], teacher["y"])
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    for k in student:
        torch.testing.assert_close(ours_s[k].grad, ref_s[k].grad)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(term.log_scales[i].grad, ref.log_scale.grad)
        for ours, theirs in zip(term.regressors[i].parameters(), ref.regressor.parameters()):
            torch.testing.assert_close(ours.grad, theirs.grad)
    assert value.item() > 0


def test_vid_loss_by_hand_and_mid_channels():
    mu, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    log_scale = torch.log(torch.expm1(torch.tensor([1.0, 4.0])))  # variances 1 and 4 (eps 0)
    expected = 0.5 * ((0.0 + 1.0 / 1.0) + (np.log(4.0) + 4.0 / 4.0)) / 2
    assert vid_loss(mu, t, log_scale, eps=0.0).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="equal shapes"):
        vid_loss(mu, t[:, :1], log_scale)
    student, teacher = _vid_features()
    term = VID(["a"], ["x"], mid_channels=7, init_pred_var=2.0)
    term.build(student, teacher)
    assert term.regressors[0][0].weight.shape == (7, 3, 1, 1) and term.regressors[0][4].weight.shape == (4, 7, 1, 1)
    torch.testing.assert_close(F.softplus(term.log_scales[0]) + term.eps, torch.full((4,), 2.0))


# -- ReviewKD: the authors' ABF and hcl (dvlab-research/ReviewKD, mdistiller), re-derived -----------------------
class RefABF(nn.Module):
    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = torch.cat([x, y], dim=1)
            z = self.att_conv(z)
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


def ref_hcl(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


def ref_reviewkd(abfs, student_feats, teacher_feats, shapes, out_shapes):
    """The authors' forward: abfs, shapes and out_shapes ordered deepest first, student_feats shallowest first."""
    x = student_feats[::-1]
    results = []
    out_features, res_features = abfs[0](x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = abf(features, res_features, shape, out_shape)
        results.insert(0, out_features)
    return ref_hcl(results, teacher_feats)


def _review_features():
    g = torch.Generator().manual_seed(2)
    student = {"s0": torch.randn(4, 3, 8, 8, generator=g).relu(), "s1": torch.randn(4, 5, 4, 4, generator=g).relu(),
               "s2": torch.randn(4, 6, 2, 2, generator=g).relu(), "pool": torch.randn(4, 6, generator=g).relu()}
    # level 1: the teacher's map is twice the student's size (the fused map is resized to it)
    teacher = {"t0": torch.randn(4, 4, 8, 8, generator=g), "t1": torch.randn(4, 7, 8, 8, generator=g),
               "t2a": torch.randn(4, 8, 2, 2, generator=g), "t2b": torch.randn(4, 8, 2, 2, generator=g),
               "tpool": torch.randn(4, 8, 1, 1, generator=g)}
    return student, teacher


def test_reviewkd_matches_the_authors_fusion_and_hcl_in_value_and_gradients():
    student, teacher = _review_features()
    torch.manual_seed(3)
    term = ReviewKD(student_layers=["s0", "s1", "s2", "pool"], teacher_layers=["t0", "t1", "t2a+t2b", "tpool"],
                    weight=5.0, warmup=20)
    assert term.teacher_layers == ("t0", "t1", "t2a", "t2b", "tpool")  # what the networks' hooks capture
    term.build(student, teacher)
    mid = 6  # min(512, channels of the deepest student layer)
    assert [a.conv1[0].weight.shape[:2] for a in term.abfs] == [(mid, 3), (mid, 5), (mid, 6), (mid, 6)]
    assert [a.conv2[0].weight.shape[0] for a in term.abfs] == [4, 7, 8, 8]
    assert [a.att_conv is None for a in term.abfs] == [False, False, False, True]
    refs = [RefABF(c, mid, o, fuse) for c, o, fuse in [(6, 8, False), (6, 8, True), (5, 7, True), (3, 4, True)]]
    for ref, ours in zip(refs, list(term.abfs)[::-1]):
        ref.load_state_dict(ours.state_dict())
    term.train()
    for ref in refs:
        ref.train()

    ours_s, ref_s = _leaves(student), _leaves(student)
    value = term(_out(ours_s, teacher, epoch=39))["reviewkd"]  # past the warm-up: factor 1
    t_maps = [teacher["t0"], teacher["t1"], teacher["t2a"] + teacher["t2b"], teacher["tpool"]]
    s_maps = [ref_s["s0"], ref_s["s1"], ref_s["s2"], ref_s["pool"].unsqueeze(-1).unsqueeze(-1)]
    expected = ref_reviewkd(refs, s_maps, t_maps, shapes=[1, 2, 4, 8], out_shapes=[1, 2, 8, 8])
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    for k in student:
        torch.testing.assert_close(ours_s[k].grad, ref_s[k].grad)
    for ref, ours in zip(refs, list(term.abfs)[::-1]):
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad)


def test_hcl_weights_by_hand_and_the_warm_up():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    # a 4x4 map: the level 4 is skipped; levels 2 and 1 weigh 1/2 and 1/4, normalised by 1.75
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    p2 = lambda x: x.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # noqa: E731 - 2x2 blocks averaged
    by_hand = (mse(s, t) + 0.5 * mse(p2(s), p2(t)) + 0.25 * mse(s.mean((2, 3)), t.mean((2, 3)))) / 1.75
    torch.testing.assert_close(hcl_loss([s], [t]), by_hand)
    one = torch.randn(2, 3, 1, 1, generator=g)
    torch.testing.assert_close(hcl_loss([s, one], [t, one * 0]), by_hand + (one ** 2).mean())
    with pytest.raises(ValueError, match="equal shapes"):
        hcl_loss([s], [t[:, :2]])

    student, teacher = _review_features()
    term = ReviewKD(["s2", "pool"], ["t2a", "tpool"], warmup=4)
    term.build(student, teacher)
    assert [term.warmup_factor(e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    full = term(_out(student, teacher, epoch=10))["reviewkd"]
    torch.testing.assert_close(term(_out(student, teacher, epoch=1))["reviewkd"], 0.5 * full)
    assert ReviewKD(["s2"], ["t2a"], warmup=0).warmup_factor(0) == 1.0


# -- the FitNets regressor: RepDistiller's ConvReg (same spatial size), re-derived ------------------------------
class RefConvReg(nn.Module):
    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        self.use_relu = use_relu
        self.conv = nn.Conv2d(s_shape[1], t_shape[1], kernel_size=(1 + s_shape[2] - t_shape[2],
                                                                    1 + s_shape[3] - t_shape[3]))
        self.bn = nn.BatchNorm2d(t_shape[1])
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        return self.relu(self.bn(x)) if self.use_relu else self.bn(x)


def test_hint_regressor_with_relu_matches_convreg_and_the_default_is_unchanged():
    g = torch.Generator().manual_seed(5)
    student = {"s": torch.randn(4, 3, 4, 4, generator=g)}
    teacher = {"t": torch.randn(4, 5, 4, 4, generator=g).relu()}
    term = Hint("s", "t", relu=True)
    term.build(student, teacher)
    conv, bn = term.adapter[0], term.adapter[1]
    assert conv.bias is not None and isinstance(bn, nn.BatchNorm2d) and isinstance(term.adapter[2], nn.ReLU)
    ref = RefConvReg((4, 3, 4, 4), (4, 5, 4, 4))
    ref.conv.load_state_dict(conv.state_dict())
    ref.bn.load_state_dict(bn.state_dict())
    ours_s, ref_s = _leaves(student), _leaves(student)
    value = term(_out(ours_s, teacher))["hint"]
    expected = F.mse_loss(ref(ref_s["s"]), teacher["t"])
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    torch.testing.assert_close(ours_s["s"].grad, ref_s["s"].grad)
    torch.testing.assert_close(conv.weight.grad, ref.conv.weight.grad)
    torch.testing.assert_close(conv.bias.grad, ref.conv.bias.grad)
    # the default adapter: the same modules from the same draws as before the option existed
    torch.manual_seed(6)
    default = Hint("s", "t")
    default.build(student, teacher)
    torch.manual_seed(6)
    before = nn.Sequential(nn.Conv2d(3, 5, 1, bias=False), nn.BatchNorm2d(5))
    assert [type(m) for m in default.adapter] == [nn.Conv2d, nn.BatchNorm2d] and default.adapter[0].bias is None
    assert all(torch.equal(a, b) for a, b in zip(default.adapter.state_dict().values(), before.state_dict().values()))
    no_bn = Hint("s", "t", relu=True, batchnorm=False)
    no_bn.build(student, teacher)
    assert [type(m) for m in no_bn.adapter] == [nn.Conv2d, nn.ReLU]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"VID: student_layers \['a'\] and teacher_layers \[\] must be non-empty"):
        VID(["a"], [])
    with pytest.raises(ValueError, match="VID: init_pred_var must be > eps"):
        VID(["a"], ["x"], init_pred_var=0.0)
    with pytest.raises(ValueError, match="VID: eps must be > 0"):
        VID(["a"], ["x"], eps=0.0)
    with pytest.raises(ValueError, match="VID: mid_channels must be a positive integer"):
        VID(["a"], ["x"], mid_channels=0)
    with pytest.raises(ValueError, match="ReviewKD: teacher_layers must be layer names or sums"):
        ReviewKD(["a"], ["x+"])
    with pytest.raises(ValueError, match="ReviewKD: student_layers .* must be non-empty lists of the same length"):
        ReviewKD(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="ReviewKD: warmup must be an integer >= 0"):
        ReviewKD(["a"], ["x"], warmup=-1)
    with pytest.raises(ValueError, match="ReviewKD: max_mid_channels must be an integer >= 1"):
        ReviewKD(["a"], ["x"], max_mid_channels=0)
    with pytest.raises(ValueError, match="Hint: relu must be true or false"):
        Hint("a", "x", relu="yes")
    with pytest.raises(RuntimeError, match="not built"):
        VID(["a"], ["x"])(_out(*_vid_features()))
    student, teacher = _vid_features()
    with pytest.raises(ValueError, match=r"VID: the layer 'a' gives features of shape \(3, 8, 8\)"):
        VID(["a"], ["x"]).build({"a": student["a"][0]}, teacher)


# -- inside a training run ----------------------------------------------------------------------------------------
def _resnet(depth: int, widths: tuple[int, int, int, int]) -> nn.Module:
    """A tiny CIFAR ResNet for the 1x8x8 digits (a one-channel stem); stages at 8, 4 and 2 pixels."""
    net = CifarResNet(depth, widths, 10)
    net.stem[0] = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
    return net


def _terms():
    stages = ["stages.0", "stages.1", "stages.2"]
    # the teacher (2 blocks a stage): each stage's last block before its ReLU, as the ReviewKD authors tap it
    preact = [f"stages.{i}.1.bn2+stages.{i}.1.shortcut" for i in range(3)]
    return [CrossEntropy(), VID(stages, stages, weight=1.0),
            ReviewKD(stages + ["pool"], preact + ["pool"], weight=5.0, warmup=2),
            Hint("stages.1", "stages.1", weight=10.0, relu=True)]


def _module(terms) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(student=_resnet(8, (4, 4, 8, 8)), teacher=_resnet(14, (4, 8, 8, 16)), terms=terms,
                              optim=dict(optimizer="adamw", lr=1e-2, weight_decay=0.0, lr_scheduler="none"))


def test_modules_train_in_a_run_and_are_saved_in_its_checkpoint(tmp_path):
    module = _module(_terms())
    module.build_terms((1, 8, 8))
    # the summed teacher layers are the stage's pre-activation: its ReLU gives the stage's output
    out = module.step((torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])))
    review = module.terms["reviewkd"]
    for i, pre in enumerate(review.teacher_maps(out.teacher_features)[:3]):
        assert (pre < 0).any()
        torch.testing.assert_close(pre.relu(), out.teacher_features[f"stages.{i}"])  # VID taps stages.i
    before = {k: v.detach().clone() for k, v in module.terms.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, max_steps=3)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    groups = trainer.optimizers[0].param_groups
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.terms.parameters()}
    names = {n for n, _ in module.terms.named_parameters()}
    assert {"vid.log_scales.0", "vid.regressors.2.4.weight", "reviewkd.abfs.0.att_conv.0.bias",
            "reviewkd.abfs.3.conv2.0.weight", "hint.adapter.0.bias"} <= names
    after = module.terms.state_dict()
    for key in ("vid.log_scales.0", "vid.regressors.0.0.weight", "reviewkd.abfs.1.att_conv.0.weight",
                "reviewkd.abfs.3.conv1.0.weight", "hint.adapter.0.bias"):
        assert not torch.equal(before[key], after[key]), key  # trained
    for name in ("train/loss_vid", "train/loss_reviewkd", "train/loss_hint"):
        assert torch.isfinite(trainer.callback_metrics[name]) and trainer.callback_metrics[name] > 0, name
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    saved = {k: v for k, v in state.items() if k.startswith("terms.")}
    assert {"terms.vid.log_scales.2", "terms.reviewkd.abfs.2.conv1.1.running_mean"} <= set(saved)
    loaded = DistillationModule.load_from_checkpoint(ckpt, student=_resnet(8, (4, 4, 8, 8)),
                                                     teacher=module.teacher, terms=_terms())
    for key, value in saved.items():
        assert torch.equal(loaded.state_dict()[key], value), key
