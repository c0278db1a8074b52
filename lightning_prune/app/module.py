"""The LightningModules the Hydra app trains: a classifier (cross-entropy, torchmetrics accuracy) and a causal
language model (next-token cross-entropy, torchmetrics perplexity), each wrapping a bare ``net``."""

from collections.abc import Callable, Iterable

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class _Supervised(LightningModule):
    """What both app modules share: ``net`` wrapped so pruning configs name tensors as ``net.<layer>.weight``,
    cross-entropy over the last dim of the logits (``(B, C)`` or ``(B, T, V)``) against integer labels, and one
    torchmetrics metric per stage, logged as ``{stage}_{score}``.

    ``optimizer`` is a factory taking the parameters, e.g. Hydra's ``_partial_: true`` node for
    ``torch.optim.AdamW``. It is called in ``configure_optimizers``, after the pruning callback has attached
    its masks, so the optimizer sees the parameters that will actually train.
    """

    #: the metric's name in the logs (``val_acc``, ``test_ppl``) and the attribute holding it per stage
    score: str

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, metrics: tuple[Metric, Metric]) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        for stage, metric in zip(("val", "test"), metrics, strict=True):
            setattr(self, f"{stage}_{self.score}", metric)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @staticmethod
    def _loss(logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = self._loss(self(inputs), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        inputs, labels = batch
        logits = self(inputs)
        self.log(f"{stage}_loss", self._loss(logits, labels), sync_dist=True)
        metric = getattr(self, f"{stage}_{self.score}")
        metric(logits.float(), labels)
        self.log(f"{stage}_{self.score}", metric, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


class LitClassifier(_Supervised):
    """A classifier: ``net(images)`` -> logits ``(B, C)``; logs ``train_loss`` and ``{val,test}_{loss,acc}``
    (torchmetrics' micro accuracy). ``optimizer``: a factory over the parameters (see :class:`_Supervised`)."""

    score = "acc"

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, num_classes: int = 10) -> None:
        super().__init__(net, optimizer, tuple(MulticlassAccuracy(num_classes=num_classes, average="micro")
                                               for _ in range(2)))


class LitCausalLM(_Supervised):
    """Wraps a language model ``net`` (``forward(input_ids)`` -> logits ``(B, T, V)``) for next-token training.

    Batches are ``(input_ids, labels)``, both ``(B, T)`` int64, ``labels`` the inputs one token on. Logs
    ``train_loss`` and, on validation and test, ``{stage}_loss`` (nats per token) and ``{stage}_ppl`` (torchmetrics'
    perplexity, over the whole epoch). ``optimizer`` is a factory over the parameters, as for :class:`LitClassifier`;
    ``num_classes`` is the vocabulary size ``V`` (a next-token model classifies every position).

    Raises:
        ValueError: in ``forward``, logits whose last dim is not ``num_classes``.
    """

    score = "ppl"

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, num_classes: int = 256) -> None:
        super().__init__(net, optimizer, (Perplexity(), Perplexity()))
        self.num_classes = num_classes

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.net(input_ids)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"LitCausalLM: the net's logits have {logits.shape[-1]} entries per position, the "
                             f"vocabulary (num_classes) {self.num_classes}")
        return logits
