"""``python -m lightning_prune.app [group=option ...] [key=value ...]``: see :mod:`lightning_prune.app.cli`."""

from lightning_prune.app.cli import main

if __name__ == "__main__":
    main()
