"""StructuredPruning under 2-process CPU DDP: rank 0 decides the masks, so every rank ends with the same model.

Lightning's ddp strategy re-launches the running script for rank 1, so the run lives in a small script written to
a temporary directory and started as a subprocess; each rank saves what the test compares.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from tests.runs import run_ddp_script

REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    '''
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune.callback import StructuredPruning
    from lightning_prune.sparsifier import BaseStructuredSparsifier


    class RankSeededRandomPruner(BaseStructuredSparsifier):
        """Masks random rows from a generator seeded by the rank: left alone, the ranks would disagree."""

        def __init__(self, **defaults):
            super().__init__(**defaults)
            self.calls = 0
            self.choices = {}

        def update_mask(self, module, tensor_name, sparsity_level, tensor_fqn, **kwargs):
            mask = module.parametrizations[tensor_name][0].mask
            generator = torch.Generator().manual_seed(1000 * (torch.distributed.get_rank() + 1) + self.calls)
            self.calls += 1
            dropped = torch.randperm(mask.numel(), generator=generator)[: round(sparsity_level * mask.numel())]
            mask.fill_(True)
            mask[dropped] = False
            self.choices[tensor_fqn] = mask.clone()


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
            self.test_widths = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def test_step(self, batch, batch_idx):
            self.test_widths.append(self.net[0].out_features)
            self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


    def loader():
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 8, generator=generator),
                                        torch.randint(0, 3, (32,), generator=generator)), batch_size=8)


    if __name__ == "__main__":
        out = Path(sys.argv[1])
        pl.seed_everything(0, verbose=False)
        pruner = RankSeededRandomPruner(sparsity_level=0.5)
        # end_step=1.0: the ramp ends on the last step, after which no forward re-broadcasts DDP's buffers
        callback = StructuredPruning(pruner, schedule="linear", start_step=0, end_step=1.0)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[callback],
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=out)
        model = Net()
        trainer.fit(model, loader())
        fitted = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainer.test(model, loader(), verbose=False)
        torch.save({"state_dict": fitted, "own_choices": pruner.choices, "fused": callback.fused,
                    "steps": trainer.global_step, "test_widths": model.test_widths},
                   out / f"rank{trainer.global_rank}.pt")
        torch.distributed.destroy_process_group()  # exit with no gloo thread left running
    '''
)


def test_ddp_ranks_with_differently_seeded_pruners_end_identical(tmp_path):
    run = run_ddp_script(tmp_path, SCRIPT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 4
    # the test really exercises the broadcast: the ranks' own last choices differ
    assert any(not torch.equal(rank0["own_choices"][k], rank1["own_choices"][k]) for k in rank0["own_choices"])
    assert rank0["fused"] and rank1["fused"]

    weights0, weights1 = rank0["state_dict"], rank1["state_dict"]
    assert weights0.keys() == weights1.keys()
    assert not any(".parametrizations." in key for key in weights0)
    for key in weights0:
        assert torch.equal(weights0[key], weights1[key]), key
    assert weights0["net.0.weight"].shape == (8, 8)
    assert weights0["net.2.weight"].shape == (8, 8)
    assert weights0["net.4.weight"].shape == (3, 8)
    assert rank0["test_widths"] and set(rank0["test_widths"]) == set(rank1["test_widths"]) == {8}
