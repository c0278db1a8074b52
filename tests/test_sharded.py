"""StructuredPruning under Lightning's ModelParallelStrategy: FSDP2 (``fully_shard`` in ``configure_model``) over 2
CPU gloo ranks ends with the pruned model one process trains from the same global batches, and the strategies the
callback cannot follow are refused at setup.

The 2-rank run lives in a script (Lightning re-launches it for rank 1, see tests/test_ddp.py); the test executes the
same script's ``fit(1)`` in-process for the one-process reference.
"""

from __future__ import annotations

import runpy
import sys
import textwrap
import types
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch.nn.utils import parametrize

from lightning_prune import PruningConfigError, SaliencyPruner, StructuredPruning, load_pruned
from lightning_prune.setup_checks import refuse_unsupported
from tests.runs import run_ddp_script, two_ranks_and_one_process

MODELS = textwrap.dedent(
    '''
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaModel

    from lightning_prune import ActivationPruner, FPGMPruner, SaliencyPruner, StructuredPruning, TaylorPruner


    class Sharded(pl.LightningModule):
        """configure_model shards ``self.blocks()`` one by one, then the whole module (FSDP2's usual pattern); it
        runs at every fit and test, so it leaves an already sharded module alone."""

        def configure_model(self):
            if self.device_mesh is None or isinstance(self, FSDPModule):
                return
            mesh = self.device_mesh["data_parallel"]
            for block in self.blocks():
                fully_shard(block, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def training_step(self, batch, batch_idx):
            return self.loss(batch)

        def test_step(self, batch, batch_idx):
            self.test_runs.append((isinstance(self, FSDPModule), float(self.loss(batch))))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def loader(self, x, y):
            """Global batches of 8 in order; rank r of n takes samples r, r + n, ... of each."""
            ranks, rank = self.trainer.world_size, self.trainer.global_rank
            return DataLoader(TensorDataset(x, y), batch_size=8 // ranks, sampler=range(rank, len(x), ranks))


    class CNN(Sharded):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(8, 3)
            self.example_input_array = torch.zeros(2, 3, 6, 6)
            self.test_runs = []

        def blocks(self):
            return [self.features[2]]

        def forward(self, x):
            return self.head(self.features(x))

        def loss(self, batch):
            return F.cross_entropy(self(batch[0]), batch[1])

        samples = 48

        def data(self):
            generator = torch.Generator().manual_seed(0)
            return self.loader(torch.randn(self.samples, 3, 6, 6, generator=generator),
                               torch.randint(0, 3, (self.samples,), generator=generator))

        train_dataloader = test_dataloader = data


    class Llama(Sharded):
        def __init__(self):
            super().__init__()
            config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                 use_cache=False)
            self.llama = LlamaModel(config)
            self.head = nn.Linear(32, 50)
            self.example_input_array = torch.zeros(2, 8, dtype=torch.long)
            self.test_runs = []

        def blocks(self):
            return list(self.llama.layers)

        def forward(self, ids):
            return self.head(self.llama(ids).last_hidden_state)

        def loss(self, batch):
            logits = self(batch[0])
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[0][:, 1:].flatten())

        def data(self):
            ids = torch.randint(0, 50, (48, 8), generator=torch.Generator().manual_seed(0))
            return self.loader(ids, torch.zeros(48))

        train_dataloader = test_dataloader = data


    RUNS = {"cnn": (CNN, lambda: SaliencyPruner(sparsity_level=0.5)),
            "cnn_fpgm": (CNN, lambda: FPGMPruner(sparsity_level=0.5)),
            "cnn_taylor": (CNN, lambda: TaylorPruner(sparsity_level=0.5)),
            "cnn_activation": (CNN, lambda: ActivationPruner(sparsity_level=0.5)),
            "llama": (Llama, lambda: SaliencyPruner(sparsity_level=0.5))}


    '''
)

SCRIPT = MODELS + textwrap.dedent(
    '''
    def strategy(devices):
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if devices > 1 else "auto"


    def fit(devices, names=tuple(RUNS)):
        """Each run: a cubic ramp to 50% over the first half of 6 steps, fused at the end, then tested."""
        results = {}
        for name in names:
            module, pruner = RUNS[name]
            pl.seed_everything(0, verbose=False)
            model, pruner = module(), pruner()
            callback = StructuredPruning(pruner, schedule="cubic", start_step=0, end_step=0.5)
            trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy(devices), max_steps=6,
                                 use_distributed_sampler=False, callbacks=[callback], logger=False,
                                 enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
            trainer.fit(model)
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            trainer.test(model, verbose=False)
            results[name] = {"state": {k: v.detach().clone() for k, v in state.items()}, "fused": callback.fused,
                             "steps": trainer.global_step, "test_runs": model.test_runs,
                             "sharded_after_fit": isinstance(model, FSDPModule), "rank": trainer.global_rank}
            if name == "cnn":  # a second fit trains the pruned model, sharded
                again = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy(devices), max_steps=2,
                                   use_distributed_sampler=False, callbacks=[callback], logger=False,
                                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
                again.fit(model)
                state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
                results["cnn_again"] = {"state": {k: v.detach().clone() for k, v in state.items()}}
        return results


    if __name__ == "__main__":
        results = fit(2)
        torch.save(results, Path(sys.argv[1]) / f"rank{results['cnn']['rank']}.pt")
        torch.distributed.destroy_process_group()
    '''
)


def test_two_fsdp2_ranks_end_with_the_model_one_process_prunes_from_the_same_global_batches(tmp_path):
    ranks, single = two_ranks_and_one_process(tmp_path, SCRIPT, "sharded_script")
    again = single.pop("cnn_again")["state"]
    for rank in ranks:
        for key, tensor in again.items():
            assert tensor.shape == single["cnn"]["state"][key].shape, key  # the narrow model trained further
            torch.testing.assert_close(rank["cnn_again"]["state"][key], tensor, rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(again["head.weight"], single["cnn"]["state"]["head.weight"])
    for name, expected in single.items():
        assert expected["fused"] and expected["steps"] == 6
        assert not any(".parametrizations." in key or key.endswith(".mask") for key in expected["state"])
        for rank in ranks:
            got = rank[name]
            assert got["fused"] and got["steps"] == 6, name
            assert got["sharded_after_fit"], name  # configure_model sharded the narrowed model again
            assert got["state"].keys() == expected["state"].keys(), name
            for key, tensor in expected["state"].items():
                assert got["state"][key].shape == tensor.shape, (name, key)
                torch.testing.assert_close(got["state"][key], tensor, rtol=0, atol=1e-6, msg=f"{name} {key}")
            # trainer.test ran on the sharded pruned model, and on both ranks' halves saw what one process saw
            assert got["test_runs"] and all(sharded for sharded, _ in got["test_runs"]), name
        halves = zip(ranks[0][name]["test_runs"], ranks[1][name]["test_runs"], strict=True)
        losses = [(a + b) / 2 for (_, a), (_, b) in halves]
        torch.testing.assert_close(losses, [loss for _, loss in expected["test_runs"]], rtol=1e-5, atol=1e-6)
    cnn = single["cnn"]["state"]
    assert cnn["features.0.weight"].shape == (4, 3, 3, 3) and cnn["head.weight"].shape == (3, 4)
    llama = single["llama"]["state"]
    assert llama["llama.layers.0.mlp.up_proj.weight"].shape[0] == 24
    assert llama["llama.layers.0.self_attn.q_proj.weight"].shape[0] < 32  # heads went


RESUME_SCRIPT = MODELS + textwrap.dedent(
    '''
    from lightning.pytorch.callbacks import ModelCheckpoint

    CNN.samples = 16  # two steps an epoch: the checkpoints written at epoch ends resume on the next batch


    def fit(out, ckpt_path=None):
        """A cubic ramp to 50% over steps 0-3 of 6, a distributed checkpoint at the end of every epoch."""
        pl.seed_everything(0, verbose=False)
        model = CNN()
        callback = StructuredPruning(SaliencyPruner(sparsity_level=0.5), schedule="cubic", start_step=0, end_step=0.5)
        checkpoints = ModelCheckpoint(dirpath=out, every_n_epochs=1, save_top_k=-1, save_last=True)
        trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=3, use_distributed_sampler=False,
                             strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                             callbacks=[callback, checkpoints], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=out)
        trainer.fit(model, ckpt_path=ckpt_path)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {"state": {k: v.detach().clone() for k, v in state.items()}, "fused": callback.fused,
                "steps": trainer.global_step, "rank": trainer.global_rank}


    if __name__ == "__main__":
        out = Path(sys.argv[1])
        whole = fit(out / "whole")
        resumed = fit(out / "resumed", ckpt_path=out / "whole" / "epoch=0-step=2.ckpt")
        torch.save({"whole": whole, "resumed": resumed}, out / f"rank{whole['rank']}.pt")
        torch.distributed.destroy_process_group()
    '''
)


def _consolidated(folder: Path) -> Path:
    """Lightning's consolidation of a distributed checkpoint folder into one file,
    ``python -m lightning.fabric.utilities.consolidate_checkpoint FOLDER`` (the ``lightning.pytorch`` one expects
    FSDPStrategy's "model" key and fails on ModelParallelStrategy's "state_dict" with a KeyError)."""
    with mock.patch.object(sys, "argv", ["consolidate_checkpoint", str(folder)]):
        runpy.run_module("lightning.fabric.utilities.consolidate_checkpoint", run_name="__main__")
    return folder.with_suffix(folder.suffix + ".consolidated")


def test_a_sharded_mid_schedule_checkpoint_resumes_and_consolidated_checkpoints_load_pruned(tmp_path):
    run = run_ddp_script(tmp_path, RESUME_SCRIPT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    whole = ranks[0]["whole"]["state"]
    assert whole["features.0.weight"].shape == (4, 3, 3, 3)
    for rank in ranks:
        assert rank["resumed"]["fused"] and rank["resumed"]["steps"] == 6
        assert rank["resumed"]["state"].keys() == whole.keys()
        for key, tensor in whole.items():  # resumed from step 2, mid-ramp: the uninterrupted run's end
            torch.testing.assert_close(rank["resumed"]["state"][key], tensor, rtol=0, atol=1e-6, msg=key)
            torch.testing.assert_close(rank["whole"]["state"][key], tensor, rtol=0, atol=0, msg=key)

    namespace: dict = {}
    exec(compile(MODELS, "sharded_models", "exec"), namespace)
    folder = tmp_path / "whole"
    assert (folder / "epoch=0-step=2.ckpt").is_dir()  # a distributed checkpoint: one shard file per rank
    last = load_pruned(namespace["CNN"](), _consolidated(folder / "last.ckpt"))  # rewritten after fusion
    for key, tensor in whole.items():
        torch.testing.assert_close(last.state_dict()[key], tensor, rtol=0, atol=0, msg=key)
    mid = load_pruned(namespace["CNN"](), _consolidated(folder / "epoch=0-step=2.ckpt"))  # masked, full width
    assert 4 <= mid.features[0].out_channels < 8
    assert not any(parametrize.is_parametrized(m) for m in mid.modules())


# --- strategies the callback cannot follow -------------------------------------------------------------------


def _setup(strategy, **callback) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    StructuredPruning(SaliencyPruner(sparsity_level=0.5), **callback).setup(trainer, pl.LightningModule(), "fit")


def test_tensor_parallel_is_refused_at_setup_with_the_reason():
    with pytest.raises(PruningConfigError, match=r"tensor_parallel_size=2\).*rows or columns.*tensor_parallel_size=1"):
        _setup(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))


def test_shrinking_during_training_is_refused_under_model_parallel():
    with pytest.raises(PruningConfigError, match=r"shrink_every_n_steps=2.*ModelParallelStrategy.*optimizers"):
        _setup(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), shrink_every_n_steps=2)


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_fsdp1_and_deepspeed_are_refused_naming_the_supported_choices(strategy):
    trainer = types.SimpleNamespace(strategy=object.__new__(strategy))  # DeepSpeed needs its package and CUDA
    with pytest.raises(PruningConfigError, match=rf"{strategy.__name__}.*ModelParallelStrategy.*FSDP2"):
        refuse_unsupported(trainer)
