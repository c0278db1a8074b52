"""``load_pruned`` reads safetensors files, shard indexes and ``save_pretrained`` directories as it reads ``.ckpt``
files, and names what is wrong with a path it cannot read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_prune import PruningConfigError, SaliencyPruner, load_pruned


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _pruned(prune: bool = True):
    model = _mlp()
    pruner = SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    pruner.step()
    if prune:
        pruner.prune()
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "masked"])
def test_a_safetensors_file_loads_like_a_ckpt(fused, tmp_path):
    model = _pruned(prune=fused)
    x = torch.randn(3, 8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = load_pruned(_mlp(), tmp_path / "model.safetensors")
    assert loaded[0].out_features == 8
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_a_shard_index_and_its_directory_load(tmp_path):
    model = _pruned()
    state = model.state_dict()
    first = {k: v for k, v in state.items() if k.startswith("0.")}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: v for k, v in state.items() if k not in first}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 if k in first else 2}-of-00002.safetensors" for k in state}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    x = torch.randn(3, 8)
    for path in (tmp_path / "model.safetensors.index.json", tmp_path):
        torch.testing.assert_close(load_pruned(_mlp(), path)(x), model(x), rtol=1e-6, atol=1e-6)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(PruningConfigError, match="the shard 'model-00002-of-00002.safetensors' that "
                                                 "model.safetensors.index.json lists is not in"):
        load_pruned(_mlp(), tmp_path)


def test_paths_that_hold_no_checkpoint_are_refused_naming_them(tmp_path):
    with pytest.raises(PruningConfigError, match="is a directory without model.safetensors.index.json or "
                                                 "model.safetensors"):
        load_pruned(_mlp(), tmp_path)
    with pytest.raises(PruningConfigError, match="no checkpoint file at .*missing.safetensors"):
        load_pruned(_mlp(), tmp_path / "missing.safetensors")
    (tmp_path / "bad.index.json").write_text("{}")
    with pytest.raises(PruningConfigError, match="has no 'weight_map'"):
        load_pruned(_mlp(), tmp_path / "bad.index.json")
