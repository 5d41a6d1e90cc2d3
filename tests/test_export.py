"""kd-lightning export: ONNX and TorchScript round trips against PyTorch, the student alone, and networks that
cannot be exported (nothing written). ONNX tests skip without the `export` extra (onnx, onnxruntime)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kd_lightning.commands.export import export_network, main
from kd_lightning.measure import count_parameters
from kd_lightning.models import build_model
from kd_lightning.models.loading import load_model

from conftest import STUDENT_KWARGS

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits" / "base.yaml")


def digits_images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit deprecated; TorchScript is what we export
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path)


def onnx_logits(path: Path, x: Tensor) -> Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


@pytest.mark.parametrize("name,kwargs", [("mlp", {"hidden": [32]}), ("digits_cnn", {"channels": 4})])
def test_torchscript_round_trip(tmp_path, name, kwargs):
    net = build_model(name, 10, **kwargs).eval()
    (exported,) = export_network(net, digits_images(6), str(tmp_path), "student", formats=["torchscript"])
    assert exported.path == str(tmp_path / "student.torchscript.pt") and exported.max_abs_diff <= 1e-4
    assert exported.batch_sizes == (1, 6)
    loaded = load_torchscript(exported.path)
    x = digits_images(7, seed=1)  # a batch size it was neither traced nor checked with
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.torchscript.pt"]  # no temporary file left


@pytest.mark.parametrize("name,kwargs", [("mlp", {"hidden": [32]}), ("digits_cnn", {"channels": 4})])
def test_onnx_round_trip_with_dynamic_batch(tmp_path, name, kwargs):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    net = build_model(name, 10, **kwargs).eval()
    (exported,) = export_network(net, digits_images(6), str(tmp_path), "student", formats=["onnx"])
    assert exported.max_abs_diff <= 1e-4
    graph = onnx.load(exported.path).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for n in (1, 7, 33):
        x = digits_images(n, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(onnx_logits(tmp_path / "student.onnx", x), net(x), rtol=0, atol=1e-5)


class TwoHeads(nn.Module):
    """Main and auxiliary logits in eval mode too, as GoogLeNet."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.aux = nn.Linear(64, 10), nn.Linear(64, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.main(x), self.aux(x)


def test_a_multi_head_network_exports_its_main_head(tmp_path):
    net = TwoHeads().eval()
    export_network(net, digits_images(4), str(tmp_path), "two_heads", formats=["torchscript"])
    x = digits_images(3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(load_torchscript(tmp_path / "two_heads.torchscript.pt")(x), net(x)[0])


class LeavesTorch(nn.Module):
    """Computes part of its forward pass outside torch (in NumPy): runs in PyTorch, no tracer can follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.fc(x.flatten(1)).numpy() ** 2)


class ReturnsADict(nn.Module):
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": x.flatten(1)}


class BranchesOnTheData(nn.Module):
    """Doubles its logits when the batch is bright: a trace records only the branch its example took."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        scale = 2.0 if float(x.mean()) > 0.5 else 1.0
        return scale * self.fc(x.flatten(1))


FORMATS = ["torchscript", pytest.param("onnx", marks=pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime")),
    reason="needs the export extra (onnx, onnxruntime)"))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_network_that_cannot_be_traced_is_a_clear_error(tmp_path, fmt):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"Cannot export student \(LeavesTorch\) to {fmt}: .*tensor operations"):
        export_network(LeavesTorch(), digits_images(4), str(out), formats=[fmt])
    assert list(out.iterdir()) == []


def test_a_network_that_returns_no_logits_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"Cannot export student \(ReturnsADict\): it returns dict, not logits"):
        export_network(ReturnsADict(), digits_images(4), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_that_computes_something_else_fails_and_writes_nothing(tmp_path, fmt):
    # traced on two bright images (scale 2 recorded), checked on a batch whose mean is dark (PyTorch: scale 1)
    images = torch.cat([torch.ones(2, 1, 8, 8), torch.zeros(5, 1, 8, 8)])
    with pytest.warns(torch.jit.TracerWarning):
        with pytest.raises(ValueError, match=rf"The {fmt} export of student differs from PyTorch by up to"):
            export_network(BranchesOnTheData(), images, str(tmp_path), formats=[fmt])
    assert list(tmp_path.iterdir()) == []


def test_every_format_must_pass_before_any_file_is_written(tmp_path, monkeypatch):
    import kd_lightning.commands.export as export

    def broken_torchscript(net: nn.Module, example: Tensor, path: str):
        torch.jit.trace(net, example).save(path)
        return lambda x: net(x) + 1.0  # an exported model off by one

    passed = []

    def working_onnx(net: nn.Module, example: Tensor, path: str):  # the real TorchScript export: it passes
        passed.append(path)
        return export._export_torchscript(net, example, path)

    monkeypatch.setitem(export._EXPORTERS, "onnx", working_onnx)
    monkeypatch.setitem(export._EXPORTERS, "torchscript", broken_torchscript)
    with pytest.raises(ValueError, match=r"The torchscript export of student differs from PyTorch by up to 1"):
        export_network(build_model("mlp", 10, hidden=[8]), digits_images(4), str(tmp_path),
                       formats=["onnx", "torchscript"])
    assert len(passed) == 1  # the first format was exported and checked ...
    assert list(tmp_path.iterdir()) == []  # ... and still not written


def test_too_small_a_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="more than 2 images"):
        export_network(build_model("mlp", 10, hidden=[8]), digits_images(2), str(tmp_path))


def test_command_line_exports_the_kd_student_alone(digits_checkpoints, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    result = subprocess.run([sys.executable, "-m", "kd_lightning", "export", f"--config={DIGITS}",
                             f"--student=kd_student={digits_checkpoints.kd}", f"--out={tmp_path}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |onnx - PyTorch|" in result.stdout and "max |torchscript - PyTorch|" in result.stdout
    assert "deprecated" not in result.stderr
    student = load_model("mlp", 10, checkpoint=str(digits_checkpoints.kd), **STUDENT_KWARGS).eval()
    weights = sum(int(torch.tensor(t.dims).prod()) for t in onnx.load(tmp_path / "kd_student.onnx").graph.initializer)
    assert weights == count_parameters(student)  # the student's weights and nothing of the teacher
    x = digits_images(5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(onnx_logits(tmp_path / "kd_student.onnx", x), student(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(load_torchscript(tmp_path / "kd_student.torchscript.pt")(x), student(x))


def test_command_line_reports_another_architecture_in_one_line(digits_checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"--config={DIGITS}", f"--student={digits_checkpoints.kd}", "--arch", "mlp {hidden: [32]}",
              f"--out={tmp_path / 'out'}", "--formats", "torchscript"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-lightning: error: ") and err.count("\n") == 1
    assert "holds 'mlp' {'hidden': [16]}" in err and "asked for 'mlp' {'hidden': [32]}" in err
    assert not (tmp_path / "out").exists()
