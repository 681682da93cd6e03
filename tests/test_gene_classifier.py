"""The gene classifier (a logistic regression on the encoder's inputs) and its place in label transfer."""

import numpy as np
import pytest
import torch
from conftest import read_dataset
from helpers import mark_singletons_unlabelled
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

import cellular
from cellular.nn import ABSENT_TYPE_LOGIT, fit_gene_classifier


def test_fit_matches_scikit_learns_logistic_regression(symphony):
    """The same objective as scikit-learn's multinomial LogisticRegression(C): the naive reference."""
    adata = symphony.copy()
    cellular.pp.normalize_log1p(adata, target_sum=1e4)
    x = adata[:, :400].X.toarray().astype(np.float32)
    labels = adata.obs["cell_type"].cat.codes.to_numpy()
    fit_rows = np.random.default_rng(0).random(adata.n_obs) < 0.7
    ours = fit_gene_classifier(x[fit_rows], labels[fit_rows], labels.max() + 2, inverse_regularization=0.1)
    with torch.no_grad():
        probabilities = torch.softmax(ours(torch.from_numpy(x[~fit_rows])), dim=1).numpy()
    theirs = LogisticRegression(C=0.1, max_iter=1000, tol=1e-6).fit(x[fit_rows], labels[fit_rows])
    reference = theirs.predict_proba(x[~fit_rows])
    present = np.unique(labels[fit_rows])
    assert (probabilities[:, present].argmax(1) == reference.argmax(1)).mean() > 0.99
    assert np.abs(probabilities[:, present] - reference).mean() < 0.005
    # The extra type has no cells: a finite, negligible logit, so its probability is zero.
    assert ours.linear.bias[-1] == ABSENT_TYPE_LOGIT and probabilities[:, -1].max() < 1e-30


@pytest.fixture(scope="module")
def kang_onto_symphony(symphony):
    """The field benchmark's hardest map pair: a default model of Symphony on the genes it shares with Kang, and
    Kang's interferon-stimulated PBMCs as the query from another lab."""
    kang = read_dataset("pbmc_kang2018_ifnb_subset")
    shared = symphony.var_names.intersection(kang.var_names)
    reference = symphony[:, shared].copy()
    mark_singletons_unlabelled(reference)
    cellular.CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = cellular.CELLULAR(reference)
    model.train(progress_bar=False)
    model.build_reference_index(reference)
    return model, kang[:, shared].copy()


def _macro_f1(query, model, key):
    truth = query.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, model.cell_types)
    classes = np.asarray(query.uns["cellular"][f"{key}_map"]["levels"]["cell_type"]["classes"])
    predicted = classes[query.obsm[f"{key}_cell_type_probabilities"].argmax(axis=1)]
    return f1_score(truth[known], predicted[known], labels=np.unique(truth[known]), average="macro")


def test_map_averages_the_vote_with_the_gene_classifier_and_beats_the_vote_alone(kang_onto_symphony):
    model, kang = kang_onto_symphony
    assert model.has_gene_classifier and model.gene_classifier_summary_["calibration_accuracy"] > 0.8
    query = kang.copy()
    cellular.tl.cellular_map(query, model, key_added="blend")
    cellular.tl.cellular_map(query, model, key_added="vote", gene_classifier_weight=0)
    assert query.uns["cellular"]["blend_map"]["params"]["gene_classifier_weight"] == 0.5
    assert query.uns["cellular"]["vote_map"]["params"]["gene_classifier_weight"] == 0.0
    # Exactly the documented average, column by column (the index's classes are the model's types here).
    genes = model.get_gene_classifier_probabilities(kang)
    classes = query.uns["cellular"]["blend_map"]["levels"]["cell_type"]["classes"]
    expected = 0.5 * query.obsm["vote_cell_type_probabilities"] + 0.5 * genes[classes].to_numpy()
    np.testing.assert_allclose(query.obsm["blend_cell_type_probabilities"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(query.obs["blend_cell_type_uncertainty"], 1 - expected.max(axis=1), rtol=1e-5, atol=1e-6)
    # Measured on this pair: 0.864 against the vote's 0.844 (field benchmark, seed 0).
    blend, vote = _macro_f1(query, model, "blend"), _macro_f1(query, model, "vote")
    assert blend >= vote + 0.005, (blend, vote)


def test_gene_classifier_saves_loads_and_maps_identically(kang_onto_symphony, tmp_path):
    model, kang = kang_onto_symphony
    model.save(tmp_path / "model")
    loaded = cellular.CELLULAR.load(tmp_path / "model")
    assert loaded.has_gene_classifier and loaded.gene_classifier_summary_ == model.gene_classifier_summary_
    for name, tensor in model.gene_classifier_.state_dict().items():
        assert torch.equal(tensor, loaded.gene_classifier_.state_dict()[name])
    first, second = kang.copy(), kang.copy()
    cellular.tl.cellular_map(first, model)
    cellular.tl.cellular_map(second, loaded)
    np.testing.assert_array_equal(
        first.obsm["cellular_cell_type_probabilities"], second.obsm["cellular_cell_type_probabilities"]
    )
    # Without the classifier stage there is no gene classifier, and mapping uses the vote alone.
    loaded.gene_classifier_ = None
    third = kang.copy()
    cellular.tl.cellular_map(third, loaded)
    assert third.uns["cellular"]["cellular_map"]["params"]["gene_classifier_weight"] == 0.0


def test_probe_uncertainty_is_the_entropy_of_the_calibrated_classifier_with_absent_genes_at_the_mean(symphony):
    """The novelty part reads the gene classifier exactly: the naive entropy of softmax(logits / temperature), with
    the genes a query lacks read at the training mean (as ``GeneLinearClassifier`` does with its mask)."""
    from cellular.model._novelty_spaces import LinearProbe
    from cellular.nn import MIN_ENTROPY

    adata = symphony.copy()
    cellular.pp.normalize_log1p(adata, target_sum=1e4)
    x = adata[:, :300].X.toarray().astype(np.float32)
    labels = adata.obs["cell_type"].cat.codes.to_numpy()
    classifier = fit_gene_classifier(x[:800], labels[:800], labels.max() + 1)
    state = {name: value.numpy() for name, value in classifier.state_dict().items()}
    probe = LinearProbe(state["mean"], state["linear.weight"], state["linear.bias"], temperature=1.7)
    present = np.random.default_rng(0).random(x.shape[1]) < 0.4
    for mask in (None, present):
        with torch.no_grad():
            logits = classifier(torch.from_numpy(x[800:]), None if mask is None else torch.from_numpy(mask))
        naive = torch.distributions.Categorical(logits=logits / 1.7).entropy().numpy()
        np.testing.assert_allclose(probe.uncertainty(x[800:], mask), naive, rtol=1e-4, atol=1e-5)
    # exact where probabilities underflow (a sharp temperature): the naive float64 entropy
    sharp = LinearProbe(probe.mean, probe.weight, probe.bias, temperature=0.05)
    with torch.no_grad():
        logits = classifier(torch.from_numpy(x[800:])).double() / 0.05
    naive = torch.distributions.Categorical(logits=logits).entropy().numpy()
    np.testing.assert_allclose(sharp.uncertainty(x[800:]), np.maximum(naive, MIN_ENTROPY), rtol=1e-3)
    assert (naive < MIN_ENTROPY).any() and (naive > MIN_ENTROPY).any()
    # a damaged copy is refused on load
    arrays = probe.to_arrays("p")
    assert LinearProbe.from_arrays(arrays, "p", n_features=x.shape[1]).temperature == pytest.approx(1.7)
    with pytest.raises(ValueError, match="probe is inconsistent"):
        LinearProbe.from_arrays({**arrays, "p_bias": arrays["p_bias"][:-1]}, "p")
    with pytest.raises(ValueError, match="probe is inconsistent"):
        LinearProbe.from_arrays({k: v for k, v in arrays.items() if k != "p_temperature"}, "p")


def test_self_assessment_separates_discrete_types_from_a_continuum():
    """Each type left out of a gene classifier in turn and found among held-out cells by its uncertainty: discrete
    cell lines (CellBench) score high, the stages of endocrinogenesis, where known cells between two stages are
    uncertain too, do not. This decides whether the part joins the novelty score."""
    from cellular.nn import held_out_type_aurocs

    means = {}
    for name in ("cellbench_lung_celllines", "pancreas_endocrinogenesis_mouse"):
        adata = read_dataset(name)
        adata = adata[np.random.default_rng(0).permutation(adata.n_obs)[:1500]].copy()
        cellular.pp.normalize_log1p(adata, target_sum=1e4)
        variances = np.asarray(adata.X.power(2).mean(0)).ravel() - np.asarray(adata.X.mean(0)).ravel() ** 2
        x = adata[:, np.argsort(variances)[-500:]].X.toarray().astype(np.float32)
        labels = adata.obs["cell_type"].cat.codes.to_numpy()
        fit = np.arange(adata.n_obs) < 2 * adata.n_obs // 3
        aurocs = held_out_type_aurocs(x[fit], labels[fit], x[~fit], labels[~fit], min_cells=5)
        assert set(aurocs) <= set(np.unique(labels)) and len(aurocs) >= 4
        means[name] = np.mean(list(aurocs.values()))
    assert means["cellbench_lung_celllines"] >= 0.95, means
    assert means["pancreas_endocrinogenesis_mouse"] < 0.85, means


def test_self_assessment_leaves_out_types_it_was_not_trained_on(symphony):
    """Held-out cells of a type absent from the training cells would look novel in every fold: they are left out, so
    the AUROCs equal those computed without them."""
    from cellular.nn import held_out_type_aurocs

    adata = symphony.copy()
    cellular.pp.normalize_log1p(adata, target_sum=1e4)
    x = adata[:, :300].X.toarray().astype(np.float32)
    labels = adata.obs["cell_type"].cat.codes.to_numpy()
    fit = np.arange(adata.n_obs) % 3 != 0
    absent = np.bincount(labels).argmax()
    train = fit & (labels != absent)
    with_absent = held_out_type_aurocs(x[train], labels[train], x[~fit], labels[~fit])
    test = ~fit & (labels != absent)
    without = held_out_type_aurocs(x[train], labels[train], x[test], labels[test])
    assert absent not in with_absent and len(with_absent) >= 3
    assert with_absent == pytest.approx(without)
