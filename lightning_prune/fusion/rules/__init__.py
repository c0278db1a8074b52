"""The rule registry and the built-in rules. Importing this package registers them all.

One registry (:mod:`.registry`) maps module types, functions, tensor method names and ATen ops to rules; the walk
dispatches every node through it and knows no layer type itself. See :mod:`.base` for the rule kinds.
"""

# the built-in rules register themselves on import
from lightning_prune.fusion.rules import (  # noqa: E402, F401, I001
    attention,
    channelwise,
    combine,
    conv,
    elementwise,
    functional_norms,
    hf,
    indexing,
    layers,
    lstm,
    mha,
    norms,
    reduce,
    registry,
    shapes,
    stream,
    timm_norms,
)
from lightning_prune.fusion.rules.base import (
    BlockingRule,
    ChannelwiseRule,
    ContainerRule,
    ElementwiseRule,
    LayerRule,
    Rule,
    RuleKind,
)
from lightning_prune.fusion.rules.norms import LayerNormRule, RMSNormRule
from lightning_prune.fusion.rules.registry import (
    layer_widths,
    register_by_name,
    register_function,
    register_layer,
    rule_for,
    rules_scope,
)

__all__ = [
    "BlockingRule", "ChannelwiseRule", "ContainerRule", "ElementwiseRule", "LayerNormRule", "LayerRule", "RMSNormRule",
    "Rule", "RuleKind",
    "layer_widths", "register_by_name", "register_function", "register_layer", "registry", "rule_for", "rules_scope",
]
