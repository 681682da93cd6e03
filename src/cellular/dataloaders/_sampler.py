"""Minibatch index sampler that is reproducible per epoch and splits every global minibatch across ranks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from cellular.data import epoch_minibatches, n_epoch_minibatches, sequential_minibatches


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised default process group, ``(1, 0)`` outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class MinibatchSampler(Sampler[np.ndarray]):
    """Yields one array of cell indices per minibatch (use with ``DataLoader(..., batch_size=None)``).

    Every rank draws the same global minibatches (from a generator seeded identically on every rank) and keeps its
    own equal share of each, so that ``N`` processes together see exactly the minibatches one process would, and
    the contrastive terms can be computed on the gathered global minibatch. Cells that do not divide evenly among
    the ranks are dropped from that minibatch.

    Parameters
    ----------
    indices
        Cells to draw from.
    batch_size
        Cells per global minibatch.
    rng
        Generator of the draws, advanced by every epoch (a shuffled sampler draws a new order each time it is
        iterated); it may be shared with the split and with depth thinning, as one training run's random stream.
    shuffle
        Draw a new random order (and, with ``balance_by``, a class-balanced sample) every epoch; ``False`` gives
        consecutive minibatches in the order of ``indices`` (evaluation).
    balance_by
        Label per cell of ``indices``: cells are drawn with replacement with probability inversely proportional to
        their label's frequency (see :func:`cellular.data.epoch_minibatches`).
    """

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        *,
        rng: np.random.Generator | None = None,
        shuffle: bool = True,
        balance_by: np.ndarray | None = None,
    ):
        self.indices = np.asarray(indices)
        self.batch_size = int(batch_size)
        if shuffle and rng is None:
            raise ValueError("A shuffling MinibatchSampler needs a random generator (rng=np.random.default_rng(seed)).")
        self.rng = rng
        self.shuffle = shuffle
        self.balance_by = balance_by

    def global_minibatches(self) -> list[np.ndarray]:
        """Draw the next epoch's minibatches, before they are shared among ranks."""
        if not self.shuffle:
            return [self.indices[b] for b in sequential_minibatches(self.indices.size, self.batch_size)]
        return epoch_minibatches(self.indices, self.batch_size, self.rng, self.balance_by)

    def __iter__(self) -> Iterator[np.ndarray]:
        world_size, rank = distributed_world()
        for batch in self.global_minibatches():
            share = batch.size // world_size
            if share:
                yield batch[rank * share : (rank + 1) * share]

    def __len__(self) -> int:
        if not self.shuffle:
            return -(-self.indices.size // self.batch_size)
        return n_epoch_minibatches(self.indices.size, self.batch_size)
