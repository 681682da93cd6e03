"""Datasets and train/test folds of the field benchmark.

Every dataset is an ``.h5ad`` file with raw counts in ``X`` and ``obs['cell_type']`` / ``obs['batch']``. A fold is a
training AnnData, a test AnnData and a name; training labels of types with fewer than two cells are replaced by
``UNLABELLED`` (a type needs two cells to be learnt; every method sees the same labels).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

LABELS = "cell_type"
BATCH = "batch"
UNLABELLED = "Unknown"
TRUE_LABELS = "true_cell_type"  # training labels before rare types were unlabelled (for the scIB metrics)

LOBO_DATASETS = [
    "pbmc_symphony_3tech",
    "pbmc_kang2018_ifnb_subset",
    "pancreas_baron_toy",
    "cellbench_lung_celllines",
]
MAP_PAIRS = [
    ("pbmc3k_seurat", "pbmc_symphony_3tech"),
    ("pbmc_kang2018_ifnb_subset", "pbmc_symphony_3tech"),
    ("pbmc3k_seurat@200", "pbmc_symphony_3tech"),
]
# A query spec NAME@N keeps N random genes (seed 0) of those NAME shares with the reference: a small gene panel.
PANEL_SEED = 0
NOVEL_DATASETS = ["cellbench_lung_celllines", "pbmc_symphony_3tech", "pancreas_endocrinogenesis_mouse"]
NOVEL_MIN_TEST_CELLS = 20
NOVEL_TEST_FRACTION = 0.3


@dataclass
class Fold:
    """One train/test split. ``novel_type`` is the cell type removed from training (``novel`` task only)."""

    task: str
    dataset: str
    name: str
    train: ad.AnnData
    test: ad.AnnData
    novel_type: str | None = None

    @property
    def classes(self) -> list[str]:
        """Cell types with labelled training cells, sorted."""
        labels = self.train.obs[LABELS]
        return sorted(set(labels[labels != UNLABELLED].astype(str)))

    def test_labels(self) -> np.ndarray:
        return self.test.obs[LABELS].astype(str).to_numpy()


def dataset_path(name_or_path: str, data_dir: Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".h5ad":
        return path
    return data_dir / f"{name_or_path}.h5ad"


def dataset_name(name_or_path: str) -> str:
    return Path(name_or_path).stem if name_or_path.endswith(".h5ad") else name_or_path


def load_dataset(name_or_path: str, data_dir: Path) -> ad.AnnData:
    path = dataset_path(name_or_path, data_dir)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found; pass --data-dir or a path to an .h5ad file")
    adata = ad.read_h5ad(path)
    missing = [key for key in (LABELS, BATCH) if key not in adata.obs]
    if missing:
        raise KeyError(f"{path} lacks obs columns {missing}; the benchmark needs obs['{LABELS}'] and obs['{BATCH}']")
    counts = adata.X.data if hasattr(adata.X, "data") else np.asarray(adata.X)
    if counts.size and (counts.min() < 0 or not np.allclose(counts[:10000], np.round(counts[:10000]))):
        raise ValueError(f"{path}: X must hold raw counts (non-negative integers)")
    missing_labels = adata.obs[LABELS].isna() | adata.obs[BATCH].isna()
    if missing_labels.any():
        raise ValueError(
            f"{path}: {int(missing_labels.sum())} cells have no obs['{LABELS}'] or obs['{BATCH}'] value; "
            f"label them (e.g. '{UNLABELLED}') or drop them"
        )
    adata.obs[LABELS] = adata.obs[LABELS].astype(str)
    adata.obs[BATCH] = adata.obs[BATCH].astype(str).astype("category")
    return adata


def _training_copy(adata: ad.AnnData) -> ad.AnnData:
    train = adata.copy()
    train.obs[LABELS] = train.obs[LABELS].astype(str)
    train.obs[TRUE_LABELS] = train.obs[LABELS]
    counts = train.obs[LABELS].value_counts()
    rare = counts.index[counts < 2]
    train.obs[LABELS] = train.obs[LABELS].where(~train.obs[LABELS].isin(rare), UNLABELLED)
    return train


def lobo_folds(name: str, adata: ad.AnnData) -> Iterator[Fold]:
    """Leave one batch out: every batch is the test set once."""
    for batch in adata.obs[BATCH].cat.categories:
        held_out = (adata.obs[BATCH] == batch).to_numpy()
        train = _training_copy(adata[~held_out])
        if train.obs[LABELS].nunique() < 2 or train.obs[BATCH].nunique() < 1:
            continue
        yield Fold("lobo", name, str(batch), train, adata[held_out].copy())


def map_fold(
    query_name: str, query: ad.AnnData, reference_name: str, reference: ad.AnnData, n_genes: int | None = None
) -> Fold:
    """Reference and query restricted to their shared genes (``n_genes`` random ones of them when given); the query
    keeps its own batch labels."""
    shared = reference.var_names.intersection(query.var_names)
    if len(shared) < 200:
        raise ValueError(f"{query_name} and {reference_name} share only {len(shared)} genes")
    if n_genes is not None:
        keep = np.random.default_rng(PANEL_SEED).choice(len(shared), min(n_genes, len(shared)), replace=False)
        shared = shared[np.sort(keep)]
        query_name = f"{query_name}@{len(shared)}"
    train = _training_copy(reference[:, shared])
    test = query[:, shared].copy()
    test.obs[BATCH] = (f"{query_name}:" + test.obs[BATCH].astype(str)).astype("category")
    return Fold("map", reference_name, f"{query_name} onto {reference_name}", train, test)


def novel_folds(name: str, adata: ad.AnnData, seed: int = 0, within_batches: bool = False) -> Iterator[Fold]:
    """Leave one cell type out.

    Multi-batch data: the test set is the batch holding most cells of the type, training is every other batch
    without the type. Single-batch data (or ``within_batches=True``): a random ``NOVEL_TEST_FRACTION`` of cells is the
    test set, so its batches are also in training. Types with fewer than ``NOVEL_MIN_TEST_CELLS`` test cells are
    skipped.
    """
    labels = adata.obs[LABELS]
    if adata.obs[BATCH].nunique() > 1 and not within_batches:
        table = pd.crosstab(labels, adata.obs[BATCH])
        splits = {cell_type: (adata.obs[BATCH] == row.idxmax()).to_numpy() for cell_type, row in table.iterrows()}
    else:
        rng = np.random.default_rng(seed)
        in_test = np.zeros(adata.n_obs, dtype=bool)
        in_test[rng.choice(adata.n_obs, int(round(NOVEL_TEST_FRACTION * adata.n_obs)), replace=False)] = True
        splits = {cell_type: in_test for cell_type in labels.unique()}
    for cell_type in sorted(splits):
        in_test = splits[cell_type]
        is_type = (labels == cell_type).to_numpy()
        if (in_test & is_type).sum() < NOVEL_MIN_TEST_CELLS:
            continue
        train = _training_copy(adata[~in_test & ~is_type])
        if train.obs[LABELS].nunique() < 2:
            continue
        random_split = within_batches or adata.obs[BATCH].nunique() == 1
        where = "random 30 %" if random_split else adata.obs[BATCH][in_test].iloc[0]
        yield Fold("novel", name, f"{cell_type} ({where})", train, adata[in_test].copy(), novel_type=cell_type)
