"""``kd-lightning export``: the student alone (no teacher) to ONNX and TorchScript, checked against PyTorch.

    kd-lightning export --config experiments/digits/base.yaml \\
        --student logs/digits/kd/version_0/checkpoints/best.ckpt --out logs/digits/export

writes ``<out>/<name>.onnx`` (input ``images``, output ``logits``, dynamic batch axis; needs the ``export``
extra: ``pip install 'kd_lightning[export]'``) and ``<out>/<name>.torchscript.pt`` (``torch.jit.load``), where
``<name>`` is ``student`` or the NAME of ``--student NAME=CHECKPOINT``. Each exported model is run on real
images of the data's split, on a batch of 1 and a full batch (both other than the batch of 2 it was traced
with), and compared with the PyTorch network: the largest absolute difference of the logits is printed, and
above ``--atol`` the export fails with exit status 2. Files appear only once every format has passed.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from kd_lightning.commands.inputs import (
    data_parser,
    instantiate_data,
    load_trained,
    output_folder,
    parse_architecture,
    parse_named_path,
    split_loader,
)
from kd_lightning.commands.errors import run_reporting_errors
from kd_lightning.core import as_heads

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TRACE_BATCH = 2  # the exported graph is traced on this many images and checked on other batch sizes


class MainHead(nn.Module):
    """A multi-head network (GoogLeNet: main and auxiliary heads) as one that returns its main head only."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return as_heads(self.net(x))[0]


@dataclass
class ExportedFile:
    format: str
    path: str
    max_abs_diff: float
    batch_sizes: tuple[int, ...]


@contextmanager
def _without_torchscript_deprecation_notices() -> Iterator[None]:
    # torch >= 2.9 marks torch.jit and the TorchScript-based ONNX exporter as deprecated. They are still the
    # formats users ask for (LibTorch loads TorchScript) and the exporter that needs no onnxscript; the
    # round-trip check vouches for the result, so these notices are kept off the user's screen. TracerWarnings
    # (a trace that may not generalise) stay visible.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        yield


def _export_onnx(net: nn.Module, example: Tensor, path: str) -> Callable[[Tensor], Tensor]:
    try:
        import onnxruntime
    except ImportError as err:
        raise ValueError("ONNX export needs onnx and onnxruntime: pip install 'kd_lightning[export]' (or export "
                         "with --formats torchscript).") from err
    # The TorchScript-based exporter (dynamo=False): it runs with onnx alone on every torch this package supports,
    # while the torch.export-based one needs onnxscript and fails on more models; the check below verifies it.
    torch.onnx.export(net, (example,), path, dynamo=False, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def _export_torchscript(net: nn.Module, example: Tensor, path: str) -> Callable[[Tensor], Tensor]:
    torch.jit.trace(net, example).save(path)
    loaded = torch.jit.load(path, map_location="cpu")
    return lambda x: loaded(x)


_EXPORTERS = {"onnx": _export_onnx, "torchscript": _export_torchscript}


def export_network(net: nn.Module, images: Tensor, out_dir: str, name: str = "student",
                   formats: Sequence[str] = FORMATS, atol: float = 1e-4) -> list[ExportedFile]:
    """Export ``net`` (in eval mode, on the CPU) to ``out_dir/<name><suffix>`` for each of ``formats`` and check
    each exported model against ``net``.

    The graph is traced on ``images[:2]``; the check runs the exported model on ``images[:1]`` and on all of
    ``images`` (at least 3, so both batch sizes differ from the traced one and the batch axis is shown to be
    dynamic), and requires ``max |exported - PyTorch| <= atol`` on the logits. Each format is written to a
    temporary file in ``out_dir`` and renamed only after every format has passed, so a failure (a network that
    cannot be traced, or one whose export computes something else) leaves no file behind.

    Raises:
        ValueError: an unknown format, too few images, a network that cannot be exported or run after export,
            or a difference above ``atol``.
    """
    if unknown := [f for f in formats if f not in FORMATS]:
        raise ValueError(f"Unknown export format(s) {unknown}; choose from {list(FORMATS)}.")
    if images.ndim < 2 or len(images) <= TRACE_BATCH:
        raise ValueError(f"Export needs a batch of more than {TRACE_BATCH} images to check the exported model, got "
                         f"shape {tuple(images.shape)}.")
    net = net.cpu().eval()
    architecture = type(net).__name__
    images = images.cpu().float()
    with torch.no_grad():
        output = net(images[:1])
        if isinstance(output, (tuple, list)) and output and all(isinstance(h, Tensor) for h in output):
            net = MainHead(net)  # what ships is the main head
        elif not isinstance(output, Tensor):
            raise ValueError(f"Cannot export {name} ({architecture}): it returns {type(output).__name__}, not "
                             "logits (a tensor, or a tuple of heads with the main one first).")
        checks = [images[:1], images]
        expected = [net(x) for x in checks]
    os.makedirs(out_dir, exist_ok=True)
    done: list[tuple[str, ExportedFile]] = []  # (temporary path, final file)
    try:
        for fmt in formats:
            # beside the final file, so the rename is atomic; created by the exporter, so with the usual permissions
            tmp = os.path.join(out_dir, f".{name}{SUFFIXES[fmt]}.{os.getpid()}.tmp")
            done.append((tmp, ExportedFile(fmt, os.path.join(out_dir, name + SUFFIXES[fmt]), float("nan"),
                                           tuple(len(x) for x in checks))))
            try:
                with _without_torchscript_deprecation_notices():
                    run_exported = _EXPORTERS[fmt](net, images[:TRACE_BATCH], tmp)
            except ValueError:
                raise
            except Exception as err:  # noqa: BLE001 - tracing fails in many ways; say which network and format
                raise ValueError(f"Cannot export {name} ({architecture}) to {fmt}: "
                                 f"{_first_line(err)}. Export traces the forward pass: it must take one image "
                                 "batch and return logits computed by tensor operations only.") from err
            diff = 0.0
            for x, reference in zip(checks, expected):
                try:
                    got = run_exported(x)
                except Exception as err:  # noqa: BLE001
                    raise ValueError(f"The {fmt} export of {name} fails on a batch of {len(x)} (traced with "
                                     f"{TRACE_BATCH}): {_first_line(err)}. Does the network fix the batch size "
                                     "in its forward pass?") from err
                if got.shape != reference.shape:
                    raise ValueError(f"The {fmt} export of {name} gives shape {tuple(got.shape)} on a batch of "
                                     f"{len(x)}, PyTorch {tuple(reference.shape)}.")
                diff = max(diff, (got.float() - reference).abs().max().item())
            done[-1][1].max_abs_diff = diff
            if not diff <= atol:  # also catches NaN
                raise ValueError(f"The {fmt} export of {name} differs from PyTorch by up to {diff:.3g} (tolerance "
                                 f"--atol {atol:g}) on batches of {[len(x) for x in checks]}: the traced graph "
                                 "does not compute what the network does (data-dependent control flow?). "
                                 "Nothing was written.")
        for tmp, exported in done:
            os.replace(tmp, exported.path)
        return [exported for _, exported in done]
    finally:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.remove(tmp)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__).rstrip(".")


def _run(argv: list[str] | None) -> list[ExportedFile]:
    parser = data_parser("kd-lightning export", __doc__)
    parser.add_argument("--student", required=True,
                        help="[NAME=]CHECKPOINT: a .ckpt of kd-lightning fit (a KD run's student, or a "
                             "ClassifierModule's network) or a state_dict file with --arch; NAME names the "
                             "files (default: student)")
    parser.add_argument("--arch", default=None,
                        help="architecture of a plain state_dict, e.g. 'mlp {hidden: [32]}'")
    parser.add_argument("--out", required=True, help="folder for <name>.onnx and <name>.torchscript.pt")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed absolute difference of exported and PyTorch logits")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    cfg = parser.parse_args(argv)
    if not cfg.atol >= 0:
        parser.error("--atol must be >= 0")
    if cfg.threads is not None:
        if cfg.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(cfg.threads)

    name, path = parse_named_path(cfg.student, "student")
    data = instantiate_data(parser, cfg)
    net = load_trained(path, data.num_classes, parse_architecture(cfg.arch) if cfg.arch else None)
    output_folder(cfg.out)  # the inputs are good: now the output folder, before the export
    images = next(iter(split_loader(data, cfg.split)))[0]
    exported = export_network(net, images, cfg.out, name, cfg.formats, cfg.atol)
    for e in exported:
        print(f"{e.format}: {e.path} ({os.path.getsize(e.path) / 1024:.1f} KB); max |{e.format} - PyTorch| = "
              f"{e.max_abs_diff:.2g} on batches of {' and '.join(map(str, e.batch_sizes))} "
              f"(tolerance {cfg.atol:g})")
    return exported


def main(argv: list[str] | None = None) -> list[ExportedFile]:
    """``kd-lightning export``; bad input exits with one ``kd-lightning: error: ...`` line (status 2)."""
    return run_reporting_errors(lambda: _run(argv))


if __name__ == "__main__":
    main()
