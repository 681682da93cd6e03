"""Scores of the field benchmark: annotation, novelty, scIB integration metrics, and resource use."""

from __future__ import annotations

import threading
import time

import anndata as ad
import numpy as np
import pandas as pd

from benchmarks._folds import BATCH, TRUE_LABELS, UNLABELLED, Fold


def annotation_scores(fold: Fold, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro / weighted F1 and per-type F1 over test cells whose type was trained on."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    truth = fold.test_labels()
    known = np.isin(truth, fold.classes)
    if not known.any():
        return {}
    predicted = np.asarray(fold.classes)[probabilities.argmax(axis=1)][known]
    truth = truth[known]
    present = sorted(set(truth))
    per_type = f1_score(truth, predicted, labels=present, average=None, zero_division=0.0)
    scores = {
        "accuracy": accuracy_score(truth, predicted),
        "balanced_accuracy": balanced_accuracy_score(truth, predicted),
        "macro_f1": f1_score(truth, predicted, labels=present, average="macro", zero_division=0.0),
        "weighted_f1": f1_score(truth, predicted, labels=present, average="weighted", zero_division=0.0),
    }
    scores.update({f"f1:{cell_type}": value for cell_type, value in zip(present, per_type, strict=True)})
    return scores


def hierarchical_scores(fold: Fold, probabilities: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Hierarchical precision / recall / F1 (Kiritchenko) on the dataset's lineage map, over test cells of trained
    types; ``labels`` (which may name a parent type) when given, else the most probable type."""
    from benchmarks._methods import fold_lineage_map
    from cellular.metrics import hierarchical_f1

    parents = fold_lineage_map(fold)
    truth = fold.test_labels()
    known = np.isin(truth, fold.classes)
    if parents is None or not known.any():
        return {}
    predicted = np.asarray(fold.classes, dtype=object)[probabilities.argmax(axis=1)] if labels is None else labels
    scores = hierarchical_f1(truth[known], np.asarray(predicted)[known], parents, unknown_label=UNLABELLED)
    return {f"hierarchical_{name}": value for name, value in scores.items()}


def novelty_scores(fold: Fold, novelty: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC of the novelty score for the cell type removed from training against all other test cells."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    is_novel = fold.test_labels() == fold.novel_type
    return {"auroc": roc_auc_score(is_novel, novelty), "auprc": average_precision_score(is_novel, novelty)}


def scib_scores(fold: Fold, embeddings: dict[str, np.ndarray], threads: int = 1) -> dict[str, dict[str, float]]:
    """scib-metrics Benchmarker on training + test cells: every metric, bio conservation, batch correction and total
    (0.6 bio + 0.4 batch), per embedding. The unintegrated reference is PCA of the log-normalised training HVGs."""
    from scib_metrics.benchmark import Benchmarker
    from sklearn.decomposition import PCA

    from benchmarks._methods import N_PCS, log_normalize, training_hvgs

    joint = ad.concat([fold.train, fold.test], index_unique="-")
    labels = np.concatenate([fold.train.obs[TRUE_LABELS].to_numpy(), fold.test_labels()])
    obs = pd.DataFrame(
        {"label": pd.Categorical(labels), BATCH: pd.Categorical(joint.obs[BATCH].astype(str))}, index=joint.obs_names
    )
    log_joint = log_normalize(joint)
    genes = training_hvgs(fold, log_normalize(fold.train))
    x = log_joint[:, genes].toarray()
    unintegrated = PCA(n_components=min(N_PCS, *x.shape) - 1, random_state=0).fit_transform(x)
    frame = ad.AnnData(obs=obs)
    frame.obsm["unintegrated"] = unintegrated
    for key, embedding in embeddings.items():
        frame.obsm[key] = np.asarray(embedding, dtype=np.float32)
    bench = Benchmarker(
        frame,
        batch_key=BATCH,
        label_key="label",
        embedding_obsm_keys=list(embeddings),
        pre_integrated_embedding_obsm_key="unintegrated",
        n_jobs=threads,
        progress_bar=False,
    )
    bench.benchmark()
    results = bench.get_results(min_max_scale=False)
    results = results.drop(index="Metric Type", errors="ignore")
    return {key: {metric: float(value) for metric, value in results.loc[key].items()} for key in embeddings}


class PeakMemory:
    """Peak resident set size (MB) of this process while the block runs, sampled every 20 ms."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
            time.sleep(self._interval)

    def __enter__(self) -> PeakMemory:
        self.peak_mb = self._process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
