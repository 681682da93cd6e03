"""Splits, minibatch schedules, gene alignment and synthetic data."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from cellular.data import align_genes, epoch_minibatches, read_expression, stratified_split, synthetic_counts


def test_stratified_split_keeps_label_proportions_and_two_training_cells():
    labels = np.repeat(np.arange(4), [100, 30, 3, 2])
    train, val = stratified_split(labels, 0.8, np.random.default_rng(0))
    assert np.intersect1d(train, val).size == 0 and train.size + val.size == labels.size
    train_counts = np.bincount(labels[train], minlength=4)
    np.testing.assert_array_equal(train_counts, [80, 24, 2, 2])
    again, _ = stratified_split(labels, 0.8, np.random.default_rng(0))
    np.testing.assert_array_equal(train, again)
    with pytest.raises(ValueError, match="train_size"):
        stratified_split(labels, 0.0, np.random.default_rng(0))


def test_minibatches_cover_cells_and_drop_small_tail():
    indices = np.arange(1000, 1530)
    batches = epoch_minibatches(indices, 256, np.random.default_rng(0))
    assert [b.size for b in batches] == [256, 256]  # the 18-cell tail is dropped
    assert np.unique(np.concatenate(batches)).size == 512
    single = epoch_minibatches(np.arange(10), 256, np.random.default_rng(0))
    assert len(single) == 1 and single[0].size == 10


def test_balanced_minibatches_show_rare_types_in_every_batch():
    labels = np.concatenate([np.zeros(5000, int), np.ones(5, int)])
    indices = np.arange(labels.size)
    rng = np.random.default_rng(0)
    plain = epoch_minibatches(indices, 256, rng)
    balanced = epoch_minibatches(indices, 256, rng, balance_by=labels)
    rare_plain = np.array([(labels[b] == 1).sum() for b in plain])
    rare_balanced = np.array([(labels[b] == 1).sum() for b in balanced])
    assert (rare_plain == 0).sum() > len(plain) / 2
    assert (rare_balanced > 0).all() and abs(rare_balanced.mean() - 128) < 20


def make_adata(values, genes):
    return AnnData(X=sp.csr_matrix(np.asarray(values, dtype=np.float32)), var=pd.DataFrame(index=genes))


def test_alignment_reorders_zero_fills_and_normalises_over_model_genes():
    adata = make_adata([[1, 2, 3, 4], [0, 5, 0, 5]], ["a", "b", "c", "d"])
    # Library = total over the present model genes (d, b), divided by their reference share (0.3 + 0.5).
    expression, alignment = read_expression(
        adata,
        ["d", "x", "b"],
        layer=None,
        log_normalized=False,
        target_sum=10.0,
        min_gene_overlap=0.5,
        gene_count_fractions=np.array([0.3, 0.2, 0.5]),
    )
    assert alignment.n_matched == 2 and alignment.missing == ["x"]
    libraries = np.array([[6.0], [10.0]]) / 0.8
    expected = np.log1p(np.array([[4, 0, 2], [5, 0, 5]]) * (10.0 / libraries))
    np.testing.assert_allclose(expression.rows(np.arange(2)), expected, rtol=1e-6)
    # Without missing genes the library is the plain total over the model genes; other genes never count.
    expression, _ = read_expression(adata, ["d", "b"], layer=None, log_normalized=False, target_sum=10.0)
    expected = np.log1p(np.array([[4, 2], [5, 5]]) * (10.0 / np.array([[6.0], [10.0]])))
    np.testing.assert_allclose(expression.rows(np.arange(2)), expected, rtol=1e-6)


def test_alignment_by_gene_id_column_and_errors():
    adata = make_adata([[1, 2, 3]], ["A", "B", "C"])
    adata.var["ids"] = ["ENSG1", "ENSG2", "ENSG3"]
    assert align_genes(adata, ["ENSG3", "ENSG1"], gene_id_key="ids").source_index.tolist() == [2, 0]
    with pytest.raises(KeyError, match="gene_id_key 'ensembl'"):
        align_genes(adata, ["ENSG1"], gene_id_key="ensembl")
    with pytest.raises(ValueError, match=r"Only 1 of the model's 4 genes .* First missing genes: \['X', 'Y', 'Z'\]"):
        align_genes(adata, ["A", "X", "Y", "Z"], min_gene_overlap=0.5)
    partial = align_genes(adata, ["A", "B", "X"], min_gene_overlap=0.5)
    assert partial.missing == ["X"] and partial.present.tolist() == [True, True, False] and partial.n_matched == 2
    duplicated = make_adata([[1, 2]], ["A", "A"])
    with pytest.raises(ValueError, match="duplicated gene names"):
        align_genes(duplicated, ["A"])


def test_gene_ids_with_versions_on_one_side_are_named_with_the_fix_for_that_side():
    ids = [f"ENSG{i:011d}" for i in range(10)]
    versioned = [f"{gene}.{i % 3 + 1}" for i, gene in enumerate(ids)]
    query = make_adata(np.ones((1, 10)), versioned)
    with pytest.raises(ValueError, match=r"but 10 match when version suffixes are removed .* remove them first"):
        align_genes(query, ids, min_gene_overlap=0.0)
    stripped = query.copy()
    stripped.var_names = stripped.var_names.str.replace(r"\.\d+$", "", regex=True)  # the fix the message gives
    assert align_genes(stripped, ids).n_matched == 10
    with pytest.raises(ValueError, match=r"the model's ids carry them: rename the query's ids"):
        align_genes(make_adata(np.ones((1, 10)), ids), versioned, min_gene_overlap=0.0)
    versions = {gene.split(".")[0]: gene for gene in versioned}  # the fix for that side
    renamed = make_adata(np.ones((1, 10)), [versions.get(gene, gene) for gene in ids])
    assert align_genes(renamed, versioned).n_matched == 10
    # Symbols whose names end in ".<digits>" (clone-based lncRNAs) match as they are: no error when most genes match.
    symbols = ["AC012345.1", "RP11-206L10.2", "LYZ"]
    assert align_genes(make_adata(np.ones((1, 3)), symbols), symbols).n_matched == 3


def test_empty_data_is_rejected():
    with pytest.raises(ValueError, match=r"adata.X is empty \(shape \(0, 2\)\)"):
        read_expression(make_adata(np.zeros((0, 2)), ["a", "b"]), ["a"], layer=None, log_normalized=False, target_sum=1)


def test_cells_without_counts_are_rejected():
    adata = make_adata([[1, 2], [0, 0]], ["a", "b"])
    with pytest.raises(ValueError, match="1 cells have no counts"):
        read_expression(adata, ["a", "b"], layer=None, log_normalized=False, target_sum=10.0)
    # The message counts the model genes the data measures: here the only counts of the second cell are in "c".
    adata = make_adata([[1, 0, 5], [0, 0, 3]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="no counts in adata.X over the 2 of the model.s 3 genes the data measures"):
        read_expression(adata, ["a", "b", "x"], layer=None, log_normalized=False, target_sum=10.0, min_gene_overlap=0.5)


def test_synthetic_counts_shape_types_and_sparsity():
    adata = synthetic_counts(3000, 500, n_types=5, n_batches=3, seed=1, chunk_size=700)
    assert adata.shape == (3000, 500) and sp.issparse(adata.X)
    assert set(adata.obs["cell_type"].cat.categories) == {f"type_{i}" for i in range(5)}
    assert adata.obs["batch"].nunique() == 3
    values = adata.X.data
    assert np.array_equal(values, np.round(values)) and values.min() > 0
    same = synthetic_counts(3000, 500, n_types=5, n_batches=3, seed=1)
    assert (same.X != adata.X).nnz == 0


@pytest.mark.parametrize("order", ["model", "reversed"])
def test_a_gene_stored_as_several_entries_reads_as_their_sum(symphony, order):
    """A CSR matrix with duplicate entries (each count split in two) reads like its canonical form, in either gene
    order, and stays as the user stored it."""
    cells = symphony[:200]
    canonical = sp.csr_matrix(cells.X, dtype=np.float32)
    halves = np.floor(canonical.data / 2)
    rows = np.repeat(np.arange(canonical.shape[0]), np.diff(canonical.indptr))
    split = sp.coo_matrix(
        (np.concatenate([halves, canonical.data - halves]), (np.tile(rows, 2), np.tile(canonical.indices, 2))),
        shape=canonical.shape,
    )
    order_of_entries = np.lexsort((split.col, split.row))
    duplicated = sp.csr_matrix(
        (
            split.data[order_of_entries],
            split.col[order_of_entries],
            np.r_[0, np.cumsum(np.bincount(split.row, minlength=canonical.shape[0]))],
        ),
        shape=canonical.shape,
    )
    assert not duplicated.has_canonical_format and np.array_equal(duplicated.toarray(), canonical.toarray())
    stored = duplicated.data.copy()
    genes = list(cells.var_names)
    genes = genes if order == "model" else genes[::-1]
    read = {}
    for name, matrix in (("canonical", canonical), ("duplicated", duplicated)):
        adata = AnnData(matrix)
        adata.var_names = cells.var_names
        expression, _ = read_expression(adata, genes, layer=None, log_normalized=False, target_sum=1e4)
        read[name] = expression.rows(np.arange(adata.n_obs))
    np.testing.assert_allclose(read["duplicated"], read["canonical"], rtol=1e-6)
    assert np.array_equal(duplicated.data, stored) and not duplicated.has_canonical_format


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [([30, 28_000], [30, 1_970]), ([10_000, 10_000], [1_000, 1_000]), ([500] * 20, [200] * 20), ([1_500], [1_500])],
)
def test_a_shared_sample_gives_each_group_its_share(sizes, expected):
    from cellular.data._sampling import shared_sample

    codes = np.repeat(np.arange(len(sizes)), sizes)
    codes = np.concatenate([codes, np.full(50, -1)])  # cells left out
    rows = shared_sample(np.random.default_rng(0).permutation(codes), 2_000, 200)
    assert np.all(np.diff(rows) > 0)
    shuffled = np.random.default_rng(0).permutation(codes)
    np.testing.assert_array_equal(np.bincount(shuffled[rows], minlength=len(sizes)), expected)
