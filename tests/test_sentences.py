"""Cell sentences (CELLama's input): exact text, gene order, ties, metadata, backed files."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellular
from cellular.lm import NO_GENES, label_pairs, pca_similarity_pairs


def _hand_built():
    genes = ["CD3E", "MS4A1", "LYZ", "ACTB", "NKG7"]
    counts = np.array(
        [
            [5, 0, 1, 9, 0],  # ACTB 9 > CD3E 5 > LYZ 1
            [2, 2, 0, 2, 7],  # NKG7 7, then a three-way tie listed alphabetically: ACTB, CD3E, MS4A1
            [0, 0, 0, 0, 0],  # nothing expressed
            [0, 3, 0, 0, 0],  # a single gene
        ],
        dtype=np.float32,
    )
    obs = pd.DataFrame(
        {"tissue": ["blood", "lung", None, "blood"], "donor": pd.Categorical(["d1", "d2", "d1", None])},
        index=[f"c{i}" for i in range(4)],
    )
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))


def test_exact_sentences_of_hand_built_cells():
    adata = _hand_built()
    cellular.tl.cell_sentences(adata, n_genes=3)
    assert adata.obs["cell_sentence"].tolist() == [
        "Top genes are ACTB, CD3E, LYZ.",
        "Top genes are NKG7, ACTB, CD3E.",
        NO_GENES,
        "Top genes are MS4A1.",
    ]
    assert adata.uns["cellular"]["cell_sentence"]["params"]["n_genes"] == 3


def test_metadata_clauses_and_missing_values():
    adata = _hand_built()
    cellular.tl.cell_sentences(adata, n_genes=2, obs_keys=["tissue", "donor"], key_added="sentence")
    assert adata.obs["sentence"].tolist() == [
        "Top genes are ACTB, CD3E. tissue of this cell is blood. donor of this cell is d1.",
        "Top genes are NKG7, ACTB. tissue of this cell is lung. donor of this cell is d2.",
        f"{NO_GENES} donor of this cell is d1.",
        "Top genes are MS4A1. tissue of this cell is blood.",
    ]


def test_sentences_do_not_depend_on_column_order_or_normalisation(symphony):
    adata = symphony[:300].copy()
    cellular.tl.cell_sentences(adata, n_genes=30)
    shuffled = adata[:, np.random.default_rng(0).permutation(adata.n_vars)].copy()
    cellular.tl.cell_sentences(shuffled, n_genes=30)
    assert adata.obs["cell_sentence"].tolist() == shuffled.obs["cell_sentence"].tolist()
    normalised = cellular.pp.normalize_log1p(adata, copy=True)
    cellular.tl.cell_sentences(normalised, n_genes=30)
    assert normalised.obs["cell_sentence"].tolist() == adata.obs["cell_sentence"].tolist()


def test_gene_order_follows_expression(symphony):
    adata = symphony[:200].copy()
    cellular.tl.cell_sentences(adata, n_genes=20)
    dense = adata.X.toarray()
    column = {gene: position for position, gene in enumerate(adata.var_names)}
    for cell, sentence in enumerate(adata.obs["cell_sentence"]):
        listed = sentence.removeprefix("Top genes are ").removesuffix(".").split(", ")
        values = dense[cell, [column[gene] for gene in listed]]
        assert np.all(np.diff(values) <= 0), "genes are not in decreasing order of expression"
        assert len(listed) == min(20, int((dense[cell] > 0).sum()))
        assert values[-1] >= np.sort(dense[cell])[::-1][len(listed) - 1], "a more expressed gene was left out"


def test_mask_var_restricts_the_genes_listed(symphony):
    adata = symphony[:100].copy()
    allowed = np.zeros(adata.n_vars, dtype=bool)
    allowed[::3] = True
    adata.var["allowed"] = allowed
    cellular.tl.cell_sentences(adata, n_genes=10, mask_var="allowed")
    listed = {gene for sentence in adata.obs["cell_sentence"] for gene in sentence[14:-1].split(", ")}
    assert listed <= set(adata.var_names[allowed])


def test_backed_file_gives_the_same_sentences_and_is_not_modified(symphony, tmp_path):
    adata = symphony[:150].copy()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    before = path.read_bytes()
    backed = ad.read_h5ad(path, backed="r")
    cellular.tl.cell_sentences(backed, n_genes=15)
    cellular.tl.cell_sentences(adata, n_genes=15)
    assert backed.obs["cell_sentence"].tolist() == adata.obs["cell_sentence"].tolist()
    backed.file.close()
    assert path.read_bytes() == before


def test_bad_arguments_raise_clear_errors(symphony):
    adata = symphony[:20].copy()
    with pytest.raises(KeyError, match="obs_keys"):
        cellular.tl.cell_sentences(adata, obs_keys=["tissue"])
    with pytest.raises(ValueError, match="n_genes"):
        cellular.tl.cell_sentences(adata, n_genes=0)
    with pytest.raises(KeyError, match="mask_var"):
        cellular.tl.cell_sentences(adata, mask_var="highly_variable")
    adata.X = adata.X * -1.0
    with pytest.raises(ValueError, match="negative"):
        cellular.tl.cell_sentences(adata)


def test_label_pairs_come_in_blocks_of_distinct_types_across_batches():
    labels = np.array(["a"] * 90 + ["b"] * 8 + ["c"] * 2 + ["d"] * 1 + [None] * 5, dtype=object)
    batches = np.array(([0, 1] * 60)[: labels.size])
    pairs = label_pairs(labels, n_pairs=3000, block_size=8, batches=batches, seed=0)
    assert pairs.block_size == 3 and len(pairs) == 3000 and np.all(pairs.target == 1)
    assert np.all(labels[pairs.first] == labels[pairs.second])
    assert np.all(pairs.first != pairs.second)
    blocks = labels[pairs.first].reshape(-1, 3)
    assert all(len(set(block)) == 3 for block in blocks), "a step holds two pairs of one type"
    assert not np.isin(np.concatenate([pairs.first, pairs.second]), np.arange(100, 106)).any()
    shares = pd.Series(labels[pairs.first]).value_counts(normalize=True)
    np.testing.assert_allclose(shares.to_numpy(), 1 / 3, atol=1e-9)
    assert np.mean(batches[pairs.first] != batches[pairs.second]) > 0.95


def test_label_pairs_never_pair_a_cell_with_itself_when_a_type_is_in_one_batch():
    labels = np.array(["a"] * 6 + ["b"] * 2)
    batches = np.array(["b1", "b2"] * 3 + ["b1", "b1"])
    pairs = label_pairs(labels, n_pairs=400, block_size=2, batches=batches, seed=0)
    assert np.all(pairs.first != pairs.second)
    assert np.all(labels[pairs.first] == labels[pairs.second])
    across = batches[pairs.first] != batches[pairs.second]
    assert across[labels[pairs.first] == "a"].all() and not across[labels[pairs.first] == "b"].any()


def test_pca_pairs_targets_are_cosines_and_zero_across_groups():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 5)).astype(np.float32)
    groups = np.repeat(["x", "y"], 100)
    pairs = pca_similarity_pairs(vectors, n_pairs=400, n_neighbors=5, groups=groups, seed=1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = np.sum(unit[pairs.first] * unit[pairs.second], axis=1)
    same = groups[pairs.first] == groups[pairs.second]
    np.testing.assert_allclose(pairs.target[same], cosine[same], atol=1e-5)
    assert np.all(pairs.target[~same] == 0)
    near = pairs.target[:200][same[:200]]
    assert near.mean() > pairs.target[200:][same[200:]].mean() + 0.3, "neighbour pairs are not more similar"
