"""The Hydra demo app's building blocks: the digits and standard-library data, demo networks and the
LightningModules."""

from lightning_prune.app.data import DigitsDataModule
from lightning_prune.app.lm_data import StdlibDataModule
from lightning_prune.app.models import BasicBlock, DigitsCNN, DigitsLSTM, DigitsResNet
from lightning_prune.app.module import LitCausalLM, LitClassifier

__all__ = ["BasicBlock", "DigitsCNN", "DigitsDataModule", "DigitsLSTM", "DigitsResNet", "LitCausalLM", "LitClassifier",
           "StdlibDataModule"]
