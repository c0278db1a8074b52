"""The Hydra app: train a digits classifier, prune it with StructuredPruning, fuse, and report the gain.

The same as ``python -m lightning_prune.app``; the configs ship in the package (lightning_prune/app/conf).
One run (digits CNN, saliency pruner, 50%, cubic schedule): ``python examples/train.py``.
A sweep: ``python examples/train.py -m pruner.sparsity_level=0.25,0.5,0.75 pruner=fpgm,saliency``,
then ``python -m lightning_prune.report multirun/<date>/<time>`` for its table and plot.
"""

from lightning_prune.app.cli import main

if __name__ == "__main__":
    main()
