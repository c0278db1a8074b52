"""scikit-learn's bundled digits as a LightningDataModule: no download, so the demo runs anywhere."""

import torch
from lightning.pytorch import LightningDataModule
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset, random_split

#: load_digits stores pixel intensities as integers 0..16.
_MAX_PIXEL = 16.0


class DigitsDataModule(LightningDataModule):
    """8x8 digit images, shape (N, 1, 8, 8) in [0, 1], with a fixed seeded train/val/test split.

    The split depends only on ``seed`` and the fractions, so every run of a sweep sees the same test set.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < fraction < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {fraction!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave training data, got {val_fraction} + {test_fraction}"
            )
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / _MAX_PIXEL
        labels = torch.tensor(digits.target, dtype=torch.long)
        dataset = TensorDataset(images, labels)
        n_val = round(len(dataset) * self.val_fraction)
        n_test = round(len(dataset) * self.test_fraction)
        lengths = [len(dataset) - n_val - n_test, n_val, n_test]
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set, self.test_set = random_split(dataset, lengths, generator=generator)

    def example_input(self, batch_size: int) -> torch.Tensor:
        """A fixed batch of test images, the input on which the app measures MACs and latency."""
        self.setup()
        indices = [i % len(self.test_set) for i in range(batch_size)]
        return torch.stack([self.test_set[i][0] for i in indices])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train_set, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
