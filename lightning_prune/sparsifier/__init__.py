"""The structured sparsifiers: the seed's API and the built-in pruners."""

from lightning_prune.sparsifier.activation import ActivationPruner
from lightning_prune.sparsifier.base import BaseStructuredSparsifier
from lightning_prune.sparsifier.budget import Budget
from lightning_prune.sparsifier.fpgm import FPGMPruner
from lightning_prune.sparsifier.lstm_saliency import LSTMSaliencyPruner
from lightning_prune.sparsifier.saliency import SaliencyPruner
from lightning_prune.sparsifier.scoring import ScoringPruner
from lightning_prune.sparsifier.statistics import StatisticsPruner
from lightning_prune.sparsifier.taylor import TaylorPruner

__all__ = ["ActivationPruner", "BaseStructuredSparsifier", "Budget", "FPGMPruner", "LSTMSaliencyPruner",
           "SaliencyPruner", "ScoringPruner", "StatisticsPruner", "TaylorPruner"]
