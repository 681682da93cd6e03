"""CELLama and tree-model settings on a held-out technology: what the defaults of ``cellular.lm`` and ``cellular.trees``
rest on.

pbmc_symphony_3tech, trained on the 3' v1 and 5' cells, scored on the 3' v2 cells (15-NN cosine vote on the
sentence embedding; kNN accuracy and macro-F1 over cells of trained types):

- sentences of all genes against sentences of the 500 most variable genes (15 and 30 genes per sentence), zero-shot;
- fine-tuning on the training cells: supervised (``labels_key``, ranking loss) and CELLama's PCA-similarity pairs;
- throughput: sentences embedded per second, pairs fine-tuned per second (2-core CPU, 15-gene sentences);
- ``TreeAnnotator``: random forest and gradient boosting, with and without temperature calibration (macro-F1,
  expected calibration error).

    python benchmarks/cellama.py --out benchmarks/results
    python benchmarks/cellama.py --seeds 0 1 --out /tmp/cellama

Writes ``cellama.csv`` (one row per seed and setting) and ``cellama.md`` (means ± sd over seeds). Resumable: rows
already in the CSV are not recomputed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

HELD_OUT = "3pv2"
N_HVG = 500
N_PAIRS = 1000
KEYS = ["seed", "setting"]


def _scores(z: np.ndarray, labels: np.ndarray, test: np.ndarray) -> dict:
    knn = KNeighborsClassifier(n_neighbors=15, metric="cosine").fit(z[~test], labels[~test])
    known = test & np.isin(labels, np.unique(labels[~test]))
    predicted = knn.predict(z[known])
    return {
        "knn_accuracy": float(np.mean(predicted == labels[known])),
        "macro_f1": float(f1_score(labels[known], predicted, average="macro")),
    }


def _sentence_data(adata: ad.AnnData, n_genes: int, variable: bool) -> ad.AnnData:
    import cellular

    data = adata.copy()
    if variable:
        normalised = cellular.pp.normalize_log1p(data, target_sum=1e4, copy=True)
        train = (data.obs["batch"] != HELD_OUT).to_numpy()
        genes = cellular.pp.highly_variable_genes(normalised.X[train], data.var_names, N_HVG)
        data.var["highly_variable"] = data.var_names.isin(genes)
    cellular.tl.cell_sentences(data, n_genes=n_genes, mask_var="highly_variable" if variable else None)
    return data


def lm_rows(adata: ad.AnnData, seed: int, done: set) -> list[dict]:
    from cellular.lm import CellSentenceEncoder

    rows = []
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    test = (adata.obs["batch"] == HELD_OUT).to_numpy()
    for n_genes, variable in [(15, False), (15, True), (30, True)]:
        setting = f"zero-shot, {n_genes} genes, {'HVG' if variable else 'all genes'}"
        if (seed, setting) in done:
            continue
        data = _sentence_data(adata, n_genes, variable)
        encoder = CellSentenceEncoder.pretrained(device="cpu")
        start = time.perf_counter()
        z = encoder.embed(data.obs["cell_sentence"].to_numpy(), batch_size=128)
        seconds = time.perf_counter() - start
        rows.append(
            {"seed": seed, "setting": setting, **_scores(z, labels, test), "cells_per_second": data.n_obs / seconds}
        )
        print(rows[-1], flush=True)
    data = _sentence_data(adata, 15, True)
    for variant in ("supervised", "pca"):
        setting = f"fine-tuned ({variant}), {N_PAIRS} pairs, 15 genes, HVG"
        if (seed, setting) in done:
            continue
        encoder = CellSentenceEncoder.pretrained(device="cpu")
        train = data[~test].copy()
        start = time.perf_counter()
        encoder.fine_tune(
            train,
            labels_key="cell_type" if variant == "supervised" else None,
            batch_key="batch" if variant == "supervised" else None,
            n_pairs=N_PAIRS,
            seed=seed,
        )
        seconds = time.perf_counter() - start
        z = encoder.embed(data.obs["cell_sentence"].to_numpy(), batch_size=128)
        rows.append(
            {"seed": seed, "setting": setting, **_scores(z, labels, test), "pairs_per_second": N_PAIRS / seconds}
        )
        print(rows[-1], flush=True)
    return rows


def tree_rows(adata: ad.AnnData, seed: int, done: set) -> list[dict]:
    from cellular.metrics import expected_calibration_error
    from cellular.trees import TreeAnnotator

    rows = []
    test = (adata.obs["batch"] == HELD_OUT).to_numpy()
    train, query = adata[~test].copy(), adata[test].copy()
    for method in ("random_forest", "hist_gradient_boosting"):
        for calibration in ("temperature", None):
            setting = f"TreeAnnotator {method}, calibration {calibration}"
            if (seed, setting) in done:
                continue
            start = time.perf_counter()
            annotator = TreeAnnotator(method, calibration=calibration, seed=seed, n_estimators=200).fit(
                train, "cell_type"
            )
            seconds = time.perf_counter() - start
            labels = query.obs["cell_type"].astype(str).to_numpy()
            known = np.isin(labels, annotator.classes_)
            probabilities = annotator.predict_proba(query)[known]
            codes = pd.Categorical(labels[known], categories=annotator.classes_).codes
            predicted = np.asarray(annotator.classes_)[probabilities.argmax(axis=1)]
            rows.append(
                {
                    "seed": seed,
                    "setting": setting,
                    "knn_accuracy": np.nan,
                    "macro_f1": float(f1_score(labels[known], predicted, average="macro")),
                    "accuracy": float(np.mean(predicted == labels[known])),
                    "ece": expected_calibration_error(probabilities, codes),
                    "fit_seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    return rows


def report(frame: pd.DataFrame) -> str:
    metrics = [
        c
        for c in ["knn_accuracy", "accuracy", "macro_f1", "ece", "cells_per_second", "pairs_per_second", "fit_seconds"]
        if c in frame
    ]
    grouped = frame.groupby("setting", sort=False)[metrics]
    mean, sd, count = grouped.mean(), grouped.std(), grouped.size()
    lines = [
        f"Held-out technology {HELD_OUT} of pbmc_symphony_3tech (trained on the other two); {count.max()} seed(s).",
        "",
        "| setting | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for setting in mean.index:
        cells = []
        for metric in metrics:
            value = mean.loc[setting, metric]
            if np.isnan(value):
                cells.append("")
            elif metric.endswith("per_second") or metric == "fit_seconds":
                cells.append(f"{value:.1f}")
            else:
                spread = sd.loc[setting, metric]
                cells.append(f"{value:.3f}" + ("" if np.isnan(spread) else f" ± {spread:.3f}"))
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data-dir", default=os.environ.get("CELLULAR_DATA_DIR", "../shared/data"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "cellama.csv"
    frame = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=KEYS)
    done = set(zip(frame["seed"], frame["setting"], strict=True))
    adata = ad.read_h5ad(Path(args.data_dir) / "pbmc_symphony_3tech.h5ad")
    for seed in args.seeds:
        for rows in (lm_rows(adata, seed, done), tree_rows(adata, seed, done)):
            if rows:
                frame = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
                frame.to_csv(csv, index=False)
    (out / "cellama.md").write_text(report(frame))
    print(report(frame))


if __name__ == "__main__":
    main()
