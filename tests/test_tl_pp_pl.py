"""scanpy-style functions: tl.cellular_embed, pp.normalize_log1p (the pl functions are tested in test_pl.py)."""

import numpy as np
import pytest

import cellular
from cellular import CELLULAR


@pytest.fixture(scope="module")
def small(symphony):
    data = symphony[symphony.obs["batch"] == "3pv2"].copy()
    counts = data.obs["cell_type"].value_counts()
    return data[data.obs["cell_type"].isin(counts[counts >= 2].index)].copy()


@pytest.fixture(scope="module")
def small_model(small):
    reference = small.copy()
    CELLULAR.setup_anndata(reference, labels_key="cell_type")
    model = CELLULAR(reference, n_latent=16, n_top_genes=500)
    model.train(max_epochs=5, progress_bar=False)
    return model


def test_cellular_embed_writes_documented_slots_only(small, small_model):
    query = small.copy()
    obs_before, var_before = query.obs.copy(), query.var.copy()
    assert cellular.tl.cellular_embed(query, small_model, key_added="X_emb") is None
    np.testing.assert_array_equal(query.obsm["X_emb"], small_model.get_latent_representation(small))
    params = query.uns["cellular"]["params"]
    assert params["key_added"] == "X_emb" and params["n_genes_matched"] == len(small_model.genes)
    assert params["genes"] == small_model.genes and params["model"]["n_latent"] == 16
    assert query.obs.equals(obs_before) and query.var.equals(var_before)
    assert set(query.obsm) == {"X_emb"} and set(query.uns) == {"cellular", "provenance"}


def test_cellular_embed_copy(small, small_model):
    query = small.copy()
    result = cellular.tl.cellular_embed(query, small_model, copy=True)
    assert "X_cellular" in result.obsm and "X_cellular" not in query.obsm


# A small model trained in seconds when cellular_embed is given no model.
QUICK_TRAINING = {
    "max_epochs": 2,
    "model_kwargs": {"n_latent": 8, "n_top_genes": 200},
    "train_kwargs": {"progress_bar": False},
}


def test_cellular_embed_trains_when_no_model_given(small):
    data = small.copy()
    columns_before = list(data.obs.columns)
    model = cellular.tl.cellular_embed(
        data,
        labels_key="cell_type",
        **QUICK_TRAINING,
    )
    assert isinstance(model, CELLULAR) and model.is_trained
    assert data.obsm["X_cellular"].shape == (data.n_obs, 8)
    assert list(data.obs.columns) == columns_before  # no _scvi_* columns added to the user's data
    assert data.uns["cellular"]["params"]["trained_here"] is True

    # Trained to match genes on an id column: the model records the ids and the cells are embedded by them.
    data = small.copy()
    data.var["gene_ids"] = [f"ENSG{i:05d}" for i in range(data.n_vars)]
    model = cellular.tl.cellular_embed(
        data,
        labels_key="cell_type",
        gene_id_key="gene_ids",
        **QUICK_TRAINING,
    )
    assert model.gene_ids == list(data.var.loc[model.genes, "gene_ids"])
    assert data.uns["cellular"]["params"]["n_genes_matched"] == 200
    with pytest.raises(KeyError, match="gene_id_key='ids' is not a column of adata.var"):
        cellular.tl.cellular_embed(data, labels_key="cell_type", gene_id_key="ids", max_epochs=1)


def test_cellular_embed_trains_on_a_layer_and_embeds_that_layer(small):
    data = small.copy()
    data.layers["counts"] = data.X.copy()
    cellular.pp.normalize_log1p(data)  # X now holds log values, the counts stay in the layer
    model = cellular.tl.cellular_embed(
        data,
        labels_key="cell_type",
        layer="counts",
        **QUICK_TRAINING,
    )
    counts_only = small.copy()
    np.testing.assert_allclose(data.obsm["X_cellular"], model.get_latent_representation(counts_only), atol=1e-5)
    assert data.uns["cellular"]["params"]["layer"] == "counts"


def test_cellular_embed_bad_arguments(small, small_model):
    with pytest.raises(ValueError, match="labels_key"):
        cellular.tl.cellular_embed(small.copy())
    with pytest.raises(KeyError, match="celltype"):
        cellular.tl.cellular_embed(small.copy(), labels_key="celltype")
    with pytest.raises(KeyError, match="layer 'counts' not found"):
        cellular.tl.cellular_embed(small.copy(), labels_key="cell_type", layer="counts")
    with pytest.raises(ValueError, match="only apply when training"):
        cellular.tl.cellular_embed(small.copy(), small_model, labels_key="cell_type")


def test_normalize_log1p_matches_formula(small):
    data = small.copy()
    totals = np.asarray(data.X.sum(1)).ravel()
    cellular.pp.normalize_log1p(data, key_added="log")
    target = float(np.median(totals))
    expected = np.log1p(small.X.toarray() / totals[:, None] * target)
    np.testing.assert_allclose(data.layers["log"].toarray(), expected, rtol=1e-5, atol=1e-6)
    assert data.uns["cellular_normalization"]["target_sum"] == pytest.approx(target)
    assert (data.X != small.X).nnz == 0  # X untouched when key_added is given
    log = cellular.pp.normalize_log1p(small, target_sum=1e4, copy=True)
    np.testing.assert_allclose(log.X.toarray(), np.log1p(small.X.toarray() / totals[:, None] * 1e4), rtol=1e-5)
    with pytest.raises(ValueError, match="non-integer"):
        cellular.pp.normalize_log1p(log)


@pytest.mark.parametrize("n_top_genes", [300, 1000])
def test_gene_selection_equals_scanpy_seurat_flavour_and_reads_in_chunks(symphony, n_top_genes, monkeypatch):
    """The model's gene choice is computed from per-gene moments (so backed files are read once, in chunks); it
    must be scanpy's Seurat-flavour selection exactly."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    from cellular.data import read_expression

    adata = symphony.copy()
    expression, _ = read_expression(adata, list(adata.var_names), layer=None, log_normalized=False, target_sum=1e4)
    log_expression = expression.normalized_sparse()
    expressed = np.asarray((log_expression != 0).sum(axis=0)).reshape(-1) > 0
    names = np.asarray(adata.var_names)
    frame = ad.AnnData(X=log_expression[:, expressed], var=pd.DataFrame(index=pd.Index(names[expressed])))
    table = sc.pp.highly_variable_genes(frame, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
    expected = [g for g in names if g in set(frame.var_names[np.asarray(table["highly_variable"], dtype=bool)])]

    assert cellular.pp.highly_variable_genes(log_expression, names, n_top_genes) == expected
    monkeypatch.setattr("cellular.data._backed.ROW_CHUNK", 97)  # many chunks
    assert cellular.pp.highly_variable_genes(expression, names, n_top_genes) == expected
