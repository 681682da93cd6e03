"""Helpers shared by the test modules (importable because pytest puts ``tests/`` on the path)."""

import json

import anndata as ad
import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

import cellular

SYMPHONY_HELD_OUT = "3pv2"


def mark_singletons_unlabelled(adata, key="cell_type"):
    """Types with a single cell cannot form positive pairs: mark them with the unlabelled category."""
    counts = adata.obs[key].value_counts()
    rare = counts[counts < 2].index
    adata.obs[key] = adata.obs[key].astype(str).where(~adata.obs[key].isin(rare), "Unknown").astype("category")


def pca_baseline(model, train, test, n_components=50):
    """PCA of the model's genes, fitted on the training cells, applied to both sets."""
    joint = ad.concat([train, test])
    cellular.pp.normalize_log1p(joint, target_sum=model.target_sum)
    x = joint[:, model.genes].X.toarray()
    pca = PCA(n_components=n_components, random_state=0).fit(x[: train.n_obs])
    return pca.transform(x[: train.n_obs]), pca.transform(x[train.n_obs :])


def pca_knn_macro_f1(model, train, test, labels_key="cell_type"):
    """Macro-F1 on ``test`` cells of known types of a 15-NN vote in the training PCA space (the simple baseline)."""
    reference, query = pca_baseline(model, train, test)
    train_labels = train.obs[labels_key].astype(str).to_numpy()
    labelled = np.isin(train_labels, model.cell_types)
    test_labels = test.obs[labels_key].astype(str).to_numpy()
    known = np.isin(test_labels, model.cell_types)
    knn = KNeighborsClassifier(n_neighbors=15).fit(reference[labelled], train_labels[labelled])
    return f1_score(test_labels[known], knn.predict(query[known]), average="macro")


def model_knn_macro_f1(model, train, test, labels_key="cell_type"):
    """Macro-F1 on ``test`` cells of known types of a 15-NN cosine vote in the model's embedding of ``train``."""
    z_train, z_test = model.get_latent_representation(train), model.get_latent_representation(test)
    labels = train.obs[labels_key].astype(str).to_numpy()
    labelled = np.isin(labels, model.cell_types)
    truth = test.obs[labels_key].astype(str).to_numpy()
    known = np.isin(truth, model.cell_types)
    knn = KNeighborsClassifier(n_neighbors=15, metric="cosine").fit(z_train[labelled], labels[labelled])
    return f1_score(truth[known], knn.predict(z_test[known]), average="macro")


def normalized_expression(model, adata):
    """``adata``'s expression over the model's genes, normalised as the model does (no moment matching)."""
    from cellular.data import read_expression

    expression, _ = read_expression(
        adata,
        model.genes,
        layer=None,
        log_normalized=False,
        target_sum=model.target_sum,
        gene_count_fractions=model.gene_count_fractions,
    )
    return expression


def reseal_tree_annotator(folder, edit=None):
    """A saved TreeAnnotator's manifest edited by ``edit`` with its checksums recomputed (a deliberate forgery), so
    the checks behind the checksums are reached."""
    from cellular._files import file_record, seal

    path = folder / "tree_annotator.json"
    manifest = json.loads(path.read_text())
    if edit is not None:
        edit(manifest)
    manifest["files"] = {"estimator.skops": file_record(folder / "estimator.skops")}
    path.write_text(json.dumps(seal(manifest)))
