"""The methods of the field benchmark, each run as its authors recommend, all trained here on the fold's training set.

A method takes a :class:`~benchmarks._folds.Fold` and returns a :class:`MethodOutput`: class probabilities of the
test cells over ``fold.classes``, a novelty score per test cell (higher = more novel), and, for methods that produce
an embedding, the embedding of training + test cells (for the scIB metrics). Work shared by two methods of one fold
(the CELLULAR model behind its classifier and kNN paths, the scVI model behind scVI + kNN and scANVI, the CellTypist
model with and without majority voting) is fitted once per fold; its time is counted in both methods' fit time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from benchmarks._folds import BATCH, LABELS, UNLABELLED, Fold

K = 15
HIERARCHY_THRESHOLD = 0.7  # tl.cellular_annotate's default
N_HVG = 2000
N_PCS = 50


@dataclass
class MethodOutput:
    """What one method produced on one fold."""

    probabilities: np.ndarray
    novelty: np.ndarray
    embedding: np.ndarray | None
    fit_seconds: float
    predict_seconds: float
    labels: np.ndarray | None = None  # labels that may name a parent type (hierarchical back-off); else argmax


@dataclass
class Settings:
    """Run-wide options: ``max_epochs`` caps every neural network's epochs (``None``: each method's default)."""

    seed: int = 0
    threads: int = 1
    max_epochs: int | None = None


class FoldCache(dict):
    """Per-fold store of shared fits: key -> (object, seconds it took)."""

    def fitted(self, key: str, fit: Callable[[], object]) -> tuple[object, float]:
        if key not in self:
            start = time.perf_counter()
            value = fit()
            self[key] = (value, time.perf_counter() - start)
        return self[key]


# ----------------------------------------------------------------------------------------------------- helpers
def log_normalize(adata: ad.AnnData) -> sp.csr_matrix:
    """Counts per 10,000 then log1p (the scanpy / CellTypist convention), kept sparse."""
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = 1e4 / np.maximum(totals, 1.0)
    normalised = sp.diags(scale.astype(np.float32)) @ counts
    normalised.data = np.log1p(normalised.data)
    return normalised.tocsr()


def training_hvgs(fold: Fold, log_train: sp.csr_matrix) -> np.ndarray:
    """Boolean mask of up to ``N_HVG`` highly variable genes chosen on the training split only (Seurat dispersion,
    per training batch, scanpy's ranking); all genes when there are fewer."""
    import scanpy as sc

    if fold.train.n_vars <= N_HVG:
        return np.ones(fold.train.n_vars, dtype=bool)
    frame = ad.AnnData(log_train, obs=fold.train.obs[[BATCH]].copy(), var=pd.DataFrame(index=fold.train.var_names))
    batch_key = BATCH if frame.obs[BATCH].nunique() > 1 else None
    sc.pp.highly_variable_genes(frame, n_top_genes=N_HVG, flavor="seurat", batch_key=batch_key)
    return frame.var["highly_variable"].to_numpy()


def labelled_mask(fold: Fold) -> np.ndarray:
    return (fold.train.obs[LABELS] != UNLABELLED).to_numpy()


def knn_vote(reference: np.ndarray, reference_labels: np.ndarray, query: np.ndarray, classes, metric="euclidean"):
    """Uniform vote of the ``K`` nearest labelled reference cells; returns (probabilities, mean neighbour distance)."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=K, metric=metric).fit(reference)
    distances, neighbours = index.kneighbors(query)
    codes = pd.Categorical(reference_labels, categories=classes).codes[neighbours]
    probabilities = np.zeros((query.shape[0], len(classes)))
    np.add.at(probabilities, (np.repeat(np.arange(query.shape[0]), K), codes.ravel()), 1.0 / K)
    return probabilities, distances.mean(axis=1)


def aligned(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Probability columns reordered to ``classes`` (absent classes get 0) and renormalised to sum to one."""
    values = frame.reindex(columns=classes, fill_value=0.0).to_numpy(dtype=float)
    return values / np.maximum(values.sum(axis=1, keepdims=True), 1e-12)


def timed(function: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def _pca_space(fold: Fold, cache: FoldCache):
    """Scaled HVG expression (train statistics, clipped at 10, as ``sc.pp.scale``) and 50 PCs fitted on train."""

    def fit():
        from sklearn.decomposition import PCA

        (train_x, test_x), _ = _hvg_expression(fold, cache)
        mean, sd = train_x.mean(axis=0), train_x.std(axis=0)
        sd[sd == 0] = 1.0
        train_x = np.clip((train_x - mean) / sd, None, 10.0)
        test_x = np.clip((test_x - mean) / sd, None, 10.0)
        pca = PCA(n_components=min(N_PCS, *train_x.shape) - 1, random_state=0, svd_solver="arpack").fit(train_x)
        return pca.transform(train_x), pca.transform(test_x)

    return cache.fitted("pca", fit)


# ----------------------------------------------------------------------------------------------------- methods
def pca_knn(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    (train_pcs, test_pcs), fit_seconds = _pca_space(fold, cache)
    labelled = labelled_mask(fold)
    train_labels = fold.train.obs[LABELS].to_numpy()[labelled]
    (probabilities, distance), predict_seconds = timed(
        lambda: knn_vote(train_pcs[labelled], train_labels, test_pcs, fold.classes)
    )
    return MethodOutput(probabilities, distance, np.vstack([train_pcs, test_pcs]), fit_seconds, predict_seconds)


def harmony_knn(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """Harmony (harmonypy) on the PCs of training + test cells together (Harmony is transductive), then 15-NN."""
    import harmonypy

    (train_pcs, test_pcs), pca_seconds = _pca_space(fold, cache)
    pcs = np.vstack([train_pcs, test_pcs])
    meta = pd.DataFrame({BATCH: np.concatenate([fold.train.obs[BATCH].astype(str), fold.test.obs[BATCH].astype(str)])})

    def fit():
        result = harmonypy.run_harmony(pcs, meta, [BATCH], random_state=settings.seed, verbose=False)
        corrected = np.asarray(result.Z_corr)
        return corrected if corrected.shape[0] == pcs.shape[0] else corrected.T

    corrected, harmony_seconds = timed(fit)
    train_z, test_z = corrected[: fold.train.n_obs], corrected[fold.train.n_obs :]
    labelled = labelled_mask(fold)
    (probabilities, distance), predict_seconds = timed(
        lambda: knn_vote(train_z[labelled], fold.train.obs[LABELS].to_numpy()[labelled], test_z, fold.classes)
    )
    return MethodOutput(probabilities, distance, corrected, pca_seconds + harmony_seconds, predict_seconds)


def _cellular_model(fold: Fold, cache: FoldCache, settings: Settings, variant: str = "cellular"):
    """The fold's CELLULAR model: ``"cellular"`` (defaults), ``"cellular_gene_grid"`` (the gene-grid encoder),
    ``"cellular_hierarchy"`` (defaults plus the dataset's lineage map as label hierarchy) or ``"cellular_no_moments"``
    (defaults without per-batch moment matching: the ablation)."""

    def fit():
        import cellular

        train = fold.train.copy()
        hierarchy = fold_lineage_map(fold) if variant == "cellular_hierarchy" else None
        cellular.CELLULAR.setup_anndata(
            train, labels_key=LABELS, batch_key=BATCH, unlabeled_category=UNLABELLED, label_hierarchy=hierarchy
        )
        encoder = "gene_grid" if variant == "cellular_gene_grid" else "mlp"
        model = cellular.CELLULAR(
            train, seed=settings.seed, encoder=encoder, match_batch_moments=variant != "cellular_no_moments"
        )
        model.train(max_epochs=settings.max_epochs, progress_bar=False)
        return model

    return cache.fitted(variant, fit)


def fold_lineage_map(fold: Fold) -> dict[str, str] | None:
    """The package's lineage map that covers every type of the fold (PBMC or pancreas), or ``None``."""
    from cellular.data import LINEAGE_MAPS

    types = set(fold.classes) | set(fold.test_labels())
    for parents in LINEAGE_MAPS.values():
        if types <= set(parents) | set(parents.values()):
            return dict(parents)
    return None


def _cellular_embedding(fold: Fold, cache: FoldCache, model, variant: str = "cellular"):
    def embed():
        return model.get_latent_representation(), model.get_latent_representation(fold.test)

    return cache.fitted(f"{variant}_embedding", embed)


def cellular_classifier(
    fold: Fold,
    cache: FoldCache,
    settings: Settings,
    variant: str = "cellular",
    *,
    gene_classifier_weight: float | None = None,
) -> MethodOutput:
    """CELLULAR encoder + its calibrated classifier head averaged with its gene classifier
    (``gene_classifier_weight``: the package default when ``None``, 0 for the head alone), as ``tl.cellular_annotate``
    labels cells; novelty = the model's novelty score."""
    from cellular.tl._common import requested_gene_classifier_weight

    model, fit_seconds = _cellular_model(fold, cache, settings, variant)
    (train_z, test_z), embed_seconds = _cellular_embedding(fold, cache, model, variant)
    weight = requested_gene_classifier_weight(model, gene_classifier_weight)

    def predict():
        frame = pd.DataFrame(_annotation_probabilities(model, fold, test_z, weight), columns=model.cell_types)
        novelty = model.get_novelty_scores(fold.test, min_gene_overlap=0.0)["score"].to_numpy()
        return aligned(frame, fold.classes), novelty

    (probabilities, novelty), predict_seconds = timed(predict)
    embedding = np.vstack([train_z, test_z])
    return MethodOutput(probabilities, novelty, embedding, fit_seconds, embed_seconds + predict_seconds)


def _annotation_probabilities(model, fold: Fold, test_z: np.ndarray, weight: float) -> np.ndarray:
    """The head's calibrated probabilities of the test cells averaged with the gene classifier's at ``weight``
    (columns in the model's type order), as ``tl.cellular_annotate`` computes them."""
    from cellular.index import ClassEvidence

    probabilities = model.probabilities_from_embedding(test_z)
    if weight > 0:
        genes = model.get_gene_classifier_probabilities(fold.test, min_gene_overlap=0.0).to_numpy()
        probabilities = ClassEvidence(genes, model.cell_types, weight).blended(probabilities, model.cell_types)
    return probabilities


def cellular_gene_grid(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """CELLULAR with the gene-grid fingerprint encoder (Spoticell), classifier head as ``cellular``."""
    return cellular_classifier(fold, cache, settings, "cellular_gene_grid")


def cellular_no_moments(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """CELLULAR without per-batch moment matching (``match_batch_moments=False``), classifier head as ``cellular``."""
    return cellular_classifier(fold, cache, settings, "cellular_no_moments")


def cellular_hierarchy(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """CELLULAR whose head trains on the dataset's lineage map; its labels (the head averaged with the gene classifier,
    as ``tl.cellular_annotate``) back off to the parent when unsure."""
    output = cellular_classifier(fold, cache, settings, "cellular_hierarchy")
    model, _ = _cellular_model(fold, cache, settings, "cellular_hierarchy")
    hierarchy = model.label_hierarchy
    if hierarchy is not None:
        from cellular.tl._common import requested_gene_classifier_weight

        (_, test_z), _ = _cellular_embedding(fold, cache, model, "cellular_hierarchy")
        weight = requested_gene_classifier_weight(model, None)
        prediction = hierarchy.predict(_annotation_probabilities(model, fold, test_z, weight), HIERARCHY_THRESHOLD)
        output.labels = np.where(
            prediction.deepest >= 0, np.asarray(hierarchy.nodes, dtype=object)[prediction.deepest], UNLABELLED
        )
    return output


def cellular_knn(
    fold: Fold, cache: FoldCache, settings: Settings, gene_classifier_weight: float | None = None
) -> MethodOutput:
    """CELLULAR encoder + the package's reference index: distance-weighted 15-NN vote averaged with the model's gene
    classifier (``gene_classifier_weight``: the package default when ``None``, 0 for the vote alone), as
    ``tl.cellular_map`` transfers the model's labels; novelty = mean distance."""
    from cellular import ReferenceIndex
    from cellular.index import ClassEvidence
    from cellular.tl._common import DEFAULT_GENE_CLASSIFIER_WEIGHT

    model, fit_seconds = _cellular_model(fold, cache, settings)
    (train_z, test_z), embed_seconds = _cellular_embedding(fold, cache, model)
    index, index_seconds = timed(
        lambda: ReferenceIndex.from_embedding(
            train_z,
            labels={LABELS: fold.train.obs[LABELS].to_numpy()},
            temperature=float(model.module.temperature.detach()),
            unlabeled_category=UNLABELLED,
            seed=settings.seed,
        )
    )

    weight = DEFAULT_GENE_CLASSIFIER_WEIGHT if gene_classifier_weight is None else gene_classifier_weight

    def predict():
        evidence = None
        if weight > 0:
            genes = model.get_gene_classifier_probabilities(fold.test, min_gene_overlap=0.0)
            evidence = {LABELS: ClassEvidence(genes.to_numpy(), model.cell_types, weight)}
        transfer = index.transfer_labels(test_z, k=K, evidence=evidence)
        frame = pd.DataFrame(transfer.probabilities[LABELS], columns=transfer.classes[LABELS])
        return aligned(frame, fold.classes), transfer.distances.mean(axis=1)

    (probabilities, novelty), predict_seconds = timed(predict)
    return MethodOutput(probabilities, novelty, None, fit_seconds + index_seconds, embed_seconds + predict_seconds)


def _scvi_reference(fold: Fold, cache: FoldCache, settings: Settings):
    """scVI on the training counts with the scArches-recommended architecture for later query mapping, on up to
    2,000 HVGs chosen with ``seurat_v3`` on the training counts (per batch)."""

    def fit():
        import scvi

        scvi.settings.seed = settings.seed
        reference = fold.train.copy()
        if reference.n_vars > N_HVG:
            reference = reference[:, _seurat_v3_genes(reference)].copy()
        scvi.model.SCVI.setup_anndata(reference, batch_key=BATCH)
        model = scvi.model.SCVI(
            reference,
            n_layers=2,
            n_latent=30,
            use_layer_norm="both",
            use_batch_norm="none",
            encode_covariates=True,
            dropout_rate=0.2,
        )
        model.train(max_epochs=settings.max_epochs, enable_progress_bar=False, accelerator="cpu")
        return model

    return cache.fitted("scvi", fit)


def _seurat_v3_genes(reference: ad.AnnData) -> np.ndarray:
    """``seurat_v3`` HVGs on counts, per batch as scvi-tools recommends; the loess fit fails on tiny batches, then
    the genes are ranked over all training cells at once."""
    import scanpy as sc

    for batch_key in ([BATCH] if reference.obs[BATCH].nunique() > 1 else []) + [None]:
        try:
            frame = sc.pp.highly_variable_genes(
                reference, n_top_genes=N_HVG, flavor="seurat_v3", batch_key=batch_key, inplace=False
            )
        except ValueError:
            continue
        return frame["highly_variable"].to_numpy()
    raise ValueError("seurat_v3 gene selection failed on the training cells")


def _query_epochs(settings: Settings, default: int) -> int:
    return default if settings.max_epochs is None else min(default, settings.max_epochs)


def scvi_knn(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """scVI reference + scArches query surgery (``load_query_data``, 200 epochs), 15-NN vote in the latent space."""
    import scvi

    reference_model, fit_seconds = _scvi_reference(fold, cache, settings)

    def map_query():
        query = fold.test[:, reference_model.adata.var_names].copy()
        scvi.model.SCVI.prepare_query_anndata(query, reference_model)
        query_model = scvi.model.SCVI.load_query_data(query, reference_model, accelerator="cpu")
        query_model.train(
            max_epochs=_query_epochs(settings, 200),
            plan_kwargs={"weight_decay": 0.0},
            enable_progress_bar=False,
            accelerator="cpu",
        )
        return reference_model.get_latent_representation(), query_model.get_latent_representation()

    (train_z, test_z), query_seconds = timed(map_query)
    labelled = labelled_mask(fold)
    (probabilities, distance), vote_seconds = timed(
        lambda: knn_vote(train_z[labelled], fold.train.obs[LABELS].to_numpy()[labelled], test_z, fold.classes)
    )
    embedding = np.vstack([train_z, test_z])
    return MethodOutput(probabilities, distance, embedding, fit_seconds, query_seconds + vote_seconds)


def scanvi(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """scANVI initialised from the scVI reference, query by scArches surgery (labels hidden, 100 epochs), its own
    classifier; novelty = 1 - max probability."""
    import scvi

    scvi_model, scvi_seconds = _scvi_reference(fold, cache, settings)

    def fit():
        model = scvi.model.SCANVI.from_scvi_model(
            scvi_model, unlabeled_category=UNLABELLED, labels_key=LABELS, adata=_with_labels(scvi_model.adata, fold)
        )
        model.train(
            max_epochs=settings.max_epochs,
            n_samples_per_label=100,
            enable_progress_bar=False,
            accelerator="cpu",
        )
        return model

    reference_model, scanvi_seconds = timed(fit)

    def map_query():
        query = fold.test[:, reference_model.adata.var_names].copy()
        query.obs[LABELS] = UNLABELLED
        scvi.model.SCANVI.prepare_query_anndata(query, reference_model)
        query_model = scvi.model.SCANVI.load_query_data(query, reference_model, accelerator="cpu")
        query_model.train(
            max_epochs=_query_epochs(settings, 100),
            plan_kwargs={"weight_decay": 0.0},
            check_val_every_n_epoch=10,
            enable_progress_bar=False,
            accelerator="cpu",
        )
        soft = query_model.predict(soft=True)
        return (
            aligned(soft, fold.classes),
            reference_model.get_latent_representation(),
            query_model.get_latent_representation(),
        )

    (probabilities, train_z, test_z), predict_seconds = timed(map_query)
    novelty = 1.0 - probabilities.max(axis=1)
    embedding = np.vstack([train_z, test_z])
    return MethodOutput(probabilities, novelty, embedding, scvi_seconds + scanvi_seconds, predict_seconds)


def _with_labels(reference: ad.AnnData, fold: Fold) -> ad.AnnData:
    reference = reference.copy()
    reference.obs[LABELS] = fold.train.obs[LABELS].reindex(reference.obs_names).to_numpy()
    return reference


def _celltypist_model(fold: Fold, cache: FoldCache, settings: Settings):
    """CellTypist logistic regression trained on all genes of the labelled training cells, log1p of counts per 10k."""

    def fit():
        import importlib

        import celltypist

        training_module = importlib.import_module("celltypist.train")  # the package re-exports the function as train
        labelled = labelled_mask(fold)
        train = ad.AnnData(log_normalize(fold.train)[labelled], var=pd.DataFrame(index=fold.train.var_names))
        train.obs[LABELS] = fold.train.obs[LABELS].to_numpy()[labelled]
        original = training_module.LogisticRegression
        training_module.LogisticRegression = _one_vs_rest_logistic_regression()
        try:
            return celltypist.train(train, labels=LABELS, n_jobs=settings.threads, check_expression=False)
        finally:
            training_module.LogisticRegression = original

    return cache.fitted("celltypist", fit)


def _one_vs_rest_logistic_regression():
    """CellTypist 1.7.1 asks scikit-learn for ``LogisticRegression(multi_class="ovr")``, an option scikit-learn 1.8
    removed; this subclass accepts it and fits the same one-vs-rest models (one binary fit per class, stacked), so
    CellTypist trains and predicts exactly as it was designed to."""
    from sklearn.linear_model import LogisticRegression

    class OneVsRestLogisticRegression(LogisticRegression):
        def __init__(self, C=1.0, solver="lbfgs", max_iter=1000, n_jobs=None, multi_class="ovr"):
            super().__init__(C=C, solver=solver, max_iter=max_iter, n_jobs=n_jobs)
            self.multi_class = multi_class

        def fit(self, X, y, sample_weight=None):
            classes = np.unique(y)
            if len(classes) <= 2:
                return super().fit(X, y, sample_weight)
            settings = {"C": self.C, "solver": self.solver, "max_iter": self.max_iter}
            binary = [LogisticRegression(**settings).fit(X, y == c, sample_weight) for c in classes]
            self.classes_ = classes
            self.coef_ = np.vstack([model.coef_ for model in binary])
            self.intercept_ = np.concatenate([model.intercept_ for model in binary])
            self.n_features_in_ = X.shape[1]
            self.n_iter_ = np.concatenate([model.n_iter_ for model in binary])
            return self

        def predict_proba(self, X):
            scores = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
            return scores / scores.sum(axis=1, keepdims=True)

    return OneVsRestLogisticRegression


def _celltypist(fold: Fold, cache: FoldCache, settings: Settings, majority_voting: bool) -> MethodOutput:
    import celltypist

    model, fit_seconds = _celltypist_model(fold, cache, settings)

    def predict():
        query = ad.AnnData(log_normalize(fold.test), var=pd.DataFrame(index=fold.test.var_names))
        query.obs_names = fold.test.obs_names
        result = celltypist.annotate(query, model=model, majority_voting=majority_voting)
        probabilities = aligned(result.probability_matrix, fold.classes)
        novelty = 1.0 - result.probability_matrix.to_numpy().max(axis=1)
        if majority_voting:
            # CellTypist skips majority voting (and its column) for queries of 50 cells or fewer.
            labels = result.predicted_labels
            voted = labels.get("majority_voting", labels["predicted_labels"]).astype(str).to_numpy()
            probabilities = (np.asarray(fold.classes)[None, :] == voted[:, None]).astype(float)
        return probabilities, novelty

    (probabilities, novelty), predict_seconds = timed(predict)
    return MethodOutput(probabilities, novelty, None, fit_seconds, predict_seconds)


def celltypist_plain(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    return _celltypist(fold, cache, settings, majority_voting=False)


def celltypist_majority(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """CellTypist followed by its majority voting over an over-clustering of the query (Leiden)."""
    return _celltypist(fold, cache, settings, majority_voting=True)


def _hvg_expression(fold: Fold, cache: FoldCache):
    def fit():
        log_train, log_test = log_normalize(fold.train), log_normalize(fold.test)
        genes = training_hvgs(fold, log_train)
        return log_train[:, genes].toarray(), log_test[:, genes].toarray()

    return cache.fitted("hvg_expression", fit)


def _sklearn_classifier(fold: Fold, cache: FoldCache, make) -> MethodOutput:
    (train_x, test_x), prepare_seconds = _hvg_expression(fold, cache)
    labelled = labelled_mask(fold)
    classifier, fit_seconds = timed(lambda: make().fit(train_x[labelled], fold.train.obs[LABELS].to_numpy()[labelled]))
    frame, predict_seconds = timed(lambda: pd.DataFrame(classifier.predict_proba(test_x), columns=classifier.classes_))
    probabilities = aligned(frame, fold.classes)
    novelty = 1.0 - probabilities.max(axis=1)
    return MethodOutput(probabilities, novelty, None, prepare_seconds + fit_seconds, predict_seconds)


def random_forest(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """Random forest (500 trees) on the log-normalised training HVGs (the CellClassifier baseline)."""
    from sklearn.ensemble import RandomForestClassifier

    return _sklearn_classifier(
        fold,
        cache,
        lambda: RandomForestClassifier(n_estimators=500, n_jobs=settings.threads, random_state=settings.seed),
    )


def gbdt(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """Histogram gradient boosting (early stopping on a 10 % validation split) on the log-normalised HVGs."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return _sklearn_classifier(
        fold,
        cache,
        lambda: HistGradientBoostingClassifier(max_iter=200, early_stopping=True, random_state=settings.seed),
    )


def _tree_annotator(fold: Fold, settings: Settings, method: str) -> MethodOutput:
    """The package's TreeAnnotator: its own HVGs and normalisation, temperature-calibrated probabilities."""
    from cellular.trees import TreeAnnotator

    labelled = labelled_mask(fold)
    train = fold.train[labelled]
    annotator, fit_seconds = timed(
        lambda: TreeAnnotator(method, n_top_genes=N_HVG, seed=settings.seed, n_jobs=settings.threads).fit(train, LABELS)
    )
    frame, predict_seconds = timed(
        lambda: pd.DataFrame(annotator.predict_proba(fold.test, min_gene_overlap=0.0), columns=annotator.classes_)
    )
    probabilities = aligned(frame, fold.classes)
    return MethodOutput(probabilities, 1.0 - probabilities.max(axis=1), None, fit_seconds, predict_seconds)


def tree_random_forest(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """cellular.trees.TreeAnnotator('random_forest'): 200 balanced trees, temperature-calibrated (CellClassifier)."""
    return _tree_annotator(fold, settings, "random_forest")


def tree_gradient_boosting(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """cellular.trees.TreeAnnotator('hist_gradient_boosting'), temperature-calibrated."""
    return _tree_annotator(fold, settings, "hist_gradient_boosting")


CELLAMA_GENES = 15  # genes per sentence: short sentences keep CPU inference and fine-tuning affordable
CELLAMA_PAIRS = 2000


def _cellama_sentences(fold: Fold, cache: FoldCache):
    """Sentences of each cell's top training HVGs (train and test)."""

    def fit():
        import cellular

        genes = fold.train.var_names[training_hvgs(fold, log_normalize(fold.train))]
        sentences = []
        for part in (fold.train, fold.test):
            frame = ad.AnnData(part.X, obs=pd.DataFrame(index=part.obs_names), var=pd.DataFrame(index=part.var_names))
            frame.var["highly_variable"] = frame.var_names.isin(genes)
            cellular.tl.cell_sentences(frame, n_genes=CELLAMA_GENES)
            sentences.append(frame.obs["cell_sentence"].to_numpy())
        return sentences

    return cache.fitted("cellama_sentences", fit)


def _cellama(fold: Fold, cache: FoldCache, settings: Settings, fine_tuned: bool) -> MethodOutput:
    """CELLama: sentence-transformer embedding of the sentences, then the package's reference index (15-NN vote)."""
    from cellular import ReferenceIndex
    from cellular.lm import CellSentenceEncoder

    (train_sentences, test_sentences), sentence_seconds = _cellama_sentences(fold, cache)

    def fit():
        encoder = CellSentenceEncoder.pretrained(device="cpu")
        if fine_tuned:
            labels = fold.train.obs[LABELS].astype(str)
            obs = pd.DataFrame(
                {
                    "sentence": train_sentences,
                    LABELS: labels.where(labels != UNLABELLED).to_numpy(),
                    BATCH: fold.train.obs[BATCH].to_numpy(),
                },
                index=fold.train.obs_names,
            )
            encoder.fine_tune(
                ad.AnnData(obs=obs),
                sentence_key="sentence",
                labels_key=LABELS,
                batch_key=BATCH,
                n_pairs=CELLAMA_PAIRS,
                seed=settings.seed,
            )
        train_z = encoder.embed(train_sentences)
        index = ReferenceIndex.from_embedding(
            train_z,
            labels={LABELS: fold.train.obs[LABELS].to_numpy()},
            unlabeled_category=UNLABELLED,
            seed=settings.seed,
        )
        return encoder, train_z, index

    (encoder, train_z, index), fit_seconds = timed(fit)

    def predict():
        test_z = encoder.embed(test_sentences)
        transfer = index.transfer_labels(test_z, k=K)
        frame = pd.DataFrame(transfer.probabilities[LABELS], columns=transfer.classes[LABELS])
        return test_z, aligned(frame, fold.classes), transfer.distances.mean(axis=1)

    (test_z, probabilities, novelty), predict_seconds = timed(predict)
    return MethodOutput(
        probabilities, novelty, np.vstack([train_z, test_z]), sentence_seconds + fit_seconds, predict_seconds
    )


def cellama_zero_shot(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """CELLama zero-shot: the pinned all-MiniLM-L6-v2 as it is."""
    return _cellama(fold, cache, settings, fine_tuned=False)


def cellama_fine_tuned(fold: Fold, cache: FoldCache, settings: Settings) -> MethodOutput:
    """CELLama fine-tuned on the training cells' labels (supervised pairs, 1 epoch of 2,000 pairs)."""
    return _cellama(fold, cache, settings, fine_tuned=True)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    run: Callable[[Fold, FoldCache, Settings], MethodOutput]
    embedding: bool  # whether its embedding enters the scIB table
    neural: bool  # whether max_epochs applies
    requires: str | None = None  # optional package the method needs


METHODS = {
    method.key: method
    for method in [
        Method("cellular", "CELLULAR (classifier)", cellular_classifier, True, True),
        Method("cellular_knn", "CELLULAR (kNN index + gene classifier)", cellular_knn, False, True),
        Method("cellular_gene_grid", "CELLULAR, gene-grid encoder (Spoticell)", cellular_gene_grid, True, True),
        Method("cellular_hierarchy", "CELLULAR, lineage hierarchy + back-off", cellular_hierarchy, False, True),
        Method("cellular_no_moments", "CELLULAR, no batch moment matching", cellular_no_moments, True, True),
        Method("pca_knn", "PCA + kNN", pca_knn, True, False),
        Method("harmony_knn", "Harmony + kNN", harmony_knn, True, False, "harmonypy"),
        Method("scvi_knn", "scVI + kNN", scvi_knn, True, True),
        Method("scanvi", "scANVI", scanvi, True, True),
        Method("celltypist", "CellTypist", celltypist_plain, False, False, "celltypist"),
        Method("celltypist_mv", "CellTypist (majority voting)", celltypist_majority, False, False, "celltypist"),
        Method("random_forest", "RandomForest", random_forest, False, False),
        Method("gbdt", "GBDT", gbdt, False, False),
        Method("tree_rf", "cellular.trees RandomForest (calibrated)", tree_random_forest, False, False),
        Method("tree_hgb", "cellular.trees GBDT (calibrated)", tree_gradient_boosting, False, False),
        Method("cellama", "CELLama (zero-shot, kNN index)", cellama_zero_shot, True, False, "sentence_transformers"),
        Method(
            "cellama_ft", "CELLama (fine-tuned, kNN index)", cellama_fine_tuned, True, False, "sentence_transformers"
        ),
    ]
}
CELLULAR_METHODS = ("cellular", "cellular_knn")
# Other CELLULAR configurations: reported, but neither counted as CELLULAR's standing nor as baselines.
CELLULAR_VARIANTS = ("cellular_gene_grid", "cellular_hierarchy", "cellular_no_moments")
