"""Tree-model annotation and per-type marker importances (CellClassifier) on real data."""

import json
import os
import pickle

import numpy as np
import pytest
from conftest import read_dataset
from helpers import SYMPHONY_HELD_OUT, reseal_tree_annotator
from sklearn.metrics import f1_score

import cellular
from cellular.metrics import expected_calibration_error
from cellular.trees import TreeAnnotator, negative_sample


@pytest.fixture(scope="module")
def pbmc3k():
    return read_dataset("pbmc3k_seurat")


@pytest.fixture(scope="module")
def split(symphony):
    train = symphony[symphony.obs["batch"] != SYMPHONY_HELD_OUT].copy()
    test = symphony[symphony.obs["batch"] == SYMPHONY_HELD_OUT].copy()
    return train, test


@pytest.fixture(scope="module")
def forest(split):
    return TreeAnnotator("random_forest", n_estimators=100, n_top_genes=1000).fit(split[0], "cell_type")


def _known(annotator, test):
    labels = test.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(labels, annotator.classes_)
    codes = np.array([annotator.classes_.index(label) for label in labels[known]])
    return known, labels[known], codes


def test_forest_annotates_a_held_out_technology_with_calibrated_confidences(split, forest):
    train, test = split
    known, labels, codes = _known(forest, test)
    cellular.tl.tree_annotate(test, forest)
    predicted = test.obs["tree_label"].astype(str).to_numpy()[known]
    # Baseline computed here: every cell given the most common training type.
    majority = train.obs["cell_type"].value_counts().idxmax()
    baseline = f1_score(labels, np.full(labels.size, majority), average="macro")
    score = f1_score(labels, predicted, average="macro")
    assert score > 0.7 and score > baseline + 0.5, (score, baseline)
    # Temperature scaling fitted by cross-validation makes the probabilities honest on new data.
    calibrated = test.obsm["tree_label_probabilities"][known]
    raw = TreeAnnotator("random_forest", n_estimators=100, n_top_genes=1000, calibration=None).fit(train, "cell_type")
    ece_calibrated = expected_calibration_error(calibrated, codes)
    ece_raw = expected_calibration_error(raw.predict_proba(test)[known], codes)
    assert ece_calibrated < 0.6 * ece_raw, (ece_calibrated, ece_raw)
    record = test.uns["cellular"]["tree_label"]
    assert record["classes"] == forest.classes_
    assert record["counts"]["n_cells"].sum() == test.n_obs


def test_min_confidence_leaves_cells_unknown(split, forest):
    test = split[1].copy()
    cellular.tl.tree_annotate(test, forest, min_confidence=0.9, key_added="strict")
    unsure = test.obs["strict_confidence"].to_numpy() < 0.9
    assert unsure.any()
    assert (test.obs["strict"].astype(str).to_numpy()[unsure] == "Unknown").all()
    assert (test.obs["strict"].astype(str).to_numpy()[~unsure] != "Unknown").all()


def test_genes_are_matched_by_name(split, forest):
    test = split[1][:100].copy()
    shuffled = test[:, np.random.default_rng(1).permutation(test.n_vars)].copy()
    np.testing.assert_array_equal(forest.predict_proba(test), forest.predict_proba(shuffled))


def test_a_query_lacking_genes_is_read_on_the_training_scale(split, forest):
    """Libraries of a query measuring half of the genes are scaled by the share of counts those genes carry."""
    import copy
    import dataclasses

    train, test = split
    genes = np.asarray(forest.features_.genes)
    kept_genes = set(genes[np.random.default_rng(0).choice(genes.size, genes.size // 2, replace=False)])
    kept = np.flatnonzero(np.isin(genes, list(kept_genes)))

    def lacking(adata):
        return adata[:, [gene for gene in adata.var_names if gene not in set(genes) or gene in kept_genes]].copy()

    naive = dataclasses.replace(forest.features_, gene_count_fractions=None)
    cells = train[:1000]
    full_mean = forest.features_.transform(cells)[:, kept].mean()
    rescaled_mean = forest.features_.transform(lacking(cells), min_gene_overlap=0.3)[:, kept].mean()
    unscaled_mean = naive.transform(lacking(cells), min_gene_overlap=0.3)[:, kept].mean()
    assert abs(rescaled_mean - full_mean) < 0.02 * full_mean
    assert unscaled_mean > 1.2 * full_mean
    known, _, codes = _known(forest, test)
    query = lacking(test)
    accuracy = (forest.predict_proba(query, min_gene_overlap=0.3)[known].argmax(1) == codes).mean()
    naive_forest = copy.copy(forest)
    naive_forest.features_ = naive
    naive_accuracy = (naive_forest.predict_proba(query, min_gene_overlap=0.3)[known].argmax(1) == codes).mean()
    assert accuracy > naive_accuracy


@pytest.mark.parametrize("method", ["random_forest", "hist_gradient_boosting"])
def test_save_load_gives_identical_probabilities_without_pickle(split, tmp_path, monkeypatch, method):
    train, test = split
    annotator = TreeAnnotator(method, n_estimators=20, n_top_genes=300, calibration="sigmoid").fit(train, "cell_type")
    annotator.save(tmp_path / "trees")
    with pytest.raises(FileExistsError):
        annotator.save(tmp_path / "trees")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = TreeAnnotator.load(tmp_path / "trees")
    assert loaded.classes_ == annotator.classes_ and loaded.features_ == annotator.features_
    np.testing.assert_array_equal(loaded.predict_proba(test), annotator.predict_proba(test))


def test_load_refuses_types_the_package_never_writes(split, tmp_path, forest):
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    forest.save(tmp_path / "trees")
    skops.io.dump(FunctionTransformer(os.system), tmp_path / "trees" / "estimator.skops")
    with pytest.raises(ValueError, match="does not match the size and SHA-256"):
        TreeAnnotator.load(tmp_path / "trees")
    reseal_tree_annotator(tmp_path / "trees")  # even with checksums that agree, the types are refused
    with pytest.raises(ValueError, match="never writes"):
        TreeAnnotator.load(tmp_path / "trees")


def test_load_verifies_the_manifest(tmp_path, forest, caplog):
    """An edited, invalid or truncated manifest is refused with the file named; version 1 (no checksums) loads."""
    folder = tmp_path / "trees"
    forest.save(folder)
    path = folder / "tree_annotator.json"
    saved = path.read_text()
    manifest = json.loads(saved)
    manifest["classes"] = list(reversed(manifest["classes"]))
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tree_annotator.json: the content does not match its recorded SHA-256"):
        TreeAnnotator.load(folder)
    reseal_tree_annotator(folder, lambda m: m["settings"].update(n_estimators="many"))
    with pytest.raises(ValueError, match="field 'settings/n_estimators' is invalid"):
        TreeAnnotator.load(folder)
    path.write_text(saved[: len(saved) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        TreeAnnotator.load(folder)
    legacy = json.loads(saved)
    for key in ("files", "metadata_sha256"):
        legacy.pop(key)
    legacy["format_version"] = 1
    path.write_text(json.dumps(legacy))
    with caplog.at_level("WARNING"):
        loaded = TreeAnnotator.load(folder)
    assert "without checksums" in caplog.text and loaded.classes_ == forest.classes_


def test_annotator_errors(split):
    train, _ = split
    with pytest.raises(ValueError, match="method"):
        TreeAnnotator("svm")
    with pytest.raises(RuntimeError, match="not fitted"):
        TreeAnnotator().predict_proba(train)
    rare = train.copy()
    rare.obs["cell_type"] = rare.obs["cell_type"].astype(str)
    rare.obs.iloc[0, rare.obs.columns.get_loc("cell_type")] = "Lonely"
    with pytest.raises(ValueError, match="a single labelled cell"):
        TreeAnnotator(n_estimators=5).fit(rare, "cell_type")
    rare.obs.iloc[1, rare.obs.columns.get_loc("cell_type")] = "Lonely"
    two_cells = TreeAnnotator(n_estimators=5, n_top_genes=100).fit(rare, "cell_type")
    assert "Lonely" in two_cells.classes_ and len(two_cells.estimator_.calibrated_classifiers_) == 2


def _naive_even_quotas(sizes, total):
    quotas = [0] * len(sizes)
    base, extra = divmod(total, len(sizes))
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    for rank, i in enumerate(order):
        quotas[i] = min(sizes[i], base + (1 if rank < extra else 0))
    shortfall = total - sum(quotas)
    for i in order:
        take = min(sizes[i] - quotas[i], shortfall)
        quotas[i] += take
        shortfall -= take
    return quotas


@pytest.mark.parametrize("sizes", [[50, 50, 50], [3, 200, 40, 1], [10, 10], [500, 2, 2, 2, 2]])
def test_even_negatives_take_equal_quotas_and_fill_from_the_largest(sizes):
    codes = np.repeat(np.arange(len(sizes) + 1), [60, *sizes])
    rows = negative_sample(codes, 0, 60, negatives="even", rng=np.random.default_rng(0))
    assert np.unique(rows).size == rows.size and not np.isin(rows, np.flatnonzero(codes == 0)).any()
    taken = np.bincount(codes[rows], minlength=len(sizes) + 1)[1:]
    assert taken.tolist() == _naive_even_quotas(sizes, min(60, sum(sizes)))


def test_random_negatives_follow_type_sizes():
    codes = np.repeat([0, 1, 2], [500, 900, 100])
    rows = negative_sample(codes, 0, 500, negatives="random", rng=np.random.default_rng(0))
    shares = np.bincount(codes[rows], minlength=3)[1:] / rows.size
    np.testing.assert_allclose(shares, [0.9, 0.1], atol=0.05)


def test_marker_importances_recover_textbook_markers(pbmc3k):
    adata = pbmc3k.copy()
    cellular.tl.marker_importances(adata, "cell_type", n_estimators=60, n_permutation_genes=10, n_repeats=2)
    record = adata.uns["cellular"]["marker_importances"]
    markers, scores = record["markers"], record["scores"]
    textbook = {"B cell": {"MS4A1", "CD79A"}, "CD14 Monocyte": {"CD14", "LYZ"}, "NK cell": {"NKG7", "GNLY"}}
    for cell_type, genes in textbook.items():
        top = set(markers.loc[markers["cell_type"] == cell_type, "gene"])
        assert len(top) == 10 and top & genes, (cell_type, sorted(top))
        assert scores.loc[cell_type, "auroc"] > 0.95
    assert set(scores.index) == set(adata.obs["cell_type"].astype(str))
    positive = markers[markers["higher_in_type"]]
    assert (positive["mean_in_type"] > positive["mean_in_negatives"]).all()
    assert markers["permutation_importance"].notna().sum() == 10 * len(scores)


def test_marker_plot_draws_one_panel_per_type(pbmc3k, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    adata = pbmc3k[pbmc3k.obs["cell_type"].isin(["B cell", "NK cell", "CD14 Monocyte"])].copy()
    cellular.tl.marker_importances(adata, "cell_type", n_estimators=20, n_permutation_genes=5, n_repeats=1)
    fig = cellular.pl.marker_importances(adata, n_genes=5, show=False)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3 and all(len(ax.patches) == 5 for ax in visible)
    sc.settings.figdir = tmp_path
    cellular.pl.marker_importances(adata, importance="permutation", show=False, save="_pbmc.png")
    assert (tmp_path / "marker_importances_pbmc.png").is_file()
    with pytest.raises(KeyError, match="run cellular.tl.marker_importances"):
        cellular.pl.marker_importances(adata, key="other")
