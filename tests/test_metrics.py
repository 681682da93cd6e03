"""Calibration and conformal helpers against naive reference implementations."""

import numpy as np
import pytest
import torch

from cellular.metrics import benjamini_hochberg, conformal_pvalues, expected_calibration_error
from cellular.model._novelty import NoveltyReference, shrink_spreads
from cellular.model._novelty_spaces import NoveltySpaces, PCASpace
from cellular.nn import CellTypeClassifier, fit_temperature


def naive_ece(probabilities, labels, n_bins):
    total = 0.0
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        members = [
            i
            for i in range(len(labels))
            if (low < probabilities[i].max() <= high) or (b == 0 and probabilities[i].max() == 0)
        ]
        if members:
            accuracy = np.mean([probabilities[i].argmax() == labels[i] for i in members])
            confidence = np.mean([probabilities[i].max() for i in members])
            total += len(members) * abs(accuracy - confidence)
    return total / len(labels)


def naive_bh(pvalues):
    n = len(pvalues)
    adjusted = []
    for p in pvalues:
        rank_values = [min(1.0, q * n / (sorted(pvalues).index(q) + 1 + sorted(pvalues).count(q) - 1)) for q in pvalues]
        adjusted.append(min(v for q, v in zip(pvalues, rank_values, strict=True) if q >= p))
    return np.array(adjusted)


def test_ece_matches_naive_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 4)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 300)
    assert expected_calibration_error(probabilities, labels, 10) == pytest.approx(naive_ece(probabilities, labels, 10))
    one_hot = np.eye(4)[labels]
    assert expected_calibration_error(one_hot, labels) == 0.0
    with pytest.raises(ValueError, match="n_cells"):
        expected_calibration_error(probabilities, labels[:10])
    # Labels that are not column indices, and bin counts that are not positive integers, are refused.
    names = np.asarray(["a", "b", "c", "d"])[labels]
    for bad, match in ((names, "integer type codes"), (labels + 1, "column indices"), (labels[:, None], "1-D")):
        with pytest.raises(ValueError, match=match):
            expected_calibration_error(probabilities, bad)
    for n_bins in (0, 2.5):
        with pytest.raises(ValueError, match="n_bins must be a positive integer"):
            expected_calibration_error(probabilities, labels, n_bins)


def test_conformal_pvalues_match_counting_and_are_valid():
    rng = np.random.default_rng(1)
    calibration = rng.normal(size=200)
    scores = np.concatenate([rng.normal(size=5), calibration[:3]])
    expected = [(1 + sum(c >= s for c in calibration)) / 201 for s in scores]
    np.testing.assert_allclose(conformal_pvalues(calibration, scores), expected)
    # exchangeable scores: averaged over calibration draws, the flagged fraction at alpha is at most alpha
    for alpha in (0.05, 0.2):
        rates = [(conformal_pvalues(rng.normal(size=99), rng.normal(size=2000)) <= alpha).mean() for _ in range(200)]
        assert alpha - 0.01 < np.mean(rates) <= alpha + 0.005
    with pytest.raises(ValueError, match="calibration"):
        conformal_pvalues([], scores)
    # A NaN has no rank: it would get the smallest p-value as a score, and count as the largest in calibration.
    with pytest.raises(ValueError, match="scores hold 1 NaN"):
        conformal_pvalues(calibration, [np.nan, 1.0])
    with pytest.raises(ValueError, match="calibration_scores hold 1 NaN"):
        conformal_pvalues([1.0, np.nan], scores)


def test_benjamini_hochberg_matches_naive():
    rng = np.random.default_rng(2)
    pvalues = np.concatenate([rng.uniform(size=40), rng.uniform(0, 0.01, size=10)])
    np.testing.assert_allclose(benjamini_hochberg(pvalues), naive_bh(list(pvalues)))
    assert benjamini_hochberg(np.array([])).size == 0
    for bad in (np.nan, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"pvalues must lie in \[0, 1\]"):
            benjamini_hochberg(np.array([0.01, bad, 0.5]))


def test_score_threshold_agrees_with_pvalues():
    rng = np.random.default_rng(3)
    reference = NoveltyReference(
        prototypes=np.eye(2, dtype=np.float32),
        spreads=np.ones(2),
        distance_scale=1.0,
        uncertainty_scale=1.0,
        uncertainty_weight=0.1,
        calibration_scores=np.sort(rng.normal(size=99)),
        calibration_source="validation",
    )
    scores = rng.normal(size=5000) * 1.5
    for alpha in (0.01, 0.05, 0.3):
        flagged = reference.pvalues(scores) <= alpha
        np.testing.assert_array_equal(flagged, scores >= reference.score_threshold(alpha))
    assert reference.score_threshold(0.005) == float("inf")


def test_spread_shrinkage_matches_naive_weighted_log_average():
    spreads = np.array([0.01, 0.02, 0.5, 0.001, 1.0])
    counts = np.array([400, 300, 3, 6, 0])
    pooled = sorted(np.log(spreads[:4]))
    pooled = (pooled[1] + pooled[2]) / 2
    expected = [
        np.exp((n * np.log(s) + 10 * pooled) / (n + 10)) if n else s for s, n in zip(spreads, counts, strict=True)
    ]
    np.testing.assert_allclose(shrink_spreads(spreads, counts), expected)


def _naive_mean_knn(reference, cells, k, skip_own_row=False):
    means = []
    for row, cell in enumerate(cells):
        distances = sorted(
            (float(np.linalg.norm(cell - other)), j)
            for j, other in enumerate(reference)
            if not (skip_own_row and j == row)
        )[:k]
        means.append((np.mean([d for d, _ in distances]), [j for _, j in distances]))
    return means


def test_relative_standardised_space_matches_naive_reference():
    rng = np.random.default_rng(5)
    values = np.abs(rng.normal(size=(120, 12))).astype(np.float32) * np.linspace(0.1, 3, 12, dtype=np.float32)
    values[:, 3] = 2.0  # a constant feature: unit scale, not a division by zero
    queries = np.abs(rng.normal(size=(7, 12))).astype(np.float32)
    space = PCASpace.fit(values, seed=0, unit_length=False, standardize=True, relative=True, n_components=5)
    scale = values.std(axis=0)
    scale[3] = 1.0
    np.testing.assert_allclose(space.scale, scale, rtol=1e-5)
    standardised = np.clip((queries - values.mean(axis=0)) / scale, -10, 10)
    np.testing.assert_allclose(space.project(queries), standardised @ space.components, rtol=1e-4, atol=1e-5)
    radius = [mean for mean, _ in _naive_mean_knn(space.reference, space.reference, 15, skip_own_row=True)]
    np.testing.assert_allclose(space.radius, radius, rtol=1e-4)
    projected = space.project(queries)
    expected = [
        mean / np.mean(np.asarray(radius)[neighbours])
        for mean, neighbours in _naive_mean_knn(space.reference, projected, 15)
    ]
    np.testing.assert_allclose(space.distances(projected), expected, rtol=1e-4)


def test_standardised_relative_space_round_trips_and_refuses_damaged_arrays():
    rng = np.random.default_rng(7)
    values = np.abs(rng.normal(size=(60, 9))).astype(np.float32)
    space = PCASpace.fit(values, seed=0, unit_length=False, standardize=True, relative=True, n_components=4)
    arrays = space.to_arrays("gene")
    loaded = PCASpace.from_arrays(arrays, "gene", unit_length=False, n_features=9)
    queries = np.abs(rng.normal(size=(5, 9))).astype(np.float32)
    np.testing.assert_array_equal(loaded.distances(loaded.project(queries)), space.distances(space.project(queries)))
    for name, damaged in (("gene_scale", -arrays["gene_scale"]), ("gene_radius", arrays["gene_radius"][:-1])):
        with pytest.raises(ValueError, match="novelty gene space is inconsistent; the model file is damaged"):
            PCASpace.from_arrays({**arrays, name: damaged}, "gene", unit_length=False, n_features=9)


def test_type_scale_matches_naive_reference_for_small_types_only():
    """A type of fewer cells than the 15 neighbours averaged gets the ratio of its cells' median neighbour distance
    to the median over types (at least 1); larger types get 1; a cell's distance is divided by its nearest reference
    cell's factor. It round-trips and refuses damaged arrays."""
    rng = np.random.default_rng(3)
    centres = np.eye(6, dtype=np.float32) * 6
    labels = np.repeat([0, 1, 2], [40, 40, 6])
    values = centres[labels] + rng.normal(size=(86, 6)).astype(np.float32) * np.array([0.5, 0.5, 3.0])[labels, None]
    space = PCASpace.fit(values, seed=0, unit_length=False, labels=labels, n_components=6)
    own = np.array([mean for mean, _ in _naive_mean_knn(space.reference, space.reference, 15, skip_own_row=True)])
    spreads = np.array([np.median(own[labels == t]) for t in range(3)])
    factor = np.where(np.arange(3) == 2, np.maximum(spreads / np.median(spreads), 1.0), 1.0)
    np.testing.assert_allclose(space.type_scale, factor[labels], rtol=1e-4)
    assert factor[2] > 1.5 and space.type_scale[labels < 2].tolist() == [1.0] * 80
    queries = (centres[[0, 2, 2]] + rng.normal(size=(3, 6))).astype(np.float32)
    projected = space.project(queries)
    expected = [
        mean / factor[labels[neighbours[0]]] for mean, neighbours in _naive_mean_knn(space.reference, projected, 15)
    ]
    np.testing.assert_allclose(space.distances(projected), expected, rtol=1e-4)
    arrays = space.to_arrays("gene")
    loaded = PCASpace.from_arrays(arrays, "gene", unit_length=False, n_features=6)
    np.testing.assert_array_equal(loaded.distances(projected), space.distances(projected))
    for damaged in (arrays["gene_type_scale"][:-1], np.full_like(arrays["gene_type_scale"], 0.5)):
        with pytest.raises(ValueError, match="novelty gene space is inconsistent; the model file is damaged"):
            PCASpace.from_arrays({**arrays, "gene_type_scale": damaged}, "gene", unit_length=False, n_features=6)


def _reference_with_gene_space(gene_weight, matching_gene_weight=None):
    """A novelty reference over two types with a hidden-layer and a gene space, and query cells' inputs to it."""
    rng = np.random.default_rng(11)
    labels = np.repeat([0, 1], 150)
    z = np.eye(8)[labels] + 0.1 * rng.standard_normal((300, 8))
    activations = np.abs(z @ rng.standard_normal((8, 20))).astype(np.float32)
    genes = (np.abs(rng.normal(size=(300, 30))) + labels[:, None]).astype(np.float32)
    hidden = PCASpace.fit(activations[:200], seed=0, unit_length=True, relative=True, n_components=5)
    gene_space = PCASpace.fit(genes[:200], seed=0, unit_length=False, standardize=True, relative=True, n_components=5)
    spaces = NoveltySpaces(hidden, gene_space)
    probabilities = np.where(np.eye(2)[labels] > 0, 0.9, 0.1)
    reference = NoveltyReference.fit(
        z[:200],
        labels[:200],
        2,
        z[200:],
        probabilities[200:],
        "validation",
        spaces=spaces,
        projections_calibration=spaces.project(genes[200:], activations[200:]),
        gene_weight=gene_weight,
        matching_gene_weight=matching_gene_weight,
    )
    queries = (z[200:] + 0.3 * rng.standard_normal((100, 8)), probabilities[200:])
    query_genes = genes[200:] + rng.normal(size=(100, 30)).astype(np.float32)
    return reference, (*queries, spaces.project(query_genes, activations[200:]))


def test_moment_matching_scores_read_the_gene_distance_at_its_own_weight():
    """Matching scores and their p-values are those of the same reference fitted at the matching weight."""
    reference, query = _reference_with_gene_space(gene_weight=4.0, matching_gene_weight=2.0)
    at_matching, _ = _reference_with_gene_space(gene_weight=2.0)
    assert at_matching.matching_calibration_scores is None  # equal weights keep one set of scores
    np.testing.assert_allclose(reference.matching_calibration_scores, at_matching.calibration_scores)
    np.testing.assert_allclose(reference.matching_scores(*query), at_matching.scores(*query))
    np.testing.assert_allclose(
        reference.matching_pvalues(reference.matching_scores(*query)),
        at_matching.matching_pvalues(at_matching.scores(*query)),
    )
    assert not np.allclose(reference.scores(*query), at_matching.scores(*query))
    assert reference.score_weights()["gene_distance"] == 4.0

    loaded = NoveltyReference.from_saved(reference.to_arrays(), reference.to_metadata(), n_genes=30)
    assert loaded.matching_gene_weight == 2.0
    np.testing.assert_array_equal(loaded.matching_scores(*query), reference.matching_scores(*query))
    np.testing.assert_array_equal(loaded.matching_calibration_scores, reference.matching_calibration_scores)
    arrays = reference.to_arrays()
    for damaged_arrays, metadata in (
        ({key: value for key, value in arrays.items() if key != "matching_calibration_scores"}, None),
        ({**arrays, "matching_calibration_scores": arrays["matching_calibration_scores"][:-1]}, None),
        (arrays, {**reference.to_metadata(), "matching_gene_weight": None}),
    ):
        with pytest.raises(ValueError, match="novelty matching scores are inconsistent; the model file is damaged"):
            NoveltyReference.from_saved(damaged_arrays, metadata or reference.to_metadata(), n_genes=30)


def _directions(rng, centre, n_cells, noise, n_latent=8):
    return centre + noise * rng.standard_normal((n_cells, n_latent))


def test_a_tiny_wide_type_does_not_hide_novel_cells():
    """Three scattered cells of a rare type must not make every far-away cell look like that type."""
    rng = np.random.default_rng(0)
    centres = np.eye(8)
    z_train = np.vstack(
        [
            _directions(rng, centres[0], 300, 0.05),
            _directions(rng, centres[1], 300, 0.05),
            _directions(rng, centres[2], 3, 0.6),
        ]
    )
    labels = np.repeat([0, 1, 2], [300, 300, 3])
    z_calibration = np.vstack([_directions(rng, centres[0], 100, 0.05), _directions(rng, centres[1], 100, 0.05)])
    probabilities = np.full((200, 3), 0.05)
    probabilities[:, 0] = 0.9
    reference = NoveltyReference.fit(z_train, labels, 3, z_calibration, probabilities, "validation")
    novel = _directions(rng, 0.5 * centres[5] + centres[2], 50, 0.05)
    confident = np.tile([0.05, 0.05, 0.9], (50, 1))  # the classifier calls them the rare type, confidently
    scores = reference.scores(novel, confident)
    assert (reference.pvalues(scores) <= 0.05).mean() > 0.9
    own = np.median(
        1
        - (z_train[labels == 2] / np.linalg.norm(z_train[labels == 2], axis=1, keepdims=True)) @ reference.prototypes[2]
    )
    assert reference.spreads[2] < own


def test_fit_temperature_recovers_the_generating_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 5, generator=generator) * 3
    labels = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError, match="held-out"):
        fit_temperature(logits[:0], labels[:0])


def test_classifier_returns_logits_of_the_right_shape():
    head = CellTypeClassifier(16, 3, (8, 4), 0.1)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 3)
    assert not torch.allclose(out.sum(1), torch.ones(5))  # logits, not probabilities
    with pytest.raises(ValueError, match="hidden_sizes"):
        CellTypeClassifier(16, 3, (8,))


# ------------------------------------------------------------------------------------------- hierarchies
def _naive_hierarchical_f1(true, predicted, parents, unknown="Unknown"):
    """Kiritchenko's definition cell by cell, with Python sets: the reference for the vectorised metric."""

    def extended(label):
        chain = {label}
        while label in parents:
            label = parents[label]
            chain.add(label)
        return chain

    shared = in_predicted = in_true = 0
    for label, guess in zip(true, predicted, strict=True):
        expected, given = extended(label), set() if guess == unknown else extended(guess)
        shared += len(expected & given)
        in_predicted += len(given)
        in_true += len(expected)
    precision, recall = shared / in_predicted, shared / in_true
    return precision, recall, 2 * precision * recall / (precision + recall)


def test_hierarchical_f1_matches_the_definition_on_real_labels(symphony):
    from cellular.data import lineage_map
    from cellular.metrics import hierarchical_f1

    parents = lineage_map("pbmc")
    true = symphony.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    vocabulary = np.array([*sorted(set(true)), "T cell", "monocyte", "lymphoid", "Unknown"])
    predicted = np.where(rng.random(true.size) < 0.3, rng.choice(vocabulary, true.size), true)
    result = hierarchical_f1(true, predicted, parents)
    np.testing.assert_allclose(
        [result["precision"], result["recall"], result["f1"]], _naive_hierarchical_f1(true, predicted, parents)
    )
    assert hierarchical_f1(true, true, parents)["f1"] == 1.0
    cd8 = np.repeat("CD8 T cell", 10)
    parent = hierarchical_f1(cd8, np.repeat("T cell", 10), parents)
    sibling = hierarchical_f1(cd8, np.repeat("CD4 T cell", 10), parents)
    other_lineage = hierarchical_f1(cd8, np.repeat("CD14 Monocyte", 10), parents)
    assert parent["precision"] == 1.0 and parent["f1"] > sibling["f1"] > other_lineage["f1"] == 0.0


@pytest.mark.parametrize(
    ("name", "datasets"),
    [
        ("pbmc", ["pbmc_symphony_3tech", "pbmc3k_seurat", "pbmc_kang2018_ifnb_subset"]),
        ("pancreas", ["pancreas_baron_toy", "pancreas_endocrinogenesis_mouse"]),
    ],
)
def test_lineage_maps_cover_the_shared_vocabularies(name, datasets):
    import anndata as ad
    from conftest import data_dir, read_dataset

    from cellular.data import ancestors, lineage_map

    parents = lineage_map(name)
    roots = {ancestors(label, parents)[-1] for label in parents}
    for dataset in datasets:
        read_dataset(dataset)  # skips or fails as the other real-data tests do when the data is absent
        types = set(ad.read_h5ad(data_dir() / f"{dataset}.h5ad", backed="r").obs["cell_type"].astype(str))
        assert types <= set(parents), (dataset, types - set(parents))
        assert {ancestors(t, parents)[-1] for t in types} <= roots
    assert len(roots) >= 3  # several lineages, not one tree with a single top
