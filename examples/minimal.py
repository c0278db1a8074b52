"""The StructuredPruning callback without Hydra: train a small CNN on scikit-learn's digits, prune half its
channels on a cubic schedule while it trains, and shrink it when fit ends.

Run: python examples/minimal.py   (about 30 s on 2 CPU cores)

It prints test accuracy, parameters and MACs per sample of the dense network and of the pruned one.
"""

from functools import partial

import lightning.pytorch as pl
import torch

from lightning_prune import SaliencyPruner, StructuredPruning
from lightning_prune.app import DigitsCNN, DigitsDataModule, LitClassifier
from lightning_prune.measure import count_macs, count_params


def trainer(epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def report(label: str, model: LitClassifier, data: DigitsDataModule, example: torch.Tensor) -> None:
    accuracy = trainer(1).test(model, datamodule=data, verbose=False)[0]["test_acc"]
    print(f"{label:>7}: test accuracy {accuracy:.4f}  params {count_params(model):>7,}  "
          f"MACs per sample {count_macs(model, example) // len(example):>9,}")


def main() -> None:
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    example = data.example_input(256)
    model = LitClassifier(DigitsCNN(), optimizer=partial(torch.optim.AdamW, lr=0.01))

    trainer(5).fit(model, datamodule=data)  # dense training
    report("dense", model, data, example)

    # the ramp ends 60% into the run (a fraction of its optimizer steps), leaving the rest to recover at the final width
    pruning = StructuredPruning(SaliencyPruner(sparsity_level=0.5), schedule="cubic", end_step=0.6, every_n_steps=5)
    trainer(5, [pruning]).fit(model, datamodule=data)  # prune while fine-tuning, then fuse in place
    report("pruned", model, data, example)
    print(model.net)


if __name__ == "__main__":
    main()
