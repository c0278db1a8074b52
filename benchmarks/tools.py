"""The pruning tools the benchmarks compare, behind one prepare / step / prune interface, and the models and
configs they get: ours (``lightning_prune``), the reference (``torch.ao.pruning._experimental.pruner``) and
Torch-Pruning."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.ao.pruning._experimental import pruner as reference

from benchmarks import models, sizes
from lightning_prune.sparsifier import SaliencyPruner

ModelFactory = Callable[[], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "MLP": models.MLP,
    "VGG-11": models.VGG11,
    "ResNet-18": models.ResNet18,
    "ResNet-50": models.ResNet50,
}


# -- configs -------------------------------------------------------------------------------------------------
def prunable_config(model: nn.Module) -> list[dict[str, object]]:
    """Every Linear/Conv2d weight except the classifier ``head``: the classes stay."""
    return [{"tensor_fqn": f"{name}.weight"} for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not name.startswith("head")]


def reference_config(model: nn.Module) -> list[dict[str, object]]:
    """``prunable_config`` less what the reference cannot fuse: VGG-11's last conv reaches the classifier through
    MaxPool2d -> Flatten, a pattern missing from its table, and its ``prune()`` raises on it."""
    config = prunable_config(model)
    if isinstance(model, models.VGG11):
        convs = [name for name, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
        config = [entry for entry in config if entry["tensor_fqn"] != f"features.{convs[-1]}.weight"]
    return config


def with_options(config: list[dict[str, object]], **options: object) -> list[dict[str, object]]:
    return [{**entry, **options} for entry in config]


def fresh(factory: ModelFactory) -> nn.Module:
    """A new model with seeded weights and BatchNorm statistics far from 0/1, as trained networks have them."""
    torch.manual_seed(0)
    model = factory()
    sizes.randomize_batchnorm(model)
    return model


def example(model: nn.Module, batch: int) -> torch.Tensor:
    torch.manual_seed(1)
    return model.example_input(batch)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class SparsifierTool:
    """A seed-API pruner (ours or the reference): prepare, then step, then prune. ``shapes``: prepare with the
    model's example input, so shapes are known (ours only)."""

    def __init__(self, make: Callable[[dict[str, object]], object], sparsity: float = 0.5,
                 config_of: Callable[[nn.Module], list[dict[str, object]]] = reference_config, shapes: bool = False):
        self.make, self.sparsity, self.config_of, self.shapes = make, sparsity, config_of, shapes

    def prepare(self, model: nn.Module) -> None:
        self.pruner = self.make({"sparsity_level": self.sparsity})
        if self.shapes:
            self.pruner.prepare(model, self.config_of(model), example_inputs=(model.example_input(),))
        else:
            self.pruner.prepare(model, self.config_of(model))

    def step(self) -> None:
        self.pruner.step()

    def prune(self) -> None:
        self.pruner.prune()


class TorchPruningTool:
    """Torch-Pruning: the dependency-graph build is its 'prepare'; its one ``step()`` scores (L1) and prunes."""

    def __init__(self, sparsity: float = 0.5):
        self.sparsity = sparsity

    def prepare(self, model: nn.Module) -> None:
        self.pruner = tp.pruner.MagnitudePruner(model, model.example_input(), ignored_layers=[model.head],
                                                importance=tp.importance.MagnitudeImportance(p=1),
                                                pruning_ratio=self.sparsity)

    def step(self) -> None:
        """Nothing: scoring happens inside its pruning step."""

    def prune(self) -> None:
        self.pruner.step()


TOOLS: dict[str, Callable[..., SparsifierTool | TorchPruningTool]] = {
    "ours": lambda sparsity=0.5: SparsifierTool(SaliencyPruner, sparsity),
    "ours, example inputs": lambda sparsity=0.5: SparsifierTool(SaliencyPruner, sparsity, shapes=True),
    "reference": lambda sparsity=0.5: SparsifierTool(reference.SaliencyPruner, sparsity),
    "torch_pruning": TorchPruningTool,
}


def phase_seconds(tool: SparsifierTool | TorchPruningTool, model: nn.Module) -> dict[str, float]:
    """Seconds of prepare and of prune; the mask update between them is not counted."""
    prepare = seconds(lambda: tool.prepare(model))
    tool.step()
    return {"prepare": prepare, "prune": seconds(tool.prune)}
