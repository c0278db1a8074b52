"""lightning_prune: structured pruning that physically removes channels, exactly, inside a Lightning run."""

from lightning_prune.callback import StructuredPruning
from lightning_prune.checkpoint import load_pruned, narrow_to_state_dict
from lightning_prune.errors import PrunerStateError, PruningConfigError, UnsupportedPatternError
from lightning_prune.fusion import ChannelwiseRule, ContainerRule, ElementwiseRule, LayerRule, Rule, register_layer
from lightning_prune.masks import FakeStructuredSparsity
from lightning_prune.sparsifier import (
    BaseStructuredSparsifier,
    FPGMPruner,
    LSTMSaliencyPruner,
    SaliencyPruner,
    ScoringPruner,
)

__all__ = [
    "BaseStructuredSparsifier",
    "ChannelwiseRule",
    "ContainerRule",
    "ElementwiseRule",
    "FPGMPruner",
    "FakeStructuredSparsity",
    "LSTMSaliencyPruner",
    "LayerRule",
    "PrunerStateError",
    "PruningConfigError",
    "Rule",
    "SaliencyPruner",
    "ScoringPruner",
    "UnsupportedPatternError",
    "StructuredPruning",
    "load_pruned",
    "narrow_to_state_dict",
    "register_layer",
]
