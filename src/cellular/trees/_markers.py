"""Per-type marker genes from one-vs-rest random forests against balanced negatives (CellClassifier)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

NEGATIVES = ("even", "random")


@dataclass
class TypeMarkers:
    """One type's one-vs-rest forest: held-out scores and its genes ranked by importance."""

    scores: dict
    markers: pd.DataFrame


def negative_sample(
    codes: np.ndarray, positive: int, n_negatives: int, *, negatives: str, rng: np.random.Generator
) -> np.ndarray:
    """Rows of ``n_negatives`` cells of types other than ``positive``.

    ``"even"``: an equal quota from every other type; the quota a small type cannot fill is taken from the largest
    types. ``"random"``: a uniform sample of all other cells.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}.")
    others = np.flatnonzero(codes != positive)
    n_negatives = min(n_negatives, others.size)
    if negatives == "random":
        return np.sort(rng.choice(others, n_negatives, replace=False))
    other_types, sizes = np.unique(codes[others], return_counts=True)
    quotas = _even_quotas(sizes, n_negatives)
    chosen = [
        rng.choice(np.flatnonzero(codes == other), quota, replace=False)
        for other, quota in zip(other_types, quotas, strict=True)
        if quota
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _even_quotas(sizes: np.ndarray, total: int) -> np.ndarray:
    """Equal shares of ``total`` over groups of ``sizes`` cells; what small groups lack comes from the largest."""
    order = np.argsort(-sizes, kind="stable")
    quotas = np.full(sizes.size, total // sizes.size, dtype=np.int64)
    quotas[order[: total % sizes.size]] += 1
    quotas = np.minimum(quotas, sizes)
    shortfall = total - int(quotas.sum())
    for group in order:
        if shortfall <= 0:
            break
        extra = min(int(sizes[group] - quotas[group]), shortfall)
        quotas[group] += extra
        shortfall -= extra
    return quotas


def one_vs_rest_markers(
    expression: sp.csr_matrix,
    labels: np.ndarray,
    genes: np.ndarray,
    cell_type: str,
    *,
    negatives: str,
    n_top: int,
    n_estimators: int,
    max_cells: int,
    test_fraction: float,
    n_permutation_genes: int,
    n_repeats: int,
    seed: int,
    n_jobs: int | None,
) -> TypeMarkers:
    """Fit a random forest of ``cell_type`` against balanced negatives and rank genes by its importances.

    Positives are the type's cells (at most ``max_cells``), negatives as many cells of the other types
    (:func:`negative_sample`). A stratified ``test_fraction`` is held out: AUROC and AUPRC are measured there, and
    the permutation importance (mean drop in held-out AUROC when a gene's values are shuffled, ``n_repeats`` times)
    is computed for the ``n_permutation_genes`` genes of highest impurity importance.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    types, codes = np.unique(labels, return_inverse=True)
    positive = int(np.flatnonzero(types == cell_type)[0])
    positives = np.flatnonzero(codes == positive)
    if positives.size > max_cells:
        positives = np.sort(rng.choice(positives, max_cells, replace=False))
    negative_rows = negative_sample(codes, positive, positives.size, negatives=negatives, rng=rng)
    rows = np.concatenate([positives, negative_rows])
    target = np.concatenate([np.ones(positives.size, dtype=np.int8), np.zeros(negative_rows.size, dtype=np.int8)])
    train, test = train_test_split(np.arange(rows.size), test_size=test_fraction, stratify=target, random_state=seed)
    forest = RandomForestClassifier(n_estimators=n_estimators, n_jobs=n_jobs, random_state=seed)
    forest.fit(expression[rows[train]], target[train])
    test_x = expression[rows[test]].toarray()
    test_y = target[test]
    score = forest.predict_proba(test_x)[:, 1]
    auroc = float(roc_auc_score(test_y, score))
    impurity = forest.feature_importances_
    candidates = np.argsort(-impurity, kind="stable")[: max(n_top, n_permutation_genes)]
    drops = np.zeros((candidates.size, n_repeats))
    for position, gene in enumerate(candidates[:n_permutation_genes]):
        original = test_x[:, gene].copy()
        for repeat in range(n_repeats):
            test_x[:, gene] = rng.permutation(original)
            drops[position, repeat] = auroc - roc_auc_score(test_y, forest.predict_proba(test_x)[:, 1])
        test_x[:, gene] = original
    ranked = pd.DataFrame(
        {
            "gene": genes[candidates],
            "impurity_importance": impurity[candidates],
            "permutation_importance": np.where(
                np.arange(candidates.size) < n_permutation_genes, drops.mean(axis=1), np.nan
            ),
            "permutation_std": np.where(np.arange(candidates.size) < n_permutation_genes, drops.std(axis=1), np.nan),
            "mean_in_type": np.asarray(expression[positives][:, candidates].mean(axis=0)).ravel(),
            "mean_in_negatives": np.asarray(expression[negative_rows][:, candidates].mean(axis=0)).ravel(),
        }
    ).head(n_top)
    # Trees also split on genes the type lacks: say which way each gene points.
    ranked["higher_in_type"] = ranked["mean_in_type"] > ranked["mean_in_negatives"]
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    ranked.insert(0, "cell_type", cell_type)
    scores = {
        "cell_type": cell_type,
        "n_positive": int(positives.size),
        "n_negative": int(negative_rows.size),
        "auroc": auroc,
        "auprc": float(average_precision_score(test_y, score)),
    }
    return TypeMarkers(scores, ranked)
