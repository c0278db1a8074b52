"""Distillation inside tiny CPU Lightning runs: the loss against a frozen dense teacher, its place in checkpoints
(none), callback order with StructuredPruning, the recovered KL, and the errors of its contract."""

from __future__ import annotations

import copy
import math
import pickle
import textwrap

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_prune import Distillation, PruningConfigError
from lightning_prune.distill import kl_divergence
from lightning_prune.masks import has_masks_anywhere
from tests.runs import CLASSES, IN, TinyClassifier, loader, pruning, run_ddp_script, trainer_for


class Recorder(Callback):
    """Per training step: the loss Lightning backpropagated, the logged KL, and the teacher's weights."""

    def __init__(self, distillation: Distillation):
        self.distillation = distillation
        self.losses, self.kls, self.teachers = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.kls.append(float(trainer.callback_metrics["distill/kl"]))
        self.teachers.append({k: v.clone() for k, v in self.distillation.teacher.state_dict().items()})


class Logged(TinyClassifier):
    """Keeps each step's input, task loss and logits, to recompute what the callback added."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.seen.append((x, float(loss), logits.detach().clone()))
        return loss


def plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("distill_first", [True, False], ids=["distill-first", "pruning-first"])
def test_the_loss_is_taken_against_the_frozen_dense_teacher_in_either_callback_order(tmp_path, distill_first):
    model = Logged()
    dense = copy.deepcopy(model).eval()
    distillation = Distillation(alpha=0.7, temperature=2.0)
    recorder = Recorder(distillation)
    prune = pruning(0.5, schedule="oneshot", start_step=1)
    callbacks = [distillation, prune] if distill_first else [prune, distillation]
    trainer_for(tmp_path, [*callbacks, recorder], max_epochs=2).fit(model, loader())

    assert prune.fused and model.net[0].out_features == 8  # pruned, and the teacher stayed whole
    teacher = distillation.teacher
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    # first: a plain copy of the dense model; after StructuredPruning: a copy with its masks, all keeping every channel
    assert has_masks_anywhere(teacher) is not distill_first
    if distill_first:
        assert recorder.teachers[0].keys() == dense.state_dict().keys()
        assert all(torch.equal(v, dense.state_dict()[k]) for k, v in recorder.teachers[0].items())
    else:
        assert all(bool(v.all()) for k, v in recorder.teachers[-1].items() if k.endswith(".mask"))
    for weights in recorder.teachers[1:]:  # the teacher never changed over the fit, at any step
        assert all(torch.equal(weights[k], recorder.teachers[0][k]) for k in weights)
    x = torch.randn(16, IN)
    with torch.no_grad():
        assert torch.equal(teacher(x), dense(x))
    assert len(model.seen) == len(recorder.losses) == 8
    for (x, task, logits), total in zip(model.seen, recorder.losses, strict=True):
        with torch.no_grad():
            expected = task + 0.7 * 2.0 ** 2 * float(kl_divergence(dense(x), logits, 2.0))
        assert total == pytest.approx(expected, rel=1e-5)
    assert recorder.kls[0] == pytest.approx(0.0, abs=1e-9)  # step 0: the student is the dense model
    assert max(recorder.kls[2:]) > 1e-4  # after pruning at step 1 it is not


def test_the_teacher_is_in_no_state_dict_and_no_checkpoint(tmp_path):
    model = TinyClassifier()
    distillation = Distillation()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    trainer = trainer_for(tmp_path, [distillation, pruning(0.5), checkpoint], enable_checkpointing=True,
                          max_epochs=2)
    trainer.fit(model, loader())
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    files = [*sorted((tmp_path / "ckpt").glob("*.ckpt")), tmp_path / "after.ckpt"]
    assert len(files) >= 3  # two epochs' files and last.ckpt, then one written after the fit
    student_keys = set(model.state_dict())
    assert not any(k.startswith("teacher") or ".teacher." in k for k in student_keys)
    for path in files:
        saved = torch.load(path, weights_only=True)
        assert not any("teacher" in k for k in saved["state_dict"]), path
        assert not any(key.startswith("Distillation") for key in saved["callbacks"]), path  # no state of its own
    assert set(torch.load(files[-1], weights_only=True)["state_dict"]) == student_keys
    # after the fit the module holds nothing of the callback: no wrapped training_step, no hook; it pickles
    assert "training_step" not in vars(model) and not model._forward_hooks
    assert pickle.loads(pickle.dumps(model)).net[0].out_features == 8


def test_a_tiny_distillation_run_lowers_the_students_kl(tmp_path):
    """A student pruned at step 1 and trained on random labels: distilled from a confident dense teacher its KL to
    it falls well below where it started; the same run without distillation ends far from the teacher."""
    dense = TinyClassifier()
    with torch.no_grad():
        dense.net[4].weight.mul_(10)  # confident outputs: a KL worth recovering
    x = torch.randn(64, IN, generator=torch.Generator().manual_seed(3))

    def kl(student) -> float:
        with torch.no_grad():
            return float(kl_divergence(dense.eval()(x), student.eval()(x), 1.0))

    final = {}
    for name, extra in (("distilled", [Distillation(alpha=10.0)]), ("plain", [])):
        student = copy.deepcopy(dense)
        recorder = [Recorder(extra[0])] if extra else []
        trainer_for(tmp_path, [*extra, pruning(0.5, start_step=1), *recorder], max_epochs=10).fit(student, loader())
        final[name] = kl(student)
        if recorder:  # the KL on the training batches right after pruning, then at the end
            assert max(recorder[0].kls[2:4]) > 3 * recorder[0].kls[-1]
    assert final["distilled"] < 0.3 * final["plain"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0}, "alpha must be a finite number > 0, got 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0, got -1.0"),
        ({"alpha": math.nan}, "alpha must be a finite number > 0, got nan"),
        ({"alpha": True}, "alpha must be a finite number > 0, got True"),
        ({"temperature": "2"}, "temperature must be a finite number > 0, got '2'"),
        ({"temperature": math.inf}, "temperature must be a finite number > 0, got inf"),
        ({"teacher": "sparse"}, "teacher must be 'dense' or an nn.Module, got 'sparse'"),
        ({"module": 3}, "module must be a submodule name such as 'net' or None, got 3"),
        ({"module": ""}, "module must be a submodule name such as 'net' or None, got ''"),
        ({"logits": "logits"}, "logits must be a function"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(PruningConfigError, match=message):
        Distillation(**kwargs)


class CallsNet(TinyClassifier):
    """training_step calls self.net, not self: the LightningModule's own forward never runs."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])


class DictOutput(TinyClassifier):
    def forward(self, x):
        return {"scores": self.net(x)}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])["scores"], batch[1])


class Steps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


def fit_raises(tmp_path, model, distillation, message, example=False):
    """fit fails with ``message`` (``distillation``: one callback or a list); with an example input, before any
    training step ran."""
    if example:
        model.example_input_array = torch.randn(2, IN)
    steps = Steps()
    distillations = distillation if isinstance(distillation, list) else [distillation]
    with pytest.raises(PruningConfigError, match=message):
        trainer_for(tmp_path, [*distillations, steps]).fit(model, loader())
    assert steps.steps == 0
    assert "training_step" not in vars(model) and not model._forward_hooks  # the failed fit left nothing behind


@pytest.mark.parametrize("example", [False, True], ids=["first-step", "setup"])
def test_a_training_step_that_calls_no_student_is_refused(tmp_path, example):
    fit_raises(tmp_path, CallsNet(), Distillation(), r"training_step called no self\(\.\.\.\).*module='net'", example)


@pytest.mark.parametrize("example", [False, True], ids=["first-step", "setup"])
def test_an_output_without_logits_is_refused_naming_it(tmp_path, example):
    fit_raises(tmp_path, DictOutput(), Distillation(), "found no logits in the student's output: got dict", example)


def test_naming_the_submodule_or_the_logits_fixes_those(tmp_path):
    for model, distillation in ((CallsNet(), Distillation(module="net")),
                                (DictOutput(), Distillation(logits=lambda output: output["scores"]))):
        recorder = Recorder(distillation)
        trainer_for(tmp_path, [distillation, recorder]).fit(model, loader())
        assert len(recorder.kls) == 4 and recorder.kls[0] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("example", [False, True], ids=["first-step", "setup"])
def test_a_teacher_of_another_output_shape_is_refused(tmp_path, example):
    other = nn.Sequential(nn.Linear(IN, CLASSES + 2))
    fit_raises(tmp_path, TinyClassifier(), Distillation(teacher=other),
               rf"teacher's logits have shape \((2|8), {CLASSES + 2}\), the student's \((2|8), {CLASSES}\)", example)


def test_setup_refuses_manual_optimization_an_unknown_module_and_a_pruned_model(tmp_path):
    manual = TinyClassifier()
    manual.automatic_optimization = False
    fit_raises(tmp_path, manual, Distillation(), "manual optimization")
    fit_raises(tmp_path, TinyClassifier(), Distillation(module="body"),
               r"no submodule 'body'; its children are \['net'\]")
    fit_raises(tmp_path, TinyClassifier(), [Distillation(), Distillation(temperature=2.0)],
               r"one Distillation per LightningModule: Distillation\(teacher='dense', alpha=1.0, temperature=1.0, "
               r"module=None\) already distils this TinyClassifier, so Distillation\(.*temperature=2.0")
    prepared = TinyClassifier()
    prune = pruning(0.5)
    prune.pruner.prepare(prepared, None)
    prune.pruner.step()  # channels pruned before the fit: a copy is no dense model
    fit_raises(tmp_path, prepared, Distillation(), "already has pruned channels at setup")


def test_resuming_with_a_dense_copy_is_refused_and_an_explicit_teacher_resumes(tmp_path):
    model = TinyClassifier()
    dense = copy.deepcopy(model)
    trainer = trainer_for(tmp_path, [Distillation()])
    trainer.fit(model, loader())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    with pytest.raises(PruningConfigError, match=r"pass the dense model itself: "
                                                 r"Distillation\(teacher=TinyClassifier.load_from_checkpoint"):
        trainer_for(tmp_path, [Distillation()], max_epochs=2).fit(TinyClassifier(), loader(),
                                                                   ckpt_path=tmp_path / "mid.ckpt")
    resumed = TinyClassifier()
    distillation = Distillation(teacher=dense)
    trainer_for(tmp_path, [distillation], max_epochs=2).fit(resumed, loader(), ckpt_path=tmp_path / "mid.ckpt")
    assert distillation.teacher is dense


DDP_SCRIPT = textwrap.dedent(
    '''
    import copy
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune import Distillation, SaliencyPruner, StructuredPruning
    from lightning_prune.distill import kl_divergence


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
            self.seen = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            logits = self(batch[0])
            loss = F.cross_entropy(logits, batch[1])
            self.seen.append((batch[0], loss.detach(), logits.detach().clone()))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    class Totals(pl.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach().clone())


    if __name__ == "__main__":
        out = Path(sys.argv[1])
        torch.manual_seed(0)
        dense = Net()  # rank 0's model, which DDP gives every rank
        rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
        torch.manual_seed(rank)  # so each rank builds other weights, and a copy at setup differs per rank
        model = Net()
        distillation, totals = Distillation(alpha=0.5, temperature=2.0), Totals()
        pruning = StructuredPruning(SaliencyPruner(sparsity_level=0.5), start_step=1)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                             callbacks=[distillation, pruning, totals], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=out)
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator))
        trainer.fit(model, DataLoader(data, batch_size=8))
        with torch.no_grad():
            expected = [task + 0.5 * 4.0 * kl_divergence(dense(x), logits, 2.0) for x, task, logits in model.seen]
        torch.save({"teacher": distillation.teacher.state_dict(), "dense": dense.state_dict(),
                    "student": model.state_dict(), "losses": totals.losses, "expected": expected,
                    "fused": pruning.fused}, out / f"rank{trainer.global_rank}.pt")
        torch.distributed.destroy_process_group()
    '''
)


def test_under_ddp_every_rank_distils_from_rank_zeros_dense_model(tmp_path):
    run = run_ddp_script(tmp_path, DDP_SCRIPT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        assert rank["fused"] and rank["student"]["net.0.weight"].shape == (8, 8)
        assert all(torch.equal(rank["teacher"][k], rank["dense"][k]) for k in rank["dense"])
        assert len(rank["losses"]) == len(rank["expected"]) == 4  # 2 epochs of 2 batches per rank
        assert torch.allclose(torch.stack(rank["losses"]), torch.stack(rank["expected"]), rtol=1e-5)
    assert all(torch.equal(ranks[0]["student"][k], ranks[1]["student"][k]) for k in ranks[0]["student"])
