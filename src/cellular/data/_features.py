"""Log-normalised expression of a fixed gene set, for models that read expression directly (trees, PCA)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ._expression import mean_count_shares, read_expression


@dataclass(frozen=True)
class GeneFeatures:
    """A gene set and its normalisation: counts over these genes scaled to ``target_sum``, then ``log1p``.

    Fitted once on the training data (:meth:`fit`) and stored with the model that reads it, so every later dataset
    is read the same way: genes matched by name, missing genes zero, each cell's library its total over the genes.
    When a dataset lacks some of the genes, that total is divided by the share of a training cell's counts the present
    genes carry (``gene_count_fractions``), so the genes it has are not scaled up.

    Parameters
    ----------
    genes
        Gene names, in feature order.
    target_sum
        Library size each cell is scaled to; ``None`` when the data already hold log1p-normalised values.
    layer
        Layer holding the expression; ``adata.X`` when ``None``.
    gene_count_fractions
        Mean share of each gene in a training cell's total over :attr:`genes` (counts only; ``None`` for
        log-normalised data and for features saved before it was recorded, which read a dataset lacking genes with
        the total over the genes it has).
    """

    genes: tuple[str, ...]
    target_sum: float | None
    layer: str | None = None
    gene_count_fractions: tuple[float, ...] | None = None

    @classmethod
    def fit(
        cls,
        adata: AnnData,
        *,
        n_top_genes: int | None = 2000,
        layer: str | None = None,
        log_normalized: bool = False,
        genes: Sequence[str] | None = None,
    ) -> GeneFeatures:
        """Choose the genes (given, or the ``n_top_genes`` most variable; all when ``None``) and the target sum.

        The target sum is the median library size over the chosen genes, and each gene's mean share of it is
        recorded (counts only).
        """
        from cellular.pp import highly_variable_genes

        if n_top_genes is not None and not (
            isinstance(n_top_genes, numbers.Integral) and not isinstance(n_top_genes, bool) and n_top_genes >= 1
        ):
            raise ValueError(f"n_top_genes must be a positive integer, or None for every gene; got {n_top_genes!r}.")
        names = [str(name) for name in adata.var_names]
        if genes is None:
            genes = names
            if n_top_genes is not None and n_top_genes < len(names):
                reader, _ = read_expression(adata, names, layer=layer, log_normalized=log_normalized, target_sum=1e4)
                genes = highly_variable_genes(reader, names, n_top_genes)
        genes = tuple(str(gene) for gene in genes)
        target_sum = fractions = None
        if not log_normalized:
            reader, _ = read_expression(adata, list(genes), layer=layer, log_normalized=False, target_sum=1.0)
            target_sum = float(np.median(1.0 / reader.size_factors))
            fractions = tuple(float(share) for share in mean_count_shares(reader))
        return cls(genes, target_sum, layer, fractions)

    @property
    def log_normalized(self) -> bool:
        """Whether the expression is read as already log1p-normalised."""
        return self.target_sum is None

    def transform(self, adata: AnnData, *, min_gene_overlap: float = 0.5) -> sp.csr_matrix:
        """``(n_cells, n_genes)`` log-normalised expression of ``adata`` over :attr:`genes` (sparse, float32)."""
        reader, _ = read_expression(
            adata,
            list(self.genes),
            layer=self.layer,
            log_normalized=self.log_normalized,
            target_sum=self.target_sum,
            min_gene_overlap=min_gene_overlap,
            gene_count_fractions=None if self.gene_count_fractions is None else np.asarray(self.gene_count_fractions),
        )
        return reader.normalized_sparse()

    def to_dict(self) -> dict:
        """Plain values for a JSON file."""
        fractions = None if self.gene_count_fractions is None else list(self.gene_count_fractions)
        return {
            "genes": list(self.genes),
            "target_sum": self.target_sum,
            "layer": self.layer,
            "gene_count_fractions": fractions,
        }

    @classmethod
    def from_dict(cls, values: dict) -> GeneFeatures:
        """Inverse of :meth:`to_dict`, with the types checked."""
        genes, target_sum, layer = values.get("genes"), values.get("target_sum"), values.get("layer")
        if not isinstance(genes, list) or not genes or not all(isinstance(gene, str) for gene in genes):
            raise ValueError("The stored gene list is missing or malformed; the file is not a valid cellular-sc model.")
        if target_sum is not None and not (isinstance(target_sum, int | float) and target_sum > 0):
            raise ValueError(f"The stored target_sum {target_sum!r} is not a positive number.")
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"The stored layer {layer!r} is not a string.")
        fractions = values.get("gene_count_fractions")
        if fractions is not None:
            if not (
                isinstance(fractions, list)
                and len(fractions) == len(genes)
                and all(_non_negative_number(share) for share in fractions)
            ):
                raise ValueError(
                    f"The stored gene_count_fractions are not {len(genes)} non-negative numbers, one per gene; the "
                    f"file is damaged. Fit and save the model again."
                )
            fractions = tuple(float(share) for share in fractions)
        return cls(tuple(genes), None if target_sum is None else float(target_sum), layer, fractions)


def _non_negative_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
