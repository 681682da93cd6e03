"""Cell-type representation vectors: one embedding per type (centroid, median or medoid of its cells)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ._common import SAME_AS_TRAINING

logger = logging.getLogger(__name__)

REPRESENTATION_METHODS = ("centroid", "median", "medoid")


class RepresentationMixin:
    """Cell-type representation vectors (:meth:`get_cell_type_representations`) for :class:`CELLULAR`."""

    def get_cell_type_representations(
        self,
        adata: AnnData | None = None,
        labels_key: str | None = None,
        method: str = "centroid",
        *,
        max_medoid_cells: int = 5000,
        batch_size: int = 4096,
        layer: str | None = SAME_AS_TRAINING,
        log_normalized: bool | None = None,
        gene_id_key: str | None = None,
        min_gene_overlap: float = 0.5,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        seed: int = 0,
    ) -> pd.DataFrame:
        """One vector per cell type in the embedding.

        Parameters
        ----------
        adata
            Labelled cells; the training data when ``None``.
        labels_key
            Column of ``adata.obs`` with the types; the model's ``labels_key`` when ``None``. Cells labelled with
            the model's unlabelled category (or missing) are left out.
        method
            ``"centroid"`` (mean of the type's embedded cells), ``"median"`` (coordinate-wise median) or
            ``"medoid"`` (the type's cell with the smallest summed Euclidean distance to the others; for types
            with more than ``max_medoid_cells`` cells, searched on a random subset of that size).
        max_medoid_cells
            Largest number of cells per type searched for the medoid.
        batch_size, layer, log_normalized, gene_id_key, min_gene_overlap, accelerator, devices
            As in :meth:`predict`.
        seed
            Seed of the medoid subsets.

        Returns
        -------
        DataFrame with one row per type and columns ``latent_0 .. latent_{n_latent - 1}``.
        """
        labels = self.representation_labels(adata, labels_key)
        z = self.get_latent_representation(
            adata,
            batch_size=batch_size,
            layer=layer,
            log_normalized=log_normalized,
            gene_id_key=gene_id_key,
            min_gene_overlap=min_gene_overlap,
            accelerator=accelerator,
            devices=devices,
        )
        return cell_type_representations(z, labels, method, max_medoid_cells=max_medoid_cells, seed=seed)

    def representation_labels(self, adata: AnnData | None, labels_key: str | None) -> pd.Categorical:
        """Cell-type labels of ``adata`` (the training data's registered labels when both arguments are ``None``)."""
        if adata is None and labels_key is None:
            codes = self.registered_labels()
            return pd.Categorical.from_codes(codes, categories=self.cell_types)
        source = self.adata if adata is None else adata
        if source is None:
            raise ValueError("The model has no attached AnnData; pass the labelled cells as `adata`.")
        key = self.setup_args["labels_key"] if labels_key is None else labels_key
        if key not in source.obs:
            raise KeyError(
                f"labels_key={key!r} is not a column of adata.obs (columns: {list(source.obs.columns)}); pass the "
                "column holding the cell types as labels_key."
            )
        values = source.obs[key].astype("category")
        # Types are named as text, as setup_anndata names them (integer labels included).
        values = values.cat.rename_categories([str(name) for name in values.cat.categories])
        unlabelled = self.setup_args.get("unlabeled_category", "Unknown")
        if unlabelled in values.cat.categories:
            values = values.cat.remove_categories([unlabelled])
        return pd.Categorical(values)


def cell_type_representations(
    z: np.ndarray,
    labels: pd.Categorical,
    method: str = "centroid",
    *,
    max_medoid_cells: int = 5000,
    seed: int = 0,
) -> pd.DataFrame:
    """Centroid, coordinate-wise median or medoid of every labelled type in an embedding.

    Parameters
    ----------
    z
        ``(n_cells, n_latent)`` embedding.
    labels
        Type of each cell; missing values are left out. Types without cells are dropped.
    method
        ``"centroid"``, ``"median"`` or ``"medoid"``.
    max_medoid_cells
        Largest number of cells per type searched for the medoid (a random subset beyond that).
    seed
        Seed of the medoid subsets.

    Returns
    -------
    DataFrame, one row per type (in category order), columns ``latent_0 ..``.
    """
    if method not in REPRESENTATION_METHODS:
        raise ValueError(f"method must be one of {REPRESENTATION_METHODS}, got {method!r}.")
    labels = pd.Categorical(labels)
    if labels.shape[0] != z.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {z.shape[0]} embedded cells.")
    codes = np.asarray(labels.codes)
    counts = np.bincount(codes[codes >= 0], minlength=len(labels.categories))
    present = np.flatnonzero(counts > 0)
    if present.size == 0:
        raise ValueError("No labelled cells: every label is missing or the unlabelled category.")
    z = np.asarray(z, dtype=np.float32)
    rng = np.random.default_rng(seed)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], present)
    rows = []
    for code, start in zip(present, starts, strict=True):
        members = z[order[start : start + counts[code]]]
        if method == "centroid":
            rows.append(members.mean(axis=0, dtype=np.float64))
        elif method == "median":
            rows.append(np.median(members, axis=0))
        else:
            rows.append(_medoid(members, max_medoid_cells, rng))
    columns = [f"latent_{i}" for i in range(z.shape[1])]
    index = pd.Index([str(labels.categories[code]) for code in present], name="cell_type")
    return pd.DataFrame(np.vstack(rows).astype(np.float32), index=index, columns=columns)


def _medoid(members: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    candidates = members
    if members.shape[0] > max_cells:
        candidates = members[rng.choice(members.shape[0], size=max_cells, replace=False)]
    points = torch.from_numpy(np.ascontiguousarray(candidates))
    chunk = max(1, 2**24 // max(points.shape[0], 1))
    totals = torch.cat([torch.cdist(points[i : i + chunk], points).sum(dim=1) for i in range(0, len(points), chunk)])
    return candidates[int(totals.argmin())]
