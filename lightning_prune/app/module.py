"""The LightningModule the Hydra app trains: a classifier ``net``, cross-entropy, torchmetrics accuracy."""

from collections.abc import Callable, Iterable

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

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
