"""One example input for a model's ``forward``: to trace shapes, verify fusion and count MACs. Torch-only.

An example input is what Lightning's ``LightningModule.example_input_array`` holds: a tensor (one positional
argument), a tuple or list (positional arguments) or a dict (keyword arguments).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sized
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_prune.errors import PruningConfigError


def as_call(example: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model.forward`` from an example input, as Lightning reads ``example_input_array``.

    Raises:
        PruningConfigError: ``example`` is none of a tensor, a tuple/list or a dict with string keys.
    """
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, Mapping) and all(isinstance(key, str) for key in example):
        return (), dict(example)
    raise PruningConfigError(
        "an example input must be a tensor, a tuple of positional arguments or a dict of keyword arguments for "
        f"forward(), got {type(example).__name__}"
    )


def run_forward(model: torch.nn.Module, example: Any) -> Any:
    """``model(*args, **kwargs)`` on an example input."""
    args, kwargs = as_call(example)
    return model(*args, **kwargs)


def from_batch(batch: Any) -> Any:
    """The part of a training batch that ``forward`` takes, by a fixed rule: a tensor batch is the input, a tuple or
    list batch gives its first element (``(x, y)`` -> ``x``), a dict batch is taken as keyword arguments.

    Returns None for anything else. Models whose forward takes more (``forward(x, mask)``) set
    ``example_input_array`` instead.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping) and batch and all(isinstance(key, str) for key in batch):
        return dict(batch)
    return None


def first_batch(loader: Any) -> Any:
    """A batch shaped like the loader's, drawn without changing what the training run will see.

    For a ``DataLoader`` over a map-style dataset: ``collate_fn`` over its first ``batch_size`` items (not the
    sampler's first batch; no sampler, no workers started). Otherwise the first batch of a fresh iterator, with the
    loader's and its sampler's generators restored afterwards. Either way the global RNGs (torch CPU, ``random``,
    numpy) are restored too, so a dataset's random augmentation leaves the run's randomness as it was.
    """
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    elif isinstance(loader, (list, tuple)):
        loader = loader[0]
    with preserved_random_state(loader):
        dataset = getattr(loader, "dataset", None)
        if (isinstance(loader, DataLoader) and loader.batch_size is not None and isinstance(dataset, Sized)
                and not isinstance(dataset, IterableDataset) and len(dataset) > 0):
            items = [dataset[i] for i in range(min(loader.batch_size, len(dataset)))]
            return loader.collate_fn(items)
        return next(iter(loader))


@contextmanager
def preserved_random_state(loader: Any = None) -> Iterator[None]:
    """Restore torch's CPU RNG, ``random``, numpy's global RNG and the loader's (and its sampler's) generators."""
    generators = [g for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None),
                                                                          "generator", None))
                  if isinstance(g, torch.Generator)]
    saved = [g.get_state() for g in generators]
    python_state = random.getstate()
    try:  # numpy is not a dependency of ours: its RNG is saved only where it is installed
        import numpy
        numpy_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        numpy = numpy_state = None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for generator, state in zip(generators, saved, strict=True):
                generator.set_state(state)
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


def to_device(example: Any, device: torch.device) -> Any:
    """The example with every tensor (in tuples, lists and dicts too) moved to ``device``."""
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, Mapping):
        return {key: to_device(value, device) for key, value in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(to_device(value, device) for value in example)
    return example


def detached(example: Any) -> Any:
    """A copy of the example that shares no storage or autograd history with the batch it came from."""
    if isinstance(example, torch.Tensor):
        return example.detach().clone()
    if isinstance(example, Mapping):
        return {key: detached(value) for key, value in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(detached(value) for value in example)
    return example


def batch_size(example: Any) -> int | None:
    """The leading dimension of the example's first tensor (the batch, by convention), or None."""
    args, kwargs = as_call(example)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None
