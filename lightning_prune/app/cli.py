"""The Hydra app's entry point: ``python -m lightning_prune.app`` (or ``python examples/train.py``).

The configs ship in the package (``lightning_prune/app/conf``, Hydra's ``pkg://`` search path), so a ``pip install``
is enough to run it from any directory.
"""

import logging

import hydra
from omegaconf import DictConfig

from lightning_prune.app.experiment import run
from lightning_prune.errors import PruningConfigError, UnsupportedPatternError

CONFIG_PATH = "pkg://lightning_prune.app.conf"


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """One run; returns the pruned model's validation score (``val_<cfg.score>``: accuracy, or the language model's
    perplexity), the value a Hydra sweeper would optimise. A config the pruner refuses (checked before training) ends
    the run with its message, not a traceback."""
    route_logs_to_hydra()
    try:
        return run(cfg)[f"val_{cfg.get('score', 'acc')}"]
    except (PruningConfigError, UnsupportedPatternError) as error:
        raise SystemExit(f"{type(error).__name__}: {error}") from None


def route_logs_to_hydra() -> None:
    """Send Lightning's log and Python warnings through the root logger that Hydra set up, so they reach both the
    console and ``train.log``, once. Lightning gives its loggers console handlers of their own (``lightning``
    always; ``lightning.pytorch`` and ``lightning.fabric`` when imported before any logging is configured), which
    would print each line a second time or keep it out of the file."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)
