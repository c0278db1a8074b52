"""The Hydra app's configs, shipped in the package so ``python -m lightning_prune.app`` finds them (pkg://)."""
