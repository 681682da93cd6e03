"""Checks of what a reference index is built from: embedding, cell names and label levels."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellular.data import check_finite_embedding


def as_embedding(values, what: str) -> np.ndarray:
    return check_finite_embedding(values, f"The {what}", "Embed the cells again, or remove those rows.")


def cell_names_index(cell_names, n_cells: int) -> pd.Index:
    if cell_names is None:
        return pd.Index([str(i) for i in range(n_cells)])
    names = pd.Index([str(name) for name in cell_names])
    if len(names) != n_cells:
        raise ValueError(f"Got {len(names)} cell names for {n_cells} reference cells.")
    return names


def label_levels(labels, n_cells: int, unlabeled_category: str) -> dict[str, pd.Categorical]:
    if labels is None:
        return {}
    if isinstance(labels, pd.DataFrame):
        labels = {str(column): labels[column].to_numpy() for column in labels.columns}
    levels = {}
    for name, values in labels.items():
        values = pd.Series(np.asarray(values, dtype=object))
        if len(values) != n_cells:
            raise ValueError(f"Label level {name!r} has {len(values)} values for {n_cells} reference cells.")
        text = values.astype(str).where(values.notna() & (values.astype(str) != unlabeled_category))
        categorical = pd.Categorical(text)
        if len(categorical.categories) == 0:
            raise ValueError(f"Label level {name!r} has no labelled reference cells.")
        levels[str(name)] = categorical
    return levels


def label_keys_of(label_keys, adata_ref, model_labels_key: str) -> list[str]:
    if label_keys is None:
        label_keys = [model_labels_key] if model_labels_key in adata_ref.obs else []
    elif isinstance(label_keys, str):
        label_keys = [label_keys]
    missing = [key for key in label_keys if key not in adata_ref.obs]
    if missing:
        raise KeyError(
            f"label_keys {missing} are not columns of adata_ref.obs (columns: {list(adata_ref.obs.columns)}). "
            "Pass the columns holding the reference labels."
        )
    return list(label_keys)
