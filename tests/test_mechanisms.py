"""Each mechanism of the CELLULAR model changes what the model does: these tests fail when one is removed.

The loss terms, their weights, balanced sampling, held-out conformal calibration and distance-weighted label
transfer were each checked by planting their removal and watching the test fail.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SYMPHONY_HELD_OUT, mark_singletons_unlabelled
from lightning.pytorch import Callback
from scipy.stats import spearmanr
from sklearn.neighbors import NearestNeighbors

import cellular
from cellular import CELLULAR
from cellular.nn import inverse_frequency_weights


@pytest.fixture(scope="module")
def reference(symphony):
    """All three technologies: the batch term has three batches to mix."""
    data = symphony.copy()
    mark_singletons_unlabelled(data)
    return data


def _model(data, **kwargs):
    data = data.copy()
    CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
    return CELLULAR(data, n_top_genes=1000, **kwargs)


def _cross_batch_share(embedding, labels, batches, k=15):
    """Mean share of a cell's same-type neighbours (cosine kNN) that come from another batch."""
    neighbours = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(embedding).kneighbors(embedding)[1][:, 1:]
    same_type = labels[neighbours] == labels[:, None]
    other_batch = batches[neighbours] != batches[:, None]
    counts = same_type.sum(1)
    keep = counts > 0
    return float(((same_type & other_batch).sum(1)[keep] / counts[keep]).mean())


def test_class_and_batch_weights_reach_the_loss(reference):
    model = _model(reference)
    labels, batches = model.registered_labels(), model.registered_batches()
    expected_classes = inverse_frequency_weights(torch.from_numpy(labels), len(model.cell_types))
    expected_batches = inverse_frequency_weights(torch.from_numpy(batches), model.n_batches)
    torch.testing.assert_close(model.module.class_weights, expected_classes.float())
    torch.testing.assert_close(model.module.batch_weights, expected_batches.float())
    assert model.module.class_weights.std() > 0.5 * model.module.class_weights.mean()  # far from uniform here
    unweighted = _model(reference, use_class_weights=False).module
    # Uniform weights keep the inverse-frequency weights' total, so the terms keep their scale against each other.
    torch.testing.assert_close(unweighted.class_weights.sum(), model.module.class_weights.sum())
    torch.testing.assert_close(unweighted.batch_weights.sum(), model.module.batch_weights.sum())
    assert unweighted.class_weights.std() == 0

    # The loss of one minibatch reads both buffers.
    rng = np.random.default_rng(0)
    rows = rng.choice(np.flatnonzero(labels >= 0), 256, replace=False)
    tensors = {
        "labels": torch.from_numpy(labels[rows]).reshape(-1, 1),
        "batch": torch.from_numpy(batches[rows]).reshape(-1, 1),
    }
    z = torch.nn.functional.normalize(torch.randn(256, model.n_latent, generator=torch.Generator().manual_seed(0)))
    module = model.module

    def terms():
        extra = module.loss(tensors, {"z": z}).extra_metrics
        return float(extra["snn_loss"]), float(extra["batch_loss"])

    weighted = terms()
    module.class_weights.fill_(1.0)
    module.batch_weights.fill_(1.0)
    uniform = terms()
    assert abs(weighted[0] - uniform[0]) > 1e-3 and abs(weighted[1] - uniform[1]) > 1e-3


def _trained(reference, **kwargs):
    """A model trained for 30 epochs without its classifier head, and the training cells' embedding."""
    model = _model(reference, **kwargs)
    model.train(max_epochs=30, classifier=False, progress_bar=False)
    return model, model.get_latent_representation()


def test_batch_term_mixes_technologies(reference):
    """Same data and seed, with and without the cross-batch term: the term measurably raises mixing. Batch moment
    matching is off here: it mixes the technologies before the encoder, leaving the term less to show."""
    shares = {}
    for weight in (0.0, 1.0):
        model, embedding = _trained(reference, batch_weight=weight, match_batch_moments=False)
        known = model.registered_labels() >= 0
        shares[weight] = _cross_batch_share(
            embedding[known], model.registered_labels()[known], model.registered_batches()[known]
        )
    assert shares[1.0] > shares[0.0] + 0.03, shares


def test_centroid_term_keeps_the_reference_geometry(reference):
    """The centroid term makes the type centroids' distances follow those of the PCA targets."""
    correlations = {}
    for weight in (0.0, 1.0):
        model, embedding = _trained(reference, centroid_weight=weight)
        labels = model.registered_labels()
        centroids = np.stack([embedding[labels == t].mean(0) for t in range(len(model.cell_types))])
        latent = np.linalg.norm(centroids[:, None] - centroids[None], axis=2)
        targets = model.module.centroid_targets.numpy()
        upper = np.triu_indices(len(model.cell_types), 1)
        correlations[weight] = spearmanr(latent[upper], targets[upper]).statistic
    assert correlations[1.0] > correlations[0.0] + 0.1, correlations


class _MinibatchLabels(Callback):
    """Records the labels of every training minibatch."""

    def __init__(self):
        self.labels = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch["labels"].reshape(-1).cpu().numpy())


def test_balanced_sampling_evens_out_the_types_seen_in_training(reference):
    shares = {}
    for balanced in (False, True):
        model = _model(reference)
        recorder = _MinibatchLabels()
        model.train(
            max_epochs=2,
            balanced_sampling=balanced,
            classifier=False,
            early_stopping=False,
            progress_bar=False,
            callbacks=[recorder],
        )
        seen = np.concatenate(recorder.labels)
        counts = np.bincount(seen[seen >= 0], minlength=len(model.cell_types))
        shares[balanced] = counts / counts.sum()
    n_types = len(shares[True])
    # Balanced: every type near 1/n; proportional: the rarest types far below it.
    assert shares[True].min() > 0.5 / n_types, shares[True]
    assert shares[False].min() < 0.25 / n_types, shares[False]


def test_conformal_false_novel_rate_on_unseen_reference_like_cells(symphony):
    """Novelty p-values are calibrated on held-out cells: cells like the reference but never seen in training are
    flagged at about alpha, as conformal p-values promise. The flag rate varies with the test cells drawn and with
    the calibration cells drawn (given them, the chance of a flag is Beta-distributed with variance about
    alpha (1 - alpha) / (n_calibration + 2)): with the default 10 % held out (49 cells here) the rate at alpha = 0.2
    ranged 0.17-0.31 over split seeds, so a quarter of the cells is held out."""
    data = symphony[symphony.obs["batch"] != SYMPHONY_HELD_OUT].copy()
    mark_singletons_unlabelled(data)
    rng = np.random.default_rng(1)
    unseen = rng.random(data.n_obs) < 0.3
    train, test = data[~unseen].copy(), data[unseen].copy()
    mark_singletons_unlabelled(train)
    test = test[test.obs["cell_type"].isin(train.obs["cell_type"].unique()) & (test.obs["cell_type"] != "Unknown")]
    test = test.copy()
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train, n_top_genes=1000)
    model.train(progress_bar=False, train_size=0.75)
    n_calibration = model.classifier_summary_["n_calibration_cells"]
    assert model.classifier_summary_["calibration_source"] == "validation" and n_calibration >= 100
    alpha = 0.2
    cellular.tl.novel_types(test, model, alpha=alpha)
    rate = float((test.obs["cellular_novel_pvalue"] <= alpha).mean())
    margin = 3 * np.sqrt(alpha * (1 - alpha) * (1 / test.n_obs + 1 / (n_calibration + 2)))
    assert rate <= alpha + margin, (rate, alpha + margin, test.n_obs, n_calibration)
    assert rate >= alpha - margin, (rate, alpha - margin, test.n_obs, n_calibration)  # and not trivially conservative


def test_label_transfer_votes_are_distance_weighted(symphony_model, symphony_split):
    """The vote of ``transfer_labels`` is exactly the documented kernel vote, recomputed naively from its neighbours."""
    train, test = symphony_split
    index = cellular.ReferenceIndex.build(symphony_model, train)
    query = symphony_model.get_latent_representation(test)
    result = index.transfer_labels(query, k=15)
    indices, distances = index.query(query, k=15)
    codes = np.asarray(index.labels["cell_type"].codes)
    classes = result.classes["cell_type"]
    naive = np.zeros((len(query), len(classes)))
    for cell in range(len(query)):  # one cell at a time, the reference the vectorised vote is checked against
        for neighbour, distance in zip(indices[cell], distances[cell], strict=True):
            if codes[neighbour] >= 0:
                naive[cell, codes[neighbour]] += np.exp(-(distance - distances[cell].min()) / index.temperature)
    naive /= naive.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.probabilities["cell_type"], naive, rtol=1e-4, atol=1e-6)
    # The kernel matters here: uniform votes would differ by far more than the tolerance.
    uniform = index.transfer_labels(query, k=15, weighting="uniform").probabilities["cell_type"]
    assert np.abs(uniform - naive).max() > 0.05
    pd.testing.assert_index_equal(pd.Index(classes), pd.Index(index.labels["cell_type"].categories.astype(str)))


def test_centroid_targets_are_centroids_of_the_values_the_encoder_reads(reference):
    """Each (batch, type) target centroid is the mean PCA score of the group's cells as the encoder reads them:
    matched to the reference's moments, the PCA fitted on the labelled cells."""
    from sklearn.decomposition import PCA

    from cellular.data import read_expression
    from cellular.model._targets import pca_centroids

    model = _model(reference)
    labels, batches = model.registered_labels(), model.registered_batches()
    expression, _ = read_expression(
        model.adata,
        model.genes,
        layer=None,
        log_normalized=False,
        target_sum=model.target_sum,
        gene_count_fractions=model.gene_count_fractions,
    )
    names = np.asarray(model.batches, dtype=object)[batches]
    expression.standardization = model.batch_moments_.standardization_for(expression, names)
    n_types, n_batches = len(model.cell_types), model.n_batches
    centroids, present = pca_centroids(expression, labels, batches, n_types, n_batches, 50, 0)

    values = expression.rows(np.arange(expression.n_cells))
    scores = PCA(n_components=centroids.shape[2], random_state=0).fit(values[labels >= 0]).transform(values)
    for batch in range(n_batches):
        for cell_type in range(n_types):
            members = (batches == batch) & (labels == cell_type)
            assert present[batch, cell_type] == members.any()
            if members.any():
                np.testing.assert_allclose(centroids[batch, cell_type], scores[members].mean(0), atol=1e-3)


def test_learning_rate_decays_to_zero_over_the_steps_the_sampler_gives(reference):
    """The cosine schedule is planned over the minibatches actually drawn (a small last one is dropped), so the
    learning rate ends near zero and the warm-up lasts the epochs asked for."""
    rates = []

    class _Rates(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    # 1,080 training cells at 256 a batch: 4 full minibatches and a last one of 56, which the sampler drops.
    model = _model(reference)
    model.train(
        max_epochs=12,
        batch_size=256,
        warmup_epochs=2,
        early_stopping=False,
        classifier=False,
        progress_bar=False,
        callbacks=[_Rates()],
    )
    steps_per_epoch = len(rates) // 12
    assert len(rates) == 12 * steps_per_epoch
    peak = max(rates)
    assert rates.index(peak) == 2 * steps_per_epoch - 1  # the rate of the warm-up's last step is the peak
    assert rates[-1] < 0.02 * peak
