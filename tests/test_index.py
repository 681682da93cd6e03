"""ReferenceIndex, exact kNN and label transfer, checked against naive implementations."""

import json

import numpy as np
import pandas as pd
import pytest

import cellular
from cellular.index import _exact, exact_knn, neighbor_weights, vote


def _clustered(n_cells, n_latent=16, n_types=4, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).standard_normal((n_types, n_latent))
    types = rng.integers(0, n_types, n_cells)
    return (centres[types] + spread * rng.standard_normal((n_cells, n_latent))).astype(np.float32), types


def _naive_knn(reference, queries, k, metric):
    if metric == "cosine":
        r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        distances = 1.0 - q.astype(np.float64) @ r.T.astype(np.float64)
    else:
        distances = np.sqrt(((queries[:, None, :].astype(np.float64) - reference[None]) ** 2).sum(-1))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(distances, order, axis=1)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_knn_matches_brute_force_across_chunks(metric, monkeypatch):
    import torch

    reference, _ = _clustered(700, seed=1)
    queries, _ = _clustered(90, seed=2)
    if metric == "cosine":
        reference_input = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        queries_input = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    else:
        reference_input, queries_input = reference, queries
    expected_index, expected_distance = _naive_knn(reference, queries, 12, metric)
    # Small blocks force several query and reference chunks, exercising the running top-k merge.
    monkeypatch.setattr(_exact, "_SCORE_BLOCK_ELEMENTS", 32 * 50)
    indices, distances = exact_knn(torch.from_numpy(reference_input), queries_input, 12, metric=metric, query_chunk=32)
    np.testing.assert_allclose(distances, expected_distance, atol=1e-4)
    assert (np.sort(indices, axis=1) == np.sort(expected_index, axis=1)).mean() > 0.99
    assert (np.diff(distances, axis=1) >= -1e-6).all()


def test_vote_matches_naive_loop():
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 5, size=(200, 9))
    codes[0] = -1  # a cell whose neighbours are all unlabelled
    weights = rng.uniform(0.1, 2.0, size=codes.shape)
    probabilities = vote(codes, weights, 5)
    expected = np.zeros((200, 5))
    for cell in range(200):
        for neighbour in range(9):
            if codes[cell, neighbour] >= 0:
                expected[cell, codes[cell, neighbour]] += weights[cell, neighbour]
        total = expected[cell].sum()
        if total > 0:
            expected[cell] /= total
    np.testing.assert_allclose(probabilities, expected, atol=1e-12)
    assert probabilities[0].sum() == 0


def test_distance_weights_are_a_softmax_of_negative_distances():
    distances = np.array([[0.1, 0.2, 0.5], [1.0, 1.0, 3.0]])
    weights = neighbor_weights(distances, weighting="distance", temperature=0.25)
    ratio = weights / weights.sum(axis=1, keepdims=True)
    softmax = np.exp(-distances / 0.25) / np.exp(-distances / 0.25).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ratio, softmax)
    np.testing.assert_array_equal(neighbor_weights(distances, weighting="uniform", temperature=1.0), 1.0)
    with pytest.raises(ValueError, match="weighting"):
        neighbor_weights(distances, weighting="gaussian", temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        neighbor_weights(distances, weighting="distance", temperature=0.0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_index_query_and_label_transfer(metric):
    reference, types = _clustered(1500, spread=1.2)
    queries, query_types = _clustered(300, seed=5, spread=1.2)
    names = np.array(["alpha", "beta", "gamma", "delta"])
    lineage = np.array(["one", "one", "two", "two"])
    labels = {"cell_type": names[types], "lineage": lineage[types]}
    index = cellular.ReferenceIndex.from_embedding(reference, labels, metric=metric, backend="exact", device="cpu")
    assert index.backend == "exact" and index.label_levels == ["cell_type", "lineage"]

    indices, distances = index.query(queries, k=10)
    expected_index, expected_distance = _naive_knn(reference, queries, 10, metric)
    np.testing.assert_allclose(distances, expected_distance, atol=1e-4)
    assert (np.sort(indices, axis=1) == np.sort(expected_index, axis=1)).mean() > 0.99

    result = index.transfer_labels(queries, k=10, min_probability=0.0)
    assert (np.asarray(result.labels["cell_type"]) == names[query_types]).mean() > 0.85
    assert (np.asarray(result.labels["lineage"]) == lineage[query_types]).mean() > 0.85
    np.testing.assert_allclose(result.probabilities["cell_type"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        result.uncertainty["cell_type"], 1.0 - result.probabilities["cell_type"].max(axis=1), atol=1e-6
    )
    # Raising the threshold turns exactly the cells below it into "Unknown".
    strict = index.transfer_labels(queries, k=10, min_probability=0.9)
    below = result.probabilities["cell_type"].max(axis=1) < 0.9
    assert below.any()
    np.testing.assert_array_equal(np.asarray(strict.labels["cell_type"]) == "Unknown", below)


def test_unlabelled_reference_cells_do_not_vote():
    reference, types = _clustered(400)
    labels = np.where(types == 0, "Unknown", np.array(["a", "b", "c", "d"])[types])
    index = cellular.ReferenceIndex.from_embedding(reference, {"cell_type": labels}, backend="exact", device="cpu")
    assert list(index.labels["cell_type"].categories) == ["b", "c", "d"]
    type0 = reference[types == 0][:20]
    result = index.transfer_labels(type0, k=5, min_probability=0.0)
    # Their neighbours are (almost) all unlabelled type-0 cells: no vote, so "Unknown" with uncertainty 1.
    assert (np.asarray(result.labels["cell_type"]) == "Unknown").mean() > 0.8


def test_distance_pvalues_are_uniform_for_reference_like_cells_and_small_for_far_ones():
    reference, _ = _clustered(3000)
    same, _ = _clustered(1000, seed=9)
    far = same + 3.0 * np.random.default_rng(1).standard_normal(same.shape).astype(np.float32)
    labels = {"t": np.zeros(3000, dtype=int)}
    index = cellular.ReferenceIndex.from_embedding(reference, labels, metric="euclidean", backend="exact", device="cpu")
    near = index.transfer_labels(same, k=15).distance_pvalue
    away = index.transfer_labels(far, k=15).distance_pvalue
    assert abs((near <= 0.1).mean() - 0.1) < 0.05
    assert (away <= 0.05).mean() > 0.95


def test_held_out_calibration_equals_a_naive_computation_and_survives_save_and_load(tmp_path):
    """Distance p-values calibrated on held-out cells: each one's distances to its nearest reference cells, without
    the nearest reference cell of its own name (half of them are reference cells embedded again, a hair away; ten
    reference names occur twice)."""
    reference, _ = _clustered(400)
    names = np.array([f"ref_{i % 390}" for i in range(400)])  # the last ten repeat names of the first ten
    rng = np.random.default_rng(3)
    again = reference[:30] + 1e-3 * rng.standard_normal((30, reference.shape[1]))
    held_out = np.vstack([again, _clustered(30, seed=8)[0]]).astype(np.float32)
    held_out_names = [*names[:30], *(f"new_{i}" for i in range(30))]
    index = cellular.ReferenceIndex.from_embedding(
        reference,
        {"t": np.zeros(400, dtype=int)},
        names,
        metric="euclidean",
        backend="exact",
        device="cpu",
        calibration_embedding=held_out,
        calibration_cell_names=held_out_names,
    )
    assert index.calibration_source == "held-out cells read as a query"
    distances = np.linalg.norm(held_out[:, None, :] - reference[None, :, :], axis=2)
    distances[np.arange(30), np.arange(30)] = np.inf  # a cell does not count itself
    naive = np.sort(distances, axis=1)[:, :15].mean(axis=1)
    np.testing.assert_allclose(index.reference_mean_distances(15), naive, rtol=1e-4)
    # More neighbours than the 50 computed at build: the held-out cells are kept, so they are measured again.
    np.testing.assert_allclose(index.reference_mean_distances(80), np.sort(distances, 1)[:, :80].mean(1), rtol=1e-4)
    queries = _clustered(50, seed=11)[0]
    query_distances = np.sort(np.linalg.norm(queries[:, None, :] - reference[None, :, :], axis=2), axis=1)[:, :15]
    expected = cellular.metrics.conformal_pvalues(naive, query_distances.mean(axis=1))
    np.testing.assert_allclose(index.transfer_labels(queries, k=15).distance_pvalue, expected, rtol=1e-5)
    index.save(tmp_path / "index")
    loaded = cellular.ReferenceIndex.load(tmp_path / "index")
    assert loaded.calibration_source == index.calibration_source
    assert loaded.temperature == index.temperature
    np.testing.assert_array_equal(loaded.reference_mean_distances(60), index.reference_mean_distances(60))
    np.testing.assert_array_equal(
        loaded.transfer_labels(queries, k=15).distance_pvalue, index.transfer_labels(queries, k=15).distance_pvalue
    )
    plain = cellular.ReferenceIndex.from_embedding(reference, metric="euclidean", backend="exact", device="cpu")
    assert plain.calibration_source == "reference cells"
    assert plain.temperature == index.temperature  # the vote's kernel width still comes from the reference cells


def test_index_rejects_bad_input():
    reference, types = _clustered(100)
    with pytest.raises(ValueError, match="backend must be one of"):
        cellular.ReferenceIndex.from_embedding(reference, backend="annoy")
    with pytest.raises(ValueError, match="metric"):
        cellular.ReferenceIndex.from_embedding(reference, metric="manhattan")
    with pytest.raises(ValueError, match="NaN"):
        cellular.ReferenceIndex.from_embedding(np.where(reference > 2, np.nan, reference))
    with pytest.raises(ValueError, match="values for 100 reference cells"):
        cellular.ReferenceIndex.from_embedding(reference, {"cell_type": types[:50]})
    index = cellular.ReferenceIndex.from_embedding(reference, {"cell_type": types.astype(str)}, backend="exact")
    with pytest.raises(ValueError, match="dimensions"):
        index.query(reference[:, :5])
    with pytest.raises(ValueError, match="k must lie"):
        index.query(reference, k=101)
    with pytest.raises(KeyError, match="lineage"):
        index.transfer_labels(reference, levels=["lineage"])
    with pytest.raises(ValueError, match="unknown_label"):
        index.transfer_labels(reference, unknown_label="1")
    with pytest.raises(ValueError, match="min_probability"):
        index.transfer_labels(reference, min_probability=1.5)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            cellular.ReferenceIndex.from_embedding(reference, device="cuda")


def test_auto_backend_choice(monkeypatch):
    from cellular.index import _reference

    reference, _ = _clustered(300)
    assert cellular.ReferenceIndex.from_embedding(reference, device="cpu").backend == "exact"
    monkeypatch.setattr(_reference, "EXACT_CPU_MAX_CELLS", 100)
    assert cellular.ReferenceIndex.from_embedding(reference, device="cpu").backend == "pynndescent"


def test_small_queries_are_answered_exactly_without_compiling_the_graph_search(monkeypatch):
    from cellular.index import _reference

    reference, _ = _clustered(3000)
    queries, _ = _clustered(300, seed=5)
    graph = cellular.ReferenceIndex.from_embedding(reference, backend="pynndescent", device="cpu")
    exact = cellular.ReferenceIndex.from_embedding(reference, backend="exact", device="cpu")
    assert graph._searcher is None  # nothing compiled on construction or load
    for a, b in zip(graph.query(queries, k=10), exact.query(queries, k=10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert graph._searcher is None
    monkeypatch.setattr(_reference, "EXACT_SEARCH_BUDGET", queries.shape[0] * 3000 - 1)
    approximate, _ = graph.query(queries, k=10)
    assert graph._searcher is not None
    overlap = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(approximate, exact.query(queries, k=10)[0], strict=True)]
    )
    assert overlap > 0.95


def test_faiss_index_is_reproducible_and_searches_a_loaded_copy_alike(tmp_path):
    reference, types = _clustered(3000)
    queries, _ = _clustered(300, seed=5)
    index = cellular.ReferenceIndex.from_embedding(reference, {"cell_type": types}, backend="faiss", device="cpu")
    again = cellular.ReferenceIndex.from_embedding(reference, {"cell_type": types}, backend="faiss", device="cpu")
    np.testing.assert_array_equal(index._faiss_index, again._faiss_index)  # one-thread build: same bytes
    exact = cellular.ReferenceIndex.from_embedding(reference, backend="exact", device="cpu")
    found, truth = index.query(queries, k=15)[0], exact.query(queries, k=15)[0]
    assert np.mean([len(set(a) & set(b)) / 15 for a, b in zip(found, truth, strict=True)]) > 0.97
    index.save(tmp_path / "index")
    loaded = cellular.ReferenceIndex.load(tmp_path / "index")
    assert loaded.backend == "faiss"
    for a, b in zip(index.query(queries, k=15), loaded.query(queries, k=15), strict=True):
        np.testing.assert_array_equal(a, b)

    # Where faiss is not installed, the index still loads and searches exactly.
    from unittest import mock

    from cellular.index import _faiss

    def missing(name, *args):
        raise ImportError(f"No module named {name!r}")

    with mock.patch.object(_faiss, "import_module", missing):
        fallback = cellular.ReferenceIndex.load(tmp_path / "index")
    assert fallback.backend == "exact"
    np.testing.assert_array_equal(fallback.query(queries, k=15)[0], truth)


@pytest.mark.parametrize("backend", ["exact", "pynndescent"])
def test_save_load_round_trip_is_exact(tmp_path, backend, monkeypatch):
    from cellular.index import _reference

    monkeypatch.setattr(_reference, "EXACT_SEARCH_BUDGET", 0)  # every query through the graph search
    reference, types = _clustered(2000)
    queries, _ = _clustered(200, seed=3)
    labels = pd.DataFrame({"cell_type": np.array(list("abcd"))[types], "lineage": np.array(list("xxyy"))[types]})
    names = [f"ref_{i}" for i in range(2000)]
    index = cellular.ReferenceIndex.from_embedding(reference, labels, names, backend=backend, device="cpu", seed=4)
    index.save(tmp_path / "index")
    with pytest.raises(FileExistsError):
        index.save(tmp_path / "index")
    loaded = cellular.ReferenceIndex.load(tmp_path / "index")
    assert loaded.backend == backend and list(loaded.cell_names) == names
    assert loaded.temperature == index.temperature
    for a, b in zip(index.query(queries, k=15), loaded.query(queries, k=15), strict=True):
        np.testing.assert_array_equal(a, b)
    first, second = index.transfer_labels(queries), loaded.transfer_labels(queries)
    for level in ("cell_type", "lineage"):
        np.testing.assert_array_equal(np.asarray(first.labels[level]), np.asarray(second.labels[level]))
        np.testing.assert_array_equal(first.probabilities[level], second.probabilities[level])
    np.testing.assert_array_equal(first.distance_pvalue, second.distance_pvalue)
    # Nothing in the folder needs pickle.
    with np.load(tmp_path / "index" / "arrays.npz", allow_pickle=False) as stored:
        assert all(stored[name].dtype != object for name in stored.files)


def test_label_levels_survive_a_metadata_file_rewritten_with_sorted_keys(tmp_path):
    """The metadata checksum reads keys sorted, so a tool that sorts them (``jq -S``) must not swap the levels."""
    reference, types = _clustered(300)
    labels = pd.DataFrame({"type": np.array(list("abcd"))[types], "lineage": np.array(list("xxyy"))[types]})
    index = cellular.ReferenceIndex.from_embedding(reference, labels, backend="exact", device="cpu")
    index.save(tmp_path / "index")
    metadata_path = tmp_path / "index" / "index.json"
    metadata_path.write_text(json.dumps(json.loads(metadata_path.read_text()), indent=1, sort_keys=True))
    loaded = cellular.ReferenceIndex.load(tmp_path / "index")
    assert loaded.label_levels == ["type", "lineage"]
    for level in ("type", "lineage"):
        np.testing.assert_array_equal(np.asarray(loaded.labels[level]), np.asarray(index.labels[level]))
