"""The CELLULAR loss terms as pure, vectorised functions of a minibatch embedding.

Conventions shared by every function here: ``z`` is the ``(n_cells, n_latent)`` embedding of a minibatch,
``labels`` holds integer cell-type codes with ``-1`` marking unlabelled cells (ignored by every term), and
``batches`` holds integer batch codes. No function loops over cells or classes in Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def inverse_frequency_weights(codes: Tensor, n_categories: int) -> Tensor:
    """Inverse-frequency weights of integer codes, normalised to sum to one.

    Categories without any cell get weight zero. Negative codes (unlabelled cells) are ignored.

    Parameters
    ----------
    codes
        Integer codes, shape ``(n_cells,)``.
    n_categories
        Number of categories.

    Returns
    -------
    Tensor of shape ``(n_categories,)``.
    """
    counts = torch.bincount(codes[codes >= 0], minlength=n_categories).to(torch.float64)
    weights = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    total = weights.sum()
    if total > 0:
        weights = weights / total
    return weights.to(torch.float32)


def _zero_like_graph(z: Tensor) -> Tensor:
    # A zero that stays attached to the graph, so a loss made only of empty terms can still be backpropagated.
    return z.sum() * 0.0


def _grouped_weighted_mean(
    values: Tensor, groups: Tensor, valid: Tensor, weights: Tensor | None, n_groups: int
) -> Tensor:
    """Sum over groups of ``weight[g] * mean(values[valid & groups == g])``, skipping empty groups."""
    if not bool(valid.any()):
        return _zero_like_graph(values)
    group_of_valid = groups[valid]
    sums = values.new_zeros(n_groups).index_add(0, group_of_valid, values[valid])
    counts = torch.bincount(group_of_valid, minlength=n_groups).to(values.dtype)
    means = sums / counts.clamp_min(1.0)
    if weights is not None:
        means = means * weights.to(values)
    return means[counts > 0].sum()


def _scaled_similarity(z: Tensor, temperature: Tensor | float) -> Tensor:
    """``exp(cos(z_i, z_j) / T)`` divided by its largest possible value ``exp(1 / T)``.

    The common factor cancels in every ratio the losses take and keeps the exponentials in ``(0, 1]``.
    """
    unit = F.normalize(z, dim=1)
    return torch.exp((unit @ unit.T - 1.0) / temperature)


def soft_nearest_neighbour_loss(
    z: Tensor,
    labels: Tensor,
    temperature: Tensor | float,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Class-weighted supervised soft-nearest-neighbour loss on cosine similarity.

    For every labelled cell ``i`` with at least one other cell of its type and one cell of another type in the
    minibatch, ``l_i = -log(sum_{j != i, y_j = y_i} s_ij / sum_{j != i} s_ij)`` with ``s_ij = exp(cos(z_i, z_j) / T)``
    (the sums run over labelled cells). The loss is ``sum_c w_c * mean_{i in c} l_i`` over the types present.

    Parameters
    ----------
    z
        Minibatch embedding.
    labels
        Cell-type codes, ``-1`` for unlabelled cells.
    temperature
        Softmax temperature (a learnable scalar in the model).
    class_weights
        Weight per cell type, shape ``(n_types,)``; unweighted sum of per-type means when ``None``.

    Returns
    -------
    Scalar tensor.
    """
    n_cells = z.shape[0]
    labelled = labels >= 0
    not_self = ~torch.eye(n_cells, dtype=torch.bool, device=z.device)
    pair = labelled[:, None] & labelled[None, :] & not_self
    same_type = pair & (labels[:, None] == labels[None, :])

    similarity = _scaled_similarity(z, temperature)
    positive = (similarity * same_type).sum(1)
    everything = (similarity * pair).sum(1)
    valid = same_type.any(1) & (pair & ~same_type).any(1)
    per_cell = torch.log(torch.where(valid, everything, 1.0)) - torch.log(torch.where(valid, positive, 1.0))

    n_types = class_weights.shape[0] if class_weights is not None else int(labels.max().clamp_min(0)) + 1
    return _grouped_weighted_mean(per_cell, labels.clamp_min(0), valid, class_weights, n_types)


def batch_mixing_loss(
    z: Tensor,
    labels: Tensor,
    batches: Tensor,
    temperature: float = 0.5,
    batch_weights: Tensor | None = None,
) -> Tensor:
    """Batch term: pulls cells of one type from different batches together.

    For every labelled cell ``i`` with at least one other cell of its type in its own batch (``P``) and one in
    another batch (``N``), ``l_i = 1 / -log(sum_P s_ij / (sum_P s_ij + sum_N s_ij))``. Minimising it lowers the
    share of same-batch similarity within a cell type. The loss is ``sum_b w_b * mean_{i in b} l_i``.

    Parameters
    ----------
    z
        Minibatch embedding.
    labels
        Cell-type codes, ``-1`` for unlabelled cells.
    batches
        Batch codes.
    temperature
        Fixed temperature of this term (0.5 in the paper).
    batch_weights
        Weight per batch, shape ``(n_batches,)``; unweighted sum of per-batch means when ``None``.

    Returns
    -------
    Scalar tensor; zero (attached to the graph) when no cell has both kinds of partner, e.g. with one batch.
    """
    n_cells = z.shape[0]
    labelled = labels >= 0
    not_self = ~torch.eye(n_cells, dtype=torch.bool, device=z.device)
    same_type = labelled[:, None] & labelled[None, :] & not_self & (labels[:, None] == labels[None, :])
    same_batch = batches[:, None] == batches[None, :]
    positive_mask = same_type & same_batch
    negative_mask = same_type & ~same_batch

    similarity = _scaled_similarity(z, temperature)
    positive = (similarity * positive_mask).sum(1)
    negative = (similarity * negative_mask).sum(1)
    valid = positive_mask.any(1) & negative_mask.any(1)
    neg_log_share = torch.log(torch.where(valid, positive + negative, 2.0)) - torch.log(
        torch.where(valid, positive, 1.0)
    )
    per_cell = 1.0 / neg_log_share

    n_batches = batch_weights.shape[0] if batch_weights is not None else int(batches.max()) + 1
    return _grouped_weighted_mean(per_cell, batches, valid, batch_weights, n_batches)


def centroid_distance_loss(z: Tensor, labels: Tensor, target_distances: Tensor) -> Tensor:
    """Centroid term: latent distances between cell-type centroids should match a reference geometry.

    Centroids of the labelled types present in the minibatch are compared pairwise (Euclidean). Pairs whose target
    distance is zero (the diagonal, or types never seen together) are left out; the remaining latent and target
    distances are each divided by their maximum and compared by mean squared error.

    Parameters
    ----------
    z
        Minibatch embedding.
    labels
        Cell-type codes, ``-1`` for unlabelled cells.
    target_distances
        ``(n_types, n_types)`` reference distances between type centroids (in the model: PCA space, averaged
        over batches).

    Returns
    -------
    Scalar tensor; zero (attached to the graph) when fewer than two types with a known distance are present.
    """
    n_types = target_distances.shape[0]
    labelled = labels >= 0
    codes = labels[labelled]
    counts = torch.bincount(codes, minlength=n_types)
    present = counts > 0
    if int(present.sum()) < 2:
        return _zero_like_graph(z)

    sums = z.new_zeros(n_types, z.shape[1]).index_add(0, codes, z[labelled])
    centroids = sums / counts.clamp_min(1).to(z.dtype)[:, None]
    pair = torch.triu(present[:, None] & present[None, :], diagonal=1) & (target_distances > 0)
    if not bool(pair.any()):
        return _zero_like_graph(z)
    first, second = pair.nonzero(as_tuple=True)
    latent = torch.linalg.vector_norm(centroids[first] - centroids[second], dim=1)
    target = target_distances[first, second].to(z)
    latent = latent / latent.max().clamp_min(1e-12)
    target = target / target.max()
    return torch.mean((latent - target) ** 2)


def centroid_target_distances(centroids: Tensor, present: Tensor) -> Tensor:
    """Average over batches of the distances between cell-type centroids.

    Parameters
    ----------
    centroids
        ``(n_batches, n_types, n_dims)`` centroid of each type in each batch (any value where absent).
    present
        ``(n_batches, n_types)`` whether the type has cells in the batch.

    Returns
    -------
    ``(n_types, n_types)`` distances averaged over the batches holding both types, zero for pairs never seen in
    one batch, divided by the largest entry.
    """
    distances = torch.cdist(centroids, centroids)
    both = (present[:, :, None] & present[:, None, :]).to(distances.dtype)
    counts = both.sum(0)
    mean = (distances * both).sum(0) / counts.clamp_min(1.0)
    mean = torch.where(counts > 0, mean, torch.zeros_like(mean))
    mean.fill_diagonal_(0.0)
    largest = mean.max()
    return mean / largest if largest > 0 else mean


def hierarchical_cross_entropy(
    logits: Tensor, labels: Tensor, ancestry: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Cross-entropy at every level of a label hierarchy (hierarchical cross-entropy).

    A node's probability is the softmax mass of the types at or below it. A cell's loss is the mean of
    ``-log P(node)`` over the nodes of its type's chain (the type, its class, its lineage, ...), so a cell whose
    type the head confuses with a sibling still pulls its class and lineage right. With one level (``ancestry`` the
    identity) this is the cross-entropy.

    Parameters
    ----------
    logits
        ``(n_cells, n_types)`` classifier logits.
    labels
        ``(n_cells,)`` type codes.
    ancestry
        ``(n_types, n_nodes)`` 0/1 matrix, ``1`` where the node is the type or one of its ancestors
        (:attr:`cellular.data.LabelHierarchy.ancestry`).
    weight
        Per-type weight of a cell's loss (the weighted mean is taken, as in ``torch.nn.functional.cross_entropy``).
    """
    log_types = torch.log_softmax(logits, dim=1)
    log_nodes = torch.logsumexp(log_types[:, :, None] + torch.log(ancestry)[None], dim=1)
    chain = ancestry[labels]
    per_cell = -(chain * log_nodes).sum(dim=1) / chain.sum(dim=1)
    cell_weight = torch.ones_like(per_cell) if weight is None else weight[labels]
    return (cell_weight * per_cell).sum() / cell_weight.sum()
