"""Distillation: recover what pruning costs by matching the student's logits to a frozen teacher's.

``Distillation`` is a companion callback to :class:`~lightning_prune.StructuredPruning` rather than a ``distill=``
argument to it: distilling is useful without pruning (and pruning without distilling), and a callback of its own
keeps StructuredPruning's hooks about masks. The user's ``training_step`` needs no extra line. At ``setup`` the callback
wraps the LightningModule's ``training_step`` for the fit and puts a forward hook on the student (the LightningModule,
or the submodule named by ``module``); while ``training_step`` runs, the hook records every call of the student: its
inputs and its output. When ``training_step`` returns its loss, the teacher runs on each recorded input under
``torch.no_grad()`` in eval mode and the returned loss gains ``alpha * T**2 * KL(teacher || student)`` over the
temperature-``T`` softmax of the logits (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; the
logit loss of Minitron, Muralidharan et al. 2024), averaged over every position of every recorded call. Because the
term is added to what ``training_step`` returns, Lightning's gradient accumulation, precision plugins and DDP
treat it exactly as the user's own loss.

The contract: ``training_step`` calls the student (``self(x)``, or ``self.<module>(...)`` with ``module=``) and
returns the loss as a tensor or as a dict's ``"loss"``; the student's output is the logits tensor, or holds it as
``.logits`` (Hugging Face), as ``["logits"]`` or as its first element, or ``logits=`` names a function that finds it.
Anything else is a :class:`~lightning_prune.errors.PruningConfigError` at the first training step (at ``setup`` when
``example_input_array`` is set, which is checked then), naming what was found.

The teacher: ``"dense"`` is a deep copy of the student taken at ``setup``, so the callbacks' order does not matter:
when Distillation comes after StructuredPruning in ``callbacks=[...]`` the copy carries masks, but at setup they keep
every channel, so it computes what the dense model computes (exactly: a mask multiplies by 1), and the copy's masks
are its own, out of the pruner's reach. Placing Distillation first spares the teacher those mask multiplications.
A module passed as ``teacher`` is used as it is (frozen). Either way the teacher is an attribute of the callback, not
a submodule of the LightningModule, so it is in neither ``state_dict`` nor any checkpoint; it follows the student's
device and floating dtype at ``on_train_start``, and under DDP every rank's dense copy takes rank 0's weights.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_prune.checkpoint import DetachingHook
from lightning_prune.errors import PruningConfigError
from lightning_prune.masks import FakeStructuredSparsity


class Distillation(Callback):
    """Add ``alpha * T**2 * KL(teacher || student)`` on the logits to the loss ``training_step`` returns.

    Args:
        teacher: ``"dense"`` (a frozen deep copy of the student at ``setup``, before any channel is pruned) or an
            ``nn.Module`` called with the student's inputs whose logits have the student's shape.
        alpha: weight of the distillation term, a finite number > 0.
        temperature: ``T``, a finite number > 0; both distributions are ``softmax(logits / T)`` and the KL is
            scaled by ``T**2`` so its gradients keep their size as ``T`` changes (Hinton et al. 2015).
        module: the submodule of the LightningModule whose calls produce the logits (e.g. ``"net"``), or ``None``
            for the LightningModule's own ``forward``.
        logits: a function from the student's (and teacher's) output to the logits tensor, for outputs that are
            not a tensor, ``.logits``, ``["logits"]`` or a tuple starting with the logits.

    Logits have shape ``(..., V)``: every position over the last dim is one distribution (a classifier's
    ``(N, V)``, a language model's ``(N, T, V)``). Logged, rank zero: ``distill/kl`` (the KL, nats per position),
    ``distill/loss`` (the term added), ``distill/teacher_ms`` (the teacher's forward time per step) and
    ``distill/teacher_bytes`` (its parameters and buffers), every step.

    Raises:
        PruningConfigError: a bad ``alpha``, ``temperature``, ``teacher``, ``module`` or ``logits`` (in ``__init__``);
            at ``setup``: manual optimization (nothing to add the term to), a second Distillation on the same
            LightningModule (one per module), an unknown ``module``, a dense copy of
            a model with channels already pruned; when a checkpoint is restored into a fit with ``teacher="dense"``
            (the copy taken at setup is not the model the run started from: pass the dense model as ``teacher``);
            at the first step (or ``setup``, with ``example_input_array``): a ``training_step`` that calls no
            student, an output whose logits cannot be found, teacher logits of another shape.
    """

    def __init__(
        self,
        teacher: str | nn.Module = "dense",
        alpha: float = 1.0,
        temperature: float = 1.0,
        module: str | None = None,
        logits: Callable[[Any], torch.Tensor] | None = None,
    ):
        if not (teacher == "dense" if isinstance(teacher, str) else isinstance(teacher, nn.Module)):
            raise PruningConfigError(f"Distillation: teacher must be 'dense' or an nn.Module, got {teacher!r}")
        for name, value in (("alpha", alpha), ("temperature", temperature)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise PruningConfigError(f"Distillation: {name} must be a finite number > 0, got {value!r}")
        if module is not None and (not isinstance(module, str) or not module):
            raise PruningConfigError(f"Distillation: module must be a submodule name such as 'net' or None, got "
                                     f"{module!r}")
        if logits is not None and not callable(logits):
            raise PruningConfigError(f"Distillation: logits must be a function from an output to its logits, got "
                                     f"{logits!r}")
        self.dense = isinstance(teacher, str)
        self.teacher: nn.Module | None = None if self.dense else teacher
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.module, self.logits = module, logits
        self._copied_in_this_fit = False
        self._recording = False
        self._calls: list[tuple[tuple, dict, Any]] = []
        self._hook = None
        self._wrapped: pl.LightningModule | None = None
        self._teacher_bytes = 0

    def __repr__(self) -> str:
        teacher = "'dense'" if self.dense else type(self.teacher).__name__
        return (f"Distillation(teacher={teacher}, alpha={self.alpha}, temperature={self.temperature}, "
                f"module={self.module!r})")

    # -- setup --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise PruningConfigError(
                "Distillation adds its term to the loss training_step returns, which manual optimization "
                "(automatic_optimization=False) does not use; optimise automatically or add the loss yourself")
        other = vars(pl_module).get("training_step")
        if isinstance(other, _DistilledStep):
            raise PruningConfigError(
                f"one Distillation per LightningModule: {other.callback!r} already distils this "
                f"{type(pl_module).__name__}, so {self!r} cannot; give one callback (one teacher, alpha, temperature)")
        student = self._student(pl_module)
        self._copied_in_this_fit = self.teacher is None
        if self.teacher is None:  # a second fit keeps the teacher of the first
            self.teacher = dense_copy(student)
        self.teacher.requires_grad_(False).eval()
        self._hook = student.register_forward_hook(DetachingHook(self._record), with_kwargs=True)
        pl_module.training_step = _DistilledStep(self, pl_module, pl_module.training_step)
        self._wrapped = pl_module
        if pl_module.example_input_array is not None:
            self._check_on_example(pl_module)

    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise PruningConfigError(f"Distillation: {type(pl_module).__name__} has no submodule {self.module!r}; "
                                     f"its children are {children}") from None

    def _check_on_example(self, pl_module: pl.LightningModule) -> None:
        """Run the student on ``example_input_array`` and the teacher on what the student was called with: the
        contract's errors surface at setup instead of the first step."""
        example, was_training = pl_module.example_input_array, pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                self._calls, self._recording = [], True
                if isinstance(example, Mapping):
                    pl_module(**example)
                elif isinstance(example, tuple):
                    pl_module(*example)
                else:
                    pl_module(example)
                self._recording = False
                self._distillation_loss()
        finally:
            self._recording, self._calls = False, []
            pl_module.train(was_training)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._copied_in_this_fit:
            raise PruningConfigError(
                "Distillation(teacher='dense') copied the model at setup, before this checkpoint replaced its "
                "weights, so that copy is not the dense model the run started from. When resuming, pass the dense "
                f"model itself: Distillation(teacher={type(pl_module).__name__}.load_from_checkpoint('dense.ckpt'), "
                "...)")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        parameter = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
        if parameter is not None:
            self.teacher.to(device=parameter.device, dtype=parameter.dtype)
        if self.dense and trainer.world_size > 1:  # DDP gave every student rank 0's weights; the teachers too
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in self.teacher.state_dict().items()}, src=0)
            self.teacher.load_state_dict(state)
        self._teacher_bytes = sum(t.numel() * t.element_size()
                                  for t in (*self.teacher.parameters(), *self.teacher.buffers()))
        rank_zero_info(f"Distillation: teacher {type(self.teacher).__name__}, {self._teacher_bytes / 2**20:.2f} MiB, "
                       f"alpha {self.alpha}, temperature {self.temperature}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        """Nothing of the callback stays on the module after a fit, finished or failed: it pickles and copies."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    # -- the loss -----------------------------------------------------------------------------------------------
    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._recording:
            self._calls.append((args, kwargs, output))

    def training_step(self, pl_module: pl.LightningModule, step: Callable, *args: Any, **kwargs: Any) -> Any:
        """``step(*args, **kwargs)`` (the module's own ``training_step``) with the distillation term added to its
        loss. Called through the wrapper that ``setup`` installs."""
        self._calls, self._recording = [], True
        try:
            output = step(*args, **kwargs)
        finally:
            self._recording = False
        if output is None:  # the user skipped this batch
            self._calls = []
            return None
        try:
            term, kl, milliseconds = self._distillation_loss()
        finally:
            self._calls = []
        pl_module.log_dict({"distill/kl": kl, "distill/loss": term.detach(), "distill/teacher_ms": milliseconds,
                            "distill/teacher_bytes": float(self._teacher_bytes)}, rank_zero_only=True)
        if isinstance(output, Mapping):
            return {**output, "loss": output["loss"] + term}
        return output + term

    def _distillation_loss(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The term for the recorded calls, the mean KL (detached) and the teacher's forward time in ms."""
        if not self._calls:
            where = "self(...)" if self.module is None else f"self.{self.module}(...)"
            raise PruningConfigError(
                f"Distillation reads the student's logits from its calls during training_step, but training_step "
                f"called no {where}. Call the student there, or name the submodule that computes the logits: "
                "Distillation(module='net')")
        self.teacher.eval()
        kls, elapsed = [], 0.0
        for args, kwargs, output in self._calls:
            student = self._find_logits(output, "student")
            started = time.perf_counter()
            with torch.no_grad():
                teacher = self._find_logits(self.teacher(*args, **kwargs), "teacher")
                if teacher.is_cuda:
                    torch.cuda.synchronize(teacher.device)
            elapsed += time.perf_counter() - started
            if teacher.shape != student.shape:
                raise PruningConfigError(f"Distillation: the teacher's logits have shape {tuple(teacher.shape)}, the "
                                         f"student's {tuple(student.shape)}; they must be the same")
            kls.append(kl_divergence(teacher, student, self.temperature))
        kl = torch.stack(kls).mean()
        return self.alpha * self.temperature ** 2 * kl, kl.detach(), 1000 * elapsed

    def _find_logits(self, output: Any, whose: str) -> torch.Tensor:
        found = self.logits(output) if self.logits is not None else logits_of(output)
        if not isinstance(found, torch.Tensor) or not found.is_floating_point() or found.dim() < 1:
            source = "logits=..." if self.logits is not None else f"the {whose}'s output"
            raise PruningConfigError(
                f"Distillation: found no logits in {source}: got {type(found).__name__}"
                f"{'' if not isinstance(found, torch.Tensor) else f' {found.dtype} of shape {tuple(found.shape)}'}. "
                "It reads a floating tensor of shape (..., V), the output itself, its .logits, its ['logits'] or "
                "its first element; pass Distillation(logits=lambda output: ...) for anything else")
        return found


class _DistilledStep:
    """The LightningModule's ``training_step`` for one fit, through :meth:`Distillation.training_step`. A copy or
    pickle of the module carries its own ``training_step`` instead (the teacher never travels with the module)."""

    def __init__(self, callback: Distillation, module: pl.LightningModule, step: Callable):
        self.callback, self.module, self.step = callback, module, step
        self.__wrapped__ = step  # functools.wraps' convention: Lightning's is_overridden reads the user's method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.callback.training_step(self.module, self.step, *args, **kwargs)

    def __reduce__(self):
        return getattr, (self.module, "training_step")


def dense_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``. Pruning masks it carries (when StructuredPruning set up first) stay on the copy:
    they keep every channel at setup, so the copy computes the dense model's outputs exactly, and the student's
    pruning and fusion never reach the copy's own masks.

    Raises:
        PruningConfigError: a mask has already pruned a channel: the copy would not be the dense model.
    """
    if any(isinstance(m, FakeStructuredSparsity) and not bool(m.mask.all()) for m in module.modules()):
        raise PruningConfigError(
            "Distillation(teacher='dense'): the model already has pruned channels at setup, so a copy of it is not "
            "the dense model; pass the dense model as teacher=...")
    return copy.deepcopy(module)


def logits_of(output: Any) -> Any:
    """The logits in a model's output: the tensor itself, ``.logits``, ``["logits"]`` or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` over the last dim, in nats, averaged over every other
    position; computed in float32 whatever the logits' dtype. Shapes: both ``(..., V)``; the result is a scalar."""
    student = F.log_softmax(student.float() / temperature, dim=-1).reshape(-1, student.shape[-1])
    teacher = F.log_softmax(teacher.float() / temperature, dim=-1).reshape(-1, teacher.shape[-1])
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")

