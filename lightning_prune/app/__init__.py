"""The Hydra demo app's building blocks: the digits data, demo networks and the LightningModule."""

from lightning_prune.app.data import DigitsDataModule
from lightning_prune.app.models import BasicBlock, DigitsCNN, DigitsLSTM, DigitsResNet
from lightning_prune.app.module import LitClassifier

__all__ = ["BasicBlock", "DigitsCNN", "DigitsDataModule", "DigitsLSTM", "DigitsResNet", "LitClassifier"]
