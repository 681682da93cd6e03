"""A multinomial logistic regression on the encoder's input genes: the second source of label transfer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Logit of a type without training cells: finite (files hold no infinities), far below any fitted logit.
ABSENT_TYPE_LOGIT = -1e4
# Entropies (nats) below this are read as certainty: the held-out cells of well-separated types sit far below it, where
# which cell is more certain than another is rounding, not biology.
MIN_ENTROPY = 1e-6


def logit_entropy(logits: np.ndarray | Tensor) -> np.ndarray:
    """Entropy (nats, float64, at least :data:`MIN_ENTROPY`) of ``softmax(logits)`` per row.

    Computed as ``log sum exp(l) - sum p l``, exact where probabilities underflow (float32 rounds near-certain cells'
    entropies to noise).
    """
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    total = weights.sum(axis=1)
    return np.maximum(np.log(total) - (weights * logits).sum(axis=1) / total, MIN_ENTROPY)


class GeneLinearClassifier(nn.Module):
    """Cell-type logits linear in the input genes: ``(x - mean) @ weight.T + bias``.

    ``x`` is what the encoder reads (log-normalised, batch-matched expression). Genes a query does not measure are
    read at the training mean, so they add nothing to any logit rather than reading as zero expression.

    Parameters
    ----------
    n_genes
        Input width.
    n_types
        Number of cell types.
    """

    def __init__(self, n_genes: int, n_types: int):
        super().__init__()
        self.linear = nn.Linear(n_genes, n_types)
        self.register_buffer("mean", torch.zeros(n_genes))

    def forward(self, x: Tensor, present: Tensor | None = None) -> Tensor:
        """Logits of a ``(n_cells, n_genes)`` batch; ``present`` (boolean over genes) marks the measured genes."""
        centered = x - self.mean
        if present is not None:
            centered = centered * present.to(centered.dtype)
        return self.linear(centered)


def fit_gene_classifier(
    x: np.ndarray,
    labels: np.ndarray,
    n_types: int,
    *,
    inverse_regularization: float = 0.1,
    max_iter: int = 500,
    device: torch.device | str = "cpu",
) -> GeneLinearClassifier:
    """Fit a :class:`GeneLinearClassifier` by L2-penalised maximum likelihood (full-batch L-BFGS).

    Minimises ``sum of cross-entropies + ||weight||^2 / (2 * inverse_regularization)``, the objective of
    scikit-learn's multinomial ``LogisticRegression(C=inverse_regularization)`` (its intercept is not penalised
    either), divided by the number of cells. Types without cells get a logit of :data:`ABSENT_TYPE_LOGIT`.

    Parameters
    ----------
    x
        ``(n_cells, n_genes)`` inputs of labelled cells.
    labels
        ``(n_cells,)`` type codes in ``0 .. n_types - 1``.
    n_types
        Number of types (output width).
    inverse_regularization
        scikit-learn's ``C``: smaller is a stronger penalty.
    max_iter
        L-BFGS iterations.
    device
        Where to fit.
    """
    if x.shape[0] != labels.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"Need one label per cell and at least one cell, got {x.shape[0]} cells, {labels.shape[0]} labels."
        )
    if not inverse_regularization > 0:
        raise ValueError(f"inverse_regularization must be positive, got {inverse_regularization}.")
    device = torch.device(device)
    present_types = np.unique(labels)
    codes = torch.as_tensor(np.searchsorted(present_types, labels), dtype=torch.long, device=device)
    inputs = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    mean = inputs.mean(dim=0)
    inputs = inputs - mean
    weight = torch.zeros(len(present_types), x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(len(present_types), device=device, requires_grad=True)
    penalty = 1.0 / (2.0 * inverse_regularization * x.shape[0])
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-4,
        tolerance_change=1e-9,
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weight.T + bias, codes) + penalty * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    classifier = GeneLinearClassifier(x.shape[1], n_types).to(device)
    with torch.no_grad():
        classifier.mean.copy_(mean)
        classifier.linear.weight.zero_()
        classifier.linear.bias.fill_(ABSENT_TYPE_LOGIT)
        rows = torch.as_tensor(present_types, dtype=torch.long, device=device)
        classifier.linear.weight[rows] = weight.detach()
        classifier.linear.bias[rows] = bias.detach()
    return classifier.eval()


def held_out_type_aurocs(
    x_train: np.ndarray,
    labels_train: np.ndarray,
    x_test: np.ndarray,
    labels_test: np.ndarray,
    *,
    inverse_regularization: float = 0.1,
    min_cells: int = 5,
    max_iter: int = 100,
    device: torch.device | str = "cpu",
) -> dict[int, float]:
    """How well the uncertainty of a gene classifier finds a type it was not trained on, for each type in turn.

    For each type with at least ``min_cells`` test cells (and at least two other types to train on), a classifier is
    fitted on the training cells of the other types and the entropy of its probabilities (:func:`logit_entropy`, as
    the novelty score reads it) scores the test cells: the
    AUROC of the left-out type's test cells against the others'. Where the types are discrete (cell lines) this is
    near 1; along a differentiation continuum, where known cells between two types are uncertain too, it is not.

    Parameters
    ----------
    x_train, labels_train
        Inputs and type codes of the cells to fit on.
    x_test, labels_test
        Inputs and type codes of the cells to score (held out of fitting); cells of types without training cells are
        left out.
    inverse_regularization, max_iter, device
        As in :func:`fit_gene_classifier` (fewer iterations: only the ranking of uncertainties is needed).
    min_cells
        Test cells a type needs to be scored.

    Returns
    -------
    AUROC by type code, for the types that could be scored.
    """
    from sklearn.metrics import roc_auc_score

    labels_train, labels_test = np.asarray(labels_train), np.asarray(labels_test)
    x_train, x_test = np.asarray(x_train, dtype=np.float32), np.asarray(x_test, dtype=np.float32)
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"Training and test inputs must be (cells, genes) arrays over the same genes, got shapes {x_train.shape} "
            f"and {x_test.shape}; read both with the same gene order."
        )
    if x_test.shape[0] != labels_test.shape[0]:
        raise ValueError(
            f"Need one label per test cell, got {x_test.shape[0]} cells and {labels_test.shape[0]} labels."
        )
    if not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise ValueError(
            "The inputs hold NaN or infinite values; pass log-normalised expression (cellular.pp.normalize_log1p)."
        )
    # A type without training cells would look novel in every fold: its test cells are left out.
    trained = np.isin(labels_test, labels_train)
    labels_test = labels_test[trained]
    test = torch.as_tensor(x_test[trained], device=device)
    aurocs = {}
    for code in np.unique(labels_test):
        left_out = labels_test == code
        keep = labels_train != code
        if left_out.sum() < min_cells or (~left_out).sum() < min_cells or np.unique(labels_train[keep]).size < 2:
            continue
        remaining = np.unique(labels_train[keep])
        classifier = fit_gene_classifier(
            x_train[keep],
            np.searchsorted(remaining, labels_train[keep]),
            remaining.size,
            inverse_regularization=inverse_regularization,
            max_iter=max_iter,
            device=device,
        )
        with torch.no_grad():
            logits = classifier(test).cpu().numpy()
        aurocs[int(code)] = float(roc_auc_score(left_out, logit_entropy(logits)))
    return aurocs
