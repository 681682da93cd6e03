"""Queries that measure part of the model's genes: mask-aware encoder, augmentation, serving paths, calibration."""

import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import read_dataset
from helpers import mark_singletons_unlabelled
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

import cellular
from cellular.data import DepthThinning
from cellular.index import calibrate_votes
from cellular.nn import CellularEncoder, masked_layer_norm, random_panel_masks


# ------------------------------------------------------------------------------------------- unit level
def test_masked_layer_norm_with_every_gene_equals_layer_norm():
    torch.manual_seed(0)
    x = torch.randn(7, 40)
    weight, bias = torch.randn(40), torch.randn(40)
    expected = torch.nn.functional.layer_norm(x, (40,), weight, bias, 1e-5)
    got = masked_layer_norm(x, torch.ones(40, dtype=torch.bool), weight, bias, 1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_masked_layer_norm_matches_layer_norm_of_the_measured_genes_and_ignores_the_rest():
    torch.manual_seed(1)
    x = torch.randn(5, 30)
    mask = torch.rand(5, 30) < 0.4
    mask[:, 0] = True
    weight, bias = torch.randn(30), torch.randn(30)
    got = masked_layer_norm(x, mask, weight, bias, 1e-5)
    for row in range(5):
        kept = mask[row]
        naive = torch.nn.functional.layer_norm(x[row, kept], (int(kept.sum()),), weight[kept], bias[kept], 1e-5)
        torch.testing.assert_close(got[row, kept], naive, atol=1e-5, rtol=1e-5)
        assert torch.all(got[row, ~kept] == 0)
    # The values of unmeasured genes never matter.
    noisy = torch.where(mask, x, torch.randn(5, 30) * 100)
    torch.testing.assert_close(masked_layer_norm(noisy, mask, weight, bias, 1e-5), got)
    encoder = CellularEncoder(30, n_latent=4).eval()
    torch.testing.assert_close(encoder(noisy, mask), encoder(x, mask))
    # Without affine parameters (the default input LayerNorm) as well, and for an encoder that has them.
    plain = masked_layer_norm(x, mask, None, None, 1e-5)
    for row in range(5):
        kept = mask[row]
        torch.testing.assert_close(
            plain[row, kept], torch.nn.functional.layer_norm(x[row, kept], (int(kept.sum()),)), atol=1e-5, rtol=1e-5
        )
        assert torch.all(plain[row, ~kept] == 0)
    affine = CellularEncoder(30, n_latent=4, input_affine=True).eval()
    torch.testing.assert_close(affine(noisy, mask), affine(x, mask))


def test_random_panel_masks_keep_the_requested_shares():
    generator = torch.Generator().manual_seed(0)
    masks = random_panel_masks(4000, 200, probability=0.5, min_fraction=0.1, generator=generator)
    kept = masks.float().mean(dim=1)
    complete = kept == 1.0
    assert 0.45 < complete.float().mean() < 0.55
    partial = kept[~complete]
    assert partial.min() >= 0.05 and abs(float(partial.mean()) - 0.55) < 0.05
    assert masks.any(dim=1).all()
    with pytest.raises(ValueError, match="panel masking"):
        random_panel_masks(3, 3, probability=1.5, min_fraction=0.1)


def test_depth_thinning_keeps_a_binomial_share_of_the_counts_and_rescales_libraries():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(3.0, size=(500, 50)).astype(np.float32))
    block = counts.copy()
    factors = np.full(500, 2.0)
    thinning = DepthThinning(probability=1.0, min_fraction=0.25, rng=np.random.default_rng(1))
    new_factors = thinning.apply(block, factors)
    assert (block.toarray() <= counts.toarray()).all()
    kept = np.asarray(block.sum(1)).ravel() / np.asarray(counts.sum(1)).ravel()
    assert 0.55 < kept.mean() < 0.70  # uniform in [0.25, 1] has mean 0.625
    np.testing.assert_allclose(new_factors * np.asarray(block.sum(1)).ravel(), 2.0 * np.asarray(counts.sum(1)).ravel())
    untouched = counts.copy()
    DepthThinning(probability=0.0, min_fraction=0.25, rng=np.random.default_rng(1)).apply(untouched, factors)
    assert (untouched != counts).nnz == 0


def test_calibrated_votes_flatten_with_temperature_and_keep_the_winner():
    shares = np.array([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.0, 0.0, 0.0]])
    sharp, flat = calibrate_votes(shares, 15, 0.5), calibrate_votes(shares, 15, 3.0)
    assert (sharp[:2].argmax(1) == [0, 0]).all() and (flat[:2].argmax(1) == [0, 0]).all()
    assert (flat[:2].max(1) < sharp[:2].max(1)).all()
    np.testing.assert_allclose(flat[:2].sum(1), 1.0)
    assert (flat[2] == 0).all()


# ------------------------------------------------------------------------------------------- real data
def _indexed_model(symphony, **settings):
    reference = symphony.copy()
    mark_singletons_unlabelled(reference)
    cellular.CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = cellular.CELLULAR(reference, **settings)
    model.train(progress_bar=False)
    model.build_reference_index(reference)
    return model, reference


@pytest.fixture(scope="module")
def full_reference(symphony):
    """A model on every gene of pbmc_symphony_3tech (the default reads half of them), otherwise default settings,
    indexed."""
    return _indexed_model(symphony, n_top_genes=symphony.n_vars)


@pytest.fixture(scope="module")
def robust_reference(symphony):
    """The same with panel-robust training: it serves queries lacking genes directly, without its training data."""
    return _indexed_model(symphony, n_top_genes=symphony.n_vars, panel_masking=0.5, depth_thinning=0.5)


@pytest.fixture(scope="module")
def pbmc3k():
    return read_dataset("pbmc3k_seurat")


def _panel(model, query, share, seed=0):
    """``query`` keeping a random ``share`` of the model's genes (among those it has)."""
    shared = [g for g in model.genes if g in set(query.var_names)]
    n_genes = min(len(shared), int(round(share * len(model.genes))))
    genes = shared if n_genes == len(shared) else sorted(np.random.default_rng(seed).choice(shared, n_genes, False))
    return query[:, genes].copy()


def _macro_f1(truth, known, predicted):
    """Macro-F1 over the true classes of cells of trained types (the field benchmark's score)."""
    present = sorted(set(truth[known]))
    return f1_score(truth[known], predicted[known], labels=present, average="macro", zero_division=0.0)


def _mapped_f1(query, truth, known):
    """Forced-choice macro-F1 of a mapped query: the most probable reference class of each cell."""
    classes = np.asarray(query.uns["cellular"]["cellular_map"]["levels"]["cell_type"]["classes"])
    return _macro_f1(truth, known, classes[query.obsm["cellular_cell_type_probabilities"].argmax(axis=1)])


def _pca_knn_f1(reference, query, target_sum, truth, known):
    genes = list(query.var_names)
    joint = ad.concat([reference[:, genes], query])
    cellular.pp.normalize_log1p(joint, target_sum=target_sum)
    x = joint.X.toarray()
    pca = PCA(n_components=50, random_state=0).fit(x[: reference.n_obs])
    labels = reference.obs["cell_type"].astype(str)
    knn = KNeighborsClassifier(n_neighbors=15).fit(pca.transform(x[: reference.n_obs]), labels)
    return _macro_f1(truth, known, knn.predict(pca.transform(x[reference.n_obs :])))


def test_twenty_percent_panel_maps_with_defaults_and_beats_pca_knn(full_reference, pbmc3k):
    model, reference = full_reference
    query = _panel(model, pbmc3k, 0.2)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, model.cell_types)
    cellular.tl.cellular_map(query, model)
    params = query.uns["cellular"]["cellular_map"]["params"]
    assert params["panel_path"] == "refit" and params["n_refit_genes"] == query.n_vars
    assert 0.1 < params["expression_share"] < 0.4
    f1 = _mapped_f1(query, truth, known)
    direct = query.copy()
    cellular.tl.cellular_map(direct, model, panel="direct")
    assert f1 > _mapped_f1(direct, truth, known) + 0.1
    assert f1 >= _pca_knn_f1(reference, query, model.target_sum, truth, known)


def test_uncertainty_grows_as_genes_are_removed_and_flags_the_wrong_labels(robust_reference, pbmc3k):
    model, _ = robust_reference
    uncertainty, confident_wrong, uncertain_wrong = [], [], []
    for share in (1.0, 0.5, 0.2):
        query = _panel(model, pbmc3k, share)
        truth = query.obs["cell_type"].astype(str).to_numpy()
        known = np.isin(truth, model.cell_types)
        cellular.tl.cellular_map(query, model, panel="direct")
        params = query.uns["cellular"]["cellular_map"]["params"]
        assert params["panel_path"] == "direct"
        if share < 1.0:
            assert params["panel_calibrated"] and "cell_type" in params["vote_temperatures"]
        unsure = query.obs["cellular_cell_type_uncertainty"].to_numpy()[known]
        wrong = query.obs["cellular_cell_type"].astype(str).to_numpy()[known] != truth[known]
        uncertainty.append(unsure.mean())
        confident_wrong.append(wrong[unsure < 0.5])
        uncertain_wrong.append(wrong[unsure >= 0.5])
    assert uncertainty[0] < uncertainty[1] < uncertainty[2]
    uncertain_wrong = np.concatenate(uncertain_wrong)
    assert uncertain_wrong.size >= 20
    assert np.concatenate(confident_wrong).mean() < uncertain_wrong.mean()


def test_panel_calibration_makes_the_classifier_less_confident_on_a_small_panel(robust_reference, pbmc3k):
    model, _ = robust_reference
    query = _panel(model, pbmc3k, 0.2)
    calibration = model.calibrate_for_panel(np.isin(model.genes, query.var_names), index=model.reference_index_)
    assert calibration.classifier_temperature > model.calibration_temperature_
    # The head alone: averaging it with the gene classifier would lower the confidence without any calibration.
    cellular.tl.cellular_annotate(query, model, panel="direct", novel_as_unknown=False, gene_classifier_weight=0)
    direct = query.obs["cellular_label_confidence"].to_numpy()
    uncalibrated = model.probabilities_from_embedding(model.get_latent_representation(query, min_gene_overlap=0)).max(1)
    assert direct.mean() < uncalibrated.mean()


def test_mask_aware_model_serves_a_half_panel_better_than_one_trained_without_masks(symphony_split, symphony_model):
    train, test = symphony_split
    # Both without batch moment matching, which also helps a panel query, and on every gene (the panel is a fifth of
    # them): the test isolates the masks.
    models = {}
    for name, masking in (("masked", 0.5), ("plain", 0.0)):
        data = train.copy()
        cellular.CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
        models[name] = cellular.CELLULAR(
            data, n_top_genes=data.n_vars, panel_masking=masking, match_batch_moments=False
        )
        models[name].train(progress_bar=False, classifier=False)
    masked = models["masked"]
    assert masked.module.mask_aware and not models["plain"].module.mask_aware
    truth = test.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, symphony_model.cell_types)
    scores = {}
    for name, model in models.items():
        z_ref = model.get_latent_representation()
        labels = model.adata.obs["cell_type"].astype(str).to_numpy()
        knn = KNeighborsClassifier(n_neighbors=15, metric="cosine").fit(z_ref, labels)
        panel_scores = []
        for panel_seed in (1, 2, 3):
            z = model.get_latent_representation(_panel(model, test, 0.2, seed=panel_seed), min_gene_overlap=0)
            panel_scores.append(f1_score(truth[known], knn.predict(z[known]), average="macro"))
        scores[name] = float(np.mean(panel_scores))
    # Trained identically but for the masks, mean over three random panels (measured: 0.618 vs 0.568 macro-F1 with one
    # torch thread, 0.612 vs 0.568 with two; single panels differ by 0.006 to 0.093).
    assert scores["masked"] > scores["plain"] + 0.025, scores


def test_refit_reads_every_reference_gene_of_a_narrow_panel(symphony, pbmc3k):
    """A default model reads half of Symphony's genes; a query of 200 random genes the two datasets share holds only
    about half of those. The refit trains on all 200, not on the model's half: on this panel the model's half left
    two reference cells without counts and the refit failed."""
    model, reference = _indexed_model(symphony)
    assert len(model.genes) < symphony.n_vars
    shared = np.intersect1d(symphony.var_names, pbmc3k.var_names)
    query = pbmc3k[:, np.random.default_rng(1).choice(shared, 200, replace=False)].copy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, model.cell_types)
    cellular.tl.cellular_map(query, model)
    params = query.uns["cellular"]["cellular_map"]["params"]
    in_model = np.isin(query.var_names, model.genes).sum()
    assert params["panel_path"] == "refit" and params["n_refit_genes"] == query.n_vars > in_model
    assert params["gene_classifier_weight"] == 0.5  # the refitted model's gene classifier joins the vote
    assert _mapped_f1(query, truth, known) >= _pca_knn_f1(reference, query, model.target_sum, truth, known)


def test_refit_model_saves_loads_and_maps_identically(full_reference, pbmc3k, tmp_path):
    model, reference = full_reference
    query = _panel(model, pbmc3k, 0.2)
    restricted = model.restrict_to_genes(query)
    assert restricted.genes == [g for g in model.genes if g in set(query.var_names)]
    assert restricted.cell_types == model.cell_types and restricted.has_classifier and restricted.has_gene_classifier
    restricted.build_reference_index(reference)
    restricted.save(tmp_path / "restricted")
    loaded = cellular.CELLULAR.load(tmp_path / "restricted")
    assert loaded.calibration_cells_.matrix.shape == restricted.calibration_cells_.matrix.shape
    first, second = query.copy(), query.copy()
    cellular.tl.cellular_map(first, restricted)
    cellular.tl.cellular_map(second, loaded)
    np.testing.assert_array_equal(first.obsm["X_cellular"], second.obsm["X_cellular"])
    np.testing.assert_array_equal(first.obs["cellular_cell_type"], second.obs["cellular_cell_type"])
    np.testing.assert_array_equal(
        first.obsm["cellular_cell_type_probabilities"], second.obsm["cellular_cell_type_probabilities"]
    )
    cellular.tl.cellular_annotate(first, restricted)
    cellular.tl.cellular_annotate(second, loaded)
    np.testing.assert_array_equal(first.obs["cellular_label"], second.obs["cellular_label"])


def test_saved_model_calibrates_panels_without_its_training_data(robust_reference, full_reference, pbmc3k, tmp_path):
    model, _ = robust_reference
    model.save(tmp_path / "model")
    loaded = cellular.CELLULAR.load(tmp_path / "model")
    assert loaded.adata is None
    half = _panel(model, pbmc3k, 0.6)
    cellular.tl.cellular_map(half, loaded)
    params = half.uns["cellular"]["cellular_map"]["params"]
    assert params["panel_path"] == "direct" and params["panel_calibrated"]
    tiny = _panel(model, pbmc3k, 0.1)
    with pytest.raises(ValueError, match="Attach the training data"):
        cellular.tl.cellular_map(tiny, loaded)
    with pytest.raises(ValueError, match="restrict_to_genes retrains"):
        loaded.restrict_to_genes(tiny)
    # A model trained without panel masking serves such a query only with its training data.
    full_reference[0].save(tmp_path / "plain")
    with pytest.raises(ValueError, match="trained without panel masking"):
        cellular.tl.cellular_map(half, cellular.CELLULAR.load(tmp_path / "plain"))


def test_a_version_2_model_file_loads_as_a_model_without_panel_masking(symphony_model, symphony_split, tmp_path):
    import json

    symphony_model.save(tmp_path / "model")
    metadata = json.loads((tmp_path / "model" / "model.json").read_text())
    metadata["format_version"] = 2
    for key in ("panel_masking", "min_panel_fraction"):
        del metadata["module_kwargs"][key]
    for key in ("depth_thinning", "train_params", "calibration_cell_names", "files", "tensors", "metadata_sha256"):
        del metadata[key]
    (tmp_path / "model" / "model.json").write_text(json.dumps(metadata))
    old = cellular.CELLULAR.load(tmp_path / "model")
    assert not old.module.mask_aware and old.calibration_cells_ is None
    assert old.depth_thinning["probability"] == 0.0
    query = _panel(old, symphony_split[1], 0.95)
    assert (
        cellular.tl.cellular_annotate(query, old, copy=True).uns["cellular"]["cellular_label"]["params"]["panel_path"]
        == "direct"
    )
    with pytest.raises(ValueError, match="trained without panel masking"):
        cellular.tl.cellular_annotate(_panel(old, symphony_split[1], 0.5), old)


def test_panel_calibration_skips_held_out_cells_without_counts_over_the_panel(symphony_model):
    """A narrow panel leaves some held-out reference cells without counts; they cannot be read as a query of those
    genes, so calibration uses the others instead of failing (it did at 5 % of the genes)."""
    model = symphony_model
    cells = model.calibration_cells_
    present = np.asarray(cells.matrix[0].todense()).ravel() == 0  # every gene the first held-out cell lacks
    empty = np.asarray(cells.matrix[:, np.flatnonzero(present)].sum(axis=1)).ravel() == 0
    assert empty[0] and not empty.all()
    calibration = model.calibrate_for_panel(present)
    assert calibration.classifier_temperature is not None and calibration.gene_classifier_temperature is not None
    assert 0.0 <= calibration.summary["classifier_accuracy"] <= 1.0


def test_refit_leaves_out_reference_cells_without_counts_over_the_panel(symphony_model, symphony_split, caplog):
    """A narrow panel can leave reference cells without a count; the refit is trained and indexed without them
    (it failed on them at 5 % of the model's genes)."""
    model = symphony_model
    train, test = symphony_split
    counts = train[:, model.genes].X
    genes = [g for g, value in zip(model.genes, np.asarray(counts[0].todense()).ravel(), strict=True) if value == 0]
    empty = np.asarray(train[:, genes].X.sum(axis=1)).ravel() == 0
    assert empty[0] and not empty.all()
    query = test[:, genes].copy()
    query = query[np.asarray(query.X.sum(axis=1)).ravel() > 0].copy()
    with caplog.at_level(logging.WARNING, logger="cellular"):
        cellular.tl.cellular_map(query, model, cellular.ReferenceIndex.build(model, train), panel="refit")
    assert f"{int(empty.sum())} of the reference's {train.n_obs} cells have no counts" in caplog.text
    params = query.uns["cellular"]["cellular_map"]["params"]
    assert params["panel_path"] == "refit" and params["n_reference_cells"] == train.n_obs - int(empty.sum())
    truth = query.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, model.cell_types)
    assert (query.obs["cellular_cell_type"].astype(str).to_numpy()[known] == truth[known]).mean() > 0.8


def test_a_refitted_query_names_rows_of_the_given_index_and_joins_only_its_own(symphony_model, symphony_split):
    """Neighbour rows follow the given index even where the refit dropped reference cells; the refitted embedding
    joins only the refitted index, and a later index's levels and metric are honoured."""
    model = symphony_model
    train, _ = symphony_split
    counts = train[:, model.genes].X
    genes = [g for g, value in zip(model.genes, np.asarray(counts[0].todense()).ravel(), strict=True) if value == 0]
    query = train[:, genes].copy()
    query = query[np.asarray(query.X.sum(axis=1)).ravel() > 0][:200].copy()
    index = cellular.ReferenceIndex.build(model, train)
    cellular.tl.cellular_map(query, model, index, panel="refit")
    params = query.uns["cellular"]["cellular_map"]["params"]
    assert params["panel_path"] == "refit" and params["n_reference_cells"] < index.n_cells
    nearest = np.asarray(index.cell_names)[query.obsm["cellular_neighbor_indices"][:, 0]]
    assert (nearest == query.obs_names.to_numpy()).mean() > 0.95  # training cells find themselves
    with pytest.raises(ValueError, match="refitted on its genes"):
        cellular.tl.join_reference_query(query, index)
    refitted_index = model.restrict_to_genes(query).reference_index_
    joint = cellular.tl.join_reference_query(query, refitted_index)
    assert joint.n_obs == refitted_index.n_cells + query.n_obs
    euclidean = cellular.ReferenceIndex.build(model, train, metric="euclidean")
    cellular.tl.cellular_map(query, model, euclidean, panel="refit")
    assert query.uns["cellular"]["cellular_map"]["params"]["metric"] == "euclidean"


def test_refit_rejects_unreadable_query_values_before_training(symphony_model, symphony_split):
    """A query the model cannot read (here fractional values read as counts) is refused before the refit trains."""
    model = symphony_model
    _, test = symphony_split
    query = test[:, model.genes[:100]].copy()
    query.X = query.X.astype(np.float32) * 0.5
    refits = dict(model.__dict__.get("_restricted_models", {}))
    with pytest.raises(ValueError, match="holds non-integer values up to .* they look like corrected or rescaled"):
        cellular.tl.cellular_annotate(query, model, panel="refit")
    assert model.__dict__.get("_restricted_models", {}) == refits
    with pytest.raises(ValueError, match="holds non-integer values"):
        model.check_query_values(query)
    with pytest.raises(ValueError, match="they look like raw counts"):  # too large to be log-normalised values
        model.check_query_values(query, log_normalized=True)
    query.X = query.X.log1p()
    model.check_query_values(query, log_normalized=True)  # readable as log-normalised values


def test_genes_named_in_a_var_column_map_as_named_by_var_names(symphony_model, symphony_split):
    """The fix the genes-in-another-column error names (gene_id_key=<column>) serves the query exactly as if its
    genes were named by var_names."""
    model = symphony_model
    _, test = symphony_split
    by_symbol = test.copy()
    by_id = test.copy()
    by_id.var["symbol"] = by_id.var_names.to_numpy()
    by_id.var_names = [f"ENSG{i:011d}" for i in range(by_id.n_vars)]
    with pytest.raises(ValueError, match=r"match adata.var\['symbol'\]"):
        cellular.tl.cellular_annotate(by_id.copy(), model)
    cellular.tl.cellular_annotate(by_symbol, model)
    cellular.tl.cellular_annotate(by_id, model, gene_id_key="symbol")
    np.testing.assert_array_equal(by_id.obs["cellular_label"].to_numpy(), by_symbol.obs["cellular_label"].to_numpy())
    key = "cellular_label_probabilities"
    np.testing.assert_array_equal(by_id.obsm[key], by_symbol.obsm[key])
