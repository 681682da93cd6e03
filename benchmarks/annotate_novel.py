"""Annotation and novel cell-type detection benchmark on the multi-batch datasets in ``../shared/data``.

Two protocols, each with reference points computed in the same run:

* ``lobo`` (leave one batch out): train on the other batches, annotate the held-out batch; accuracy, balanced
  accuracy, macro-F1 and expected calibration error (ECE) over held-out cells whose type occurs in training, for the
  CELLULAR classifier (calibrated and raw softmax), a 15-NN vote in the CELLULAR embedding, and PCA + 15-NN.
  Also the fraction of these known-type cells that novelty detection flags at alpha = 0.05.
* ``novel`` (leave one cell type out): the type is removed from training, the test batch is the one holding most of
  its cells (types with >= 20 cells there); AUROC and AUPRC of the novelty score for the removed type against all
  other test cells, the false-novel rate on known types and the recall of the removed type at alpha = 0.05. Reference
  scores: 1 - max calibrated probability, and the mean distance to 15 training neighbours in PCA space.

    python benchmarks/annotate_novel.py                              # all datasets, both protocols, seed 0
    python benchmarks/annotate_novel.py --datasets pbmc_symphony_3tech --protocols lobo --seeds 0 1 2

Writes ``annotate_novel.csv`` (one row per fold, method and metric) and ``annotate_novel.md`` (summary tables) to
``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_DATASETS = ["pbmc_symphony_3tech", "pbmc_kang2018_ifnb_subset", "cellbench_lung_celllines"]
ALPHA = 0.05
K = 15


def load(name: str, data_dir: Path):
    import anndata as ad

    return ad.read_h5ad(data_dir / f"{name}.h5ad")


def unlabel_singletons(adata) -> None:
    counts = adata.obs["cell_type"].value_counts()
    rare = counts[counts < 2].index
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).where(~adata.obs["cell_type"].isin(rare), "Unknown")


def fit(train, seed: int, max_epochs: int | None):
    import cellular

    cellular.CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = cellular.CELLULAR(train, seed=seed)
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, progress_bar=False)
    return model, time.perf_counter() - start


def pca_spaces(model, train, test, n_components: int = 50):
    import anndata as ad
    from sklearn.decomposition import PCA

    import cellular

    joint = ad.concat([train, test])
    cellular.pp.normalize_log1p(joint, target_sum=model.target_sum)
    x = joint[:, model.genes].X.toarray()
    pca = PCA(n_components=n_components, random_state=0).fit(x[: train.n_obs])
    return pca.transform(x[: train.n_obs]), pca.transform(x[train.n_obs :])


def knn_vote(reference, reference_codes, query, n_types: int, metric: str):
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=K, metric=metric).fit(reference)
    distances, neighbours = index.kneighbors(query)
    votes = np.zeros((query.shape[0], n_types))
    np.add.at(votes, (np.repeat(np.arange(query.shape[0]), K), reference_codes[neighbours].ravel()), 1.0 / K)
    return votes, distances.mean(axis=1)


def classification_metrics(codes, probabilities) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from cellular.metrics import expected_calibration_error

    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": accuracy_score(codes, predicted),
        "balanced_accuracy": balanced_accuracy_score(codes, predicted),
        "macro_f1": f1_score(codes, predicted, average="macro", labels=np.unique(codes)),
        "ece": expected_calibration_error(probabilities, codes),
    }


def lobo(name: str, data, seed: int, max_epochs: int | None) -> list[dict]:
    rows = []
    for batch in data.obs["batch"].cat.categories:
        train = data[data.obs["batch"] != batch].copy()
        test = data[data.obs["batch"] == batch].copy()
        unlabel_singletons(train)
        model, seconds = fit(train, seed, max_epochs)
        types = model.cell_types
        known = test.obs["cell_type"].astype(str).isin(types).to_numpy()
        codes = pd.Categorical(test.obs["cell_type"].astype(str)[known], categories=types).codes
        train_codes = pd.Categorical(train.obs["cell_type"].astype(str), categories=types).codes
        labelled = train_codes >= 0

        z_train, z_test = model.get_latent_representation(), model.get_latent_representation(test)
        pca_train, pca_test = pca_spaces(model, train, test)
        calibrated = model.probabilities_from_embedding(z_test)
        results = {
            "CELLULAR classifier (calibrated)": calibrated[known],
            "CELLULAR classifier (raw softmax)": model.probabilities_from_embedding(z_test, calibrated=False)[known],
            "CELLULAR embedding + kNN": knn_vote(
                z_train[labelled], train_codes[labelled], z_test[known], len(types), "cosine"
            )[0],
            "PCA + kNN": knn_vote(pca_train[labelled], train_codes[labelled], pca_test[known], len(types), "euclidean")[
                0
            ],
        }
        novelty = model.get_novelty_scores(test)
        false_novel = float((novelty["pvalue"].to_numpy()[known] <= ALPHA).mean())
        f1_line = []
        for method, probabilities in results.items():
            metrics = classification_metrics(codes, probabilities)
            f1_line.append(f"[{method}]={metrics['macro_f1']:.3f}")
            if method == "CELLULAR classifier (calibrated)":
                metrics["false_novel_rate"] = false_novel
                metrics["train_seconds"] = seconds
            for metric, value in metrics.items():
                rows.append(_row("lobo", name, batch, seed, method, metric, value))
        print(f"  lobo {name} / {batch}: macro-F1 " + " ".join(f1_line), flush=True)
    return rows


def novel(name: str, data, seed: int, max_epochs: int | None, min_cells: int = 20) -> list[dict]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rows = []
    table = pd.crosstab(data.obs["cell_type"], data.obs["batch"])
    for cell_type, per_batch in table.iterrows():
        batch = per_batch.idxmax()
        if per_batch[batch] < min_cells:
            continue
        train = data[(data.obs["batch"] != batch) & (data.obs["cell_type"] != cell_type)].copy()
        test = data[data.obs["batch"] == batch].copy()
        unlabel_singletons(train)
        if train.obs["cell_type"].nunique() < 2:
            continue
        model, _ = fit(train, seed, max_epochs)
        frame = model.get_novelty_scores(test)
        is_novel = (test.obs["cell_type"] == cell_type).to_numpy()
        pca_train, pca_test = pca_spaces(model, train, test)
        labelled = train.obs["cell_type"].astype(str).isin(model.cell_types).to_numpy()
        _, pca_distance = knn_vote(pca_train[labelled], np.zeros(labelled.sum(), int), pca_test, 1, "euclidean")
        scores = {
            "CELLULAR novelty score": frame["score"].to_numpy(),
            "CELLULAR prototype distance only": frame["distance"].to_numpy(),
            "CELLULAR 1 - max probability": frame["uncertainty"].to_numpy(),
            "CELLULAR hidden-layer distance only": frame["hidden_distance"].to_numpy(),
            "PCA kNN distance": pca_distance,
        }
        flagged = frame["pvalue"].to_numpy() <= ALPHA
        for method, score in scores.items():
            metrics = {"auroc": roc_auc_score(is_novel, score), "auprc": average_precision_score(is_novel, score)}
            if method == "CELLULAR novelty score":
                metrics["false_novel_rate"] = float(flagged[~is_novel].mean())
                metrics["novel_recall"] = float(flagged[is_novel].mean())
            for metric, value in metrics.items():
                rows.append(_row("novel", name, f"{cell_type} in {batch}", seed, method, metric, value))
        print(
            f"  novel {name} / {cell_type} in {batch}: "
            + " ".join(f"[{m}]={roc_auc_score(is_novel, s):.3f}" for m, s in scores.items())
            + f" false-novel={flagged[~is_novel].mean():.3f} recall={flagged[is_novel].mean():.3f}",
            flush=True,
        )
    return rows


def _row(protocol, dataset, fold, seed, method, metric, value) -> dict:
    return {
        "protocol": protocol,
        "dataset": dataset,
        "fold": fold,
        "seed": seed,
        "method": method,
        "metric": metric,
        "value": float(value),
    }


def summarise(results: pd.DataFrame) -> str:
    def mean_sd(values: pd.Series) -> str:
        per_seed = values.groupby(level="seed").mean()
        if len(per_seed) > 1:
            return f"{per_seed.mean():.3f} ± {per_seed.std():.3f}"
        return f"{per_seed.mean():.3f}"

    sections = []
    for protocol, metrics in (
        ("lobo", ["macro_f1", "accuracy", "balanced_accuracy", "ece", "false_novel_rate"]),
        ("novel", ["auroc", "auprc", "false_novel_rate", "novel_recall"]),
    ):
        part = results[results["protocol"] == protocol]
        if part.empty:
            continue
        # Mean over folds first, then over seeds (reported as mean ± sd across seeds when there are several).
        by_fold = part.groupby(["dataset", "method", "metric", "seed"])["value"].mean()
        table = by_fold.groupby(["dataset", "method", "metric"]).apply(
            lambda v: mean_sd(v.droplevel(["dataset", "method", "metric"]))
        )
        wide = table.unstack("metric").reindex(columns=[m for m in metrics if m in table.index.get_level_values(2)])
        wide = wide.fillna("–").reset_index()
        header = "| " + " | ".join(wide.columns) + " |"
        lines = [header, "|" + "---|" * len(wide.columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in wide.itertuples(index=False)]
        title = "Leave-one-batch-out annotation" if protocol == "lobo" else "Leave-one-cell-type-out novelty"
        sections.append(f"### {title}\n\n" + "\n".join(lines))
    return "\n\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS)
    parser.add_argument("--protocols", nargs="+", default=["lobo", "novel"], choices=["lobo", "novel"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-epochs", type=int, default=None, help="epochs per model (default: the model's)")
    parser.add_argument("--data-dir", default=os.environ.get("CELLULAR_DATA_DIR", "../shared/data"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    data_dir = Path(args.data_dir)
    rows: list[dict] = []
    start = time.perf_counter()
    for name in args.datasets:
        data = load(name, data_dir)
        for seed in args.seeds:
            if "lobo" in args.protocols:
                rows += lobo(name, data, seed, args.max_epochs)
            if "novel" in args.protocols:
                rows += novel(name, data, seed, args.max_epochs)
    results = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "annotate_novel.csv", index=False)
    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    report = (
        f"<!-- generated by: python benchmarks/annotate_novel.py {' '.join(sys.argv[1:])} -->\n"
        f"Seeds {args.seeds}; alpha = {ALPHA}; k = {K}; {machine}; "
        f"{time.perf_counter() - start:.0f} s in total.\n\n" + summarise(results.set_index("seed", append=True)) + "\n"
    )
    (out / "annotate_novel.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
