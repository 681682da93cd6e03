"""Train/validation splits and minibatch schedules (index arithmetic only; no data is touched)."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, train_size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split cell indices into train and validation sets, stratified by label.

    Each label keeps ``round(train_size * n)`` of its cells for training, and at least two where it has two,
    so every type with two or more cells can still form positive pairs during training.

    Parameters
    ----------
    labels
        Integer code per cell (unlabelled cells may share one code).
    train_size
        Fraction of cells used for training, in ``(0, 1]``.
    rng
        Random generator.

    Returns
    -------
    Sorted train indices and sorted validation indices.
    """
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must lie in (0, 1], got {train_size}.")
    order = rng.permutation(labels.shape[0])
    shuffled = labels[order]
    # Rank of each cell within its label in the shuffled order, computed with a stable sort.
    by_label = np.argsort(shuffled, kind="stable")
    sorted_labels = shuffled[by_label]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty_like(by_label)
    rank[by_label] = np.arange(by_label.size) - starts
    _, inverse, counts = np.unique(shuffled, return_inverse=True, return_counts=True)
    n_train = np.maximum(np.round(train_size * counts).astype(int), np.minimum(counts, 2))
    is_train = rank < n_train[inverse]
    return np.sort(order[is_train]), np.sort(order[~is_train])


def epoch_minibatches(
    indices: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    balance_by: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Minibatches for one epoch over ``indices``.

    Parameters
    ----------
    indices
        Cells to draw from.
    batch_size
        Cells per minibatch. A last minibatch smaller than half of ``batch_size`` is dropped (it would give noisy
        contrastive terms), except when it is the only one.
    rng
        Random generator.
    balance_by
        Label code per cell of ``indices``; when given, cells are drawn with replacement with probability
        inversely proportional to their label's frequency, so rare types appear in every minibatch.

    Returns
    -------
    List of index arrays.
    """
    if balance_by is None:
        drawn = rng.permutation(indices)
    else:
        _, inverse, counts = np.unique(balance_by, return_inverse=True, return_counts=True)
        probabilities = 1.0 / counts[inverse]
        drawn = rng.choice(indices, size=indices.size, replace=True, p=probabilities / probabilities.sum())
    return [drawn[i * batch_size : (i + 1) * batch_size] for i in range(n_epoch_minibatches(drawn.size, batch_size))]


def n_epoch_minibatches(n_cells: int, batch_size: int) -> int:
    """Number of minibatches :func:`epoch_minibatches` gives for ``n_cells`` (a small last one is dropped)."""
    n_batches = -(-n_cells // batch_size)
    last = n_cells - (n_batches - 1) * batch_size
    return n_batches - 1 if n_batches > 1 and last < batch_size / 2 else n_batches


def sequential_minibatches(n_cells: int, batch_size: int) -> list[np.ndarray]:
    """Consecutive minibatches covering ``range(n_cells)`` in order (for inference)."""
    return [np.arange(start, min(start + batch_size, n_cells)) for start in range(0, n_cells, batch_size)]


def rows_per_group(codes: np.ndarray, per_group: int, seed: int = 0) -> np.ndarray:
    """Sorted rows holding every group's cells, or ``per_group`` of them drawn at random where a group has more.

    ``codes`` gives each cell's group; cells with a negative code are left out.
    """
    members = _group_rows(codes)
    return _draw_rows(members, [per_group] * len(members), seed)


def shared_sample(codes: np.ndarray, total: int, min_per_group: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of a sample of about ``total`` cells shared fairly among groups.

    Each group gets an equal share, a group smaller than its share all of its cells and its leftover going to the
    others; every group gets at least ``min_per_group`` cells (or all it has), so the sample grows past ``total`` only
    with the number of groups. ``codes`` gives each cell's group; cells with a negative code are left out.
    """
    members = _group_rows(codes)
    sizes = np.array([rows.size for rows in members], dtype=np.int64)
    quotas = np.zeros(sizes.size, dtype=np.int64)
    budget, remaining = max(total, min_per_group * sizes.size), sizes.size
    for group in np.argsort(sizes, kind="stable"):
        quotas[group] = min(sizes[group], budget // remaining)
        budget -= quotas[group]
        remaining -= 1
    return _draw_rows(members, quotas, seed)


def _group_rows(codes: np.ndarray) -> list[np.ndarray]:
    """The rows of each group (ascending), groups in code order; negative codes are left out."""
    codes = np.asarray(codes)
    order = np.argsort(codes, kind="stable")
    groups, starts = np.unique(codes[order], return_index=True)
    return [rows for group, rows in zip(groups, np.split(order, starts[1:]), strict=True) if group >= 0]


def _draw_rows(members: list[np.ndarray], quotas, seed: int) -> np.ndarray:
    """Sorted rows: each group's rows, or ``quota`` of them drawn at random where it has more."""
    rng = np.random.default_rng(seed)
    chosen = [
        rows if rows.size <= quota else rng.choice(rows, quota, replace=False)
        for rows, quota in zip(members, quotas, strict=True)
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
