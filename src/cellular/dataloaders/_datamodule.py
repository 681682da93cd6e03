"""Lightning data modules: minibatches of normalised expression (encoder) and of embeddings (classifier head)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from scvi import REGISTRY_KEYS
from torch.utils.data import DataLoader, Dataset

from cellular.data import DepthThinning, NormalizedExpression, stratified_split

from ._sampler import MinibatchSampler

# Cells whose rows a backed file's minibatches read at once (a window of 32 minibatches of 256).
BACKED_WINDOW_CELLS = 8192


class _ExpressionMinibatches(Dataset):
    """Item ``index`` (an array of cells) is the dense normalised expression, labels and batches of those cells."""

    def __init__(
        self,
        expression: NormalizedExpression,
        labels: np.ndarray,
        batches: np.ndarray,
        thinning: DepthThinning | None = None,
    ):
        self.expression = expression
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.batches = torch.from_numpy(np.asarray(batches, dtype=np.int64))
        self.thinning = thinning

    def __len__(self) -> int:
        return self.expression.n_cells

    def __getitem__(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        return self.minibatch(index, self.expression, index)

    def minibatch(self, index: np.ndarray, expression: NormalizedExpression, rows: np.ndarray) -> dict:
        """The minibatch of cells ``index``, whose expression is ``rows`` of ``expression`` (all cells or a window)."""
        index_t = torch.from_numpy(index)
        return {
            REGISTRY_KEYS.X_KEY: torch.from_numpy(expression.rows(rows, self.thinning)),
            REGISTRY_KEYS.LABELS_KEY: self.labels[index_t],
            REGISTRY_KEYS.BATCH_KEY: self.batches[index_t],
        }


class _EmbeddingMinibatches(Dataset):
    def __init__(self, z: torch.Tensor, labels: torch.Tensor):
        self.z = z
        self.labels = labels

    def __len__(self) -> int:
        return self.z.shape[0]

    def __getitem__(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        index_t = torch.from_numpy(np.asarray(index))
        return {REGISTRY_KEYS.X_KEY: self.z[index_t], REGISTRY_KEYS.LABELS_KEY: self.labels[index_t]}


class _PrefetchingLoader:
    """Minibatches of expression read from disk a window at a time, one window ahead, in a background thread.

    HDF5 pays per read: the rows of the next minibatches, up to :data:`BACKED_WINDOW_CELLS` cells, are read in one
    sorted read (3.4x the rows per second of 256-row reads on a 100k-cell file) while the current window's
    minibatches train (torch releases the GIL while it computes). Minibatches are built from the window in the
    sampler's order, one at a time, so they hold exactly what the in-memory path gives, and depth thinning draws its
    random numbers in the same order.
    """

    # Read by Lightning on anything it iterates, as on a DataLoader.
    batch_sampler = None

    def __init__(self, dataset: _ExpressionMinibatches, sampler: MinibatchSampler):
        self.dataset = dataset
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellular-prefetch") as reader:
            pending = None
            for window in self._windows():
                upcoming = reader.submit(self._read_window, window)
                if pending is not None:
                    yield from pending.result()
                pending = upcoming
            if pending is not None:
                yield from pending.result()

    def _windows(self):
        window, n_cells = [], 0
        for index in self.sampler:
            window.append(np.asarray(index))
            n_cells += len(index)
            if n_cells >= BACKED_WINDOW_CELLS:
                yield window
                window, n_cells = [], 0
        if window:
            yield window

    def _read_window(self, window: list[np.ndarray]) -> list[dict]:
        rows = np.unique(np.concatenate(window))
        cells = self.dataset.expression.subset(rows)
        return [self.dataset.minibatch(index, cells, np.searchsorted(rows, index)) for index in window]


def _loader(dataset: Dataset, sampler: MinibatchSampler) -> DataLoader | _PrefetchingLoader:
    if isinstance(dataset, _ExpressionMinibatches) and dataset.expression.is_backed:
        return _PrefetchingLoader(dataset, sampler)
    # batch_size=None: the sampler yields whole minibatches and the dataset builds them in one vectorised read. The
    # loader's own generator keeps it from drawing from torch's global stream, which dropout uses.
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0, generator=torch.Generator())


class CellularDataModule(LightningDataModule):
    """Stratified train/validation split and minibatches of normalised expression for the CELLULAR encoder.

    Plays the part of scvi-tools' ``DataSplitter``: after construction ``train_idx``, ``val_idx`` and ``test_idx``
    hold the split (``test_idx`` is empty), ``n_train`` and ``n_val`` its sizes.

    Parameters
    ----------
    expression
        The training cells' expression over the model's genes.
    labels, batches
        Integer label (``-1`` unlabelled) and batch code per cell.
    train_size
        Fraction of each label's cells used for training; the rest gives the validation loss.
    batch_size
        Cells per global minibatch (shared among ranks under distributed training).
    seed
        Seed of the run's random stream: the split, then every epoch's minibatches and depth thinning, in order.
    balanced_sampling
        Draw training minibatches class-balanced (see :class:`MinibatchSampler`).
    thinning_probability, thinning_min_fraction
        Binomial depth thinning of training minibatches (augmentation, see :class:`cellular.data.DepthThinning`);
        off when the probability is 0, never applied to validation cells.
    """

    def __init__(
        self,
        expression: NormalizedExpression,
        labels: np.ndarray,
        batches: np.ndarray,
        *,
        train_size: float,
        batch_size: int,
        seed: int,
        balanced_sampling: bool = True,
        thinning_probability: float = 0.0,
        thinning_min_fraction: float = 0.25,
    ):
        super().__init__()
        self.expression = expression
        self.labels = np.asarray(labels)
        self.batches = np.asarray(batches)
        self.batch_size = batch_size
        self.seed = seed
        self.balanced_sampling = balanced_sampling
        self.rng = np.random.default_rng(seed)
        self.train_idx, self.val_idx = stratified_split(self.labels, train_size, self.rng)
        self.thinning = None
        if thinning_probability > 0:
            self.thinning = DepthThinning(thinning_probability, thinning_min_fraction, self.rng)
        self._datasets: list[_ExpressionMinibatches] = []
        self.test_idx = np.zeros(0, dtype=int)

    @property
    def n_train(self) -> int:
        """Number of training cells."""
        return int(self.train_idx.size)

    @property
    def n_val(self) -> int:
        """Number of validation cells."""
        return int(self.val_idx.size)

    @property
    def has_validation(self) -> bool:
        """Whether there are enough validation cells (two) for a contrastive validation loss."""
        return self.n_val >= 2

    def train_dataloader(self) -> DataLoader:
        """Class-balanced (or shuffled) minibatches of the training cells, with depth thinning when configured."""
        balance = self.labels[self.train_idx] if self.balanced_sampling else None
        sampler = MinibatchSampler(self.train_idx, self.batch_size, rng=self.rng, balance_by=balance)
        dataset = _ExpressionMinibatches(self.expression, self.labels, self.batches, self.thinning)
        self._datasets.append(dataset)
        return _loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        """Consecutive minibatches of the validation cells (none when there are fewer than two)."""
        if not self.has_validation:
            return []
        indices = self.val_idx
        n_full = indices.size // self.batch_size
        # A last minibatch of a single cell has no pairs for the contrastive terms: fold it into the previous one.
        batch_size = self.batch_size + 1 if n_full and indices.size - n_full * self.batch_size == 1 else self.batch_size
        sampler = MinibatchSampler(indices, batch_size, shuffle=False)
        dataset = _ExpressionMinibatches(self.expression, self.labels, self.batches)
        self._datasets.append(dataset)
        return _loader(dataset, sampler)

    def teardown(self, stage: str) -> None:
        """Let go of the expression after training: ``model.trainer`` keeps this module, not the data."""
        for dataset in self._datasets:
            dataset.expression = None
        self._datasets.clear()
        self.expression = None


class EmbeddingDataModule(LightningDataModule):
    """Minibatches of embedded cells and their labels for the classifier head.

    Parameters
    ----------
    z
        ``(n_cells, n_latent)`` embedding.
    labels
        Type code per cell.
    batch_size
        Cells per minibatch.
    seed
        Seed of the split (a stratified tenth is held back to choose the stopping epoch) and of the minibatches.
    """

    def __init__(self, z: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int):
        super().__init__()
        self.z = torch.as_tensor(z, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.train_idx, self.val_idx = stratified_split(np.asarray(labels), 0.9, self.rng)
        if self.val_idx.size == 0:
            self.val_idx = self.train_idx

    def train_dataloader(self) -> DataLoader:
        """Shuffled minibatches of the fitting cells."""
        sampler = MinibatchSampler(self.train_idx, self.batch_size, rng=self.rng)
        return _loader(_EmbeddingMinibatches(self.z, self.labels), sampler)

    def val_dataloader(self) -> DataLoader:
        """All held-back cells in one minibatch (the stopping loss)."""
        sampler = MinibatchSampler(self.val_idx, max(self.val_idx.size, 1), shuffle=False)
        return _loader(_EmbeddingMinibatches(self.z, self.labels), sampler)
