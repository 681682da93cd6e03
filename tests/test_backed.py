"""Backed (on-disk) AnnData in every entry point: identical results to in-memory data, the file left unchanged."""

import hashlib
import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import data_dir
from helpers import SYMPHONY_HELD_OUT, mark_singletons_unlabelled, pca_knn_macro_f1

import cellular
from cellular import CELLULAR


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(symphony, tmp_path_factory):
    """The Symphony split written to disk: a training file and a held-out-technology query file."""
    folder = tmp_path_factory.mktemp("backed")
    train = symphony[symphony.obs["batch"] != SYMPHONY_HELD_OUT].copy()
    mark_singletons_unlabelled(train)
    query = symphony[symphony.obs["batch"] == SYMPHONY_HELD_OUT].copy()
    query.obs = query.obs[["batch"]].copy()  # a query from another lab carries no labels
    paths = {"train": folder / "train.h5ad", "query": folder / "query.h5ad", "narrow": folder / "narrow.h5ad"}
    train.write_h5ad(paths["train"])
    query.write_h5ad(paths["query"])
    # a query measuring fewer genes: 60 % of the genes, drawn at random, are missing from it
    missing = np.random.default_rng(0).random(query.n_vars) < 0.6
    query[:, ~missing].copy().write_h5ad(paths["narrow"])
    return paths


@pytest.fixture(scope="module")
def models(files):
    """The same model trained from the in-memory and from the backed training file."""
    digest = _digest(files["train"])
    trained = {}
    for mode in ("memory", "backed"):
        adata = ad.read_h5ad(files["train"], backed="r" if mode == "backed" else None)
        CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
        model = CELLULAR(adata, n_top_genes=800)
        model.train(max_epochs=20, progress_bar=False)
        trained[mode] = model
    assert _digest(files["train"]) == digest
    return trained


def _query(files, mode, name="query"):
    return ad.read_h5ad(files[name], backed="r" if mode == "backed" else None)


def test_backed_training_gives_the_in_memory_model(models, files):
    memory, backed = models["memory"], models["backed"]
    assert isinstance(backed.adata.X, ad.abc.CSRDataset)
    assert memory.genes == backed.genes and memory.target_sum == backed.target_sum
    np.testing.assert_array_equal(memory.get_latent_representation(), backed.get_latent_representation())
    np.testing.assert_array_equal(
        memory.calibration_cells_.matrix.toarray(), backed.calibration_cells_.matrix.toarray()
    )


def test_backed_training_reaches_the_in_memory_quality(models, symphony):
    train = symphony[symphony.obs["batch"] != SYMPHONY_HELD_OUT].copy()
    test = symphony[symphony.obs["batch"] == SYMPHONY_HELD_OUT].copy()
    mark_singletons_unlabelled(train)
    model = models["backed"]
    z_train, z_test = model.get_latent_representation(train), model.get_latent_representation(test)
    labels = train.obs["cell_type"].astype(str).to_numpy()
    labelled = np.isin(labels, model.cell_types)
    truth = test.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, model.cell_types)
    from sklearn.metrics import f1_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=15, metric="cosine").fit(z_train[labelled], labels[labelled])
    f1 = f1_score(truth[known], knn.predict(z_test[known]), average="macro")
    assert f1 >= pca_knn_macro_f1(model, train, test)


@pytest.mark.parametrize("panel", ["auto", "refit"])
def test_every_tl_function_gives_the_same_result_on_a_backed_query(models, files, panel):
    model = models["memory"]
    index = model.build_reference_index(model.adata)
    name = "narrow" if panel == "refit" else "query"  # the narrow query is served by a refitted model
    digest = _digest(files[name])
    results = {}
    for mode in ("memory", "backed"):
        query = _query(files, mode, name)
        cellular.tl.cellular_embed(query, model, min_gene_overlap=0)
        cellular.tl.cellular_annotate(query, model, panel=panel)
        cellular.tl.novel_types(query, model, key_added="novel", panel=panel)
        cellular.tl.cellular_map(query, model, index, key_added="mapped", panel=panel)
        served = model.restrict_to_genes(query).reference_index_ if panel == "refit" else index
        joined = cellular.tl.join_reference_query(query, served, key_added="mapped")
        results[mode] = (query.obs.copy(), {k: np.asarray(v) for k, v in query.obsm.items()}, joined)
    assert _digest(files[name]) == digest
    if panel == "refit":
        assert query.uns["cellular"]["mapped_map"]["params"]["panel_path"] == "refit"
    (obs_m, obsm_m, joined_m), (obs_b, obsm_b, joined_b) = results["memory"], results["backed"]
    pd.testing.assert_frame_equal(obs_m, obs_b)
    assert set(obsm_m) == set(obsm_b)
    for key in obsm_m:
        np.testing.assert_array_equal(obsm_m[key], obsm_b[key], err_msg=key)
    np.testing.assert_array_equal(joined_m.obsm["X_mapped"], joined_b.obsm["X_mapped"])
    model.reference_index_ = None


def test_a_backed_reference_refits_without_its_cells_lacking_counts(models, files):
    """The refit leaves out reference cells without counts over the query's genes; a backed reference's subset is
    written to a temporary file and stays on disk."""
    model = models["backed"]
    train = ad.read_h5ad(files["train"])
    counts = train[:, model.genes].X
    genes = [g for g, value in zip(model.genes, np.asarray(counts[0].todense()).ravel(), strict=True) if value == 0]
    empty = np.asarray(train[:, genes].X.sum(axis=1)).ravel() == 0
    assert empty[0] and not empty.all()
    query = _query(files, "memory")[:, genes].copy()
    query = query[np.asarray(query.X.sum(axis=1)).ravel() > 0].copy()
    cellular.tl.cellular_map(query, model, cellular.ReferenceIndex.build(model, model.adata), panel="refit")
    params = query.uns["cellular"]["cellular_map"]["params"]
    assert params["panel_path"] == "refit" and params["n_reference_cells"] == train.n_obs - int(empty.sum())
    assert model.adata.isbacked and model.restrict_to_genes(query).adata.isbacked


def test_cli_reads_backed_files(models, files, tmp_path):
    from cellular._cli import main

    model_dir = tmp_path / "model"
    models["memory"].save(model_dir)
    digest = _digest(files["query"])
    outputs = {}
    for flag in ([], ["--backed"]):
        out = tmp_path / f"annotated{len(flag)}.h5ad"
        assert main(["annotate", str(files["query"]), "-m", str(model_dir), "-o", str(out), "--quiet", *flag]) == 0
        outputs[bool(flag)] = ad.read_h5ad(out)
    assert _digest(files["query"]) == digest
    pd.testing.assert_frame_equal(outputs[False].obs, outputs[True].obs)
    np.testing.assert_array_equal(outputs[False].obsm["X_cellular"], outputs[True].obsm["X_cellular"])


def _synthetic_file(path, n_cells):
    adata = cellular.data.synthetic_counts(n_cells, 600, n_types=5, n_batches=2, seed=1)
    adata.write_h5ad(path)


def test_embedding_memory_grows_with_the_output_only(models, tmp_path, monkeypatch):
    """Peak Python-side memory of embedding a backed file: chunk-bound plus the n x n_latent output."""
    monkeypatch.setattr("cellular.data._backed.ROW_CHUNK", 4_000)  # several chunks at test sizes
    model = models["memory"]
    peaks = {}
    for n_cells in (20_000, 60_000):
        path = tmp_path / f"cells{n_cells}.h5ad"
        adata = cellular.data.synthetic_counts(n_cells, 400, n_types=5, n_batches=2, seed=1)
        adata.var_names = list(model.genes[:400])
        adata.write_h5ad(path)
        matrix_bytes = adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes
        del adata
        backed = ad.read_h5ad(path, backed="r")
        tracemalloc.start()
        z = model.get_latent_representation(backed, min_gene_overlap=0, batch_size=1024)
        peaks[n_cells] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert z.shape == (n_cells, model.n_latent)
        # far below the matrix itself: it is never loaded whole
        assert peaks[n_cells] < 0.5 * matrix_bytes + z.nbytes, (peaks, matrix_bytes)
    output_growth = 40_000 * model.n_latent * 4
    assert peaks[60_000] - peaks[20_000] < 4 * output_growth + 8_000_000, peaks


def test_csc_on_disk_is_refused_with_the_fix(models, tmp_path):
    adata = ad.read_h5ad(data_dir() / "pbmc_symphony_3tech.h5ad")
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    backed = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    with pytest.raises(ValueError, match="column by column"):
        models["memory"].get_latent_representation(backed)


def test_two_files_joined_on_disk_embed_like_one_concatenated_file(models, files, tmp_path):
    """Several files are served as one by joining them on disk (no matrix in memory), then reading backed."""
    from anndata.experimental import concat_on_disk

    query = ad.read_h5ad(files["query"])
    halves = [tmp_path / "first.h5ad", tmp_path / "second.h5ad"]
    query[:200].copy().write_h5ad(halves[0])
    query[200:].copy().write_h5ad(halves[1])
    concat_on_disk([str(p) for p in halves], str(tmp_path / "joined.h5ad"))
    joined = ad.read_h5ad(tmp_path / "joined.h5ad", backed="r")
    model = models["memory"]
    np.testing.assert_array_equal(model.get_latent_representation(joined), model.get_latent_representation(query))


def test_marker_ranking_reads_a_bounded_sample_of_a_backed_query(symphony_model, symphony_split, tmp_path, monkeypatch):
    """novel_types(group=True) ranks markers on at most MARKER_CELLS_PER_GROUP cells per group, read from disk."""
    from cellular.data import NormalizedExpression
    from cellular.tl import _novel

    _, test = symphony_split
    test.write_h5ad(tmp_path / "query.h5ad")
    in_memory = test.copy()
    cellular.tl.novel_types(in_memory, symphony_model, alpha=0.3, group=True)
    full = in_memory.uns["cellular"]["cellular_novel"]["groups"]

    read = []
    original = NormalizedExpression.normalized_rows

    def spy(self, index):
        read.append(len(index))
        return original(self, index)

    monkeypatch.setattr(NormalizedExpression, "normalized_rows", spy)
    monkeypatch.setattr(_novel, "MARKER_CELLS_PER_GROUP", 60)
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    cellular.tl.novel_types(backed, symphony_model, alpha=0.3, group=True)
    sampled = backed.uns["cellular"]["cellular_novel"]["groups"]
    n_groups = len(full) + 1  # the candidate groups and the known cells
    assert read and read[-1] <= 60 * n_groups < test.n_obs
    assert sampled.keys() == full.keys()
    compared = 0
    for name, group in full.items():  # same cells, same groups; the top markers agree on the sample
        assert sampled[name]["n_cells"] == group["n_cells"]
        # a group of a few dozen cells has noisy markers whichever sample of the other cells it is ranked against
        # (a 22-cell monocyte-like group shared 4 of its top 10)
        if group["markers"] and group["n_cells"] >= 30:
            compared += 1
            shared = set(sampled[name]["markers"][:10]) & set(group["markers"][:10])
            assert len(shared) >= 5, (name, group, sampled[name])
    assert compared, {name: group["n_cells"] for name, group in full.items()}


def test_backed_training_reads_windows_of_minibatches(files, monkeypatch):
    """A backed file is read a window of minibatches at a time (one sorted read), not minibatch by minibatch, and
    depth thinning still draws the same numbers as in memory."""
    from cellular.data._expression import BackedColumns

    reads = []
    original = BackedColumns.__getitem__

    def counting(self, index):
        reads.append(len(index))
        return original(self, index)

    embeddings = {}
    for mode in ("memory", "backed"):
        adata = ad.read_h5ad(files["train"], backed="r" if mode == "backed" else None)
        CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
        model = CELLULAR(adata, n_top_genes=300, depth_thinning=0.5)
        if mode == "backed":
            monkeypatch.setattr(BackedColumns, "__getitem__", counting)
        model.train(max_epochs=3, batch_size=64, early_stopping=False, progress_bar=False, classifier=False)
        monkeypatch.undo()
        embeddings[mode] = model.get_latent_representation()
    n_minibatches = 3 * int(np.ceil(0.9 * adata.n_obs / 64))
    print(f"{len(reads)} reads of {sum(reads)} rows for {n_minibatches} training minibatches (+ validation)")
    assert 0 < len(reads) <= 2 * 3  # one training and one validation window per epoch
    np.testing.assert_array_equal(embeddings["memory"], embeddings["backed"])


@pytest.mark.parametrize("dense", [False, True])
def test_a_backed_subset_is_written_chunk_by_chunk(tmp_path, monkeypatch, dense):
    """The refit's subset of a backed reference: the same cells and slots as anndata's subset, written with memory
    bound by the chunk rather than the subset."""
    from cellular.data._backed import write_rows_backed

    monkeypatch.setattr("cellular.data._backed.ROW_CHUNK", 4_000)
    adata = cellular.data.synthetic_counts(30_000, 400, n_types=5, n_batches=2, seed=1)
    if dense:
        adata.X = adata.X.toarray()
    adata.obsm["X_pca"] = np.random.default_rng(0).random((adata.n_obs, 3))
    adata.uns["note"] = "kept"
    adata.write_h5ad(tmp_path / "full.h5ad")
    backed = ad.read_h5ad(tmp_path / "full.h5ad", backed="r")
    rows = np.random.default_rng(1).random(adata.n_obs) < 0.9
    tracemalloc.start()
    subset = write_rows_backed(backed, rows, tmp_path / "subset.h5ad")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert subset.isbacked
    expected = adata[rows].copy()
    written = subset.to_memory()
    pd.testing.assert_frame_equal(written.obs, expected.obs)
    np.testing.assert_array_equal(written.obsm["X_pca"], expected.obsm["X_pca"])
    assert written.uns["note"] == "kept"
    difference = written.X - expected.X
    assert not (difference.nnz if sp.issparse(difference) else np.count_nonzero(difference))
    matrix_bytes = expected.X.data.nbytes + expected.X.indices.nbytes if not dense else expected.X.nbytes
    assert peak < 0.5 * matrix_bytes, (peak, matrix_bytes)
