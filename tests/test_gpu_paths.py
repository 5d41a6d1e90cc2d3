"""The GPU paths of the modules: teacher_precision, channels_last, compile_student / compile_model, and float32
losses under mixed precision. CPU tests use torch.compile's "eager" backend (inductor on a CPU is slow); the real
thing (inductor, bf16-mixed, channels_last) runs in the CUDA test, skipped on machines without a GPU."""

import copy
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import ClassifierModule, DistillationModule
from kd_lightning.distillers import AttentionTransfer, CrossEntropy, HintonKD

NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def cnn(width: int) -> nn.Module:
    """Conv (layer "0"), BatchNorm, ReLU, pool, linear head: small enough for a CPU, 4-D weights for channels_last."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, NUM_CLASSES))


def nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(student, teacher), the same weights for the same seed."""
    torch.manual_seed(seed)
    return cnn(4), cnn(8)


def loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, fast_dev_run=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


def distiller(**kwargs) -> DistillationModule:
    student, teacher = nets()
    return DistillationModule(student=student, teacher=teacher, num_classes=NUM_CLASSES, optim=dict(lr=0.1), **kwargs)


class RecordSteps(Callback):
    """The outputs of each training step (loss and logits), and the first layer's input/weight layout."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, torch.Tensor]] = []
        self.input_channels_last: list[bool] = []
        self.weight_channels_last: list[bool] = []

    def on_fit_start(self, trainer, pl_module):
        first = pl_module.student[0]

        def hook(module, args):
            self.input_channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last))
            self.weight_channels_last.append(module.weight.is_contiguous(memory_format=torch.channels_last))
        self.handle = first.register_forward_pre_hook(hook)

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: v.detach().clone() for k, v in outputs.items()})


# -- teacher_precision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("16", torch.float16)])
def test_low_precision_teacher_runs_under_autocast_and_returns_float32(precision, dtype):
    reference = distiller()
    module = distiller(teacher_precision=precision)
    seen = []
    module.teacher[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    x = torch.randn(8, 3, 8, 8)
    heads = module.teacher_logits(x)
    assert seen == [dtype]  # the teacher's convolution ran in the low precision (CPU autocast)
    assert heads[0].dtype == torch.float32  # and the logits come back in float32 for the loss terms
    torch.testing.assert_close(heads[0], reference.teacher_logits(x)[0], atol=5e-2, rtol=5e-2)
    losses = module.losses(module.step((x, torch.randint(0, NUM_CLASSES, (8,)))))
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_default_teacher_precision_changes_nothing():
    module = distiller()
    assert module.hparams.teacher_precision == "32"
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        expected = module.teacher(x)
    assert torch.equal(module.teacher_logits(x)[0], expected)  # bit-identical: no autocast, no cast


# -- mixed precision keeps the loss terms in float32 ---------------------------------------------------------
@pytest.mark.parametrize("teacher_precision", ["32", "bf16"])
def test_bf16_mixed_losses_are_float32(tmp_path, teacher_precision):
    terms = [CrossEntropy(weight=0.1), HintonKD(weight=0.9, temperature=4.0),
             AttentionTransfer(student_layers=["0"], teacher_layers=["0"], weight=10.0)]
    module = distiller(terms=terms, teacher_precision=teacher_precision)
    record = RecordSteps()
    logged = {}

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/loss")})

    trainer(tmp_path, precision="bf16-mixed", callbacks=[record, Losses()]).fit(module, loader(), loader())
    out = record.outputs[0]
    assert out["student_logits"].dtype == torch.bfloat16  # the student did run under bf16 autocast
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert set(logged) == {"train/loss", "train/loss_ce", "train/loss_kd", "train/loss_at"}
    assert all(v.dtype == torch.float32 for v in logged.values())


def test_bf16_mixed_classifier_loss_is_float32(tmp_path):
    outputs = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
            outputs.append(out["loss"])

    trainer(tmp_path, precision="bf16-mixed", callbacks=[Record()]).fit(
        ClassifierModule(cnn(4), NUM_CLASSES, optim=dict(lr=0.1)), loader(), loader())
    assert outputs[0].dtype == torch.float32


# -- channels_last ---------------------------------------------------------------------------------------------
def test_channels_last_gives_the_same_loss_and_checkpoint(tmp_path):
    runs = {}
    for channels_last in (False, True):
        module, record = distiller(channels_last=channels_last), RecordSteps()
        trainer(tmp_path, callbacks=[record]).fit(module, loader(), loader())
        runs[channels_last] = module, record
    (plain, plain_record), (cl, cl_record) = runs[False], runs[True]
    assert cl_record.input_channels_last == [True, True] and cl_record.weight_channels_last == [True, True]
    assert plain_record.input_channels_last[0] is False  # (a 3-channel NCHW input is not channels_last)
    torch.testing.assert_close(cl_record.outputs[0]["loss"], plain_record.outputs[0]["loss"])
    assert list(cl.state_dict()) == list(plain.state_dict())
    for key, value in cl.state_dict().items():  # the same values, and the default layout after the run
        torch.testing.assert_close(value, plain.state_dict()[key])
        assert value.is_contiguous()
    assert all(p.is_contiguous() for p in cl.teacher.parameters())


def test_channels_last_classifier(tmp_path):
    torch.manual_seed(0)
    net = cnn(4)
    module = ClassifierModule(copy.deepcopy(net), NUM_CLASSES, optim=dict(lr=0.1), channels_last=True)
    reference = ClassifierModule(net, NUM_CLASSES, optim=dict(lr=0.1))
    losses = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
            losses.append(out["loss"])

    for m in (module, reference):
        trainer(tmp_path, callbacks=[Record()]).fit(m, loader(), loader())
    torch.testing.assert_close(losses[0], losses[1])
    assert list(module.state_dict()) == list(reference.state_dict())


# -- compile_student / compile_model ------------------------------------------------------------------------
def counting_backend(calls: list):
    """A torch.compile backend that runs the captured graph as is and counts the graphs it was given."""
    def backend(graph_module, example_inputs):
        calls.append(graph_module)
        return graph_module.forward
    return backend


def test_compile_student_trains_with_unchanged_checkpoint_keys(tmp_path):
    calls = []
    module = distiller(compile_student={"backend": counting_backend(calls)})
    teacher_calls = []
    module.teacher.register_forward_pre_hook(lambda m, args: teacher_calls.append(torch.compiler.is_compiling()))
    record = RecordSteps()
    trainer(tmp_path, callbacks=[record]).fit(module, loader(), loader())
    assert calls, "the student ran through torch.compile"
    assert teacher_calls and not any(teacher_calls)  # the teacher never is compiled
    assert type(module.student) is nn.Sequential  # the plain network, for export and evaluate
    plain = distiller()
    assert list(module.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in key for key in module.state_dict())
    assert [name for name, _ in module.named_children()] == [name for name, _ in plain.named_children()]
    # the parameters the optimizer and DDP see are the student's, once each
    assert {id(p) for p in module.parameters()} == {id(p) for p in plain_params(module)}
    module.load_state_dict(plain.state_dict())  # a non-compiled run's checkpoint loads as is
    clone = copy.deepcopy(module)  # a compiled module still copies (and pickles: the compiled code is left out)
    assert list(clone.state_dict()) == list(module.state_dict())


def plain_params(module: DistillationModule):
    return [*module.student.parameters(), *module.teacher.parameters(), *module.terms.parameters()]


def test_compile_student_gives_the_eager_losses_and_captures_features(tmp_path):
    """With the "eager" backend (dynamo traces, nothing is optimised) the numbers equal the plain run's, hooks on
    student layers (attention transfer) included."""
    def terms():
        return [CrossEntropy(weight=0.1), HintonKD(weight=0.9),
                AttentionTransfer(student_layers=["0"], teacher_layers=["0"], weight=10.0)]

    losses = {}
    for compiled in (False, True):
        record = RecordSteps()
        module = distiller(terms=terms(), compile_student={"backend": "eager"} if compiled else False)
        trainer(tmp_path, fast_dev_run=3, callbacks=[record]).fit(module, loader(n=24), loader())
        losses[compiled] = torch.stack([o["loss"] for o in record.outputs])
    torch.testing.assert_close(losses[True], losses[False])


def test_compile_model_for_classifier(tmp_path):
    calls = []
    module = ClassifierModule(cnn(4), NUM_CLASSES, optim=dict(lr=0.1), compile_model={"backend": counting_backend(calls)})
    trainer(tmp_path).fit(module, loader(), loader())
    assert calls and type(module.model) is nn.Sequential
    assert list(module.state_dict()) == list(ClassifierModule(cnn(4), NUM_CLASSES).state_dict())


# -- bad values -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"teacher_precision": "fp16"}, r"teacher_precision must be one of '32', 'bf16', '16'"),
    ({"channels_last": "yes"}, "channels_last must be true or false"),
    ({"compile_student": "yes"}, "compile_student must be true, false or a dict"),
    ({"compile_student": {"mdoe": "max-autotune"}}, r"\['mdoe'\] are not torch.compile arguments; valid: .*mode"),
])
def test_bad_values_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distiller(**kwargs)


def test_bad_compile_model_is_a_clear_error():
    with pytest.raises(ValueError, match="compile_model: .* are not torch.compile arguments"):
        ClassifierModule(cnn(4), NUM_CLASSES, compile_model={"backend_name": "eager"})


# -- the real thing, on a GPU ----------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: inductor, bf16-mixed and channels_last on GPU")
def test_cuda_bf16_mixed_channels_last_compiled_student(tmp_path):
    module = distiller(teacher_precision="bf16", channels_last=True, compile_student=True,
                       terms=[CrossEntropy(weight=0.1), HintonKD(weight=0.9),
                              AttentionTransfer(student_layers=["0"], teacher_layers=["0"], weight=10.0)])
    record = RecordSteps()
    trainer(tmp_path, accelerator="gpu", fast_dev_run=3, precision="bf16-mixed", callbacks=[record]).fit(
        module, loader(n=24), loader())
    assert len(record.outputs) == 3
    assert all(o["loss"].dtype == torch.float32 and torch.isfinite(o["loss"]) for o in record.outputs)
    assert all(o["teacher_logits"].dtype == torch.float32 for o in record.outputs)
    assert all(record.input_channels_last) and all(record.weight_channels_last)
    assert list(module.state_dict()) == list(distiller().state_dict())
    assert type(module.student) is nn.Sequential
