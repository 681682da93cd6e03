"""Reading expression out of an AnnData: checks, gene alignment and on-the-fly log-normalisation.

The matrix stays sparse; only the rows of one minibatch are ever made dense.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from anndata.experimental import AnnCollection
from anndata.experimental.multi_files._anncollection import AnnCollectionView

from . import _backed
from ._backed import check_row_readable, is_backed, read_rows, row_chunks
from ._collection import is_collection, open_collection

logger = logging.getLogger(__name__)

_CHECK_CHUNK = 1 << 23

COUNTS_FIX = (
    "Pass raw counts (e.g. layer='counts'), or, if the values are already log1p-normalised, set "
    "log_normalized=True: in setup_anndata for training data, in the call that reads a query (the tl functions and "
    "the model's methods take it), or --log-normalized on the command line."
)
# No log-normalised value exceeds this (log1p of 1e13, log2 of 1e9): larger values are counts, raw or rescaled.
LOG1P_MAX = 30.0


def get_matrix(adata: AnnData, layer: str | None) -> np.ndarray | sp.spmatrix:
    """Return ``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer.

    For an AnnData of :func:`~cellular.data.read_collection`, the files' ``X`` (or ``layer``), read on demand.
    """
    if isinstance(adata, AnnCollection | AnnCollectionView):
        raise TypeError(
            "An AnnCollection cannot be used directly: pass cellular.data.read_collection(collection) (or the list "
            "of h5ad paths), an AnnData whose expression stays in the files and which takes the results."
        )
    if is_collection(adata):
        return open_collection(adata, layer)
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; store the expression in adata.X or name the layer that holds it.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found in adata.layers (available: {list(adata.layers)}).")
    return adata.layers[layer]


def _stored_values(matrix) -> np.ndarray:
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix)


def _value_blocks(matrix) -> Iterator[np.ndarray]:
    """The stored values in flat blocks of bounded size; a backed matrix is streamed from disk once."""
    blocks = (block for _, _, block in row_chunks(matrix)) if is_backed(matrix) else (matrix,)
    for block in blocks:
        values = _stored_values(block).reshape(-1)
        for start in range(0, values.size, _CHECK_CHUNK):
            yield values[start : start + _CHECK_CHUNK]


def matrix_name(layer: str | None) -> str:
    """How messages name the matrix of ``layer`` (``adata.X`` when ``None``)."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def check_expression_values(matrix, *, counts: bool | None, where: str = "adata.X") -> None:
    """Raise a ``ValueError`` naming the problem if the values cannot be used.

    One pass over the values, in blocks (streamed from disk for a backed matrix), without full-size copies.

    Parameters
    ----------
    matrix
        Dense or sparse expression matrix, in memory or backed.
    counts
        Whether raw counts are expected (non-negative integers) or log1p-normalised values (non-negative, at most
        :data:`LOG1P_MAX`); ``None``: any non-negative values (counts or log-normalised).
    where
        Name of the matrix used in messages.
    """
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{where} is empty (shape {matrix.shape}); CELLULAR needs at least one cell and one gene.")
    check_row_readable(matrix, where)
    n_bad, minimum, maximum, non_integer = 0, np.inf, -np.inf, False
    for values in _value_blocks(matrix):
        if values.size == 0:
            continue
        kept = values[np.isfinite(values)]
        n_bad += int(values.size - kept.size)
        if kept.size:
            minimum, maximum = min(minimum, float(kept.min())), max(maximum, float(kept.max()))
        non_integer = non_integer or (counts and not np.array_equal(kept, np.round(kept)))
    if n_bad:
        raise ValueError(
            f"{where} contains {n_bad} NaN or infinite values. Remove or repair those cells/genes "
            "(e.g. adata = adata[np.isfinite(...)] or recompute the matrix) before using CELLULAR."
        )
    if minimum < 0:
        kind = "raw counts" if counts else "log1p-normalised values"
        raise ValueError(
            f"{where} contains negative values (minimum {minimum:.3g}), but CELLULAR expects {kind}. "
            "Scaled or centred data (e.g. after sc.pp.scale) cannot be used: pass the unscaled matrix, for example "
            "adata.raw.to_adata() or a layer holding counts."
        )
    if non_integer and maximum > LOG1P_MAX:
        raise ValueError(
            f"{where} holds non-integer values up to {maximum:.4g}, too large to be log1p-normalised: they look like "
            "corrected or rescaled counts (e.g. corrected for ambient RNA, or normalize_total without log1p). "
            "CELLULAR normalises counts itself: pass the raw counts (e.g. layer='counts'), or round corrected counts "
            "to integers first (e.g. adata.X.data = np.round(adata.X.data) for a sparse matrix)."
        )
    if non_integer:
        raise ValueError(f"{where} holds non-integer values, but raw counts were expected. {COUNTS_FIX}")
    if counts is False and maximum > LOG1P_MAX:
        raise ValueError(
            f"{where} holds values up to {maximum:.4g}, but log1p-normalised values were expected (they stay below "
            f"{LOG1P_MAX:g}): they look like raw counts. Drop log_normalized=True (--log-normalized on the command "
            "line) so the counts are normalised for you, or pass log-normalised values (sc.pp.normalize_total, then "
            "sc.pp.log1p)."
        )


def library_sizes(matrix) -> np.ndarray:
    """Total counts per cell as float64 (streamed in chunks for a backed matrix or :class:`BackedColumns`)."""
    if isinstance(matrix, BackedColumns) or is_backed(matrix):
        chunks = matrix.chunks() if isinstance(matrix, BackedColumns) else row_chunks(matrix)
        return np.concatenate([library_sizes(block) for _, _, block in chunks]) if matrix.shape[0] else np.zeros(0)
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).reshape(-1)


@dataclass
class GeneAlignment:
    """Where the model's genes are found in an AnnData.

    Attributes
    ----------
    source_index
        For each model gene, its column in the AnnData, or ``-1`` when missing.
    n_matched
        Number of model genes found.
    missing
        Names of the model genes not found, in model order.
    """

    source_index: np.ndarray
    n_matched: int
    missing: list[str]

    @property
    def n_genes(self) -> int:
        """Number of model genes."""
        return self.source_index.shape[0]

    @property
    def present(self) -> np.ndarray:
        """``(n_genes,)`` boolean: which model genes the data measures."""
        return self.source_index >= 0


def align_genes(
    adata: AnnData,
    genes: Sequence[str],
    *,
    gene_id_key: str | None = None,
    min_gene_overlap: float = 1.0,
) -> GeneAlignment:
    """Locate ``genes`` in ``adata`` by ``var_names`` (or by ``adata.var[gene_id_key]``).

    Parameters
    ----------
    adata
        Data to read.
    genes
        The model's genes, in model order.
    gene_id_key
        Column of ``adata.var`` to match on instead of ``var_names`` (e.g. Ensembl ids).
    min_gene_overlap
        Smallest fraction of ``genes`` that must be present.

    Returns
    -------
    The alignment (the callers warn about missing genes, saying how they are treated).
    """
    if gene_id_key is None:
        names = pd.Index(adata.var_names)
        source = "var_names"
    else:
        if gene_id_key not in adata.var:
            raise KeyError(f"gene_id_key {gene_id_key!r} not found in adata.var (columns: {list(adata.var.columns)}).")
        names = pd.Index(adata.var[gene_id_key].astype(str))
        source = f"var[{gene_id_key!r}]"
    if names.has_duplicates:
        duplicated = names[names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"adata.{source} has duplicated gene names (e.g. {duplicated}); make them unique first, "
            "e.g. adata.var_names_make_unique()."
        )
    source_index = names.get_indexer(pd.Index(genes))
    matched = source_index >= 0
    n_matched = int(matched.sum())
    missing = [genes[i] for i in np.flatnonzero(~matched)]
    fraction = n_matched / len(genes)
    _check_name_case(names, genes, n_matched, source)
    _check_version_suffixes(names, genes, n_matched, source)
    _check_gene_columns(adata, genes, n_matched, source, gene_id_key)
    if fraction < min_gene_overlap:
        raise ValueError(
            f"Only {n_matched} of the model's {len(genes)} genes ({fraction:.1%}) are present in adata.{source}; "
            f"at least {min_gene_overlap:.0%} are required. First missing genes: {missing[:10]}. "
            "Check that the gene names use the same convention as the training data (symbols vs Ensembl ids: "
            "see gene_id_key), or lower min_gene_overlap if embedding with fewer genes is intended."
        )
    logger.info("Matched %d of %d model genes in adata.%s.", n_matched, len(genes), source)
    return GeneAlignment(source_index=source_index, n_matched=n_matched, missing=missing)


def _matches_far_better(n_other: int, n_matched: int, n_genes: int) -> bool:
    """Whether another reading of the names matches at least twice as many genes, and 10 % of the model's more."""
    return n_other >= max(2 * n_matched, n_matched + 0.1 * n_genes)


def _normalised_match(names: pd.Index, genes: list[str], normalise) -> tuple[int, str | None]:
    """How many ``genes`` match ``names`` once both are ``normalise``-d.

    Also one pair that matches only so, as ``"'query name' for 'model gene'"`` (``None`` when there is none).
    """
    normalised = pd.Index(normalise(pd.Index(names.astype(str))))
    first = ~normalised.duplicated()
    kept_names = names[first]
    position = normalised[first].get_indexer(normalise(pd.Index(genes)))
    found = np.flatnonzero(position >= 0)
    differing = found[kept_names[position[found]] != pd.Index(genes)[found]]
    example = f"{kept_names[position[differing[0]]]!r} for {genes[differing[0]]!r}" if differing.size else None
    return int(found.size), example


def _check_name_case(names: pd.Index, genes: list[str], n_matched: int, source: str) -> None:
    """Refuse a query whose gene names match the model's far better when case is ignored (a naming mismatch)."""
    if n_matched > 0.9 * len(genes):  # folding case could not add the 10 % of genes the rule asks for
        return
    n_folded, example = _normalised_match(names, genes, lambda index: index.str.upper())
    if _matches_far_better(n_folded, n_matched, len(genes)):
        raise ValueError(
            f"Only {n_matched} of the model's {len(genes)} genes match adata.{source} exactly, but {n_folded} match "
            f"when upper and lower case are ignored (e.g. {example}): the gene names differ in case. If they name "
            f"the same genes, rename them to the model's convention first, e.g. "
            f"adata.{source} = adata.{source}.str.upper(), or match on ids with gene_id_key=..."
        )


_VERSION_SUFFIX = r"\.\d+$"


def _without_version(index: pd.Index) -> pd.Index:
    return index.str.replace(_VERSION_SUFFIX, "", regex=True)


def _check_version_suffixes(names: pd.Index, genes: list[str], n_matched: int, source: str) -> None:
    """Refuse a query whose gene ids match the model's far better without version suffixes (``ENSG....16``)."""
    if n_matched > 0.9 * len(genes):
        return
    n_stripped, example = _normalised_match(names, genes, _without_version)
    if not _matches_far_better(n_stripped, n_matched, len(genes)):
        return
    names_versioned = (_without_version(pd.Index(names.astype(str))) != names).mean()
    if names_versioned > (_without_version(pd.Index(genes)) != pd.Index(genes)).mean():
        fix = f"remove them first, e.g. adata.{source} = adata.{source}.str.replace(r'\\.\\d+$', '', regex=True)"
    else:
        fix = (
            "the model's ids carry them: rename the query's ids to the model's first, e.g. versions = "
            "{g.split('.')[0]: g for g in model.genes}; adata.var_names = [versions.get(g, g) for g in adata.var_names]"
        )
    raise ValueError(
        f"Only {n_matched} of the model's {len(genes)} genes match adata.{source} exactly, but {n_stripped} match "
        f"when version suffixes are removed (e.g. {example}): the gene ids carry versions on one side only; {fix}."
    )


def _check_gene_columns(adata: AnnData, genes: list[str], n_matched: int, source: str, gene_id_key) -> None:
    """Refuse a query whose genes are named in another ``var`` column that matches the model's far better.

    Files from CELLxGENE, for instance, have Ensembl ids as ``var_names`` and the symbols in ``var['feature_name']``.
    """
    if n_matched > 0.9 * len(genes):
        return
    wanted = pd.Index(genes)
    best, n_best = None, 0
    for column in adata.var.columns:
        values = adata.var[column]
        if column == gene_id_key or not (
            pd.api.types.is_object_dtype(values)
            or isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(values)
        ):
            continue
        n_column = int(wanted.isin(pd.Index(values.astype(str))).sum())
        if n_column > n_best:
            best, n_best = column, n_column
    if best is not None and _matches_far_better(n_best, n_matched, len(genes)):
        raise ValueError(
            f"Only {n_matched} of the model's {len(genes)} genes match adata.{source}, but {n_best} match "
            f"adata.var[{best!r}]: the genes are named in that column. Use it as the gene names first, e.g. "
            f"adata.var_names = adata.var[{best!r}].astype(str) then adata.var_names_make_unique(), or match on it "
            f"with gene_id_key={best!r} (--gene-id-key {best} on the command line)."
        )


class BackedColumns:
    """The model's genes of a backed matrix, read from disk only when rows are asked for.

    Parameters
    ----------
    matrix
        Backed cells x genes matrix (``adata.X`` of ``read_h5ad(..., backed="r")``).
    alignment
        Where the model's genes are in ``matrix``.
    """

    def __init__(self, matrix, alignment: GeneAlignment):
        self.matrix = matrix
        self.alignment = alignment

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_cells, n_model_genes)``."""
        return self.matrix.shape[0], self.alignment.n_genes

    def __getitem__(self, index: np.ndarray) -> sp.csr_matrix:
        return select_columns(read_rows(self.matrix, np.asarray(index)), self.alignment)

    def chunks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """``(start, stop, rows)`` over consecutive blocks of cells, each a CSR matrix of the model's genes."""
        for start, stop, block in row_chunks(self.matrix):
            yield start, stop, select_columns(block, self.alignment)


def select_columns(matrix, alignment: GeneAlignment) -> sp.csr_matrix | BackedColumns:
    """Cells x model genes CSR matrix: reordered columns, zeros for missing genes (lazy for a backed matrix)."""
    if is_backed(matrix):
        return BackedColumns(matrix, alignment)
    if sp.issparse(matrix) and matrix.format in ("csr", "csc") and not matrix.has_canonical_format:
        # A gene stored as several entries of one cell is their sum (normalising entry by entry would not be).
        matrix = matrix.copy()
        matrix.sum_duplicates()
    n_source = matrix.shape[1]
    if n_source == alignment.n_genes and np.array_equal(alignment.source_index, np.arange(n_source)):
        if sp.isspmatrix_csr(matrix) and matrix.dtype == np.float32:
            return matrix
        return sp.csr_matrix(matrix, dtype=np.float32)
    matched = np.flatnonzero(alignment.source_index >= 0)
    selector = sp.csr_matrix(
        (np.ones(matched.size, dtype=np.float32), (alignment.source_index[matched], matched)),
        shape=(n_source, alignment.n_genes),
    )
    if not sp.issparse(matrix):
        matrix = sp.csr_matrix(np.asarray(matrix, dtype=np.float32))
    return sp.csr_matrix(matrix.tocsr() @ selector, dtype=np.float32)


@dataclass
class DepthThinning:
    """Binomial thinning of counts, simulating a shallower sequencing run of the same cells.

    Attributes
    ----------
    probability
        Share of cells that are thinned.
    min_fraction
        Smallest expected fraction of counts a thinned cell keeps (uniform in ``[min_fraction, 1]``).
    rng
        Random generator.
    """

    probability: float
    min_fraction: float
    rng: np.random.Generator

    def apply(self, block: sp.csr_matrix, size_factors: np.ndarray) -> np.ndarray:
        """Thin the counts of ``block`` in place; return the size factors of the thinned cells' new depth."""
        n_cells = block.shape[0]
        thinned = self.rng.random(n_cells) < self.probability
        fraction = np.where(thinned, self.rng.uniform(self.min_fraction, 1.0, n_cells), 1.0)
        before = library_sizes(block)
        kept = np.repeat(fraction, np.diff(block.indptr))
        block.data = self.rng.binomial(block.data.astype(np.int64), kept).astype(np.float32)
        after = library_sizes(block)
        # A cell thinned to nothing would have no expression left; such cells keep a single count-free row of
        # zeros scaled as before (log1p(0) = 0 whatever the factor).
        return size_factors * before / np.where(after > 0, after, before)


class NormalizedExpression:
    """Cells x model genes expression, normalised minibatch by minibatch.

    Parameters
    ----------
    matrix
        CSR matrix of raw counts or log1p-normalised values (cells x model genes).
    size_factors
        ``target_sum / library_size`` per cell when ``matrix`` holds counts; ``None`` when it is already
        log-normalised.
    standardization
        Per-batch moment matching applied to the log-normalised minibatches (:class:`BatchStandardization`), or
        ``None``.
    """

    def __init__(self, matrix: sp.csr_matrix, size_factors: np.ndarray | None, standardization=None):
        self.matrix = matrix
        self.size_factors = size_factors
        self.standardization = standardization

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return self.matrix.shape[0]

    def rows(self, index: np.ndarray, thinning: DepthThinning | None = None) -> np.ndarray:
        """Dense float32 log-normalised expression of the cells ``index``.

        Parameters
        ----------
        index
            Cells to read.
        thinning
            Binomially thin the counts of some cells before normalising them (training augmentation; counts only).
        """
        block = self.matrix[index]
        if self.size_factors is not None:
            size_factors = self.size_factors[index]
            if thinning is not None:
                size_factors = thinning.apply(block, size_factors)
            # Normalise the stored entries only (log1p(0) = 0), before densifying.
            factors = np.repeat(size_factors.astype(np.float32), np.diff(block.indptr))
            block.data = np.log1p(block.data * factors)
        dense = block.toarray()
        if self.standardization is not None:
            self.standardization.apply(dense, index)
        return dense

    def subset(self, rows: np.ndarray) -> NormalizedExpression:
        """The cells ``rows`` (sorted, distinct) held in memory, read from disk in one read when backed."""
        rows = np.asarray(rows, dtype=np.int64)
        factors = None if self.size_factors is None else self.size_factors[rows]
        standardization = None if self.standardization is None else self.standardization.subset(rows)
        return NormalizedExpression(sp.csr_matrix(self.matrix[rows], dtype=np.float32), factors, standardization)

    @property
    def is_backed(self) -> bool:
        """Whether the cells are read from disk minibatch by minibatch."""
        return isinstance(self.matrix, BackedColumns)

    def normalized_sparse(self) -> sp.csr_matrix:
        """The whole log-normalised matrix, still sparse (``log1p(0) = 0``); read into memory when backed."""
        if self.is_backed:
            return sp.vstack([block for _, _, block in self.normalized_chunks()], format="csr")
        return self._normalize(self.matrix, self.size_factors)

    def normalized_rows(self, index: np.ndarray) -> sp.csr_matrix:
        """The log-normalised rows ``index`` (sorted, distinct), still sparse; only those rows are read from disk."""
        index = np.asarray(index, dtype=np.int64)
        factors = None if self.size_factors is None else self.size_factors[index]
        return self._normalize(sp.csr_matrix(self.matrix[index]), factors)

    def stored_chunks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """``(start, stop, rows)``: the matrix as stored (model genes), in consecutive blocks of cells."""
        if self.is_backed:
            yield from self.matrix.chunks()
            return
        for start in range(0, self.n_cells, _backed.ROW_CHUNK):
            stop = min(start + _backed.ROW_CHUNK, self.n_cells)
            yield start, stop, self.matrix[start:stop]

    def normalized_chunks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """``(start, stop, rows)``: the log-normalised matrix in consecutive blocks of cells (bounded memory)."""
        for start, stop, block in self.stored_chunks():
            factors = None if self.size_factors is None else self.size_factors[start:stop]
            yield start, stop, self._normalize(block, factors)

    @staticmethod
    def _normalize(block: sp.csr_matrix, size_factors: np.ndarray | None) -> sp.csr_matrix:
        if size_factors is None:
            return sp.csr_matrix(block, dtype=np.float32, copy=True)
        out = sp.csr_matrix(sp.diags(size_factors.astype(np.float32)) @ block, dtype=np.float32)
        np.log1p(out.data, out=out.data)
        return out


def read_expression(
    adata: AnnData,
    genes: Sequence[str],
    *,
    layer: str | None,
    log_normalized: bool,
    target_sum: float | None,
    gene_id_key: str | None = None,
    min_gene_overlap: float = 1.0,
    gene_count_fractions: np.ndarray | None = None,
    check_values: bool = True,
) -> tuple[NormalizedExpression, GeneAlignment]:
    """Check, align and prepare an AnnData's expression for the model's genes.

    Each cell's library size is its total count over ``genes`` (as in scvi-tools), so genes of ``adata`` outside
    ``genes`` never change the result. When some of ``genes`` are missing, the total over the present ones is
    divided by the share of counts those genes carry in the reference (``gene_count_fractions``), which keeps the
    scale of the other genes unbiased; the missing genes are zero after normalisation.

    Parameters
    ----------
    adata
        Data to read.
    genes
        The model's genes, in model order.
    layer
        Layer holding the expression; ``adata.X`` when ``None``.
    log_normalized
        Whether the matrix already holds log1p-normalised values (used as they are).
    target_sum
        Library size every cell is scaled to (counts only).
    gene_id_key, min_gene_overlap
        As in :func:`align_genes`.
    gene_count_fractions
        Mean share of each gene in a reference cell's total over ``genes``; without it, the total over the present
        genes is used as it is.
    check_values
        Check the values (:func:`check_expression_values`; a full pass over a backed file). Only skip it when the
        same matrix was checked already.
    """
    where = matrix_name(layer)
    matrix = get_matrix(adata, layer)
    if check_values:
        check_expression_values(matrix, counts=not log_normalized, where=where)
    alignment = align_genes(adata, genes, gene_id_key=gene_id_key, min_gene_overlap=min_gene_overlap)
    selected = select_columns(matrix, alignment)
    if log_normalized:
        return NormalizedExpression(selected, None), alignment
    sizes = library_sizes(selected)
    if (sizes <= 0).any():
        raise ValueError(
            f"{int((sizes <= 0).sum())} cells have no counts in {where} over the {alignment.n_matched} of the "
            f"model's {len(genes)} genes the data measures; remove them first, e.g. "
            "sc.pp.filter_cells(adata, min_counts=1), or filter on these genes."
        )
    if gene_count_fractions is not None and alignment.n_matched < alignment.n_genes:
        present_share = float(np.asarray(gene_count_fractions)[alignment.source_index >= 0].sum())
        logger.info("The genes present carry %.1f%% of reference counts; libraries are rescaled.", 100 * present_share)
        sizes = sizes / max(present_share, 1e-12)
    return NormalizedExpression(selected, target_sum / sizes), alignment


def mean_count_shares(expression) -> np.ndarray:
    """Mean over cells of each gene's share of the cell's counts (``expression`` read with ``target_sum=1``)."""
    totals = np.zeros(expression.matrix.shape[1])
    for start, stop, block in expression.stored_chunks():
        totals += np.asarray((sp.diags(expression.size_factors[start:stop]) @ block).sum(axis=0)).reshape(-1)
    return totals / max(expression.n_cells, 1)
