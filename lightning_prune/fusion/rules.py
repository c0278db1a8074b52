"""The rule registry: for each layer type, how its channels map and how to slice it.

A rule is one small object per layer type. Graph analysis asks it what the layer does to the channels that reach it;
fusion asks it to narrow the layer. Users teach fusion about their own layers with :func:`register_layer`.

Kinds of rule:
- :class:`LayerRule`: a layer with its own input and output channels (Linear, ConvNd, LSTM). It consumes the channels
  that reach it and produces a new set, which a pruner can mask.
- :class:`ChannelwiseRule`: keeps channel ``c`` at ``c`` but holds per-channel state to slice (BatchNorm, depthwise
  conv). It may turn a constant channel into another constant.
- :class:`ElementwiseRule`: keeps channel ``c`` at ``c`` with no state (activations, Dropout, Identity, pools).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.errors import PruningConfigError

#: While fusion runs: id(new tensor) -> (id of the tensor it came from before fusion, {dim: kept indices}).
#: Ids, not tensors, so the old full-size tensors are freed as soon as nothing else holds them.
LINEAGE: ContextVar[dict[int, tuple[int, dict[int, torch.Tensor]]] | None] = ContextVar(
    "lightning_prune_lineage", default=None
)


def _set(module: nn.Module, name: str, value: torch.Tensor, source: torch.Tensor, index: dict) -> None:
    """Swap a parameter or buffer for ``value`` (a fresh tensor), keeping its kind and requires_grad, and record
    where it came from."""
    if name in module._parameters:
        value = nn.Parameter(value.detach(), requires_grad=source.requires_grad)
        module._parameters[name] = value
    else:
        value = value.detach()
        module._buffers[name] = value
    lineage = LINEAGE.get()
    if lineage is not None:
        root, previous = lineage.pop(id(source), (id(source), {}))
        composed = dict(previous)
        for dim, kept in index.items():
            composed[dim] = previous[dim][kept.to(previous[dim].device)] if dim in previous else kept
        lineage[id(value)] = (root, composed)


def _select(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Keep the entries ``keep`` of ``module.<name>`` along ``dim`` (no-op for a missing tensor)."""
    tensor = getattr(module, name, None)
    if tensor is not None:
        _set(module, name, tensor.index_select(dim, keep), tensor, {dim: keep})


class Rule:
    """Base of all rules; ``kind`` tells the graph analysis how to treat a module."""

    def kind(self, module: nn.Module) -> str:
        raise NotImplementedError

    def blocked_reason(self, module: nn.Module) -> str | None:
        return None


class LayerRule(Rule):
    """A layer with its own in and out channels. Subclasses say where the channels live and how to slice them."""

    #: dimension of the channels in the layer's input and output tensors (1: NC..., -1: ...C)
    channel_dim: int = -1

    def kind(self, module: nn.Module) -> str:
        return "layer"

    def prunable_tensors(self, module: nn.Module) -> list[str]:
        """Names of the weights whose rows are this layer's output channels."""
        return ["weight"]

    def rows_per_channel(self, module: nn.Module, tensor_name: str) -> int:
        return 1

    def channel_dim_of_weight(self, module: nn.Module) -> int:
        """The weight dimension that holds the output channels."""
        return 0

    def bias_names(self, module: nn.Module, tensor_name: str) -> list[str]:
        """Per-row tensors that must be masked with the rows of ``tensor_name``."""
        return ["bias"] if getattr(module, "bias", None) is not None else []

    def output_ndim(self, module: nn.Module) -> int | None:
        return None

    def in_channels(self, module: nn.Module) -> int:
        raise NotImplementedError

    def out_channels(self, module: nn.Module) -> int:
        raise NotImplementedError

    def constant_input_is_constant(self, module: nn.Module) -> bool:
        """Whether a constant input channel contributes a position-independent amount to the output."""
        return True

    def fold(self, module: nn.Module, removed: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """What the removed input features (constant ``values``) add to each output channel.

        Only called when ``constant_input_is_constant`` holds; otherwise fusion keeps non-zero constant channels.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot fold constant inputs")

    def slice_out(self, module: nn.Module, keep: torch.Tensor) -> None:
        """Keep output channels ``keep``: rows of the weight along ``channel_dim_of_weight``, and the bias."""
        _select(module, "weight", self.channel_dim_of_weight(module), keep)
        _select(module, "bias", 0, keep)
        self.sync(module)

    def slice_in(self, module: nn.Module, keep: torch.Tensor) -> None:
        """Keep input features ``keep``: the weight's other leading dimension."""
        _select(module, "weight", 1 - self.channel_dim_of_weight(module), keep)
        self.sync(module)

    def add_to_bias(self, module: nn.Module, delta: torch.Tensor) -> None:
        """Fold a constant into the bias, creating the bias if the layer had none."""
        if module.bias is None:
            module.bias = nn.Parameter(delta.detach().to(module.weight.dtype).clone())
        else:
            with torch.no_grad():
                module.bias.add_(delta.to(module.bias.dtype))

    def sync(self, module: nn.Module) -> None:
        """Set the layer's size attributes from its (already narrowed) tensors."""


class LinearRule(LayerRule):
    channel_dim = -1

    def in_channels(self, module: nn.Linear) -> int:
        return module.in_features

    def out_channels(self, module: nn.Linear) -> int:
        return module.out_features

    def fold(self, module, removed, values):
        return module.weight[:, removed].to(values.dtype) @ values

    def sync(self, module):
        module.out_features, module.in_features = module.weight.shape


class ConvRule(LayerRule):
    """ConvNd with groups == 1 is a layer; a depthwise conv keeps channels (see :class:`DepthwiseConvRule`)."""

    channel_dim = 1

    def kind(self, module: nn.Conv2d) -> str:
        if module.groups == 1:
            return "layer"
        if module.groups == module.in_channels == module.out_channels:
            return "channelwise"
        return "blocked"

    def blocked_reason(self, module: nn.Conv2d) -> str | None:
        if self.kind(module) == "blocked":
            return (
                f"grouped convolution (groups={module.groups}, in={module.in_channels}, "
                f"out={module.out_channels}); only groups=1 and depthwise (groups=in=out) are supported"
            )
        return None

    def output_ndim(self, module) -> int:
        return len(module.kernel_size) + 2

    def in_channels(self, module):
        return module.in_channels

    def out_channels(self, module):
        return module.out_channels

    def constant_input_is_constant(self, module) -> bool:
        return not _pads_with_zeros(module)

    def fold(self, module, removed, values):
        weight = module.weight[:, removed].to(values.dtype)
        return (weight.flatten(2).sum(-1) * values).sum(-1)

    def sync(self, module):
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            DEPTHWISE.sync(module)
            return
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups


class ConvTransposeRule(ConvRule):
    """ConvTransposeNd (groups == 1): the weight is (in, out, *kernel), so output channels are weight dim 1.

    A constant input does not give a constant output (border positions receive fewer taps), so removed input
    channels that still emit a non-zero constant are kept.
    """

    def kind(self, module) -> str:
        return "layer" if module.groups == 1 else "blocked"

    def blocked_reason(self, module) -> str | None:
        if module.groups != 1:
            return f"grouped transposed convolution (groups={module.groups}); only groups=1 is supported"
        return None

    def channel_dim_of_weight(self, module) -> int:
        return 1

    def constant_input_is_constant(self, module) -> bool:
        return False

    def sync(self, module):
        module.in_channels, module.out_channels = module.weight.shape[:2]


def _pads_with_zeros(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    if conv.padding == "valid":
        return False
    return any(p > 0 for p in conv.padding)


class LSTMRule(LayerRule):
    """nn.LSTM: each layer's hidden units are channels; every weight packs 4 gate rows per unit."""

    channel_dim = -1

    def blocked_reason(self, module: nn.LSTM) -> str | None:
        if module.bidirectional or module.proj_size:
            return "bidirectional or projected LSTM (only unidirectional LSTMs without proj_size are supported)"
        return None

    def prunable_tensors(self, module):
        return [f"weight_{kind}_l{k}" for k in range(module.num_layers) for kind in ("ih", "hh")]

    def rows_per_channel(self, module, tensor_name):
        return 4

    def bias_names(self, module, tensor_name):
        name = tensor_name.replace("weight", "bias")
        return [name] if module.bias else []

    def in_channels(self, module):
        return module.input_size

    def out_channels(self, module):
        return module.hidden_size

    def fold(self, module, removed, values):
        weight = module.weight_ih_l0[:, removed].to(values.dtype)
        return weight @ values

    def slice_in(self, module, keep):
        _select(module, "weight_ih_l0", 1, keep)
        module.input_size = module.weight_ih_l0.shape[1]
        module._init_flat_weights()

    def add_to_bias(self, module, delta):
        with torch.no_grad():
            module.bias_ih_l0.add_(delta.to(module.bias_ih_l0.dtype))

    def slice_units(self, module: nn.LSTM, layer: int, rows_ih: torch.Tensor, rows_hh: torch.Tensor,
                    cols_hh: torch.Tensor | Callable) -> None:
        """Keep the given gate rows of layer ``layer`` and the given hidden columns of its recurrent weight."""
        for kind, rows in (("ih", rows_ih), ("hh", rows_hh)):
            _select(module, f"weight_{kind}_l{layer}", 0, rows)
            if module.bias:
                _select(module, f"bias_{kind}_l{layer}", 0, rows)
        name = f"weight_hh_l{layer}"
        if callable(cols_hh):
            hh = getattr(module, name)
            _set(module, name, cols_hh(hh), hh, {})
        else:
            _select(module, name, 1, cols_hh)

    def slice_layer_input(self, module: nn.LSTM, layer: int, keep: torch.Tensor) -> None:
        name = f"weight_ih_l{layer}"
        _select(module, name, 1, keep)

    def sync(self, module):
        module.hidden_size = module.weight_hh_l0.shape[1]
        module.input_size = module.weight_ih_l0.shape[1]
        module._init_flat_weights()


class ChannelwiseRule(Rule):
    """Keeps channel c at c and holds per-channel state (BatchNorm, depthwise conv)."""

    channel_dim = 1

    def kind(self, module):
        return "channelwise"

    def affine_names(self, module: nn.Module) -> list[str]:
        """Per-channel tensors to mask together with the channels (so a pruned channel stays silent)."""
        return []

    def const(self, module: nn.Module, values: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Map constant input channels to constant outputs; the flag says the map is position-independent."""
        raise NotImplementedError

    def slice_channels(self, module: nn.Module, keep: torch.Tensor) -> None:
        raise NotImplementedError

    def sync(self, module: nn.Module) -> None:
        """Set the size attributes from the (already narrowed) tensors."""


class BatchNormRule(ChannelwiseRule):
    def affine_names(self, module):
        return ["weight", "bias"] if module.affine else []

    def const(self, module, values):
        out = values
        if module.track_running_stats and module.running_mean is not None:
            mean = module.running_mean.to(values.dtype)
            var = module.running_var.to(values.dtype)
            out = (values - mean) / torch.sqrt(var + module.eps)
        else:
            out = torch.zeros_like(values)  # batch statistics: a constant channel normalises to 0
        if module.affine:
            out = out * module.weight.to(values.dtype) + module.bias.to(values.dtype)
        return out, True

    def slice_channels(self, module, keep):
        for name in ("weight", "bias", "running_mean", "running_var"):
            _select(module, name, 0, keep)
        self.sync(module)

    def sync(self, module):
        module.num_features = next(t for t in (module.weight, module.running_mean) if t is not None).shape[0]


class DepthwiseConvRule(ChannelwiseRule):
    """A depthwise conv ties input channel c to output channel c."""

    def const(self, module, values):
        out = module.weight.flatten(1).sum(1).to(values.dtype) * values
        if module.bias is not None:
            out = out + module.bias.to(values.dtype)
        return out, not _pads_with_zeros(module)

    def slice_channels(self, module, keep):
        _select(module, "weight", 0, keep)
        _select(module, "bias", 0, keep)
        self.sync(module)

    def sync(self, module):
        module.out_channels = module.in_channels = module.groups = module.weight.shape[0]


class ElementwiseRule(Rule):
    """Keeps channel c at c with no state: ``fn`` maps a constant channel value to the op's output value."""

    def __init__(self, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], spatial_dims: int = 0):
        self.fn = fn
        #: trailing dims the op works over (pools); the channel dim must lie before them
        self.spatial_dims = spatial_dims

    def kind(self, module):
        return "elementwise"

    def const(self, module: nn.Module, values: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return self.fn(module, values), _position_independent(module)


def _position_independent(module: nn.Module) -> bool:
    """Zero-padded average pooling turns a constant into a border-dependent value."""
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        return not (module.count_include_pad and any(p > 0 for p in padding))
    return True


class LayerNormRule(Rule):
    """LayerNorm's statistics span the channels: it blocks exact removal (see DESIGN, invariant 1)."""

    def kind(self, module):
        return "norm"

    def slice_channels(self, module: nn.LayerNorm, keep: torch.Tensor) -> None:
        _select(module, "weight", 0, keep)
        _select(module, "bias", 0, keep)
        self.sync(module)

    def sync(self, module):
        if module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)


class FlattenRule(Rule):
    """nn.Flatten turns channel c into a block of features; the graph analysis tracks that itself."""

    def kind(self, module):
        return "flatten"


def _apply_module(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    return module(values.reshape(1, -1)).reshape(-1)


def _identity(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    return values


_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.RReLU, nn.Hardtanh, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.Hardshrink, nn.Softshrink, nn.LeakyReLU, nn.LogSigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Threshold,
)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOLS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}

_REGISTRY: dict[type, Rule] = {}


def register_layer(layer_type: type[nn.Module], rule: Rule) -> None:
    """Teach fusion how ``layer_type``'s channels map and how to slice it. Subclasses inherit the rule."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise PruningConfigError(f"register_layer expects an nn.Module subclass, got {layer_type!r}")
    if not isinstance(rule, Rule):
        raise PruningConfigError(
            f"register_layer expects a Rule (LayerRule, ChannelwiseRule or ElementwiseRule), got {rule!r}"
        )
    _REGISTRY[layer_type] = rule


def rule_for(module: nn.Module) -> Rule | None:
    """The rule registered for the module's type or its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


for _cls in (nn.Linear,):
    register_layer(_cls, LinearRule())
_CONV = ConvRule()
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_cls, _CONV)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_cls, ConvTransposeRule())
register_layer(nn.LSTM, LSTMRule())
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_layer(_cls, BatchNormRule())
register_layer(nn.LayerNorm, LayerNormRule())
for _cls in _ACTIVATIONS:
    register_layer(_cls, ElementwiseRule(_apply_module))
for _cls in _IDENTITIES:
    register_layer(_cls, ElementwiseRule(_identity))
for _cls, _dims in _POOLS.items():
    register_layer(_cls, ElementwiseRule(_identity, spatial_dims=_dims))
register_layer(nn.Flatten, FlattenRule())

DEPTHWISE = DepthwiseConvRule()

# Functions and tensor methods that keep channel c at c; ``fn(values, *args, **kwargs)`` gives the constant map.
ELEMENTWISE_FUNCTIONS: dict[object, Callable] = {}
for _fn in (
    F.relu, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.logsigmoid, F.softplus, F.softsign, F.tanhshrink, F.hardshrink, F.softshrink, F.sigmoid, F.tanh,
    torch.relu, torch.sigmoid, torch.tanh, torch.abs, torch.exp, torch.sqrt, torch.square, torch.neg,
    torch.clamp, torch.clip,
):
    ELEMENTWISE_FUNCTIONS[_fn] = _fn
for _name in ("relu", "sigmoid", "tanh", "abs", "exp", "sqrt", "square", "neg", "clamp", "clip", "contiguous",
              "relu_", "sigmoid_", "tanh_", "clamp_", "float", "to"):
    ELEMENTWISE_FUNCTIONS[_name] = _name
for _fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
    ELEMENTWISE_FUNCTIONS[_fn] = None  # identity at inference

#: functional pools: name -> (number of pooled trailing dims, whether zero padding can break constants)
POOL_FUNCTIONS = {
    F.max_pool1d: (1, False), F.max_pool2d: (2, False), F.max_pool3d: (3, False),
    F.avg_pool1d: (1, True), F.avg_pool2d: (2, True), F.avg_pool3d: (3, True),
    F.adaptive_avg_pool1d: (1, False), F.adaptive_avg_pool2d: (2, False), F.adaptive_avg_pool3d: (3, False),
    F.adaptive_max_pool1d: (1, False), F.adaptive_max_pool2d: (2, False), F.adaptive_max_pool3d: (3, False),
}


def pool_dims(module: nn.Module) -> int:
    rule = rule_for(module)
    return rule.spatial_dims if isinstance(rule, ElementwiseRule) else 0


__all__ = [
    "Rule", "LayerRule", "ChannelwiseRule", "ElementwiseRule", "LinearRule", "ConvRule", "ConvTransposeRule",
    "LSTMRule", "BatchNormRule", "DepthwiseConvRule", "LayerNormRule", "register_layer", "rule_for",
]
