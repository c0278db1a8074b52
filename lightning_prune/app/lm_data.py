"""An offline language-model corpus: the Python standard library's own source files, read as bytes.

Every Python installation ships its standard library's sources (``sysconfig.get_paths()["stdlib"]``, about 30 MB of
``.py`` files for CPython 3.11, installed packages left out), so a language model can train and be measured
anywhere with no download. The tokenizer is the identity on bytes: a vocabulary of 256, nothing to fit or ship.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

#: a byte-level tokenizer: token ids are the bytes themselves
VOCAB_SIZE = 256
#: joins one file to the next (source files hold no NUL byte)
SEPARATOR = b"\0"
_INSTALLED = {"site-packages", "dist-packages"}


class StdlibDataModule(LightningDataModule):
    """Next-byte prediction on the standard library's sources, split by file into train/val/test.

    A file's split depends only on its path relative to the library: ``sha256(path)`` read as a fraction in [0, 1)
    is below ``val_fraction`` for validation, below ``val_fraction + test_fraction`` for test, else train. Each
    split joins its files in sorted path order, separated by a NUL byte, and cuts the stream into non-overlapping
    windows: a sample is ``(input_ids, labels)``, both ``(block_size,)`` int64 in [0, 256), ``labels`` the inputs
    shifted one byte on. Batches are ``(B, block_size)`` pairs; training batches are shuffled by ``seed``.

    Args:
        block_size: tokens (bytes) per sample.
        batch_size: samples per batch.
        val_fraction, test_fraction: shares of the files held out, each in (0, 1), leaving some for training.
        max_bytes: cap on each split's bytes (files taken in sorted order, the last one cut), so tests read a few
            KB; ``None`` reads everything.
        seed: the training order's seed (the split does not depend on it).
        root: the directory of ``.py`` files to read; ``None`` is the running interpreter's standard library.

    Raises:
        ValueError: a bad argument (at construction), or at ``setup``, a split with fewer than ``block_size + 1``
            bytes (too small a ``max_bytes`` or ``root``).
    """

    def __init__(self, block_size: int = 128, batch_size: int = 32, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, max_bytes: int | None = None, seed: int = 0, num_workers: int = 0,
                 root: str | None = None) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or
                                      max_bytes <= block_size):
            raise ValueError(f"max_bytes must be None or an integer > block_size ({block_size}), got {max_bytes!r}")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < fraction < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {fraction!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must leave files to train on, got {val_fraction} + "
                             f"{test_fraction}")
        self.block_size, self.batch_size, self.max_bytes = block_size, batch_size, max_bytes
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.seed, self.num_workers = seed, num_workers
        self.root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
        self.train_set = self.val_set = self.test_set = None

    def files(self) -> dict[str, list[Path]]:
        """Each split's files, in sorted order of their paths relative to ``root``."""
        splits: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
        for path in sorted(self.root.rglob("*.py"), key=lambda p: p.relative_to(self.root).as_posix()):
            relative = path.relative_to(self.root)
            if _INSTALLED & set(relative.parts) or not path.is_file():
                continue
            digest = hashlib.sha256(relative.as_posix().encode()).digest()
            position = int.from_bytes(digest[:8], "big") / 2 ** 64
            split = "val" if position < self.val_fraction else \
                "test" if position < self.val_fraction + self.test_fraction else "train"
            splits[split].append(path)
        return splits

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        streams = {name: self._read(paths, name) for name, paths in self.files().items()}
        self.train_set, self.val_set, self.test_set = (ByteBlocks(streams[name], self.block_size)
                                                       for name in ("train", "val", "test"))

    def _read(self, paths: list[Path], split: str) -> torch.Tensor:
        chunks, size = [], 0
        for path in paths:
            if self.max_bytes is not None and size >= self.max_bytes:
                break
            chunk = path.read_bytes() + SEPARATOR
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)[: self.max_bytes]
        if len(data) < self.block_size + 1:
            raise ValueError(f"the {split} split of {self.root} holds {len(data)} bytes, fewer than block_size + 1 "
                             f"({self.block_size + 1}); raise max_bytes or the held-out fractions")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def example_input(self, batch_size: int) -> torch.Tensor:
        """A fixed ``(batch_size, block_size)`` batch of test inputs, on which the app measures MACs and latency."""
        self.setup()
        return torch.stack([self.test_set[i % len(self.test_set)][0] for i in range(batch_size)])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)


class ByteBlocks(Dataset):
    """Non-overlapping windows of a byte stream: sample ``i`` is bytes ``[i*T, (i+1)*T)`` as inputs and the same
    window one byte on as labels, both int64 of shape ``(T,)``."""

    def __init__(self, stream: torch.Tensor, block_size: int) -> None:
        self.stream, self.block_size = stream, block_size

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        start = index * self.block_size
        window = self.stream[start: start + self.block_size + 1].long()
        return window[:-1], window[1:]
