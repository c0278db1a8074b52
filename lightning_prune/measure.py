"""Size and speed of a model: parameters, MACs, CPU latency and per-layer widths.

Pruning is only worth its accuracy cost if these numbers move, so the callback, the app and the examples
all report them the same way, through PyTorch's own counters rather than hand-written formulas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune.inputs import as_call

#: one input for ``forward``: a tensor, a tuple of positional arguments, or a dict of keyword arguments
ExampleInput = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]



def count_params(model: nn.Module) -> int:
    """Number of parameter elements; a parameter shared by several modules counts once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: ExampleInput) -> int:
    """Multiply-accumulates of one eval-mode forward pass, from ``FlopCounterMode`` (MACs = FLOPs / 2).

    Counted with :func:`countable_kernels`, so an LSTM counts.
    """
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), countable_kernels(), counter:
        args, kwargs = as_call(example_input)
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


@contextlib.contextmanager
def countable_kernels() -> Iterator[None]:
    """oneDNN, cuDNN and the fused transformer inference path off: their fused kernels (an LSTM's, an
    ``nn.TransformerEncoderLayer``'s in eval mode) have no FLOP formula; the reference kernels run the same math as
    matmuls that ``FlopCounterMode`` counts."""
    mkldnn, mha = torch.backends.mkldnn, torch.backends.mha
    fastpath = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with mkldnn.flags(enabled=False, deterministic=mkldnn.deterministic, allow_tf32=mkldnn.allow_tf32), \
                torch.backends.cudnn.flags(enabled=False):
            yield
    finally:
        mha.set_fastpath_enabled(fastpath)


def latency_ms(
    model: nn.Module, example_input: ExampleInput, threads: int = 1, min_run_time: float = 0.2
) -> float:
    """Median wall time of one eval-mode forward pass in milliseconds, on a fixed number of threads.

    A fixed thread count makes dense and pruned timings comparable across runs and machines.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be a positive number of seconds, got {min_run_time!r}")
    args, kwargs = as_call(example_input)
    timer = benchmark.Timer(
        stmt="model(*args, **kwargs)",
        globals={"model": model, "args": args, "kwargs": kwargs},
        num_threads=threads,
    )
    with eval_mode(model), torch.no_grad():
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return measurement.median * 1e3


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Measure in eval mode (Dropout off, BatchNorm statistics frozen), then restore every module's mode."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
