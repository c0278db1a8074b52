"""Edits to a model that can be undone, so ``prune()`` either completes or leaves the model exactly as it was.

Every edit is journaled. A narrowed tensor's old storage is freed as soon as its narrow copy exists (the parameter
object itself is kept, its shape intact over a one-element storage), so pruning needs about one tensor of extra memory
at a time; on an error the removed
values, kept aside, rebuild it bit for bit, and every module entry, attribute and class goes back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

_FAULT_AT: ContextVar[int | None] = ContextVar("lightning_prune_fault_at", default=None)


class InjectedFault(RuntimeError):
    """Raised by :func:`inject_fault` at a chosen edit (tests of atomicity)."""


@contextlib.contextmanager
def inject_fault(at: int) -> Iterator[None]:
    """Make the ``at``-th edit of any surgery inside raise :class:`InjectedFault` (1-based)."""
    token = _FAULT_AT.set(at)
    try:
        yield
    finally:
        _FAULT_AT.reset(token)


class Surgery:
    """A journal of undoable edits; use as a context manager: an exception rolls everything back."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.edits = 0
        self._fault_at = _FAULT_AT.get()
        self._snapshots: set[int] = set()
        self._tracked: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> Surgery:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None:
            self.rollback()
            self._tracked.clear()
        self._undo.clear()
        if error is None:
            self.finalize()
        return False

    def _edit(self) -> None:
        self.edits += 1
        if self._fault_at is not None and self.edits == self._fault_at:
            raise InjectedFault(f"injected fault at edit {self.edits}")

    def rollback(self) -> None:
        with torch.no_grad():
            while self._undo:
                self._undo.pop()()

    # -- edits --------------------------------------------------------------------------------------------------
    def set_entry(self, table: dict, key: str, value: Any) -> None:
        """``table[key] = value`` (a module's ``_parameters``, ``_buffers`` or ``_modules``); None deletes."""
        self._edit()
        had, old = key in table, table.get(key)
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value

        def undo() -> None:
            if had:
                table[key] = old
            else:
                table.pop(key, None)

        self._undo.append(undo)

    def reorder(self, table: dict, order: list[str]) -> None:
        """Put ``table``'s keys in ``order`` (keys not in it last), as a module listed its parameters before masks."""
        self._edit()
        old = list(table.items())
        items = sorted(table.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
        table.clear()
        table.update(items)

        def undo() -> None:
            table.clear()
            table.update(old)

        self._undo.append(undo)

    def set_class(self, module: nn.Module, cls: type) -> None:
        self._edit()
        old = module.__class__
        module.__class__ = cls
        self._undo.append(lambda: setattr(module, "__class__", old))

    def snapshot(self, module: nn.Module) -> None:
        """Record the module's plain attributes (sizes, flat-weight lists) before a rule changes them."""
        if id(module) in self._snapshots:
            return
        self._edit()
        self._snapshots.add(id(module))
        saved = {k: (list(v) if isinstance(v, list) else v) for k, v in module.__dict__.items()
                 if k not in ("_parameters", "_buffers", "_modules")}

        def undo() -> None:
            for key in [k for k in module.__dict__ if k not in saved and k not in ("_parameters", "_buffers",
                                                                                   "_modules")]:
                del module.__dict__[key]
            module.__dict__.update(saved)

        self._undo.append(undo)

    def keep_structure(self, module: nn.Module) -> None:
        """Record what an edit made outside this journal may replace (``load_pruned`` resizing a model): the
        module's class, plain attributes, and which parameters, buffers and submodules it holds (not their values)."""
        self.snapshot(module)
        cls = module.__class__
        tables = [(table, dict(table)) for table in (module._parameters, module._buffers, module._modules)]

        def undo() -> None:
            module.__class__ = cls
            for table, entries in tables:
                table.clear()
                table.update(entries)

        self._undo.append(undo)

    def narrow(self, old: torch.Tensor, keeps: dict[int, torch.Tensor]) -> torch.Tensor:
        """A view of ``old`` holding only the indices ``keeps[dim]`` (ascending) along each dim.

        Within ``old``'s own storage, the kept entries beyond the front swap places with the removed ones in front,
        then the front is put in order: nothing is lost (rollback reverses both) and nothing is kept aside. The view
        is made compact, and ``old`` released, by :meth:`finalize` once every edit has succeeded.
        """
        self._edit()
        view = old.detach()
        moves = []
        with torch.no_grad():
            for dim, index in sorted(keeps.items()):
                index, count = index.to(old.device), index.numel()
                if not torch.equal(index, torch.arange(count, device=old.device)):
                    kept = torch.zeros(view.shape[dim], dtype=torch.bool, device=old.device)
                    kept[index] = True
                    front = (~kept[:count]).nonzero().flatten()  # removed entries in front ...
                    back = index[index >= count]  # ... and as many kept ones behind
                    _swap(view, dim, front, back)
                    source = torch.arange(count, device=old.device)
                    source[front] = back  # which original entry each front position holds now
                    where = torch.empty(view.shape[dim], dtype=torch.long, device=old.device)
                    where[source] = torch.arange(count, device=old.device)
                    order = where[index]
                    head = view.narrow(dim, 0, count)
                    head.copy_(head.index_select(dim, order))
                    moves.append((view, dim, count, front, back, order))
                view = view.narrow(dim, 0, count)

        def undo() -> None:
            for whole, dim, count, front, back, order in reversed(moves):
                head = whole.narrow(dim, 0, count)
                head.copy_(head.index_select(dim, torch.argsort(order)))
                _swap(whole, dim, front, back)

        self._undo.append(undo)
        return view

    def track(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """``new`` (built on a view of ``old``) replaces ``old``: at :meth:`finalize` it becomes compact and ``old``
        lets go of its storage, keeping its shape for whoever still holds it (an optimizer's state is sliced
        against that shape)."""
        self._tracked.append((old, new))

    def finalize(self) -> None:
        """After every edit succeeded: compact the narrowed tensors and free the old storages, one at a time."""
        with torch.no_grad():
            while self._tracked:
                old, new = self._tracked.pop(0)
                new.data = new.data.clone(memory_format=torch.contiguous_format)  # its own, compact storage
                old.data = torch.zeros((), dtype=old.dtype, device=old.device).expand(old.shape)

    def zero(self, tensor: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        """Zero ``tensor``'s entries ``index`` along ``dim`` in place."""
        if not index.numel():
            return
        self._edit()
        index = index.to(tensor.device)
        with torch.no_grad():
            saved = tensor.index_select(dim, index).clone()
            tensor.index_fill_(dim, index, 0)
        self._undo.append(lambda: tensor.index_copy_(dim, index, saved))

    def add(self, tensor: torch.Tensor, delta: torch.Tensor) -> None:
        """``tensor += delta`` in place."""
        self._edit()
        with torch.no_grad():
            saved = tensor.detach().clone()
            tensor.add_(delta.to(tensor.dtype))
        self._undo.append(lambda: tensor.copy_(saved))

    def assign(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """``tensor`` takes ``value``'s entries in place (same shape; an RMSNorm's weight rescaled)."""
        self._edit()
        with torch.no_grad():
            saved = tensor.detach().clone()
            tensor.copy_(value)
        self._undo.append(lambda: tensor.copy_(saved))


def _swap(tensor: torch.Tensor, dim: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the entries ``a`` and ``b`` (disjoint, equally many) of ``tensor`` along ``dim``, in place."""
    if a.numel():
        held = tensor.index_select(dim, a)
        tensor.index_copy_(dim, a, tensor.index_select(dim, b))
        tensor.index_copy_(dim, b, held)
