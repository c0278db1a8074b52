"""The analysed graph: what a front end (:mod:`.trace`) hands the walk, and how its nodes name modules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn


@dataclass
class Traced:
    """The analysed graph of one model: an fx graph in one vocabulary, and whether its nodes carry shapes."""

    graph: fx.Graph
    shapes: bool
    front_end: str  # "fx" or "export"
    #: tensors made in forward from literals (``torch.ones(16)``), which the graph reads as ``get_attr`` constants
    constants: dict[str, torch.Tensor] = field(default_factory=dict)


def module_path(path: str, modules: dict[str, nn.Module]) -> str | None:
    """The module FQN of an ``nn_module_stack`` path (``L['self'].layer1[0].conv`` or ``layer1.0.conv``)."""
    if path in modules:
        return path
    cleaned = re.sub(r"^L\['self'\]\.?", "", path)
    cleaned = re.sub(r"\[(\d+)\]", r".\1", cleaned)
    cleaned = re.sub(r"\['([^']+)'\]", r".\1", cleaned).strip(".")
    cleaned = cleaned.replace("._modules.", ".")
    return cleaned if cleaned in modules else None
