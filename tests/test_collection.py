"""Several h5ad files read as one (``cellular.data.read_collection``): the same results as their concatenation in
memory, for training and every tl function and the CLI, the files left unchanged."""

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata.experimental import AnnCollection
from helpers import SYMPHONY_HELD_OUT, mark_singletons_unlabelled

import cellular
from cellular import CELLULAR
from cellular.data import read_collection
from cellular.data._collection import ROW_COLUMN


def _digests(paths) -> list[str]:
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]


@pytest.fixture(scope="module")
def files(symphony, tmp_path_factory):
    """The Symphony training technologies in one file each, the held-out technology split over two files."""
    folder = tmp_path_factory.mktemp("collection")
    train = symphony[symphony.obs["batch"] != SYMPHONY_HELD_OUT].copy()
    mark_singletons_unlabelled(train)
    query = symphony[symphony.obs["batch"] == SYMPHONY_HELD_OUT].copy()
    query.obs = query.obs[["batch"]].copy()
    paths = {"train": [], "query": []}
    for batch in train.obs["batch"].cat.categories:
        path = folder / f"train_{batch}.h5ad"
        train[train.obs["batch"] == batch].copy().write_h5ad(path)
        paths["train"].append(path)
    for position, cells in enumerate((slice(0, 150), slice(150, None))):
        path = folder / f"query_{position}.h5ad"
        query[cells].copy().write_h5ad(path)
        paths["query"].append(path)
    return paths


def _concatenated(paths) -> ad.AnnData:
    return ad.concat([ad.read_h5ad(path) for path in paths], join="inner", merge="same")


@pytest.fixture(scope="module")
def models(files):
    """The same model trained on the two training files in memory (concatenated) and read as a collection."""
    digests = _digests(files["train"])
    trained = {}
    for mode in ("memory", "collection"):
        adata = _concatenated(files["train"]) if mode == "memory" else read_collection(files["train"])
        CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
        model = CELLULAR(adata, n_top_genes=800)
        model.train(max_epochs=20, progress_bar=False)
        trained[mode] = model
    assert _digests(files["train"]) == digests
    return trained


def test_collection_holds_the_files_cells_and_shared_genes_without_expression(files):
    collection = read_collection(files["query"], label="file")
    parts = [ad.read_h5ad(path) for path in files["query"]]
    assert collection.X is None
    assert collection.n_obs == sum(part.n_obs for part in parts)
    assert list(collection.var_names) == list(parts[0].var_names)
    assert list(collection.obs["file"].unique()) == ["query_0", "query_1"]
    np.testing.assert_array_equal(collection.obs[ROW_COLUMN], np.arange(collection.n_obs))


def test_training_from_a_collection_gives_the_in_memory_model(models):
    memory, collection = models["memory"], models["collection"]
    assert memory.genes == collection.genes and memory.target_sum == collection.target_sum
    np.testing.assert_array_equal(memory.get_latent_representation(), collection.get_latent_representation())


def test_every_tl_function_gives_the_same_result_on_a_collection_query(models, files):
    model = models["memory"]
    index = model.build_reference_index(model.adata)
    digests = _digests(files["query"])
    results = {}
    for mode in ("memory", "collection"):
        query = _concatenated(files["query"]) if mode == "memory" else read_collection(files["query"])
        cellular.tl.cellular_embed(query, model)
        cellular.tl.cellular_annotate(query, model)
        cellular.tl.novel_types(query, model, key_added="novel")
        cellular.tl.cellular_map(query, model, index, key_added="mapped")
        joined = cellular.tl.join_reference_query(query, index, key_added="mapped")
        results[mode] = (query.obs.drop(columns=ROW_COLUMN, errors="ignore"), dict(query.obsm), joined)
    assert _digests(files["query"]) == digests
    (obs_m, obsm_m, joined_m), (obs_c, obsm_c, joined_c) = results["memory"], results["collection"]
    pd.testing.assert_frame_equal(obs_m, obs_c)
    assert set(obsm_m) == set(obsm_c)
    for key in obsm_m:
        np.testing.assert_array_equal(np.asarray(obsm_m[key]), np.asarray(obsm_c[key]), err_msg=key)
    np.testing.assert_array_equal(joined_m.obsm["X_mapped"], joined_c.obsm["X_mapped"])
    model.reference_index_ = None


def test_a_subset_of_a_collection_reads_its_own_cells_and_genes(models, files):
    """Cells taken across both files in a shuffled order, and 70 % of the genes: the rows and columns follow."""
    model = models["memory"]
    memory, collection = _concatenated(files["query"]), read_collection(files["query"])
    cells = np.random.default_rng(0).permutation(memory.n_obs)[:200]
    genes = np.random.default_rng(1).random(memory.n_vars) < 0.7
    expected = model.get_latent_representation(memory[cells][:, genes].copy(), min_gene_overlap=0)
    subset = collection[cells][:, genes].copy()
    np.testing.assert_array_equal(model.get_latent_representation(subset, min_gene_overlap=0), expected)


def test_an_anncollection_of_backed_files_is_read_like_the_paths(models, files):
    model = models["memory"]
    backed = [ad.read_h5ad(path, backed="r") for path in files["query"]]
    members = AnnCollection(backed, join_obs="inner", join_vars="inner")
    expected = model.get_latent_representation(read_collection(files["query"]))
    np.testing.assert_array_equal(model.get_latent_representation(read_collection(members)), expected)
    with pytest.raises(TypeError, match="cannot be used directly"):
        model.get_latent_representation(members)


def test_results_written_to_disk_read_the_files_again(models, files, tmp_path):
    """The collection AnnData, with its results, is written without expression and still reads the files."""
    model = models["memory"]
    collection = read_collection(files["query"])
    cellular.tl.cellular_embed(collection, model)
    collection.write_h5ad(tmp_path / "results.h5ad")
    again = ad.read_h5ad(tmp_path / "results.h5ad")
    np.testing.assert_array_equal(model.get_latent_representation(again), collection.obsm["X_cellular"])


def test_collection_errors_name_the_problem(models, files, tmp_path):
    model = models["memory"]
    with pytest.raises(ValueError, match="index_unique"):
        read_collection([files["query"][0], _copy(files["query"][0], tmp_path / "same_cells.h5ad")])
    moved = _copy(files["query"][1], tmp_path / "moved.h5ad")
    collection = read_collection([files["query"][0], moved])
    moved.unlink()
    with pytest.raises(FileNotFoundError, match="moved or deleted"):
        model.get_latent_representation(collection)
    collection = read_collection(files["query"])
    del collection.obs[ROW_COLUMN]
    with pytest.raises(ValueError, match="missing or damaged"):
        model.get_latent_representation(collection)


def test_cli_reads_several_files_as_one(models, files, tmp_path):
    from cellular._cli import main

    model_dir = tmp_path / "model"
    assert (
        main(
            [
                "train",
                *map(str, files["train"]),
                "--labels-key",
                "cell_type",
                "--batch-key",
                "batch",
                "--n-top-genes",
                "300",
                "--epochs",
                "3",
                "--no-index",
                "-o",
                str(model_dir),
                "--quiet",
            ]
        )
        == 0
    )
    assert CELLULAR.load(model_dir).batches == sorted({"3pv1", "5p"})
    digests = _digests(files["query"])
    outputs = {}
    concatenated = tmp_path / "query.h5ad"
    _concatenated(files["query"]).write_h5ad(concatenated)
    for name, inputs in (("one", [concatenated]), ("several", files["query"])):
        out = tmp_path / f"annotated_{name}.h5ad"
        assert main(["annotate", *map(str, inputs), "-m", str(model_dir), "-o", str(out), "--quiet"]) == 0
        outputs[name] = ad.read_h5ad(out)
    twice = ["annotate", str(files["query"][0]), str(files["query"][0]), "-m", str(model_dir), "-o", str(out)]
    with pytest.raises(SystemExit) as exited:  # a usage error: the same file named twice
        main([*twice, "--quiet", "--overwrite"])
    assert exited.value.code == 2
    assert _digests(files["query"]) == digests
    assert outputs["several"].X is None
    pd.testing.assert_frame_equal(outputs["one"].obs, outputs["several"].obs.drop(columns=ROW_COLUMN))
    np.testing.assert_array_equal(outputs["one"].obsm["X_cellular"], outputs["several"].obsm["X_cellular"])


def _copy(source, destination):
    destination.write_bytes(source.read_bytes())
    return destination
