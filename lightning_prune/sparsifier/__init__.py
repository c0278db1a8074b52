"""The structured sparsifiers: the seed's API and the built-in pruners."""

from lightning_prune.sparsifier.base import BaseStructuredSparsifier
from lightning_prune.sparsifier.fpgm import FPGMPruner
from lightning_prune.sparsifier.lstm_saliency import LSTMSaliencyPruner
from lightning_prune.sparsifier.saliency import SaliencyPruner
from lightning_prune.sparsifier.scoring import ScoringPruner

__all__ = ["BaseStructuredSparsifier", "FPGMPruner", "LSTMSaliencyPruner", "SaliencyPruner", "ScoringPruner"]
