"""lightning_prune: structured pruning that physically removes channels, exactly, inside a Lightning run."""

from lightning_prune.callback import StructuredPruning
from lightning_prune.checkpoint import load_pruned, narrow_to_state_dict
from lightning_prune.distill import Distillation
from lightning_prune.errors import (
    OutputReachedError,
    PrunerStateError,
    PruningConfigError,
    UnsupportedPatternError,
)
from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.fusion.rules import (
    BlockingRule,
    ChannelwiseRule,
    ContainerRule,
    ElementwiseRule,
    LayerNormRule,
    LayerRule,
    RMSNormRule,
    Rule,
    RuleKind,
    register_function,
    register_layer,
    rules_scope,
)
from lightning_prune.masks import FakeStructuredSparsity
from lightning_prune.optim import carry_optimizer_state
from lightning_prune.pretrained import from_pretrained, save_pretrained
from lightning_prune.schedule import SparsityScheduler
from lightning_prune.sparsifier import (
    ActivationPruner,
    BaseStructuredSparsifier,
    Budget,
    FPGMPruner,
    LSTMSaliencyPruner,
    SaliencyPruner,
    ScoringPruner,
    StatisticsPruner,
    TaylorPruner,
)
from lightning_prune.sparsifier.explain import explain

__all__ = [
    "ActivationPruner",
    "BaseStructuredSparsifier",
    "Budget",
    "BlockingRule",
    "ChannelwiseRule",
    "ContainerRule",
    "Distillation",
    "ElementwiseRule",
    "FPGMPruner",
    "FakeStructuredSparsity",
    "LSTMSaliencyPruner",
    "LayerNormRule",
    "LayerRule",
    "OutputReachedError",
    "PrunerStateError",
    "PruningConfigError",
    "PruningPlan",
    "RMSNormRule",
    "Rule",
    "RuleKind",
    "SaliencyPruner",
    "ScoringPruner",
    "SparsityScheduler",
    "StatisticsPruner",
    "TaylorPruner",
    "UnsupportedPatternError",
    "explain",
    "from_pretrained",
    "StructuredPruning",
    "carry_optimizer_state",
    "load_pruned",
    "narrow_to_state_dict",
    "register_function",
    "register_layer",
    "rules_scope",
    "save_pretrained",
]
