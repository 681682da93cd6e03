"""CELLULAR model on real data: quality against PCA, reproducibility, save/load, gene handling, bad input."""

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from helpers import SYMPHONY_HELD_OUT as HELD_OUT
from helpers import mark_singletons_unlabelled, pca_baseline, pca_knn_macro_f1
from sklearn.metrics import silhouette_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import cellular
from cellular import CELLULAR, NotTrainedError


@pytest.fixture(scope="module")
def split(symphony_split):
    return symphony_split


@pytest.fixture(scope="module")
def trained(symphony_model):
    return symphony_model


def knn_accuracy(reference, reference_labels, query, query_labels, metric):
    known = np.isin(query_labels, reference_labels)
    knn = KNeighborsClassifier(n_neighbors=15, metric=metric).fit(reference, reference_labels)
    return float((knn.predict(query[known]) == query_labels[known]).mean())


def cross_batch_fraction(embedding, labels, batches, metric, k=15):
    """Mean fraction of a cell's same-type kNN neighbours that come from another batch."""
    neighbours = NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(embedding).kneighbors(embedding)[1][:, 1:]
    same_type = labels[neighbours] == labels[:, None]
    other_batch = batches[neighbours] != batches[:, None]
    counts = same_type.sum(1)
    keep = counts > 0
    return float(((same_type & other_batch).sum(1)[keep] / counts[keep]).mean())


def test_held_out_technology_beats_pca(trained, split):
    train, test = split
    z_train = trained.get_latent_representation()
    z_test = trained.get_latent_representation(test)
    p_train, p_test = pca_baseline(trained, train, test)
    labelled = train.obs["cell_type"].values != "Unknown"
    y_train = train.obs["cell_type"].values.astype(str)[labelled]
    y_test = test.obs["cell_type"].values.astype(str)

    acc_cellular = knn_accuracy(z_train[labelled], y_train, z_test, y_test, "cosine")
    acc_pca = knn_accuracy(p_train[labelled], y_train, p_test, y_test, "euclidean")
    sil_cellular = silhouette_score(z_test, y_test, metric="cosine")
    sil_pca = silhouette_score(p_test, y_test, metric="euclidean")
    print(f"kNN accuracy {acc_cellular:.3f} vs PCA {acc_pca:.3f}; silhouette {sil_cellular:.3f} vs {sil_pca:.3f}")
    assert acc_cellular >= acc_pca
    assert sil_cellular > sil_pca

    labels = np.concatenate([train.obs["cell_type"].values.astype(str), y_test])
    batches = np.concatenate([train.obs["batch"].values.astype(str), test.obs["batch"].values.astype(str)])
    mixing_cellular = cross_batch_fraction(np.vstack([z_train, z_test]), labels, batches, "cosine")
    mixing_pca = cross_batch_fraction(np.vstack([p_train, p_test]), labels, batches, "euclidean")
    print(f"cross-batch neighbours {mixing_cellular:.3f} vs PCA {mixing_pca:.3f}")
    assert mixing_cellular > mixing_pca


def test_training_history_and_temperature(trained):
    history = trained.history
    for key in (
        "train_loss",
        "train_snn_loss",
        "train_batch_loss",
        "train_centroid_loss",
        "validation_loss",
        "temperature",
    ):
        assert key in history and len(history[key]) == trained.training_summary_["epochs_run"]
    temperatures = history["temperature"]["temperature"]
    assert temperatures.between(0.1, 2.0).all()
    # The temperature is learnt: it moves away from its initial value, and the restored weights carry the value
    # logged at the best epoch.
    assert abs(temperatures.iloc[-1] - 0.25) > 0.01
    best = trained.training_summary_["best_epoch"]
    assert float(trained.module.temperature) == pytest.approx(temperatures.iloc[best], rel=1e-6)
    assert history["train_loss"]["train_loss"].iloc[-1] < history["train_loss"]["train_loss"].iloc[0]
    assert trained.is_trained and "trained" in repr(trained)
    assert len(trained.validation_indices) > 0
    assert not set(trained.validation_indices) & set(trained.train_indices)


def test_save_load_round_trip(trained, split, tmp_path):
    _, test = split
    expected = trained.get_latent_representation(test)
    trained.save(tmp_path / "model")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(tmp_path / "model")

    loaded = CELLULAR.load(tmp_path / "model")
    assert loaded.adata is None and loaded.genes == trained.genes and loaded.cell_types == trained.cell_types
    np.testing.assert_array_equal(loaded.get_latent_representation(test), expected)
    pd.testing.assert_frame_equal(loaded.history["train_loss"], trained.history["train_loss"])

    with_data = CELLULAR.load(tmp_path / "model", adata=trained.adata.copy())
    np.testing.assert_array_equal(with_data.get_latent_representation(), trained.get_latent_representation())


def test_load_attaches_only_the_training_data(trained, split, tmp_path):
    train, test = split
    trained.save(tmp_path / "model", save_anndata=True)
    assert CELLULAR.load(tmp_path / "model").adata.n_obs == train.n_obs
    # Saved again without its data, the folder no longer holds the data saved with the earlier model.
    trained.save(tmp_path / "model", overwrite=True)
    assert not (tmp_path / "model" / "adata.h5ad").exists() and CELLULAR.load(tmp_path / "model").adata is None
    # The training cells in another order, or other cells, would be split by the stored indices wrongly.
    for other in (train[::-1].copy(), test.copy()):
        with pytest.raises(ValueError, match="not the model's training data"):
            CELLULAR.load(tmp_path / "model", adata=other)
    test.write_h5ad(tmp_path / "model" / "adata.h5ad")
    with pytest.raises(ValueError, match="holds other cells than the"):
        CELLULAR.load(tmp_path / "model")
    # A model loaded without its data keeps the record, so saving it again still guards its folder.
    (tmp_path / "model" / "adata.h5ad").unlink()
    CELLULAR.load(tmp_path / "model").save(tmp_path / "again")
    with pytest.raises(ValueError, match="not the model's training data"):
        CELLULAR.load(tmp_path / "again", adata=test.copy())
    assert CELLULAR.load(tmp_path / "again", adata=train.copy()).adata.n_obs == train.n_obs


def test_models_saved_with_an_affine_input_layer_norm_still_load(trained, split, tmp_path):
    """Earlier versions gave the input LayerNorm per-gene affine parameters (today's models have none): such a file
    loads with them, and embeds as the equivalent network with the affine map folded into the first Linear."""
    import json

    from cellular._files import write_metadata

    assert not any(name.startswith("encoder.layers.0.") for name in trained.module.state_dict())
    trained.save(tmp_path / "old")
    tensors = torch.load(tmp_path / "old" / "model.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    gene_scale = 0.5 + torch.rand(len(trained.genes), generator=generator)
    gene_shift = 0.1 * torch.randn(len(trained.genes), generator=generator)
    tensors["module.encoder.layers.0.weight"], tensors["module.encoder.layers.0.bias"] = gene_scale, gene_shift
    torch.save(tensors, tmp_path / "old" / "model.pt")
    metadata = json.loads((tmp_path / "old" / "model.json").read_text())
    metadata.pop("metadata_sha256")
    del metadata["module_kwargs"]["input_norm_affine"]
    metadata["tensors"] = {name: list(tensor.shape) for name, tensor in tensors.items()}
    write_metadata(
        tmp_path / "old" / "model.json", metadata, tmp_path / "old" / "model.pt", "tensors", metadata["tensors"]
    )
    old = CELLULAR.load(tmp_path / "old")
    assert old.module.encoder.layers[0].elementwise_affine

    # W (scale * x + shift) + b == (W diag(scale)) x + (W shift + b): the same network without the affine map.
    folded = CELLULAR.load(tmp_path / "old")
    first = folded.module.encoder.layers[1]
    with torch.no_grad():
        first.bias += first.weight @ gene_shift
        first.weight *= gene_scale
        folded.module.encoder.layers[0].weight.fill_(1.0)
        folded.module.encoder.layers[0].bias.zero_()
    query = split[1]
    np.testing.assert_allclose(
        old.get_latent_representation(query), folded.get_latent_representation(query), rtol=1e-4, atol=1e-4
    )
    assert not np.allclose(old.get_latent_representation(query), trained.get_latent_representation(query), atol=1e-3)


def test_model_file_holds_no_pickled_objects(trained, tmp_path):
    import pickletools
    import zipfile

    trained.save(tmp_path / "m")
    with zipfile.ZipFile(tmp_path / "m" / "model.pt") as archive:
        pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        ops = list(pickletools.genops(archive.read(pickle_name)))
    globals_used = {str(arg) for op, arg, _ in ops if op.name in ("GLOBAL", "STACK_GLOBAL") and arg}
    assert all(name.startswith(("torch", "collections OrderedDict")) for name in globals_used), globals_used


def test_incompatible_model_file_is_rejected(trained, tmp_path):
    import json

    trained.save(tmp_path / "m")
    metadata = json.loads((tmp_path / "m" / "model.json").read_text())
    metadata["format_version"] = 999
    (tmp_path / "m" / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="cannot read"):
        CELLULAR.load(tmp_path / "m")


def test_gene_order_and_extra_genes_do_not_change_embedding(trained, split):
    _, test = split
    expected = trained.get_latent_representation(test)
    order = np.random.default_rng(0).permutation(test.n_vars)
    shuffled = test[:, order].copy()
    np.testing.assert_array_equal(trained.get_latent_representation(shuffled), expected)


def test_counts_and_package_normalisation_give_same_embedding(trained, split):
    _, test = split
    from_counts = trained.get_latent_representation(test)
    normalised = cellular.pp.normalize_log1p(test[:, trained.genes].copy(), target_sum=trained.target_sum, copy=True)
    from_log = trained.get_latent_representation(normalised, log_normalized=True)
    np.testing.assert_allclose(from_log, from_counts, rtol=1e-5, atol=1e-5)


def test_missing_genes_are_masked_with_warning(trained, split, caplog):
    _, test = split
    keep = np.random.default_rng(1).permutation(test.n_vars)[: int(0.7 * test.n_vars)]
    partial = test[:, np.sort(keep)].copy()
    with caplog.at_level(logging.WARNING):
        z = trained.get_latent_representation(partial)
    assert "missing from the data" in caplog.text
    assert z.shape == (test.n_obs, trained.n_latent) and np.isfinite(z).all()


def test_query_is_not_modified(trained, split):
    _, test = split
    before = test.copy()
    trained.get_latent_representation(test)
    assert list(test.obs.columns) == list(before.obs.columns) and set(test.uns) == set(before.uns)
    assert (test.X != before.X).nnz == 0


def test_same_seed_gives_identical_training(symphony):
    """The same seed gives the same encoder, head and novelty reference whatever drew from torch's global generator
    before (the novelty spaces' randomized PCA once did, so a query's novelty scores and moment matching changed)."""
    small = symphony[symphony.obs["batch"] == "5p"].copy()
    query = symphony[symphony.obs["batch"] == "3pv2"].copy()
    mark_singletons_unlabelled(small)

    def fit(seed):
        CELLULAR.setup_anndata(small, labels_key="cell_type")
        model = CELLULAR(small, n_latent=16, n_top_genes=300, seed=seed)
        model.train(max_epochs=3, progress_bar=False)
        return model.get_latent_representation(), model.get_novelty_scores(query)["score"].to_numpy()

    first = fit(0)
    torch.randn(100)
    second, other = fit(0), fit(1)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first[0], other[0])


def test_encoder_widths_are_set_saved_and_restored(symphony, tmp_path):
    """hidden_sizes sets the MLP's widths; the saved model rebuilds them and embeds identically, and a restricted
    model keeps them."""
    small = symphony[symphony.obs["batch"] == "5p"].copy()
    mark_singletons_unlabelled(small)
    CELLULAR.setup_anndata(small, labels_key="cell_type")
    model = CELLULAR(small, n_latent=16, n_top_genes=300, hidden_sizes=(48, 24))

    def encoder_widths(built):
        return [layer.out_features for layer in built.module.encoder.layers if hasattr(layer, "out_features")]

    assert encoder_widths(CELLULAR(small, n_latent=16, n_top_genes=300, hidden_sizes="paper")) == [150, 75, 16]
    assert encoder_widths(CELLULAR(small, n_latent=16, n_top_genes=300)) == [256, 128, 16]
    assert encoder_widths(model) == [48, 24, 16]
    model.train(max_epochs=2, progress_bar=False, classifier=False)
    model.save(tmp_path / "narrow")
    loaded = CELLULAR.load(tmp_path / "narrow")
    query = symphony[symphony.obs["batch"] == "3pv1"].copy()
    np.testing.assert_array_equal(loaded.get_latent_representation(query), model.get_latent_representation(query))
    restricted = model.restrict_to_genes(model.genes[::2])
    assert restricted.module.encoder.layers[1].out_features == 48

    # A model saved before (256, 128) became the default: paper widths, recorded as absent, with hidden_sizes=None
    # among its settings. Its refit keeps the paper's widths for the shared genes.
    old = CELLULAR(small, n_latent=16, n_top_genes=300, hidden_sizes="paper")
    old.init_params_["non_kwargs"]["hidden_sizes"] = None
    old.train(max_epochs=2, progress_bar=False, classifier=False)
    assert encoder_widths(old.restrict_to_genes(old.genes[::2])) == [75, 37, 16]


def test_hvg_selection_and_target_sum(symphony):
    data = symphony[:300].copy()
    mark_singletons_unlabelled(data)
    CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(data, n_top_genes=200)
    assert len(model.genes) == 200 and set(model.genes) <= set(data.var_names)
    assert model.target_sum == pytest.approx(np.median(np.asarray(data[:, model.genes].X.sum(1)).ravel()))
    np.testing.assert_allclose(model.gene_count_fractions.sum(), 1.0)
    everything = CELLULAR(data, n_top_genes=50_000)
    expressed = np.asarray((data.X > 0).sum(0)).ravel() > 0
    assert len(everything.genes) == int(expressed.sum())


def test_log_normalised_input_and_dense_matrix(symphony):
    data = symphony[:400].copy()
    mark_singletons_unlabelled(data)
    cellular.pp.normalize_log1p(data, target_sum=1e4, key_added="log")
    data.X = data.layers["log"].toarray()
    CELLULAR.setup_anndata(data, labels_key="cell_type", log_normalized=True)
    model = CELLULAR(data, n_latent=10, n_top_genes=300)
    assert model.target_sum is None
    model.train(max_epochs=2, progress_bar=False)
    sparse_copy = data.copy()
    sparse_copy.X = sp.csr_matrix(data.X)
    # Both copies are queries of one new batch (no batch_key): matched to the reference the same way.
    np.testing.assert_allclose(
        model.get_latent_representation(sparse_copy), model.get_latent_representation(data.copy()), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="trained on log-normalised"):
        model.get_latent_representation(symphony[:10], log_normalized=False)


def test_unlabelled_cells_and_balanced_sampling(symphony):
    data = symphony[symphony.obs["batch"] != HELD_OUT].copy()
    mark_singletons_unlabelled(data)
    labels = data.obs["cell_type"].astype(str).to_numpy()
    labels[np.random.default_rng(0).random(data.n_obs) < 0.3] = "Unknown"
    data.obs["partial"] = pd.Categorical(labels)
    mark_singletons_unlabelled(data, "partial")
    CELLULAR.setup_anndata(data, labels_key="partial", batch_key="batch")
    model = CELLULAR(data, n_latent=16)
    assert "Unknown" not in model.cell_types
    model.train(max_epochs=3, balanced_sampling=True, progress_bar=False)
    assert np.isfinite(model.get_latent_representation()).all()


# ----------------------------------------------------------------- bad input
def test_missing_labels_key(symphony):
    with pytest.raises(KeyError, match="labels_key='celltype' is not a column of adata.obs"):
        CELLULAR.setup_anndata(symphony.copy(), labels_key="celltype")
    with pytest.raises(KeyError, match="batch_key='donor'"):
        CELLULAR.setup_anndata(symphony.copy(), labels_key="cell_type", batch_key="donor")


def test_missing_layer(symphony):
    with pytest.raises(KeyError, match="layer 'counts' not found"):
        CELLULAR.setup_anndata(symphony.copy(), labels_key="cell_type", layer="counts")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda x: x.data.__setitem__(0, np.nan), "NaN or infinite"),
        (lambda x: x.data.__setitem__(0, np.inf), "NaN or infinite"),
        (lambda x: x.data.__setitem__(0, -3.0), "negative values"),
        (lambda x: x.data.__setitem__(0, 0.5), "non-integer values"),
    ],
)
def test_bad_values_rejected(symphony, corrupt, message):
    data = symphony[:200].copy()
    mark_singletons_unlabelled(data)
    corrupt(data.X)
    CELLULAR.setup_anndata(data, labels_key="cell_type")
    with pytest.raises(ValueError, match=message):
        CELLULAR(data)


def test_bad_query_values_rejected(trained, split):
    _, test = split
    query = test.copy()
    query.X.data[0] = -1.0
    with pytest.raises(ValueError, match="negative values"):
        trained.get_latent_representation(query)


def test_single_cell_type_rejected(symphony):
    data = symphony[:300].copy()
    with pytest.raises(ValueError, match="single labelled cell"):
        data.obs["cell_type"] = data.obs["cell_type"].astype(str)
        data.obs.iloc[0, data.obs.columns.get_loc("cell_type")] = "Lonely"
        mark = data.obs["cell_type"].value_counts()
        data = data[data.obs["cell_type"].isin(mark[mark >= 2].index) | (data.obs["cell_type"] == "Lonely")].copy()
        CELLULAR.setup_anndata(data, labels_key="cell_type")
        CELLULAR(data)


def test_missing_label_values_rejected(symphony):
    data = symphony[:100].copy()
    data.obs["cell_type"] = data.obs["cell_type"].astype(object)
    data.obs.iloc[:3, data.obs.columns.get_loc("cell_type")] = np.nan
    with pytest.raises(ValueError, match="missing values"):
        CELLULAR.setup_anndata(data, labels_key="cell_type")


def test_no_shared_genes(trained, split):
    _, test = split
    renamed = test.copy()
    renamed.var_names = [f"gene_{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match=r"Only 0 of the model's .* genes"):
        trained.get_latent_representation(renamed)


def test_untrained_model(symphony):
    data = symphony[:200].copy()
    mark_singletons_unlabelled(data)
    CELLULAR.setup_anndata(data, labels_key="cell_type")
    model = CELLULAR(data, n_latent=8, n_top_genes=100)
    with pytest.raises(NotTrainedError, match=r"call model.train\(\) first"):
        model.get_latent_representation()
    with pytest.raises(NotTrainedError, match=r"has not been trained yet; call model.train\(\) first"):
        cellular.tl.cellular_embed(data, model)


# ------------------------------------------------------- labels as users hold them
def test_label_categories_without_cells_create_no_phantom_type(split):
    """A type relabelled as unlabelled keeps its pandas category; it must not become a type without cells."""
    train, test = split
    data = train.copy()
    if "Unknown" not in data.obs["cell_type"].cat.categories:
        data.obs["cell_type"] = data.obs["cell_type"].cat.add_categories("Unknown")
    data.obs.loc[data.obs["cell_type"] == "B cell", "cell_type"] = "Unknown"
    assert "B cell" in data.obs["cell_type"].cat.categories
    values = data.obs["cell_type"].astype(str).copy()
    CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(data, n_top_genes=800)
    assert "B cell" not in model.cell_types
    assert data.obs["cell_type"].astype(str).equals(values)  # the cells' labels are unchanged
    model.train(max_epochs=15, progress_bar=False)
    query = test.copy()
    cellular.tl.novel_types(query, model)
    is_b = (query.obs["cell_type"] == "B cell").to_numpy()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(is_b, query.obs["cellular_novel_score"]) > 0.9


def test_integer_labels_work_as_labels(split):
    train, test = split
    types = sorted(set(train.obs["cell_type"].astype(str)) - {"Unknown"})
    codes = {name: number for number, name in enumerate(types)}
    data = train[train.obs["cell_type"] != "Unknown"].copy()
    data.obs["code"] = data.obs["cell_type"].astype(str).map(codes).astype(int)
    query = test[test.obs["cell_type"].astype(str).isin(types)].copy()
    query.obs["code"] = query.obs["cell_type"].astype(str).map(codes).astype(str)

    as_category = data.copy()
    as_category.obs["code"] = as_category.obs["code"].astype("category")
    CELLULAR.setup_anndata(as_category, labels_key="code")
    assert CELLULAR(as_category, n_top_genes=800).cell_types == [str(number) for number in range(len(types))]
    with_unlabelled = data.copy()  # scikit-learn's convention: -1 marks unlabelled cells
    with_unlabelled.obs["code"] = np.where(np.arange(data.n_obs) % 5 == 0, -1, with_unlabelled.obs["code"])
    CELLULAR.setup_anndata(with_unlabelled, labels_key="code", unlabeled_category=-1)
    assert "-1" not in CELLULAR(with_unlabelled, n_top_genes=800).cell_types

    CELLULAR.setup_anndata(data, labels_key="code", batch_key="batch")
    model = CELLULAR(data, n_top_genes=800)
    assert model.cell_types == [str(number) for number in range(len(types))]
    model.train(max_epochs=15, progress_bar=False)
    cellular.tl.cellular_annotate(query, model, novel_as_unknown=False)
    from sklearn.metrics import f1_score

    f1 = f1_score(query.obs["code"], query.obs["cellular_label"].astype(str), average="macro")
    assert f1 >= pca_knn_macro_f1(model, data, query, labels_key="code") - 0.02


def test_default_gene_count_is_half_of_the_reference_within_bounds(symphony):
    """n_top_genes=None reads the more variable half of a reference's genes, at least 200 and at most 2,000."""
    from cellular.model._model import default_n_top_genes

    assert [default_n_top_genes(n) for n in (100, 300, 1767, 3000, 28455)] == [200, 200, 883, 1500, 2000]
    adata = symphony.copy()
    CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    default, every_gene = CELLULAR(adata), CELLULAR(adata, n_top_genes=2000)
    assert len(default.genes) == 883 and len(every_gene.genes) == adata.n_vars
    assert set(default.genes) < set(every_gene.genes)
    small = adata[:, :300].copy()
    CELLULAR.setup_anndata(small, labels_key="cell_type", batch_key="batch")
    assert len(CELLULAR(small).genes) == 200
