"""The LightningModules the Hydra app trains: a classifier (cross-entropy, torchmetrics accuracy) and a causal
language model (next-token cross-entropy, torchmetrics perplexity), each wrapping a bare ``net``."""

from collections.abc import Callable, Iterable

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class LitClassifier(LightningModule):
    """Wraps ``net`` so pruning configs name tensors as ``net.<layer>.weight``.

    ``optimizer`` is a factory taking the parameters, e.g. Hydra's ``_partial_: true`` node for
    ``torch.optim.AdamW``. It is called in ``configure_optimizers``, after the pruning callback has attached
    its masks, so the optimizer sees the parameters that will actually train.
    """

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, num_classes: int = 10) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_acc, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_acc, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], accuracy: MulticlassAccuracy, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), sync_dist=True)
        accuracy(logits, labels)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


class LitCausalLM(LightningModule):
    """Wraps a language model ``net`` (``forward(input_ids)`` -> logits ``(B, T, V)``) for next-token training.

    Batches are ``(input_ids, labels)``, both ``(B, T)`` int64, ``labels`` the inputs one token on. Logs
    ``train_loss`` and, on validation and test, ``{stage}_loss`` (nats per token) and ``{stage}_ppl`` (torchmetrics'
    perplexity, over the whole epoch). ``optimizer`` is a factory over the parameters, as for :class:`LitClassifier`;
    ``num_classes`` is the vocabulary size ``V`` (a next-token model classifies every position).

    Raises:
        ValueError: in ``forward``, logits whose last dim is not ``num_classes``.
    """

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, num_classes: int = 256) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.num_classes = num_classes
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.net(input_ids)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"LitCausalLM: the net's logits have {logits.shape[-1]} entries per position, the "
                             f"vocabulary (num_classes) {self.num_classes}")
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, labels = batch
        loss = F.cross_entropy(self(input_ids).flatten(0, -2), labels.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_ppl, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_ppl, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], perplexity: Perplexity, stage: str) -> None:
        input_ids, labels = batch
        logits = self(input_ids)
        self.log(f"{stage}_loss", F.cross_entropy(logits.flatten(0, -2), labels.flatten()), sync_dist=True)
        perplexity(logits.float(), labels)
        self.log(f"{stage}_ppl", perplexity, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())
