"""Reference mapping on real data: pbmc3k_seurat onto a model and index built on pbmc_symphony_3tech."""

import logging
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import read_dataset
from helpers import mark_singletons_unlabelled
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

import cellular

LINEAGE = {
    "B cell": "lymphoid",
    "CD4 T cell": "lymphoid",
    "CD8 T cell": "lymphoid",
    "NK cell": "lymphoid",
    "CD14 Monocyte": "myeloid",
    "CD16 Monocyte": "myeloid",
    "Dendritic cell": "myeloid",
    "Megakaryocyte/Platelet": "other",
    "HSPC": "other",
}


@pytest.fixture(scope="module")
def atlas(symphony):
    """A model trained on all of pbmc_symphony_3tech, with a two-level reference index (cell type, lineage)."""
    reference = symphony.copy()
    mark_singletons_unlabelled(reference)
    reference.obs["lineage"] = reference.obs["cell_type"].astype(str).map(LINEAGE).fillna("Unknown")
    cellular.CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = cellular.CELLULAR(reference)
    model.train(progress_bar=False, classifier=False)
    model.build_reference_index(reference, label_keys=["cell_type", "lineage"])
    return model, reference


@pytest.fixture(scope="module")
def pbmc3k():
    return read_dataset("pbmc3k_seurat")


def _known(query, model):
    truth = query.obs["cell_type"].astype(str).to_numpy()
    return truth, np.isin(truth, model.cell_types)


def _scores(truth, predicted):
    """Accuracy and macro-F1 over the true classes ("Unknown" predictions count as wrong)."""
    return float((predicted == truth).mean()), f1_score(truth, predicted, labels=np.unique(truth), average="macro")


def _pca_knn_scores(reference, query, known_types):
    """The simple baseline: PCA of the shared genes (fitted on the reference), 15-NN vote."""
    joint = ad.concat([reference, query], join="inner", label="source", keys=["reference", "query"])
    cellular.pp.normalize_log1p(joint, target_sum=1e4)
    is_reference = (joint.obs["source"] == "reference").to_numpy()
    x = joint.X.toarray()
    pca = PCA(n_components=50, random_state=0).fit(x[is_reference])
    reference_labels = reference.obs["cell_type"].astype(str).to_numpy()
    labelled = np.isin(reference_labels, known_types)
    knn = KNeighborsClassifier(n_neighbors=15).fit(pca.transform(x[is_reference])[labelled], reference_labels[labelled])
    truth = query.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, known_types)
    return _scores(truth[known], knn.predict(pca.transform(x[~is_reference])[known])), joint.n_vars


def test_map_pbmc3k_beats_pca_knn_on_shared_genes(atlas, pbmc3k):
    model, reference = atlas
    query = pbmc3k.copy()
    cellular.tl.cellular_map(query, model)
    truth, known = _known(query, model)
    predicted = query.obs["cellular_cell_type"].astype(str).to_numpy()
    (accuracy, macro_f1), ((baseline_accuracy, baseline_f1), n_shared) = (
        _scores(truth[known], predicted[known]),
        _pca_knn_scores(reference, pbmc3k, model.cell_types),
    )
    assert n_shared == 1342
    # Macro-F1 (the project's mapping metric) must beat the baseline. Accuracy is dominated by the CD4 T cells
    # (45 % of pbmc3k), where the embedding confuses more CD4 with CD8 T cells than PCA does (measured 0.893 vs
    # 0.917, see the benchmarks page, and 0.886 vs 0.917 with scikit-learn 1.9 / pynndescent 0.7), so it is held
    # to within 4 points of the baseline.
    assert macro_f1 >= baseline_f1, (macro_f1, baseline_f1)
    assert accuracy >= baseline_accuracy - 0.04, (accuracy, baseline_accuracy)
    # The second level is transferred too, and agrees with the first level's lineage almost everywhere.
    lineage = query.obs["cellular_lineage"].astype(str).to_numpy()
    assert (pd.Series(predicted).map(LINEAGE).to_numpy() == lineage).mean() > 0.97

    record = query.uns["cellular"]["cellular_map"]
    n_matched = len(set(model.genes) & set(query.var_names))
    assert record["params"]["n_genes_matched"] == n_matched and record["params"]["levels"] == ["cell_type", "lineage"]
    assert record["levels"]["cell_type"]["counts"]["n_cells"].sum() == query.n_obs
    assert list(record["distance_summary"].columns) == ["query", "reference"]
    assert query.obsm["X_cellular"].shape == (query.n_obs, model.n_latent)
    assert query.obsm["cellular_neighbor_indices"].shape == (query.n_obs, 15)
    probabilities = query.obsm["cellular_cell_type_probabilities"]
    np.testing.assert_allclose(
        query.obs["cellular_cell_type_uncertainty"], 1 - probabilities.max(axis=1), rtol=1e-5, atol=1e-6
    )


def test_query_is_not_modified_beyond_documented_keys(atlas, pbmc3k):
    model, _ = atlas
    query = pbmc3k.copy()
    before_x, before_obs, before_var = query.X.copy(), query.obs.copy(), query.var.copy()
    before_obsm = set(query.obsm)
    cellular.tl.cellular_map(query, model, key_added="mapped")
    assert (query.X != before_x).nnz == 0
    pd.testing.assert_frame_equal(query.var, before_var)
    pd.testing.assert_frame_equal(query.obs[before_obs.columns], before_obs)
    added = set(query.obs.columns) - set(before_obs.columns)
    assert added == {
        "mapped_cell_type",
        "mapped_cell_type_uncertainty",
        "mapped_lineage",
        "mapped_lineage_uncertainty",
        "mapped_distance",
        "mapped_distance_pvalue",
    }
    assert set(query.obsm) - before_obsm == {
        "X_mapped",
        "mapped_cell_type_probabilities",
        "mapped_lineage_probabilities",
        "mapped_neighbor_indices",
        "mapped_neighbor_distances",
    }
    copied = cellular.tl.cellular_map(pbmc3k, model, copy=True)
    assert "cellular_cell_type" in copied.obs and "cellular_cell_type" not in pbmc3k.obs


def test_gene_order_and_missing_genes(atlas, pbmc3k, caplog):
    model, _ = atlas
    query = pbmc3k.copy()
    cellular.tl.cellular_map(query, model)

    shuffled = pbmc3k[:, np.random.default_rng(0).permutation(pbmc3k.n_vars)].copy()
    cellular.tl.cellular_map(shuffled, model)
    np.testing.assert_array_equal(shuffled.obsm["X_cellular"], query.obsm["X_cellular"])
    np.testing.assert_array_equal(shuffled.obs["cellular_cell_type"], query.obs["cellular_cell_type"])
    np.testing.assert_array_equal(shuffled.obsm["cellular_neighbor_indices"], query.obsm["cellular_neighbor_indices"])

    present = [gene for gene in model.genes if gene in pbmc3k.var_names]
    rng = np.random.default_rng(1)
    dropped = set(rng.choice(model.genes, int(0.3 * len(model.genes)), replace=False))
    reduced = pbmc3k[:, [g for g in pbmc3k.var_names if g not in dropped]].copy()
    with caplog.at_level(logging.WARNING, logger="cellular"):
        cellular.tl.cellular_map(reduced, model)
    assert any("missing from the data" in message for message in caplog.messages)
    n_matched = reduced.uns["cellular"]["cellular_map"]["params"]["n_genes_matched"]
    assert n_matched == len(set(present) - dropped)
    truth, known = _known(reduced, model)
    predicted = reduced.obs["cellular_cell_type"].astype(str).to_numpy()
    assert (predicted[known] == truth[known]).mean() > 0.8

    kept = rng.choice(present, int(0.1 * len(model.genes)), replace=False)
    with pytest.raises(ValueError, match=r"at least 50% are required. First missing genes: \['"):
        cellular.tl.cellular_map(pbmc3k[:, kept].copy(), model, min_gene_overlap=0.5)


@pytest.mark.parametrize("backend", ["pynndescent", "faiss"])
def test_approximate_search_agrees_with_exact_and_model_carries_index(atlas, pbmc3k, tmp_path, monkeypatch, backend):
    from cellular.index import _reference

    monkeypatch.setattr(_reference, "EXACT_SEARCH_BUDGET", 0)  # every query through the graph search
    model, reference = atlas
    query_embedding = model.get_latent_representation(pbmc3k)
    exact = model.reference_index_
    approximate = cellular.ReferenceIndex.build(model, reference, ["cell_type"], backend=backend, n_neighbors=15)
    exact_neighbours, _ = exact.query(query_embedding, k=15)
    approximate_neighbours, _ = approximate.query(query_embedding, k=15)
    overlap = np.mean(
        [len(set(a) & set(b)) / 15 for a, b in zip(exact_neighbours, approximate_neighbours, strict=True)]
    )
    assert overlap >= 0.95, overlap

    approximate.save(tmp_path / "index")
    reloaded = cellular.ReferenceIndex.load(tmp_path / "index")
    for a, b in zip(approximate.query(query_embedding), reloaded.query(query_embedding), strict=True):
        np.testing.assert_array_equal(a, b)

    model.save(tmp_path / "model")
    loaded = cellular.CELLULAR.load(tmp_path / "model")
    assert loaded.fingerprint == model.fingerprint
    assert loaded.reference_index_ is not None
    first = cellular.tl.cellular_map(pbmc3k, model, copy=True)
    second = cellular.tl.cellular_map(pbmc3k, loaded, copy=True)
    np.testing.assert_array_equal(first.obs["cellular_cell_type"], second.obs["cellular_cell_type"])
    np.testing.assert_array_equal(first.obsm["cellular_neighbor_indices"], second.obsm["cellular_neighbor_indices"])


@pytest.fixture(scope="module")
def atlas_without_b_cells(symphony):
    """The second tutorial's reference: a default model (classifier stage included) on Symphony without B cells."""
    reference = symphony[symphony.obs["cell_type"] != "B cell"].copy()
    reference.obs["cell_type"] = reference.obs["cell_type"].cat.remove_unused_categories()
    mark_singletons_unlabelled(reference)
    cellular.CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = cellular.CELLULAR(reference)
    model.train(progress_bar=False)
    model.build_reference_index(reference, label_keys=["cell_type"])
    return model, reference


def test_distance_pvalues_are_calibrated_on_held_out_cells_read_as_a_query(atlas_without_b_cells, pbmc3k):
    """pbmc3k from another lab onto Symphony without its B cells (the query lacks 170 of the model's genes and is
    served by the model itself). Calibrated on the model's held-out cells read as a query, under the query's panel
    (seed 0: 7.5 %) or with every gene (the index's own calibration, 7.0 %), at most 10 % of the known types' cells
    get a distance p-value <= 0.05, and the unseen B cells nearly all do; calibrated on the reference cells
    themselves (trained on, read with their own batch's moments) the same distances flag 19 % of the known cells."""
    model, reference = atlas_without_b_cells
    index = model.reference_index_
    assert index.calibration_source == "held-out cells read as a query"
    query = pbmc3k.copy()
    cellular.tl.cellular_map(query, model)
    params = query.uns["cellular"]["cellular_map"]["params"]
    assert params["panel_path"] == "direct"
    assert params["distance_calibration"] == "held-out cells read under the query's gene panel"
    distances = query.obs["cellular_distance"].to_numpy()
    panel = model.calibrate_for_panel(np.isin(model.genes, query.var_names), index=index)
    pvalues = query.obs["cellular_distance_pvalue"].to_numpy()
    np.testing.assert_allclose(pvalues, cellular.metrics.conformal_pvalues(panel.neighbor_distances, distances))
    is_b_cell = (query.obs["cell_type"] == "B cell").to_numpy()
    on_reference_cells = cellular.ReferenceIndex.from_embedding(
        index.embedding, {"cell_type": reference.obs["cell_type"].to_numpy()}, index.cell_names
    )
    calibrations = {
        "panel": pvalues,
        "held-out": cellular.metrics.conformal_pvalues(index.reference_mean_distances(15), distances),
        "reference cells": cellular.metrics.conformal_pvalues(
            on_reference_cells.reference_mean_distances(15), distances
        ),
    }
    known_flagged = {name: float((values <= 0.05)[~is_b_cell].mean()) for name, values in calibrations.items()}
    b_cells_flagged = {name: float((values <= 0.05)[is_b_cell].mean()) for name, values in calibrations.items()}
    assert known_flagged["panel"] <= 0.10 and known_flagged["held-out"] <= 0.10, known_flagged
    assert b_cells_flagged["panel"] >= 0.9 and b_cells_flagged["held-out"] >= 0.9, b_cells_flagged
    assert known_flagged["reference cells"] >= known_flagged["held-out"] + 0.05, known_flagged
    # An index of cells that lacks some of the held-out ones keeps the reference-cell calibration.
    half = reference[reference.obs["batch"] != reference.obs["batch"].iloc[0]].copy()
    assert cellular.ReferenceIndex.build(model, half).calibration_source == "reference cells"
    # So does a model whose calibration cells are training cells (nothing was held out of encoder training).
    unheld = reference.copy()
    cellular.CELLULAR.setup_anndata(unheld, labels_key="cell_type", batch_key="batch")
    trained_on_all = cellular.CELLULAR(unheld)
    trained_on_all.train(max_epochs=2, train_size=1.0, progress_bar=False)
    assert trained_on_all.classifier_summary_["calibration_source"] == "training"
    assert trained_on_all.embed_calibration_cells() is None
    assert trained_on_all.build_reference_index(unheld).calibration_source == "reference cells"
    with pytest.raises(ValueError, match="distance_calibration must be"):
        index.transfer_labels(index.embedding[:5], distance_calibration=np.array([0.1, np.nan]))


def test_annotate_keeps_a_rare_type_and_names_the_types_that_lose_most_cells_to_unknown(
    atlas_without_b_cells, pbmc3k, caplog
):
    """pbmc3k onto Symphony without B cells. Symphony has 7 megakaryocytes: far fewer than the 15 neighbours the
    novelty score's gene distance averages, so the distance of a cell nearest to them is scaled by how far apart
    their own cells lie (without that, 13 of pbmc3k's 14 megakaryocytes were labelled Unknown); the unseen B cells
    still are. ``counts`` records, per likeliest type, the cells labelled Unknown, and one warning names exactly the
    types that lose most of their (at least 5) cells so."""
    model, _ = atlas_without_b_cells
    query = pbmc3k.copy()
    with caplog.at_level(logging.WARNING, logger="cellular"):
        cellular.tl.cellular_annotate(query, model)
    truth = query.obs["cell_type"].to_numpy()
    labels = query.obs["cellular_label"].to_numpy()
    megakaryocytes = truth == "Megakaryocyte/Platelet"
    assert (labels[megakaryocytes] == "Megakaryocyte/Platelet").mean() >= 0.7, labels[megakaryocytes]
    assert (labels[truth == "B cell"] == "Unknown").mean() >= 0.8
    counts = query.uns["cellular"]["cellular_label"]["counts"]
    likeliest = np.asarray(model.cell_types)[query.obsm["cellular_label_probabilities"].argmax(1)]
    unknown = labels == "Unknown"
    n_likeliest = pd.Series(likeliest).value_counts().reindex(model.cell_types, fill_value=0)
    n_unknown = pd.Series(likeliest[unknown]).value_counts().reindex(model.cell_types, fill_value=0)
    np.testing.assert_array_equal(counts.loc[model.cell_types, "n_likeliest"], n_likeliest)
    np.testing.assert_array_equal(counts.loc[model.cell_types, "n_unknown"], n_unknown)
    assert counts.loc["Unknown", "n_cells"] == unknown.sum()
    lost = [name for name in model.cell_types if n_likeliest[name] >= 5 and n_unknown[name] >= 0.5 * n_likeliest[name]]
    assert lost, counts  # the B cells' likeliest types
    assert (truth[np.isin(likeliest, lost) & unknown] == "B cell").mean() >= 0.8
    warnings = [message for message in caplog.messages if message.startswith("Most cells whose likeliest type")]
    assert len(warnings) == 1
    assert re.findall(r"'([^']+)' \(\d+ of \d+\)", warnings[0]) == lost
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cellular"):
        cellular.tl.cellular_annotate(query, model, novel_as_unknown=False)
    assert not any(message.startswith("Most cells whose likeliest type") for message in caplog.messages)


def test_join_reference_query(atlas, pbmc3k):
    model, reference = atlas
    query = pbmc3k.copy()
    cellular.tl.cellular_map(query, model)
    joint = cellular.tl.join_reference_query(query, model.reference_index_)
    assert joint.n_obs == reference.n_obs + query.n_obs
    assert joint.obs["dataset"].value_counts().to_dict() == {"query": query.n_obs, "reference": reference.n_obs}
    np.testing.assert_array_equal(joint.obsm["X_cellular"][reference.n_obs :], query.obsm["X_cellular"])
    reference_labels = joint.obs["cell_type"].astype(str).to_numpy()[: reference.n_obs]
    np.testing.assert_array_equal(reference_labels, reference.obs["cell_type"].astype(str).to_numpy())
    sample = cellular.tl.join_reference_query(query, model.reference_index_, max_reference_cells=100)
    assert (sample.obs["dataset"] == "reference").sum() == 100
    with pytest.raises(KeyError, match="run cellular.tl.cellular_map"):
        cellular.tl.join_reference_query(pbmc3k, model.reference_index_)


def test_mapping_errors(atlas, symphony_model, pbmc3k):
    model, _ = atlas
    with pytest.raises(ValueError, match="different model"):
        cellular.tl.cellular_map(pbmc3k.copy(), symphony_model, model.reference_index_)
    with pytest.raises(ValueError, match="No reference index"):
        cellular.tl.cellular_map(pbmc3k.copy(), symphony_model)
    with pytest.raises(TypeError, match="ReferenceIndex"):
        cellular.tl.cellular_map(pbmc3k.copy(), model, index="atlas")
    with pytest.raises(KeyError, match="label_keys"):
        model.build_reference_index(pbmc3k, label_keys=["celltype"])


def test_gene_id_matching():
    adata = cellular.data.synthetic_counts(600, 200, n_types=3, n_batches=2, seed=0)
    adata.var["gene_ids"] = [f"ENSG{i:05d}" for i in range(adata.n_vars)]
    cellular.CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch", gene_id_key="gene_ids")
    model = cellular.CELLULAR(adata, n_latent=8, n_top_genes=100)
    model.train(max_epochs=3, progress_bar=False, classifier=False)
    assert model.gene_ids == list(adata.var.loc[model.genes, "gene_ids"])
    # A query whose symbols differ (renamed) but whose ids match, in another gene order.
    query = adata[:50, ::-1].copy()
    query.var_names = [f"symbol_{i}" for i in range(query.n_vars)]
    expected = model.get_latent_representation(adata[:50].copy())
    np.testing.assert_array_equal(model.get_latent_representation(query, gene_id_key="gene_ids"), expected)
    with pytest.raises(ValueError, match="gene_id_key"):
        model.get_latent_representation(query)
    with pytest.raises(KeyError, match="gene_id_key"):
        cellular.CELLULAR.setup_anndata(adata.copy(), labels_key="cell_type", gene_id_key="ensembl")
