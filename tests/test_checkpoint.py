"""Reloading pruned models outside the training run: load_pruned, load_from_checkpoint, and what is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.checkpoint import dense_view
from tests.test_callback import TinyClassifier, loader, probe, pruning, trainer_for


class ReloadableClassifier(TinyClassifier):
    """The README's recipe: narrow to the checkpoint before Lightning's strict load."""

    def on_load_checkpoint(self, checkpoint):
        lp.narrow_to_state_dict(self, checkpoint["state_dict"])


def fitted(tmp_path, module_cls=TinyClassifier):
    model = module_cls()
    trainer = trainer_for(tmp_path, [pruning()])
    trainer.fit(model, loader())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), path


def test_load_from_checkpoint_with_the_narrowing_hook(tmp_path):
    model, path = fitted(tmp_path, ReloadableClassifier)
    reloaded = ReloadableClassifier.load_from_checkpoint(path).eval()
    assert reloaded.net[0].out_features == model.net[0].out_features < 16
    torch.testing.assert_close(reloaded(probe()), model(probe()), rtol=0, atol=0)


def test_load_pruned_takes_a_plain_state_dict_and_creates_folded_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3, bias=False))
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    pruner.step()
    pruner.prune()  # sigmoid(0) = 0.5 from the removed channels is folded into a new bias of the last layer
    assert model[2].bias is not None
    fresh = lp.load_pruned(nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3, bias=False)),
                           model.state_dict())
    assert (fresh[0].out_features, fresh[2].in_features) == (4, 4)
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_masked_state_dict_is_refused_with_a_clear_message():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "0.weight"}])
    with pytest.raises(lp.PruningConfigError, match="saved before fusion"):
        lp.load_pruned(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), model.state_dict())


def test_dense_view_names_masked_tensors_as_the_plain_model_does():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    plain_keys = set(model.state_dict())
    lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "0.weight"}])
    assert set(dense_view(model.state_dict())) == plain_keys


def test_pruning_starts_from_a_dense_checkpoint(tmp_path):
    dense = TinyClassifier()
    trainer = trainer_for(tmp_path, [])
    trainer.fit(dense, loader())
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)

    model = TinyClassifier()
    trainer_for(tmp_path, [pruning()], max_epochs=2).fit(model, loader(), ckpt_path=path)
    assert model.net[0].out_features == 8  # pruned and fused, after resuming the dense weights and optimizer


def test_loading_dense_weights_into_a_prepared_model_keeps_its_masks(tmp_path):
    callback = pruning()
    model = TinyClassifier()
    trainer = trainer_for(tmp_path, [callback])
    callback.setup(trainer, model, "fit")
    dense = TinyClassifier().state_dict()
    model.load_state_dict(dense)
    torch.testing.assert_close(model.net[0].weight, dense["net.0.weight"])
    assert callback.pruner.state["net.0.weight"]["mask"].all()
