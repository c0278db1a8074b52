"""Rule kinds: what a layer or op does to the channels that reach it, and how to narrow it.

Every rule has a :class:`RuleKind` and implements ``visit(v)``, which the walk calls with a
:class:`~lightning_prune.fusion.walk.Visit`. Users subclass one of the kinds below and register it with
:func:`~lightning_prune.fusion.rules.registry.register_layer` or ``register_function``:

- :class:`LayerRule` (``LAYER``): a layer with its own input and output channels (Linear, ConvNd, LSTM, Embedding).
  It consumes the channels that reach it (its weight's input dim is narrowed with them) and produces new channels
  (its weight's rows), which a pruner can mask.
- :class:`ChannelwiseRule` (``CHANNELWISE``): keeps channel ``c`` at ``c`` and holds per-channel tensors to narrow
  (BatchNorm, InstanceNorm, PReLU, a depthwise conv's weight).
- :class:`ElementwiseRule` (``ELEMENTWISE``): keeps channel ``c`` at ``c`` with no state (activations, dropout,
  pooling over the dims after the channels).
- ``LAYOUT``: moves channels between dims or positions (view, permute, indexing, concat); ``COMBINE``: joins two
  tensors position by position (add, mul); ``ATTENTION``: heads (SDPA, matmul); ``BLOCKING``: an op whose output
  mixes the channels it reads, such as LayerNorm over them; it refuses with the reason.
- :class:`ContainerRule` (``CONTAINER``): a module whose forward the analysis reads op by op (an attention block, an
  MLP); the rule only keeps the module's size attributes (head counts, widths) in step with its narrowed children.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.records import TensorRef
from lightning_prune.fusion.visit import Visit


class RuleKind(enum.Enum):
    LAYER = "layer"
    CHANNELWISE = "channelwise"
    ELEMENTWISE = "elementwise"
    LAYOUT = "layout"
    COMBINE = "combine"
    ATTENTION = "attention"
    BLOCKING = "blocking"
    CONTAINER = "container"


class Rule:
    """Base of all rules."""

    kind: RuleKind = RuleKind.BLOCKING
    #: a call of the module returns a tensor of its input's shape and dtype, so the shape pass skips running it
    keeps_shape: bool = False

    @property
    def transparent(self) -> bool:
        """Whether the module is not a leaf (a ``CONTAINER`` rule): the front ends trace through it and only
        :meth:`sync` is used."""
        return self.kind is RuleKind.CONTAINER

    def visit(self, v: Visit) -> None:
        """Read the node's inputs from ``v`` and record its output layout, couplings, blocks and bindings."""
        raise NotImplementedError

    def const(self, v: Visit, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """What the node outputs for removed channels that emit constants.

        ``inputs`` hold, for each channel-carrying input in order, the constant at every position of its layout's
        labels; return the constant at every position of the output layout (optionally with a bool tensor marking
        positions where the value varies along the other dims, so those channels must stay), or None when the op
        only moves positions (the values follow their channels).
        """
        return None

    def widths(self, module: nn.Module) -> tuple[int, int] | None:
        """(input, output) channels of a module, for summaries; None if the rule has no notion of them."""
        return None

    def sync(self, module: nn.Module) -> None:
        """Set the module's size attributes from its (already narrowed) tensors."""

    def resized(self, module: nn.Module, before: tuple[int, int] | None) -> None:
        """``load_pruned`` gave the module's tensors a checkpoint's shapes; ``before`` is what :meth:`widths` said
        until then. Sets the size attributes (:meth:`sync`), and whatever else depends on the width it had."""
        self.sync(module)

    def on_masked(self, module: nn.Module) -> None:
        """Called once masks are attached to (or inside) ``module``: make the masked model compute what the pruned
        one will (a LayerNorm's statistics over the kept channels), or switch off what it cannot (a fused path
        that only runs at full width)."""

    # -- fusion hooks for what the walk recorded with ``v.action(data)`` (``ctx``: apply's FuseContext) --------
    def adjust_kept(self, module: nn.Module, data: Any, ctx: Any) -> str | None:
        """Change which classes stay before anything is narrowed (``ctx.kept``, by class root); returns a note."""
        return None

    def owned_tensors(self, module: nn.Module, data: Any, ctx: Any) -> list[torch.Tensor]:
        """Tensors this rule narrows itself in :meth:`narrow` instead of by their bindings."""
        return []

    def narrow(self, module: nn.Module, data: Any, ctx: Any) -> None:
        """Rule-specific narrowing; ``ctx.kept_positions(labels)`` gives the kept positions of a label tensor and
        ``ctx.surgery`` journals tensor edits. Size attributes set here are restored on rollback."""


def input_layout(v: Visit) -> Layout | None:
    """The first argument's layout; any other argument carrying channels is blocked as a secondary input."""
    first = v.arg(0, "input")
    for arg in v.node.all_input_nodes:
        if arg is not first and v.value(arg) is not None and not _is_ref(v.value(arg)):
            v.block(v.value(arg), f"{v.where} takes pruned channels as a secondary argument")
    return v.layout(first)


def tie_axis(v: Visit, labels: torch.Tensor, axis: int) -> None:
    """Couple the channels along ``axis`` of ``labels`` position by position, so that no position along it ever
    disappears: its extent is fixed (a grouped conv's groups, a literal size, a picked index) while the positions
    along the other axes go or stay together."""
    v.couple(labels.narrow(axis, 0, 1).expand_as(labels), labels)


def _is_ref(value: Any) -> bool:
    return isinstance(value, TensorRef)


class LayerRule(Rule):
    """A layer with its own in and out channels. Subclasses say where the channels live and how to slice them."""

    kind = RuleKind.LAYER
    #: where the channels sit in the layer's (batched) input and output tensors: 1 (N, C, ...) or -1 (..., C)
    channel_dim: int = -1

    def channel_dim_of_weight(self, module: nn.Module) -> int:
        """The weight dim that holds the output channels (the input channels are the other leading dim)."""
        return 0

    def bias_names(self, module: nn.Module, tensor_name: str) -> list[str]:
        """Per-row tensors narrowed and masked with the rows of ``tensor_name``."""
        return ["bias"] if getattr(module, "bias", None) is not None else []

    def output_ndim(self, module: nn.Module) -> int | None:
        """The output's rank when no shapes are known (None: any)."""
        return None

    def out_ndim(self, v: Visit, module: nn.Module) -> int | None:
        """This call's output rank: from the shapes, else :meth:`output_ndim`, recorded as an assumption."""
        return v.ndim() if v.shapes else v.assume_rank(self.output_ndim(module))

    def in_channels(self, module: nn.Module) -> int:
        raise NotImplementedError

    def out_channels(self, module: nn.Module) -> int:
        raise NotImplementedError

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return self.in_channels(module), self.out_channels(module)

    def constant_input_is_constant(self, module: nn.Module) -> bool:
        """Whether a constant input channel contributes a position-independent amount to the output."""
        return True

    def fold(self, module: nn.Module, removed: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """What the removed input features (constant ``values``) add to each output channel.

        Only called when ``constant_input_is_constant`` holds; otherwise fusion keeps non-zero constant channels.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot fold constant inputs")

    def fold_target(self, module: nn.Module) -> tuple[str, str, int]:
        """Where folded constants go: (bias name, the weight whose rows the bias follows, that weight's row dim).
        Fusion creates the bias if the layer has none."""
        return "bias", "weight", self.channel_dim_of_weight(module)

    def channel_dim_for(self, v: Visit) -> int:
        """The channel dim of this call's input and output (reads the input's rank when shapes are known)."""
        return self.channel_dim

    # -- the walk -----------------------------------------------------------------------------------------------
    def visit(self, v: Visit) -> None:
        module = v.module
        flow = input_layout(v)
        dim = self.channel_dim_for(v)
        if flow is not None:
            self.consume(v, module, flow, dim)
        else:
            name, weight_dim = self.input_tensor(module)
            v.hold(v.tensor(name), weight_dim)
        v.set(self.produce(v, module, dim))

    def input_tensor(self, module: nn.Module) -> tuple[str, int]:
        """The weight whose input dim reads the incoming channels, and that dim."""
        return "weight", 1 - self.channel_dim_of_weight(module)

    def consume(self, v: Visit, module: nn.Module, flow: Layout, dim: int) -> None:
        """Bind the weight's input dim to the channels reaching the layer; block what it cannot read exactly."""
        labels = features_at(v, flow, dim, self.in_channels(module))
        name, weight_dim = self.input_tensor(module)
        if labels is None:
            v.hold(v.tensor(name), weight_dim)
            return
        v.bind(v.tensor(name), weight_dim, labels)
        v.consumer(module, labels, self)

    def produce(self, v: Visit, module: nn.Module, dim: int) -> Layout:
        """Output channel ids (the weight's rows), the bias bound and silenced with them."""
        ids = v.produce(module, "weight", self.channel_dim_of_weight(module))
        for name in self.bias_names(module, "weight"):
            v.bind(v.tensor(name), 0, ids)
            v.silence(module, name, ids)
        return Layout.vector(ids, dim, self.out_ndim(v, module))

    def const(self, v: Visit, *inputs: torch.Tensor) -> torch.Tensor:
        bias = getattr(v.module, "bias", None)
        if bias is None:
            return torch.zeros(self.out_channels(v.module), dtype=torch.float64)
        return bias.detach().to(torch.float64).cpu()


def features_at(v: Visit, flow: Layout, dim: int, expected: int) -> torch.Tensor | None:
    """The label of each input feature a layer reads along ``dim``, or None (and the channels blocked) when the
    channels do not arrive there exactly."""
    if flow.pending:  # no shapes: channels flattened into blocks whose size the layer's width tells
        if flow.width == 0 or expected % flow.width:
            v.block(flow, f"{v.where} expects {expected} input features but the pruned channels give a multiple "
                          f"of {flow.width}")
            return None
        return flow.labels.reshape(-1).repeat_interleave(expected // flow.width)
    if not flow.at(dim):
        v.block(flow, f"{v.where} does not take the pruned channels on its channel dimension")
        return None
    if flow.width != expected:
        v.block(flow, f"{v.where} expects {expected} input features but the pruned channels give {flow.width}")
        return None
    return flow.labels.reshape(-1)


class ChannelwiseRule(Rule):
    """Keeps channel c at c and holds per-channel tensors (BatchNorm, InstanceNorm, PReLU, depthwise conv)."""

    kind = RuleKind.CHANNELWISE
    #: where the module reads channels in a batched input of rank >= 3 (a rank-2 input has them last)
    channel_dim: int = 1

    def channel_tensors(self, module: nn.Module) -> list[str]:
        """Per-channel tensors (dim 0) narrowed with the channels."""
        return []

    def affine_names(self, module: nn.Module) -> list[str]:
        """Per-channel tensors to mask with the channels, so a pruned channel stays silent (``prune_bias``)."""
        return []

    def const(self, v: Visit, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | bool]:
        return self.const_map(v.module, values)

    def const_map(self, module: nn.Module, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | bool]:
        """Map the constant of each channel (one value per channel, float64) to the module's output for it; the
        flag (or bool tensor) is True where that output depends on position."""
        raise NotImplementedError(f"{type(self).__name__} must say what it does to a constant channel")

    def dim_for(self, v: Visit, flow: Layout) -> int:
        ndim = v.ndim(v.arg(0, "input")) if v.shapes else flow.ndim
        if ndim == 2 or (ndim is None and flow.at(-1) and flow.axes == (-1,)):
            return 1 if ndim == 2 else -1
        return self.channel_dim

    def visit(self, v: Visit) -> None:
        flow = input_layout(v)
        if flow is None or not flow.at(self.dim_for(v, flow)):
            if flow is not None:
                v.block(flow, f"{v.where} does not take the pruned channels on its channel dimension")
            for name in self.channel_tensors(v.module):
                v.hold(v.tensor(name), 0)
            return
        labels = flow.labels.reshape(-1)
        for name in self.channel_tensors(v.module):
            v.bind(v.tensor(name), 0, labels)
        for name in self.affine_names(v.module):
            v.silence(v.module, name, labels)
        v.set(flow)


class ElementwiseRule(Rule):
    """Keeps channel c at c with no state; ``fn(module, values)`` maps a removed channel's constant to the op's
    output (``module`` is None for a function). ``spatial_dims``: the trailing dims a pool works over, which the
    channels must precede."""

    kind = RuleKind.ELEMENTWISE

    def __init__(self, fn=None, spatial_dims: int = 0):
        if fn is not None and not callable(fn):
            raise PruningConfigError(f"ElementwiseRule(fn): fn must be None or a function (module, values) -> "
                                     f"values, got {fn!r}")
        self.fn = fn
        self.spatial_dims = spatial_dims

    def visit(self, v: Visit) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        if self.spatial_dims:
            ndim = v.ndim(v.arg(0, "input")) if v.shapes else flow.ndim
            axes = flow.front_axes() if ndim is not None else None
            if axes is None or ndim is None or max(axes) >= ndim - self.spatial_dims:
                v.block(flow, f"{v.where} pools over the pruned channel dimension")
                return
        v.set(flow)

    def const(self, v: Visit, values: torch.Tensor, *others: torch.Tensor):
        out = values if self.fn is None else self.fn(v.module, values)
        return out, self.dependent(v, out)

    def dependent(self, v: Visit, out: torch.Tensor) -> torch.Tensor | bool:
        """Whether the output constant varies with position (zero-padded average pooling)."""
        return False


class BlockingRule(Rule):
    """An op whose output at a channel depends on other channels (LayerNorm over them, softmax over them)."""

    kind = RuleKind.BLOCKING

    def __init__(self, why: str):
        self.why = why

    def visit(self, v: Visit) -> None:
        v.block_inputs(self.why)


class ContainerRule(Rule):
    """A module traced through op by op (never a leaf), whose :meth:`sync` sets its size attributes from its
    children after they were narrowed; fusion and ``load_pruned`` call it after the children's own syncs."""

    kind = RuleKind.CONTAINER

    def visit(self, v: Visit) -> None:  # pragma: no cover - the front ends never make a node for it
        raise RuntimeError(f"{type(self).__name__} is a container rule; its module is traced through")
