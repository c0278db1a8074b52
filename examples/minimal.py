"""Prune half the channels of a small CNN with the core API, in plain PyTorch (no Lightning, no Hydra).

Run: python examples/minimal.py

It prints the size of the network before and after, and checks that the narrowed network computes exactly
what the masked one did.
"""

import torch
from torch import nn

from lightning_prune.measure import count_macs, count_params, layer_widths
from lightning_prune.sparsifier import SaliencyPruner

# The conv layers and the hidden Linear; the last Linear keeps its 10 classes.
PRUNED_TENSORS = ["features.0.weight", "features.3.weight", "classifier.1.weight"]


class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm and an MLP head, for 8x8 grey images such as scikit-learn's digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def main() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    images = torch.rand(64, 1, 8, 8)
    widths_before = layer_widths(model)
    params_before, macs_before = count_params(model), count_macs(model, images)

    pruner = SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": fqn} for fqn in PRUNED_TENSORS])
    pruner.enable_mask_update = True
    pruner.step()
    with torch.no_grad():
        masked_output = model(images)

    model = pruner.prune()
    with torch.no_grad():
        pruned_output = model(images)

    widths_after = layer_widths(model)
    print(f"{'layer (in, out)':18} {'before':>12} -> after")
    for name, before in widths_before.items():
        print(f"{name:18} {before!s:>12} -> {widths_after[name]}")
    print(f"{'params':18} {params_before:>12,} -> {count_params(model):,}")
    print(f"{'MACs, batch of ' + str(len(images)):18} {macs_before:>12,} -> {count_macs(model, images):,}")

    difference = (pruned_output - masked_output).abs().max().item()
    print(f"max |pruned - masked| = {difference:.2e}")
    if not torch.allclose(pruned_output, masked_output, rtol=1e-5, atol=1e-5):
        raise SystemExit("the pruned model does not compute what the masked model computed")


if __name__ == "__main__":
    main()
