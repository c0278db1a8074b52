"""The Hydra app: train a digits classifier, prune it with StructuredPruning, fuse, and report the gain.

One run (digits CNN, saliency pruner, 50%, cubic schedule): ``python examples/train.py``.
A sweep: ``python examples/train.py -m pruner.sparsity_level=0.25,0.5,0.75 pruner=fpgm,saliency``,
then ``python -m lightning_prune.report multirun/<date>/<time>`` for its table and plot.
"""

import hydra
from omegaconf import DictConfig

from lightning_prune.app.experiment import run


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Returns the pruned model's validation accuracy, the value a Hydra sweeper would optimise."""
    return run(cfg)["val_acc"]


if __name__ == "__main__":
    main()
