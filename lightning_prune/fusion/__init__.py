"""Analysis and surgery: the channel dependency analysis, the rule registry, and in-place narrowing.

It knows masks and layers, never pruners: ``trace`` reads the model, ``walk`` follows every channel through its
rules, ``plan`` settles what can be pruned, ``attach`` puts the masks on, and ``apply`` narrows the modules.
"""

from lightning_prune.fusion.rules import (
    BlockingRule,
    ChannelwiseRule,
    ContainerRule,
    ElementwiseRule,
    LayerRule,
    Rule,
    RuleKind,
    register_by_name,
    register_function,
    register_layer,
    rules_scope,
)

__all__ = [
    "BlockingRule", "ChannelwiseRule", "ContainerRule", "ElementwiseRule", "LayerRule", "Rule", "RuleKind",
    "register_by_name", "register_function", "register_layer", "rules_scope",
]
