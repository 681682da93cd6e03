"""Checks and conversions :meth:`CELLULAR.setup_anndata` and training apply to the user's ``obs`` columns."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from cellular.data import ancestors, hierarchy_from_columns

logger = logging.getLogger(__name__)

_COLUMN_CONTENT = {"labels_key": "cell-type labels", "batch_key": "batches"}


def _check_obs_column(adata: AnnData, key: str, argument: str) -> None:
    if key not in adata.obs:
        raise KeyError(
            f"{argument}={key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}). "
            f"Pass the name of the column holding the {_COLUMN_CONTENT.get(argument, 'values')}."
        )
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(
            f"adata.obs[{key!r}] has {int(column.isna().sum())} missing values. Fill them, e.g. with the "
            "unlabeled_category ('Unknown') for labels, before setting up the data."
        )


def _label_levels(adata: AnnData, labels_key, label_hierarchy, label_levels, unlabeled_category: str):
    """The finest labels column, the parent map and the level names of ``setup_anndata``'s label arguments."""
    if isinstance(labels_key, list | tuple):
        keys = [str(key) for key in labels_key]
        if len(keys) < 2 or len(set(keys)) < len(keys):
            raise ValueError(
                f"labels_key={keys} must name one column, or at least two distinct columns (coarse to fine) for "
                "labels at several levels."
            )
        for key in keys:
            _check_obs_column(adata, key, "labels_key")
        derived = hierarchy_from_columns(adata.obs, keys, unlabeled_category)
        for child, parent in (label_hierarchy or {}).items():
            if derived.get(str(child), str(parent)) != str(parent):
                raise ValueError(
                    f"label_hierarchy puts {child!r} under {parent!r}, but the labels_key columns put it under "
                    f"{derived[str(child)]!r}; a hierarchy gives each label one parent."
                )
        label_hierarchy = {**{str(c): str(p) for c, p in (label_hierarchy or {}).items()}, **derived}
        label_levels = keys if label_levels is None else label_levels
        labels_key = keys[-1]
    else:
        _check_obs_column(adata, labels_key, "labels_key")
    if label_hierarchy is not None:
        if not isinstance(label_hierarchy, dict):
            raise TypeError(
                f"label_hierarchy must be a parent map {{child: parent}}, got {type(label_hierarchy).__name__}."
            )
        label_hierarchy = {str(child): str(parent) for child, parent in label_hierarchy.items()}
        for child in label_hierarchy:
            ancestors(child, label_hierarchy)
    elif label_levels is not None:
        raise ValueError("label_levels names the levels of a hierarchy; pass label_hierarchy or a list of labels_key.")
    label_levels = None if label_levels is None else [str(level) for level in label_levels]
    return labels_key, label_hierarchy, label_levels


def _as_string_categories(adata: AnnData, key: str) -> None:
    """Make ``adata.obs[key]`` categorical with string categories, all of them used (values unchanged)."""
    column = adata.obs[key]
    if isinstance(column.dtype, pd.CategoricalDtype) and all(isinstance(c, str) for c in column.cat.categories):
        used = set(column.cat.codes.unique())
        unused = [c for code, c in enumerate(column.cat.categories) if code not in used]
        if not unused:
            return
        logger.info("Removing categories without cells from adata.obs[%r]: %s.", key, unused)
        adata.obs[key] = column.cat.remove_unused_categories()
        return
    logger.info("Converting adata.obs[%r] (%s) to categorical labels with string categories.", key, column.dtype)
    values = column.cat.remove_unused_categories() if isinstance(column.dtype, pd.CategoricalDtype) else column
    distinct = list(values.cat.categories) if isinstance(values.dtype, pd.CategoricalDtype) else list(pd.unique(values))
    if all(isinstance(v, int | np.integer | float | np.floating) and not isinstance(v, bool) for v in distinct):
        distinct = sorted(distinct)  # numbers in numeric order: 2 before 10
    text = [str(value) for value in distinct]
    if len(set(text)) < len(text):
        raise ValueError(
            f"adata.obs[{key!r}] holds different values that read the same as text (e.g. 1 and '1'): "
            f"{sorted(t for t in set(text) if text.count(t) > 1)[:5]}. Make the column one type first, e.g. "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)."
        )
    adata.obs[key] = pd.Categorical(values.astype(str), categories=list(dict.fromkeys(text)))


def _check_label_counts(labels: np.ndarray, cell_types: list[str], labels_key: str) -> None:
    counts = np.bincount(labels[labels >= 0], minlength=len(cell_types))
    if int((counts > 0).sum()) < 2:
        raise ValueError(
            f"adata.obs[{labels_key!r}] has {int((counts > 0).sum())} labelled cell type(s); CELLULAR's contrastive "
            "loss needs at least two cell types with labelled cells."
        )
    single = [cell_types[i] for i in np.flatnonzero(counts == 1)]
    if single:
        raise ValueError(
            f"Cell type(s) {single} in adata.obs[{labels_key!r}] have a single labelled cell; a type needs at least "
            "two cells to form positive pairs. Remove those cells, merge the type into a broader one, or set their "
            "label to the unlabeled_category."
        )
