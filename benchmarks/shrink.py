"""Wall time of training with shrinking at every ramp tick against keeping masks until the end of fit.

    python benchmarks/shrink.py [--quick] [--out benchmarks/shrink.json]

A VGG-11-shaped conv net trains on scikit-learn's digits, upsampled to 3x32x32, under a cubic schedule to 50% channel
sparsity. The ramp covers the first half of training; the second half fine-tunes. Both variants start from the same
seed and see the same batches. ``shrink`` fuses at every tick where something new is masked
(``shrink_every_n_steps=every_n_steps``); ``fuse-at-end`` keeps training the full-width masked model and fuses when
fit ends. The two end with the same model up to float32 rounding; the max logit difference on the 297 held-out
images is reported. ``shrink_s`` is the time spent inside the mid-fit shrinks (fusion, optimizer state carried over,
masks traced and attached again). Medians over alternating rounds; the JSON keeps every round's fit time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.models import VGG11  # noqa: E402
from benchmarks.run import machine, markdown  # noqa: E402
from lightning_prune.callback import StructuredPruning  # noqa: E402
from lightning_prune.measure import count_macs, count_params  # noqa: E402
from lightning_prune.sparsifier import SaliencyPruner  # noqa: E402

VARIANTS = ("fuse-at-end", "shrink")
COLUMNS = ["variant", "fit_s", "shrinks", "shrink_s", "ms_per_step_after_ramp", "params_end", "macs_end"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes; ``quick`` (a narrower VGG-11, fewer steps) finishes in under two minutes on 2 cores."""

    threads: int = 2
    width: int = 64  # VGG-11's first conv; 64 is the standard network
    batch: int = 64
    steps: int = 56  # two epochs of the 1,797 digits at batch 64 (the last partial batch dropped)
    every_n_steps: int = 4
    sparsity: float = 0.5
    rounds: int = 3  # the variants run alternately; medians are reported

    @property
    def ramp_end(self) -> int:
        return self.steps // 2

    @classmethod
    def quick(cls) -> Settings:
        return cls(width=32, batch=32, steps=32, every_n_steps=2)


class Classifier(pl.LightningModule):
    def __init__(self, width: int):
        super().__init__()
        self.net = VGG11(num_classes=10, width=width, image_size=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class TimedPruning(StructuredPruning):
    """Adds up the time spent in mid-fit shrinks: fusion, optimizer carry-over, masks traced and attached again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shrink_s = 0.0

    def _shrink(self, *args, **kwargs):
        start = time.perf_counter()
        super()._shrink(*args, **kwargs)
        self.shrink_s += time.perf_counter() - start


class StepClock(Callback):
    """The time at the end of every training step, and the parameter count then (drops show the shrinks)."""

    def __init__(self):
        self.times: list[float] = []
        self.params: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())
        self.params.append(count_params(pl_module))


def digits() -> tuple[TensorDataset, TensorDataset]:
    """Digits as 3x32x32 images in [0, 1] (bilinear upsampling, gray repeated), split 1,500 train / 297 test."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1500], order[1500:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def train(variant: str, settings: Settings, train_set: TensorDataset, test_set: TensorDataset) -> dict[str, object]:
    pl.seed_everything(0, verbose=False)
    model = Classifier(settings.width)
    shrink = settings.every_n_steps if variant == "shrink" else None
    callback = TimedPruning(SaliencyPruner(sparsity_level=settings.sparsity), schedule="cubic", start_step=0,
                            end_step=settings.ramp_end, every_n_steps=settings.every_n_steps,
                            shrink_every_n_steps=shrink)
    clock = StepClock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=settings.steps, callbacks=[callback, clock],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    batches = DataLoader(train_set, batch_size=settings.batch, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    trainer.fit(model, batches)
    fit_s = time.perf_counter() - start

    after_ramp = clock.times[settings.ramp_end:]  # steps after the first one that follows the last tick
    model.eval()
    x = test_set.tensors[0]
    with torch.no_grad():
        logits = model(x)
    return {
        "variant": variant,
        "fit_s": fit_s,
        "ms_per_step_after_ramp": 1e3 * (after_ramp[-1] - after_ramp[0]) / (len(after_ramp) - 1),
        "shrinks": sum(a > b for a, b in zip(clock.params, clock.params[1:], strict=False)),
        "shrink_s": callback.shrink_s,
        "params_end": count_params(model),
        "macs_end": count_macs(model, x[:1]),
        "logits": logits,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="VGG-11 at half width, batch 32, 32 steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("shrink.json"))
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    torch.set_num_threads(settings.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    train_set, test_set = digits()
    runs: dict[str, list[dict[str, object]]] = {variant: [] for variant in VARIANTS}
    for round_index in range(settings.rounds):
        for variant in VARIANTS:
            runs[variant].append(train(variant, settings, train_set, test_set))
            print(f"[round {round_index + 1}, {variant}: {runs[variant][-1]['fit_s']:.1f} s]", file=sys.stderr)

    rows = []
    for results in runs.values():
        row = {k: v for k, v in results[0].items() if k != "logits"}
        row["fit_s_rounds"] = [r["fit_s"] for r in results]
        row["fit_s"] = statistics.median(row["fit_s_rounds"])
        for key in ("shrink_s", "ms_per_step_after_ramp"):
            row[key] = statistics.median(r[key] for r in results)
        rows.append(row)
    fused, shrunk = rows
    summary = {
        "fit_time_ratio_shrink_over_fuse_at_end": shrunk["fit_s"] / fused["fit_s"],
        "step_time_ratio_after_ramp": shrunk["ms_per_step_after_ramp"] / fused["ms_per_step_after_ramp"],
        "max_abs_logit_diff": (runs["shrink"][0]["logits"] - runs["fuse-at-end"][0]["logits"]).abs().max().item(),
    }
    print(f"\n### Shrinking during training: VGG-11 (width {settings.width}) on digits 3x32x32, cubic to "
          f"{settings.sparsity:.0%} over steps 0..{settings.ramp_end} of {settings.steps}, batch {settings.batch}\n")
    print(markdown(rows, COLUMNS))
    print(f"\nfit time shrink / fuse-at-end: {summary['fit_time_ratio_shrink_over_fuse_at_end']:.3f}; "
          f"step time after the ramp: {summary['step_time_ratio_after_ramp']:.3f}; "
          f"max |logit difference| between the two final models: {summary['max_abs_logit_diff']:.2e}")
    results = {"machine": machine(), "settings": dataclasses.asdict(settings), "rows": rows, "summary": summary}
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
