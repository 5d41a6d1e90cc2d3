"""What a trained network costs to ship: parameters, size on disk, FLOPs per image and CPU latency.

Used by the study table (:func:`network_cost`) and by ``kd-lightning evaluate``; every function leaves the network's train/eval
mode as it found it.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def count_parameters(net: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in net.parameters())


def size_on_disk_kb(net: nn.Module) -> float:
    """Size of ``torch.save(net.state_dict())`` in KiB: what shipping the weights costs."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.tell() / 1024


def flops_per_image(net: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on one image of ``input_shape``, counted by ``torch.utils.flop_counter``.

    The counter counts matrix multiplications and convolutions as 2 FLOPs per multiply-accumulate (a Linear
    layer ``n -> m`` costs ``2 n m``); element-wise operations (activations, BatchNorm in eval, pooling) are not
    counted, as in the FLOP columns of the distillation papers.
    """
    param = next(net.parameters(), None)
    x = torch.zeros(1, *input_shape, device=None if param is None else param.device)
    with _eval_mode(net), torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return int(counter.get_total_flops())


def latency_us(net: nn.Module, input_shape: Sequence[int], batch_size: int = 1, repeats: int = 300,
               warmup: int = 20, statistic: Callable[[list[float]], float] = statistics.median) -> float:
    """CPU wall time of one forward pass on a batch of ``batch_size`` random inputs, in microseconds.

    ``warmup`` untimed passes first (allocator and kernel caches), then ``statistic`` over ``repeats`` timed
    passes: ``median`` is the typical cost; ``min`` the most stable figure on a shared machine, where noise only
    ever adds time. The caller chooses the thread count (``torch.set_num_threads``) and should state it.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch_size and repeats must be >= 1 and warmup >= 0, got {batch_size}, {repeats}, "
                         f"{warmup}.")
    x = torch.rand(batch_size, *input_shape)
    times = []
    with _eval_mode(net), torch.inference_mode():
        for _ in range(warmup):
            net(x)
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return statistic(times) * 1e6


def network_cost(net: nn.Module, input_shape: Sequence[int], repeats: int = 300) -> dict[str, float | int]:
    """What a study's table reports per network: parameters, size on disk (KiB) and the best of ``repeats``
    single-image CPU forward passes on one thread (µs; the minimum is the stable statistic on a shared machine).
    Measured on a CPU copy, so a network trained on a GPU is timed on the CPU too."""
    net = copy.deepcopy(net).cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latency = latency_us(net, input_shape, batch_size=1, repeats=repeats, warmup=20, statistic=min)
    finally:
        torch.set_num_threads(threads)
    return {"params": count_parameters(net), "size_kb": size_on_disk_kb(net), "latency_us": latency}
