"""Annotation, calibration, novelty and cell-type representations on real data."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import read_dataset
from helpers import pca_knn_macro_f1
from sklearn.metrics import f1_score, log_loss, roc_auc_score

import cellular
from cellular import CELLULAR, NotTrainedError
from cellular.metrics import conformal_pvalues, expected_calibration_error

CELLBENCH_HELD_OUT_BATCH = "celseq2_5cl_p3"
CELLBENCH_NOVEL_LINE = "A549"


def cellbench_plate_split(plate: str, novel_line: str):
    """CellBench without one plate and one cell line (training), and that plate with every line (test)."""
    data = read_dataset("cellbench_lung_celllines")
    train = data[(data.obs["batch"] != plate) & (data.obs["cell_type"] != novel_line)].copy()
    train.obs["cell_type"] = train.obs["cell_type"].cat.remove_unused_categories()
    test = data[data.obs["batch"] == plate].copy()
    return train, test


@pytest.fixture(scope="module")
def cellbench_split():
    """CellBench lung lines: train without one plate and without the A549 line; the held-out plate contains A549."""
    return cellbench_plate_split(CELLBENCH_HELD_OUT_BATCH, CELLBENCH_NOVEL_LINE)


@pytest.fixture(scope="module")
def cellbench_model(cellbench_split):
    train, _ = cellbench_split
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train)
    model.train(progress_bar=False)
    return model


def known_type_codes(model, adata):
    labels = adata.obs["cell_type"].astype(str)
    known = labels.isin(model.cell_types).to_numpy()
    return known, pd.Categorical(labels[known], categories=model.cell_types).codes


@pytest.mark.parametrize("dataset", ["symphony", "cellbench"])
def test_annotation_beats_pca_knn_and_calibration_lowers_log_loss(dataset, request):
    """The temperature, fitted on held-out reference cells by log loss, lowers the held-out batch's log loss. Its
    expected calibration error (15 bins over a few hundred cells, a sampling error near 0.01) is not asserted to fall:
    on Symphony's 3' v2 batch it went 0.048 -> 0.043 in one run and 0.0515 -> 0.0517 in another."""
    model = request.getfixturevalue(f"{dataset}_model")
    train, test = request.getfixturevalue(f"{dataset}_split")
    query = test.copy()
    cellular.tl.cellular_annotate(query, model, novel_as_unknown=False)
    known, codes = known_type_codes(model, query)
    truth = query.obs["cell_type"].astype(str)[known]
    ours = f1_score(truth, query.obs["cellular_label"].astype(str)[known], average="macro")
    baseline = pca_knn_macro_f1(model, train, test)
    assert ours >= baseline, (ours, baseline)

    calibrated = model.predict(test, soft=True).to_numpy()[known]
    raw = model.predict(test, soft=True, calibrated=False).to_numpy()[known]
    classes = np.arange(len(model.cell_types))
    assert log_loss(codes, calibrated, labels=classes) < log_loss(codes, raw, labels=classes)
    assert expected_calibration_error(calibrated, codes) <= expected_calibration_error(raw, codes) + 0.01
    np.testing.assert_array_equal(calibrated.argmax(1), raw.argmax(1))  # calibration never changes the label


def test_novel_cell_line_is_detected_and_known_lines_are_rarely_flagged(cellbench_model, cellbench_split):
    _, test = cellbench_split
    query = test.copy()
    cellular.tl.novel_types(query, cellbench_model, alpha=0.05)
    is_novel = (query.obs["cell_type"] == CELLBENCH_NOVEL_LINE).to_numpy()
    assert roc_auc_score(is_novel, query.obs["cellular_novel_score"]) >= 0.9
    flagged = query.obs["cellular_novel"].to_numpy()
    assert flagged[~is_novel].mean() <= 0.15
    assert flagged[is_novel].mean() >= 0.5
    summary = query.uns["cellular"]["cellular_novel"]["summary"]
    assert summary["n_novel"] == flagged.sum()
    assert summary["calibration_source"] == "validation"
    scores = query.obs["cellular_novel_score"].to_numpy()
    np.testing.assert_array_equal(flagged, scores >= summary["score_threshold"])

    # annotation labels exactly the flagged cells "Unknown"
    cellular.tl.cellular_annotate(query, cellbench_model, alpha=0.05)
    np.testing.assert_array_equal(query.obs["cellular_label"].to_numpy() == "Unknown", flagged)

    # FDR control flags a subset and its q-values are BH-adjusted p-values
    cellular.tl.novel_types(query, cellbench_model, alpha=0.05, fdr=True, key_added="fdr")
    assert not (query.obs["fdr"] & ~query.obs["cellular_novel"]).any()
    assert (query.obs["fdr_qvalue"] >= query.obs["fdr_pvalue"]).all()


def test_hardest_cell_line_is_found_through_the_hidden_layer():
    """HCC827 held out of training, test plate celseq2_3cl: it resembles the trained lines, so the paper-width
    encoder's embedding alone maps it onto them (AUROC 0.81 at seed 0); the hidden-layer distance separates it
    better. The paper's widths are used because that embedding is the case the mechanism is for: the default
    (256, 128) encoder's embedding alone already reaches 0.90-0.98 here depending on the seed, leaving the hidden
    layer little to add. Without batch moment matching: this plate holds three lines, one of them novel, and
    matching its moments costs this fold some AUROC (benchmarks page), which is not what this test is about.
    Such a model trains to convergence by default (``early_stopping_min_delta=0``, about 220 epochs here).

    Since the learning-rate schedule decays over the steps the sampler really gives (December 8), this configuration
    scores lower on the fold (seeds 0-2: 0.785 / 0.704 / 0.595 with the part, 0.721 / 0.595 / 0.578 without; it
    read 0.89 at seed 0 before), so the test asserts what the part adds, not the issue's bounds, which the default
    model's test below checks."""
    train, test = cellbench_plate_split("celseq2_3cl", "HCC827")
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train, match_batch_moments=False, hidden_sizes="paper")
    model.train(progress_bar=False)
    assert model.train_params_["early_stopping_min_delta"] == 0.0
    is_novel = (test.obs["cell_type"] == "HCC827").to_numpy()
    frame = model.get_novelty_scores(test)
    # Without the hidden-layer part the score misses it (the mechanism is what finds it).
    model.train_classifier(novelty_hidden_weight=0.0)
    without = model.get_novelty_scores(test)
    assert "hidden_distance" in frame and without["hidden_distance"].notna().all()
    assert roc_auc_score(is_novel, without["score"]) < roc_auc_score(is_novel, frame["score"]) - 0.03


def test_hardest_cell_line_is_found_by_the_default_model_through_the_gene_classifiers_uncertainty(tmp_path):
    """The issue's test: HCC827 held out of training, test plate celseq2_3cl, default model. The embedding and hidden
    layer place HCC827 near the trained lines (0.96 at seed 0 without the part); a linear classifier on the genes is
    unsure where to put it. The part joins the score because the reference passes its own test: each of its lines
    left out of a gene classifier in turn is found by that classifier's uncertainty, every one without a miss, so
    the part leads the score."""
    from cellular.model._gene_classifier import FLAWLESS_GENE_UNCERTAINTY_WEIGHT, GENE_UNCERTAINTY_FLAWLESS_AUROC

    train, test = cellbench_plate_split("celseq2_3cl", "HCC827")
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train)
    model.train(progress_bar=False)
    summary = model.classifier_summary_
    assert summary["gene_uncertainty_worst_auroc"] >= GENE_UNCERTAINTY_FLAWLESS_AUROC
    assert summary["novelty_gene_uncertainty_weight"] == FLAWLESS_GENE_UNCERTAINTY_WEIGHT
    is_novel = (test.obs["cell_type"] == "HCC827").to_numpy()
    frame = model.get_novelty_scores(test)
    with_part = roc_auc_score(is_novel, frame["score"])
    assert with_part >= 0.95
    assert (frame["pvalue"].to_numpy()[~is_novel] <= 0.05).mean() <= 0.10
    assert roc_auc_score(is_novel, frame["gene_uncertainty"]) >= 0.95
    query = test.copy()
    cellular.tl.novel_types(query, model)
    weights = query.uns["cellular"]["cellular_novel"]["summary"]["score_weights"]
    assert weights["gene_uncertainty"] == FLAWLESS_GENE_UNCERTAINTY_WEIGHT and weights["gene_distance"] == 3.0
    np.testing.assert_allclose(query.obs["cellular_novel_score"], frame["score"])
    # a query measuring half of the model's genes is scored with the part, recalibrated under its panel
    narrow = test[:, model.genes[::2]].copy()
    cellular.tl.novel_types(narrow, model)
    assert narrow.uns["cellular"]["cellular_novel"]["summary"]["score_weights"]["gene_uncertainty"] > 0
    assert np.isfinite(narrow.obs["cellular_novel_score"]).all()
    assert roc_auc_score(is_novel, narrow.obs["cellular_novel_score"]) >= 0.9

    model.save(tmp_path / "model")
    loaded = CELLULAR.load(tmp_path / "model", adata=train)
    pd.testing.assert_frame_equal(loaded.get_novelty_scores(test), frame)

    model.train_classifier(novelty_gene_uncertainty_weight=0.0)
    without = model.get_novelty_scores(test)
    assert "gene_uncertainty" not in without
    assert with_part > roc_auc_score(is_novel, without["score"]) + 0.02


def test_gene_uncertainty_part_reads_the_gene_classifier_before_its_temperature_sharpens_it():
    """Same fold, seed 1. The known lines separate perfectly on the held-out cells, so the calibrated temperature
    sharpens the gene classifier about fourfold; read through it, most HCC827 cells were certain (entropies at the
    1e-6 floor) and the part's AUROC was 0.71. The part reads the fit at temperature 1, as the self-assessment does.
    Every line the reference holds is found without a miss when left out, so the part leads the score: at weight 1,
    beside the other parts, the score reached 0.97."""
    train, test = cellbench_plate_split("celseq2_3cl", "HCC827")
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train, seed=1)
    model.train(progress_bar=False)
    assert model.gene_classifier_temperature_ < 0.5
    assert model.gene_classifier_probe().temperature == 1.0
    is_novel = (test.obs["cell_type"] == "HCC827").to_numpy()
    frame = model.get_novelty_scores(test)
    assert roc_auc_score(is_novel, frame["gene_uncertainty"]) >= 0.99
    assert roc_auc_score(is_novel, frame["score"]) >= 0.99  # 0.92 through the calibrated temperature
    assert (frame["pvalue"].to_numpy()[~is_novel] <= 0.05).mean() <= 0.10


def test_novelty_pvalues_are_calibrated_on_cells_read_as_a_new_batch():
    """H2228 held out of CellBench, test plate celseq2_3cl: a new plate is matched by moments estimated from its own
    cells, which its calibration cells, read with their training plates' stored moments, never are; p-values against
    those scores flag many known cells of the new plate (24 % at seed 0). The model also reads its calibration cells
    as new batches and computes query p-values against those scores. Trained to convergence
    (``early_stopping_min_delta=0``, about 400 epochs), where the over-flagging shows: the default stops after about
    50 epochs on this reference, and then both calibrations flag about 5 %."""
    from cellular.model._gene_classifier import (
        GENE_UNCERTAINTY_FLAWLESS_AUROC,
        GENE_UNCERTAINTY_MIN_AUROC,
        NOVELTY_GENE_UNCERTAINTY_WEIGHT,
    )

    train, test = cellbench_plate_split("celseq2_3cl", "H2228")
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train)
    model.train(progress_bar=False, early_stopping_min_delta=0.0)
    assert model.classifier_summary_["novelty_calibration"] == "as new batches"
    # The self-assessment passes on average but misses some cells of a left-out line: the part joins at weight 1
    # without leading the score.
    summary = model.classifier_summary_
    assert summary["gene_uncertainty_auroc"] >= GENE_UNCERTAINTY_MIN_AUROC
    assert summary["gene_uncertainty_worst_auroc"] < GENE_UNCERTAINTY_FLAWLESS_AUROC
    assert summary["novelty_gene_uncertainty_weight"] == NOVELTY_GENE_UNCERTAINTY_WEIGHT
    is_novel = (test.obs["cell_type"] == "H2228").to_numpy()
    frame = model.get_novelty_scores(test)
    assert roc_auc_score(is_novel, frame["score"]) >= 0.95
    flagged = frame["pvalue"].to_numpy() <= 0.05
    stored = conformal_pvalues(model.novelty_reference_.calibration_scores, frame["score"].to_numpy()) <= 0.05
    assert flagged[~is_novel].mean() <= 0.10
    assert stored[~is_novel].mean() > flagged[~is_novel].mean() + 0.04
    assert flagged[is_novel].mean() >= 0.8


def test_an_unseen_trajectory_stage_is_found_through_the_input_genes():
    """Pancreatic endocrinogenesis without the Ngn3-high progenitors, scored on a random 30 % of all cells: the
    progenitors sit between trained stages, so embedding and hidden layer place them among those stages (AUROC
    0.66 at seed 0 without the gene part); the distance in the encoder's batch-matched input genes keeps them apart."""
    data = read_dataset("pancreas_endocrinogenesis_mouse")
    in_test = np.zeros(data.n_obs, dtype=bool)
    in_test[np.random.default_rng(0).choice(data.n_obs, int(0.3 * data.n_obs), replace=False)] = True
    novel_type = "Ngn3 high EP"
    train = data[~in_test & (data.obs["cell_type"] != novel_type).to_numpy()].copy()
    train.obs["cell_type"] = train.obs["cell_type"].cat.remove_unused_categories()
    test = data[in_test].copy()
    is_novel = (test.obs["cell_type"] == novel_type).to_numpy()
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train)
    model.train(progress_bar=False)
    assert model.classifier_params_["novelty_gene_weight"] == 3.0  # the default for a moment-matching model
    # Along a continuum the gene classifier's uncertainty does not find left-out stages: that part stays out.
    assert model.classifier_summary_["gene_uncertainty_auroc"] < 0.9
    assert model.classifier_summary_["novelty_gene_uncertainty_weight"] == 0.0
    frame = model.get_novelty_scores(test)
    with_genes = roc_auc_score(is_novel, frame["score"])
    assert roc_auc_score(is_novel, frame["gene_distance"]) > roc_auc_score(is_novel, frame["distance"]) + 0.1
    assert (frame["pvalue"].to_numpy()[~is_novel] <= 0.05).mean() <= 0.10

    # A new batch's moments are estimated without its likely novel cells, picked by a score whose gene weight is
    # capped: a heavier weight in the reported score does not move the batch's embedding.
    new_batch = test.copy()
    new_batch.obs["batch"] = "another lab"
    embedding = model.get_latent_representation(new_batch)
    model.train_classifier(novelty_gene_weight=4.0)
    assert model.novelty_reference_.matching_gene_weight == 2.0
    np.testing.assert_array_equal(model.get_latent_representation(new_batch), embedding)

    model.train_classifier(novelty_gene_weight=0.0)
    without = model.get_novelty_scores(test)
    assert "gene_distance" not in without
    assert with_genes > roc_auc_score(is_novel, without["score"]) + 0.05

    # A model without batch moment matching leaves the gene part out by default (its inputs carry batch shifts).
    unmatched = CELLULAR(train, match_batch_moments=False)
    unmatched.train(max_epochs=5, progress_bar=False)
    assert unmatched.classifier_params_["novelty_gene_weight"] == 0.0
    assert "gene_distance" not in unmatched.get_novelty_scores(test.copy())


def test_flagged_cells_are_grouped_with_markers(cellbench_model, cellbench_split):
    _, test = cellbench_split
    query = test.copy()
    cellular.tl.novel_types(query, cellbench_model, group=True, n_markers=5)
    groups = query.obs["cellular_novel_group"]
    np.testing.assert_array_equal(groups.notna().to_numpy(), query.obs["cellular_novel"].to_numpy())
    described = query.uns["cellular"]["cellular_novel"]["groups"]
    assert set(described) == set(groups.dropna().unique())
    largest = max(described, key=lambda g: described[g]["n_cells"])
    members = query.obs.loc[groups == largest, "cell_type"]
    assert (members == CELLBENCH_NOVEL_LINE).mean() > 0.8
    assert len(described[largest]["markers"]) == 5
    assert set(described[largest]["markers"]) <= set(query.var_names)
    # Markers are genes the group expresses more widely than the known cells do.
    detected = query[:, described[largest]["markers"]].X > 0
    in_group = (groups == largest).to_numpy()
    known = ~query.obs["cellular_novel"].to_numpy()
    assert (np.asarray(detected[in_group].mean(0)) > np.asarray(detected[known].mean(0))).all()


def test_a_query_of_one_flagged_group_gets_no_markers_and_fdr_thresholds_agree(cellbench_model, cellbench_split):
    """A query whose every cell is flagged and forms one group has no other cells to rank markers against: its
    markers stay empty (scanpy would return the first genes, at score 0). With FDR control the recorded score
    threshold flags exactly the flagged cells, also when none is."""
    _, test = cellbench_split
    from cellular.model import SAME_AS_TRAINING
    from cellular.tl._novel import _candidate_groups

    novel = test[(test.obs["cell_type"] == CELLBENCH_NOVEL_LINE).to_numpy()].copy()
    frame = cellbench_model.get_novelty_scores(novel)
    z = cellbench_model.get_latent_representation(novel)
    every_cell = np.ones(novel.n_obs, dtype=bool)
    groups, summary = _candidate_groups(
        novel, cellbench_model, z, every_cell, frame, 1.0, 10_000, 5, SAME_AS_TRAINING, None
    )
    (group,) = summary.values()
    assert group["n_cells"] == novel.n_obs and list(group["markers"]) == []

    known = test[(test.obs["cell_type"] != CELLBENCH_NOVEL_LINE).to_numpy()].copy()
    for query in (known, test.copy()):
        cellular.tl.novel_types(query, cellbench_model, fdr=True)
        threshold = query.uns["cellular"]["cellular_novel"]["summary"]["score_threshold"]
        flagged = query.obs["cellular_novel"].to_numpy()
        np.testing.assert_array_equal(query.obs["cellular_novel_score"].to_numpy() >= threshold, flagged)
    assert not known.obs["cellular_novel"].any() and np.isinf(
        known.uns["cellular"]["cellular_novel"]["summary"]["score_threshold"]
    )


def test_annotate_writes_documented_slots_only(symphony_model, symphony_split):
    _, test = symphony_split
    before = test.copy()
    out = cellular.tl.cellular_annotate(test, symphony_model, copy=True)
    assert test.obs.equals(before.obs) and set(test.uns) == set(before.uns) and set(test.obsm) == set(before.obsm)
    new_obs = set(out.obs.columns) - set(test.obs.columns)
    assert new_obs == {"cellular_label", "cellular_label_confidence"}
    assert set(out.obsm) - set(test.obsm) == {"cellular_label_probabilities"}
    record = out.uns["cellular"]["cellular_label"]
    assert record["classes"] == symphony_model.cell_types
    assert record["counts"]["n_cells"].sum() == test.n_obs
    assert list(out.obs["cellular_label"].cat.categories) == [*symphony_model.cell_types, "Unknown"]
    assert record["params"]["gene_classifier_weight"] == 0.5
    probabilities = out.obsm["cellular_label_probabilities"]
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.obs["cellular_label_confidence"], probabilities.max(1), rtol=1e-6)
    soft = symphony_model.predict(test, soft=True)
    assert list(soft.columns) == symphony_model.cell_types and soft.index.equals(test.obs_names)
    genes = symphony_model.get_gene_classifier_probabilities(test)
    assert list(genes.columns) == symphony_model.cell_types
    np.testing.assert_allclose(0.5 * soft.to_numpy() + 0.5 * genes.to_numpy(), probabilities, rtol=1e-5, atol=1e-6)
    labels = np.asarray(symphony_model.cell_types)[probabilities.argmax(1)]
    assignable = (out.obs["cellular_label"] != "Unknown").to_numpy()
    np.testing.assert_array_equal(labels[assignable], out.obs["cellular_label"][assignable].astype(str))

    head_only = cellular.tl.cellular_annotate(test, symphony_model, gene_classifier_weight=0, copy=True)
    assert head_only.uns["cellular"]["cellular_label"]["params"]["gene_classifier_weight"] == 0.0
    np.testing.assert_allclose(head_only.obsm["cellular_label_probabilities"], soft.to_numpy(), rtol=1e-5, atol=1e-6)
    hard = symphony_model.predict(test)
    assignable = (head_only.obs["cellular_label"] != "Unknown").to_numpy()
    np.testing.assert_array_equal(hard[assignable], head_only.obs["cellular_label"][assignable].astype(str))
    # The novelty flags read the head's probabilities, on which their p-values were calibrated, whatever the blend.
    np.testing.assert_array_equal(out.obs["cellular_label"] == "Unknown", head_only.obs["cellular_label"] == "Unknown")


def test_the_gene_classifier_averaged_with_the_head_labels_other_labs_cells_better(symphony_model, symphony_split):
    """The head reads the embedding, the gene classifier the encoder's inputs; averaged (the default) they label
    Symphony's held-out 3' v2 cells and pbmc3k better than the head alone (at the fixture's seed: macro-F1 0.902 vs
    0.876 and 0.823 vs 0.805), and the average stays calibrated: its log loss is below the head's."""
    _, test = symphony_split
    for query in (test, read_dataset("pbmc3k_seurat")):
        scores, losses = {}, {}
        for weight in (0.0, None):
            out = cellular.tl.cellular_annotate(
                query, symphony_model, novel_as_unknown=False, gene_classifier_weight=weight, copy=True
            )
            known, codes = known_type_codes(symphony_model, out)
            truth = out.obs["cell_type"].astype(str)[known]
            scores[weight] = f1_score(truth, out.obs["cellular_label"].astype(str)[known], average="macro")
            probabilities = out.obsm["cellular_label_probabilities"][known]
            losses[weight] = log_loss(codes, probabilities, labels=np.arange(len(symphony_model.cell_types)))
        assert scores[None] >= scores[0.0] + 0.01, scores
        assert losses[None] < losses[0.0], losses


def test_results_survive_h5ad_round_trip_and_use_rep(symphony_model, symphony_split, tmp_path):
    _, test = symphony_split
    query = test.copy()
    cellular.tl.cellular_embed(query, symphony_model)
    cellular.tl.cellular_annotate(query, symphony_model, use_rep="X_cellular")
    cellular.tl.novel_types(query, symphony_model, use_rep="X_cellular")
    cellular.tl.cell_type_representations(query, symphony_model, labels_key="cellular_label", use_rep="X_cellular")
    direct = test.copy()
    cellular.tl.cellular_annotate(direct, symphony_model)
    np.testing.assert_array_equal(query.obs["cellular_label"], direct.obs["cellular_label"])
    query.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    for key in ("cellular_label", "cellular_novel", "cellular_novel_pvalue"):
        np.testing.assert_array_equal(back.obs[key], query.obs[key])
    summary = back.uns["cellular"]["cellular_novel"]["summary"]
    pd.testing.assert_frame_equal(
        summary["novel_per_nearest_type"], query.uns["cellular"]["cellular_novel"]["summary"]["novel_per_nearest_type"]
    )
    stored = back.uns["cellular"]["cellular_representations"]
    np.testing.assert_allclose(stored["representations"].to_numpy(), back_frame(query).to_numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="not made by this model"):
        query.obsm["X_bad"] = np.zeros((query.n_obs, 3))
        cellular.tl.cellular_annotate(query, symphony_model, use_rep="X_bad")


def test_a_stored_embedding_of_a_query_lacking_genes_is_calibrated_as_a_fresh_one(symphony_model, symphony_split):
    _, test = symphony_split
    dropped = set(symphony_model.genes[::40])
    query = test[:, [gene for gene in test.var_names if gene not in dropped]].copy()
    fresh = query.copy()
    cellular.tl.cellular_annotate(fresh, symphony_model)
    cellular.tl.cellular_embed(query, symphony_model)
    cellular.tl.cellular_annotate(query, symphony_model, use_rep="X_cellular")
    stored, direct = (data.uns["cellular"]["cellular_label"]["params"] for data in (query, fresh))
    assert direct["panel_path"] == "direct" and stored["panel_path"] == "stored"
    assert stored["panel_calibrated"] and stored["panel_calibration"] == direct["panel_calibration"]
    np.testing.assert_allclose(
        query.obsm["cellular_label_probabilities"], fresh.obsm["cellular_label_probabilities"], atol=1e-6
    )
    np.testing.assert_array_equal(query.obs["cellular_label"], fresh.obs["cellular_label"])


def back_frame(adata):
    return adata.uns["cellular"]["cellular_representations"]["representations"]


def test_saved_model_keeps_classifier_and_calibration(symphony_model, symphony_split, tmp_path):
    _, test = symphony_split
    symphony_model.save(tmp_path / "model")
    loaded = CELLULAR.load(tmp_path / "model")
    assert loaded.has_classifier and loaded.calibration_temperature_ == symphony_model.calibration_temperature_
    pd.testing.assert_frame_equal(loaded.predict(test, soft=True), symphony_model.predict(test, soft=True))
    pd.testing.assert_frame_equal(loaded.get_novelty_scores(test), symphony_model.get_novelty_scores(test))


@pytest.mark.parametrize("method", ["centroid", "median", "medoid"])
def test_cell_type_representations(symphony_model, method):
    table = symphony_model.get_cell_type_representations(method=method)
    z = symphony_model.get_latent_representation()
    labels = symphony_model.adata.obs["cell_type"].astype(str).to_numpy()
    assert list(table.index) == [t for t in symphony_model.cell_types if (labels == t).any()]
    for cell_type, vector in table.iterrows():
        members = z[labels == cell_type]
        if method == "centroid":
            np.testing.assert_allclose(vector.to_numpy(), members.mean(0), rtol=1e-5, atol=1e-6)
        elif method == "median":
            np.testing.assert_allclose(vector.to_numpy(), np.median(members, 0), rtol=1e-6)
        else:
            assert (np.abs(members - vector.to_numpy()).max(1) == 0).any()
            totals = np.linalg.norm(members[:, None] - members[None], axis=2).sum(1)
            assert np.linalg.norm(members - vector.to_numpy(), axis=1).sum() <= totals.min() * (1 + 1e-5)


def test_representation_distances_in_uns(symphony_model, symphony_split, tmp_path):
    train, _ = symphony_split
    data = train.copy()
    cellular.tl.cell_type_representations(data, symphony_model, metric="euclidean")
    assert "Megakaryocyte/Platelet" in set(data.obs["cell_type"])
    with warnings.catch_warnings():  # type names hold slashes, which h5 keys will not accept
        warnings.filterwarnings("error", message=".*[Ff]orward slash")
        data.write_h5ad(tmp_path / "representations.h5ad")
    record = data.uns["cellular"]["cellular_representations"]
    vectors = record["representations"].to_numpy()
    distances = record["distances"]
    assert distances.shape == (len(vectors), len(vectors))
    assert np.allclose(distances, distances.T) and np.allclose(np.diag(distances), 0)
    np.testing.assert_allclose(distances[0, 1], np.linalg.norm(vectors[0] - vectors[1]), rtol=1e-5)
    assert record["n_cells"].loc["B cell", "n_cells"] == int((train.obs["cell_type"] == "B cell").sum())
    with pytest.raises(KeyError, match="labels_key"):
        cellular.tl.cell_type_representations(data, symphony_model, labels_key="no_such_column")
    with pytest.raises(ValueError, match="method"):
        symphony_model.get_cell_type_representations(method="mode")


def test_representations_of_integer_labels_are_named_as_text(symphony_model, symphony_split):
    train, _ = symphony_split
    data = train.copy()
    codes = data.obs["cell_type"].cat.codes.astype(int)
    data.obs["type_code"] = codes
    cellular.tl.cell_type_representations(data, symphony_model, labels_key="type_code", key_added="by_code")
    cellular.tl.cell_type_representations(data, symphony_model, key_added="by_name")
    by_code, by_name = data.uns["cellular"]["by_code"], data.uns["cellular"]["by_name"]
    names = dict(zip(codes.astype(str), data.obs["cell_type"].astype(str), strict=True))
    renamed = by_code["representations"].rename(index=names).loc[by_name["representations"].index]
    np.testing.assert_allclose(renamed.to_numpy(), by_name["representations"].to_numpy())
    assert by_code["n_cells"]["n_cells"].sum() == by_name["n_cells"]["n_cells"].sum() == data.n_obs


def test_model_without_classifier_is_refused(symphony):
    data = symphony[symphony.obs["batch"] == "5p"].copy()
    data.obs["cell_type"] = data.obs["cell_type"].astype(str).replace({"HSPC": "Unknown"})
    CELLULAR.setup_anndata(data, labels_key="cell_type")
    model = CELLULAR(data, n_top_genes=300, n_latent=16)
    with pytest.raises(NotTrainedError, match="not been trained"):
        cellular.tl.cellular_annotate(data.copy(), model)
    model.train(max_epochs=2, progress_bar=False, classifier=False)
    assert not model.has_classifier
    for call in (
        lambda: cellular.tl.cellular_annotate(data.copy(), model),
        lambda: cellular.tl.novel_types(data.copy(), model),
        lambda: model.predict(data),
    ):
        with pytest.raises(NotTrainedError, match="train_classifier"):
            call()
    model.train_classifier(max_epochs=3)
    assert model.has_classifier and model.predict(data).shape == (data.n_obs,)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_unit_interval_is_refused(symphony_model, symphony_split, alpha):
    _, test = symphony_split
    with pytest.raises(ValueError, match="alpha must lie strictly between 0 and 1"):
        cellular.tl.novel_types(test.copy(), symphony_model, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        cellular.tl.cellular_annotate(test.copy(), symphony_model, alpha=alpha)


def test_query_without_model_genes_is_refused(symphony_model, symphony_split):
    _, test = symphony_split
    renamed = test.copy()
    renamed.var_names = [f"other_{g}" for g in renamed.var_names]
    for call in (cellular.tl.cellular_annotate, cellular.tl.novel_types):
        with pytest.raises(ValueError, match="genes"):
            call(renamed, symphony_model)


def test_tune_classifier_searches_and_retrains(symphony_model, capsys):
    optuna = pytest.importorskip("optuna")
    before = symphony_model.classifier_params_
    verbosity = optuna.logging.get_verbosity()
    try:
        best = symphony_model.tune_classifier(n_trials=2, max_epochs=5)
        assert "2/2" in capsys.readouterr().err  # the progress bar over the trials
        assert optuna.logging.get_verbosity() == verbosity  # the caller's optuna logging is left as it was
        assert set(best) == {"hidden_sizes", "dropout_rate", "lr"}
        assert symphony_model.classifier_summary_["tuning"]["n_trials"] == 2
        assert symphony_model.classifier_params_["hidden_sizes"] == best["hidden_sizes"]
        with pytest.raises(ValueError, match="searched"):
            symphony_model.tune_classifier(n_trials=1, lr=0.1)
    finally:
        symphony_model.train_classifier(**{k: v for k, v in before.items()})


def test_bad_query_values_and_arguments_are_refused(symphony_model, symphony_split):
    _, test = symphony_split
    corrupt = test.copy()
    corrupt.X = corrupt.X.toarray()
    corrupt.X[0, 0] = np.nan
    for call in (cellular.tl.cellular_annotate, cellular.tl.novel_types, cellular.tl.cell_type_representations):
        kwargs = {"labels_key": "cell_type"} if call is cellular.tl.cell_type_representations else {}
        with pytest.raises(ValueError, match="NaN"):
            call(corrupt.copy(), symphony_model, **kwargs)
        with pytest.raises(TypeError, match="cellular.CELLULAR"):
            call(test.copy(), "not a model", **kwargs)
    with pytest.raises(ValueError, match="min_confidence"):
        cellular.tl.cellular_annotate(test.copy(), symphony_model, min_confidence=1.5)
    with pytest.raises(ValueError, match="unknown_label"):
        cellular.tl.cellular_annotate(test.copy(), symphony_model, unknown_label="B cell")
    # Counts and labels of the wrong kind are refused before any cell is embedded.
    bad_arguments = [
        (cellular.tl.cellular_annotate, {"unknown_label": None}, "unknown_label must be a non-empty string"),
        (cellular.tl.cellular_annotate, {"batch_size": 0}, "batch_size must be a positive integer"),
        (cellular.tl.cellular_map, {"batch_size": 0}, "batch_size must be a positive integer"),
        (cellular.tl.cellular_map, {"unknown_label": ""}, "unknown_label must be a non-empty string"),
        (cellular.tl.novel_types, {"n_markers": -1}, "n_markers must be a positive integer"),
        (cellular.tl.novel_types, {"min_group_size": 0}, "min_group_size must be a positive integer"),
        (cellular.tl.cellular_embed, {"batch_size": 2.5}, "batch_size must be a positive integer"),
        (
            cellular.tl.cell_type_representations,
            {"labels_key": "cell_type", "max_medoid_cells": 0},
            "max_medoid_cells must be a positive integer",
        ),
    ]
    for call, kwargs, match in bad_arguments:
        with pytest.raises(ValueError, match=match):
            call(test.copy(), symphony_model, **kwargs)
    with pytest.raises(ValueError, match=r"gene_classifier_weight must be a number in \[0, 1\]"):
        cellular.tl.cellular_annotate(test.copy(), symphony_model, gene_classifier_weight=1.5)
    with pytest.raises(ValueError, match="gene_classifier_weight must be a number"):
        cellular.tl.cellular_annotate(test.copy(), symphony_model, gene_classifier_weight=True)
    with pytest.raises(ValueError, match="novelty_uncertainty_weight"):
        symphony_model.train_classifier(novelty_uncertainty_weight=-1.0)
    with pytest.raises(ValueError, match="novelty_gene_uncertainty_weight must be a non-negative number"):
        symphony_model.train_classifier(novelty_gene_uncertainty_weight=-1.0)
    with pytest.raises(ValueError, match="needs the gene classifier"):
        symphony_model.train_classifier(novelty_gene_uncertainty_weight=0.5, gene_classifier=False)


def test_low_confidence_cells_are_unknown(symphony_model, symphony_split):
    _, test = symphony_split
    query = test.copy()
    cellular.tl.cellular_annotate(query, symphony_model, novel_as_unknown=False, min_confidence=0.9)
    low = query.obs["cellular_label_confidence"].to_numpy() < 0.9
    assert 0 < low.sum() < query.n_obs
    np.testing.assert_array_equal(query.obs["cellular_label"].to_numpy() == "Unknown", low)
