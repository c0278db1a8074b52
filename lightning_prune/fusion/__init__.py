"""The fx fusion pass: channel dependency analysis, the rule registry, and in-place shrinking."""

from lightning_prune.fusion.rules import ChannelwiseRule, ElementwiseRule, LayerRule, Rule, register_layer

__all__ = ["ChannelwiseRule", "ElementwiseRule", "LayerRule", "Rule", "register_layer"]
