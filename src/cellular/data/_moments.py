"""Per-batch moment matching: each batch's log-normalised genes shifted and scaled to the reference's moments.

Technology, laboratory and stimulation shift whole genes in every cell of a batch (an interferon response raises the
same genes in every cell type). Matching each batch's per-gene mean and standard deviation to those of the pooled
reference removes such shifts before the encoder sees the cells, in training (each reference batch) and at query
time (each query batch), so a query from another lab is read on the reference's scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._sampling import sequential_minibatches, shared_sample

logger = logging.getLogger(__name__)

# Added to both standard deviations: genes detected in few cells of a batch are not blown up.
MOMENT_EPS = 0.01
# Query batches with fewer cells are matched together; if all of them together are fewer, they are left as they are.
MIN_BATCH_CELLS = 30
# Rounds of re-estimating a query batch's composition from the model's predictions, and the cells they classify.
COMPOSITION_ROUNDS = 4
COMPOSITION_SAMPLE_CELLS = 2_000
# Cells of each query group in that sample at least (all of a smaller group), however many groups share it.
MIN_COMPOSITION_CELLS = 200
# A candidate map is plausible for a batch when the reference explains (does not flag) at most this share of its cells
# fewer than under the best candidate; a batch is read with the mean of its plausible maps.
PLAUSIBLE_SHARE_GAP = 0.2
# Cells read at a time (one minibatch's worth: memory stays bounded as when embedding).
MOMENT_CHUNK_CELLS = 1024


def group_moments(expression, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group, per-gene mean and standard deviation of log-normalised expression, in one chunked pass.

    Parameters
    ----------
    expression
        :class:`~cellular.data.NormalizedExpression` (in memory or backed: read block by block, kept sparse).
    codes
        Group of each cell, ``0 .. n_groups - 1``; cells with ``-1`` are skipped.
    n_groups
        Number of groups.

    Returns
    -------
    ``(means, stds, counts)``: ``(n_groups, n_genes)``, ``(n_groups, n_genes)`` and ``(n_groups,)``.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n_genes = expression.matrix.shape[1]
    sums = np.zeros((n_groups, n_genes))
    squares = np.zeros((n_groups, n_genes))
    for index in sequential_minibatches(expression.n_cells, MOMENT_CHUNK_CELLS):
        start, stop = int(index[0]), int(index[-1]) + 1
        block = expression.normalized_rows(index)
        block_codes = codes[start:stop]
        kept = np.flatnonzero(block_codes >= 0)
        indicator = sp.csr_matrix(
            (np.ones(kept.size, dtype=np.float32), (block_codes[kept], kept)), shape=(n_groups, stop - start)
        )
        # The block is this loop's own copy: squared in place, no second copy of the chunk.
        block = sp.csr_matrix(block, dtype=np.float32, copy=False)
        sums += (indicator @ block).toarray()
        np.square(block.data, out=block.data)
        squares += (indicator @ block).toarray()
    counts = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
    safe = np.maximum(counts, 1.0)[:, None]
    means = sums / safe
    stds = np.sqrt(np.maximum(squares / safe - means**2, 0.0))
    return means, stds, counts


@dataclass
class BatchMoments:
    """The reference's gene moments a model matches every batch to.

    A batch's per-gene mean and standard deviation depend on its cell types as much as on its technology, so each
    batch is matched to the reference's moments *for its own composition*: the mixture, in the batch's proportions,
    of each cell type's moments over all training cells. Training batches use their labels; a query batch first
    uses the pooled moments, then (when the model can classify) the composition its cells are predicted to have.

    Attributes
    ----------
    mean, std
        ``(n_genes,)`` per-gene mean and standard deviation of log-normalised expression over all training cells.
    type_means, type_squares
        ``(n_types, n_genes)`` per cell type, mean and mean square over all training cells of that type.
    batches
        Names of the training batches.
    batch_means, batch_stds
        ``(n_batches, n_genes)`` mean and standard deviation per training batch.
    batch_compositions
        ``(n_batches, n_types)`` share of each type among a training batch's labelled cells (rows of zeros for a
        batch without labels, which is matched to the pooled moments).
    """

    mean: np.ndarray
    std: np.ndarray
    type_means: np.ndarray
    type_squares: np.ndarray
    batches: list[str]
    batch_means: np.ndarray
    batch_stds: np.ndarray
    batch_compositions: np.ndarray

    @classmethod
    def fit(cls, expression, batch_codes: np.ndarray, labels: np.ndarray, batches: list[str], n_types: int):
        """Moments of the training cells, pooled, per batch and per type (two chunked passes over the data).

        ``labels`` are type codes, ``-1`` for unlabelled cells.
        """
        batch_codes = np.asarray(batch_codes, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        means, stds, counts = group_moments(expression, batch_codes, len(batches))
        total = counts.sum()
        pooled_mean = (counts[:, None] * means).sum(0) / total
        pooled_square = (counts[:, None] * (stds**2 + means**2)).sum(0) / total
        pooled_std = np.sqrt(np.maximum(pooled_square - pooled_mean**2, 0.0))
        type_means, type_stds, _ = group_moments(expression, labels, n_types)
        labelled = labels >= 0
        table = np.zeros((len(batches), n_types))
        np.add.at(table, (batch_codes[labelled], labels[labelled]), 1.0)
        compositions = table / np.maximum(table.sum(1, keepdims=True), 1.0)
        return cls(
            pooled_mean,
            pooled_std,
            type_means,
            type_stds**2 + type_means**2,
            [str(b) for b in batches],
            means,
            stds,
            compositions,
        )

    @property
    def n_types(self) -> int:
        """Number of cell types."""
        return self.type_means.shape[0]

    def targets(self, compositions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference ``(means, stds)`` for groups of these type ``compositions``.

        ``compositions`` is ``(n_groups, n_types)``; a row of zeros gives the pooled moments.
        """
        compositions = np.atleast_2d(np.asarray(compositions, dtype=np.float64))
        weight = compositions.sum(1, keepdims=True)
        shares = compositions / np.maximum(weight, 1e-12)
        means = shares @ self.type_means
        stds = np.sqrt(np.maximum(shares @ self.type_squares - means**2, 0.0))
        pooled = weight[:, 0] <= 0
        means[pooled], stds[pooled] = self.mean, self.std
        return means, stds

    @staticmethod
    def affine(means, stds, target_means, target_stds, present: np.ndarray | None = None):
        """Per-group ``(scale, offset)`` taking groups of these moments to the target moments.

        Genes not ``present`` in the data keep ``scale = 1``, ``offset = 0`` (they stay absent).
        """
        scale = (np.asarray(target_stds) + MOMENT_EPS) / (np.asarray(stds) + MOMENT_EPS)
        offset = np.asarray(target_means) - np.asarray(means) * scale
        if present is not None and not np.all(present):
            scale[:, ~present] = 1.0
            offset[:, ~present] = 0.0
        return scale.astype(np.float32), offset.astype(np.float32)

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The arrays to save (``moments.*`` in the model file)."""
        return {f"moments.{key}": getattr(self, key) for key in _ARRAYS}

    @classmethod
    def from_tensors(cls, tensors: dict, batches: list[str], n_genes: int, n_types: int) -> BatchMoments:
        """Inverse of :meth:`to_tensors`; ``ValueError`` when the arrays do not fit the model."""
        arrays = {key: np.asarray(tensors[f"moments.{key}"], dtype=np.float64) for key in _ARRAYS}
        n_batches = len(batches)
        shapes = {
            "mean": (n_genes,),
            "std": (n_genes,),
            "type_means": (n_types, n_genes),
            "type_squares": (n_types, n_genes),
            "batch_means": (n_batches, n_genes),
            "batch_stds": (n_batches, n_genes),
            "batch_compositions": (n_batches, n_types),
        }
        if any(arrays[key].shape != shape for key, shape in shapes.items()):
            raise ValueError("the batch moments do not fit the model's genes, types and batches")
        if any((arrays[key] < 0).any() for key in ("std", "type_squares", "batch_stds", "batch_compositions")):
            raise ValueError("the batch moments hold negative spreads or shares")
        return cls(batches=[str(b) for b in batches], **arrays)

    def standardization_for(
        self, expression, batch_names: np.ndarray | None, present: np.ndarray | None = None, classify=None
    ) -> BatchStandardization:
        """How to match the cells of ``expression`` to the reference.

        Cells of a training batch (by name) use that batch's stored moments and composition, so training cells are
        embedded as in training whatever else is embedded with them. Every other batch is matched with the moments of
        its own cells (one extra pass over the data). Without ``classify`` it is matched to the pooled reference
        moments. With ``classify``, candidate maps are scored on a sample of about :data:`COMPOSITION_SAMPLE_CELLS`
        cells shared fairly among the new batches (all of a batch smaller than its share, at least
        :data:`MIN_COMPOSITION_CELLS` of each) by the share of the batch's cells the reference explains (not flagged
        novel): the batch left unmatched, matched to the pooled moments, then :data:`COMPOSITION_ROUNDS` times matched
        to the reference moments of the composition its cells are predicted to have (with the batch's own moments taken
        over its cells of known types only; each round predicts under the map that so far explains the most cells). Each
        batch is read with the mean of the unmatched, pooled and final composition maps that explain nearly as many of
        its cells as the best of the three (within :data:`PLAUSIBLE_SHARE_GAP`), so a batch of a few types, far from the
        reference's composition, is not pushed off every type by the pooled map. Batches of fewer than
        :data:`MIN_BATCH_CELLS` cells are matched together, and left as they are when all of them together are fewer.

        Parameters
        ----------
        expression
            The cells' :class:`~cellular.data.NormalizedExpression`.
        batch_names
            Batch of each cell; all cells form one new batch when ``None``.
        present
            Which of the model's genes the data measures (absent genes stay absent).
        classify
            ``classify(expression) -> (probabilities, known)``: ``(n_cells, n_types)`` type probabilities of (a
            sample of) the cells read with the standardization attached, and whether each is of a known type (not
            flagged novel); or ``None``.
        """
        n_cells = expression.n_cells
        names = (
            np.full(n_cells, "\x00query", dtype=object)
            if batch_names is None
            else np.asarray(batch_names).astype(str).astype(object)
        )
        stored = pd.Index(self.batches).get_indexer(names)
        new = pd.Categorical(names[stored < 0])
        new_codes = np.asarray(new.codes, dtype=np.int64)
        sizes = np.bincount(new_codes, minlength=len(new.categories))
        small = sizes < MIN_BATCH_CELLS
        n_new = int((~small).sum())
        remap = np.full(len(new.categories), n_new, dtype=np.int64)  # small batches share the last group
        remap[~small] = np.arange(n_new)
        pooled_small = int(sizes[small].sum())
        if small.any() and pooled_small < MIN_BATCH_CELLS:
            remap[small] = -1
            logger.warning(
                "%d cells in batches of fewer than %d cells are not moment-matched (too few cells to estimate their "
                "batch's gene means); embed them together with more cells of their batch.",
                pooled_small,
                MIN_BATCH_CELLS,
            )
        n_groups = n_new + int(small.any() and pooled_small >= MIN_BATCH_CELLS)
        n_stored = len(self.batches)
        codes = np.full(n_cells, -1, dtype=np.int64)
        codes[stored >= 0] = stored[stored >= 0]
        mapped = remap[new_codes] if new_codes.size else new_codes
        codes[np.flatnonzero(stored < 0)] = np.where(mapped >= 0, mapped + n_stored, -1)
        means, stds = self.batch_means, self.batch_stds
        compositions = self.batch_compositions
        if n_groups:
            query_codes = np.where(codes >= n_stored, codes - n_stored, -1)
            query_means, query_stds, _ = group_moments(expression, query_codes, n_groups)
            means, stds = np.vstack([means, query_means]), np.vstack([stds, query_stds])
            compositions = np.vstack([compositions, np.zeros((n_groups, self.n_types))])
        scale, offset = self._affine_for(means, stds, compositions, present)
        if not n_groups or classify is None:
            return BatchStandardization(codes, scale, offset)
        # The sample is shared among the query groups: a small batch beside a large one keeps its cells in it.
        rows = shared_sample(np.where(codes >= n_stored, codes, -1), COMPOSITION_SAMPLE_CELLS, MIN_COMPOSITION_CELLS)
        sample = expression.subset(rows)
        groups = codes[rows] - n_stored

        def explained(candidate):
            """Type probabilities, known-type flags and, per query group, the share of its sample cells known."""
            sample.standardization = BatchStandardization(codes[rows], *candidate)
            probabilities, known = classify(sample)
            known = np.asarray(known, dtype=bool)
            share = np.bincount(groups[known], minlength=n_groups) / np.maximum(
                np.bincount(groups, minlength=n_groups), 1
            )
            return np.asarray(probabilities, dtype=np.float64), known, share

        # Each round predicts a group's composition under the candidate map that so far explains (does not flag as
        # novel) the largest share of its cells; a round's proposal takes over only when it explains at least as
        # many. The unmatched values are the first candidate: matched to the pooled moments, a batch whose
        # composition is far from the reference's (a few cell lines of many) can be pushed off every type.
        pooled = (scale, offset)
        unmatched = (scale.copy(), offset.copy())
        unmatched[0][n_stored:], unmatched[1][n_stored:] = 1.0, 0.0
        probabilities, known, best = explained(unmatched)
        shares = [best]
        proposal = pooled
        for round_ in range(COMPOSITION_ROUNDS + 1):
            proposal_probabilities, proposal_known, share = explained(proposal)
            if round_ in (0, COMPOSITION_ROUNDS):
                shares.append(share)
            cells = (share >= best)[groups]
            probabilities[cells], known[cells] = proposal_probabilities[cells], proposal_known[cells]
            best = np.maximum(best, share)
            if round_ == COMPOSITION_ROUNDS:
                break
            # Cells the reference does not explain (novel types) neither set the composition nor the batch's
            # moments: matched on them, a novel population would be made to look like the types it is taken for.
            # A batch with too few such cells uses all of its cells.
            trusted = np.bincount(groups[known], minlength=n_groups) >= MIN_BATCH_CELLS
            used = known | ~trusted[groups]
            predicted = np.zeros((n_groups, self.n_types))
            np.add.at(predicted, groups[used], probabilities[used])
            used_means, used_stds, _ = group_moments(sample, np.where(used, groups, -1), n_groups)
            compositions[n_stored:] = predicted / np.maximum(predicted.sum(1, keepdims=True), 1e-12)
            means[n_stored:], stds[n_stored:] = used_means, used_stds
            proposal = self._affine_for(means, stds, compositions, present)
        return BatchStandardization(codes, *_plausible_mean(n_stored, [unmatched, pooled, proposal], shares))

    def _affine_for(self, means, stds, compositions, present):
        target_means, target_stds = self.targets(compositions)
        return self.affine(means, stds, target_means, target_stds, present)


def _plausible_mean(n_stored: int, maps: list[tuple[np.ndarray, np.ndarray]], shares: list[np.ndarray]):
    """Per query group (rows from ``n_stored``), the mean of its plausible candidate maps.

    A map is plausible when it explains nearly as many of the group's cells as the best of them (within
    :data:`PLAUSIBLE_SHARE_GAP`).

    Which single map explains the most cells is decided by the cells the reference fails to explain, so it favours
    the map that makes an unseen population look like known types (and otherwise often turns on a few cells). The
    batch left as measured, matched to the pooled reference and matched to its predicted composition each err in
    their own way; on the field benchmark their mean finds unseen types better than the single map and labels known
    cells at least as well (benchmarks page, "Batch moment matching": "One map or the mean of the plausible ones").
    """
    shares = np.vstack(shares)
    plausible = shares >= shares.max(axis=0) - PLAUSIBLE_SHARE_GAP
    weights = plausible / plausible.sum(axis=0)
    scale, offset = maps[0][0].copy(), maps[0][1].copy()
    scale[n_stored:] = sum(w[:, None] * m[0][n_stored:] for w, m in zip(weights, maps, strict=True))
    offset[n_stored:] = sum(w[:, None] * m[1][n_stored:] for w, m in zip(weights, maps, strict=True))
    return scale, offset


_ARRAYS = (
    "mean",
    "std",
    "type_means",
    "type_squares",
    "batch_means",
    "batch_stds",
    "batch_compositions",
)


@dataclass
class BatchStandardization:
    """Per-cell affine map of log-normalised values onto the reference's moments, clipped at zero.

    Attributes
    ----------
    codes
        Group of each cell (row of ``scale`` / ``offset``); ``-1`` leaves the cell as it is.
    scale, offset
        ``(n_groups, n_genes)``.
    """

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray

    def apply(self, x: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Map the dense rows ``x`` of the cells ``index`` (in place) and return them."""
        codes = self.codes[np.asarray(index)]
        # One vectorised in-place update per group present (a minibatch holds few); a group's rows are gathered
        # once and written back once.
        for group in np.unique(codes[codes >= 0]):
            rows = codes == group
            part = x if rows.all() else x[np.flatnonzero(rows)]
            part *= self.scale[group]
            part += self.offset[group]
            np.maximum(part, 0.0, out=part)
            if part is not x:
                x[rows] = part
        return x

    def subset(self, rows: np.ndarray) -> BatchStandardization:
        """The same map for the cells ``rows``."""
        return BatchStandardization(self.codes[np.asarray(rows)], self.scale, self.offset)
