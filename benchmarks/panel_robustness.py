"""Queries that measure part of the model's genes: quality, uncertainty and calibration against the share kept.

A model is trained on every gene of pbmc_symphony_3tech (default settings, and panel-robust: panel masking and depth
thinning at 0.5) and pbmc3k_seurat is mapped onto it keeping a random share of the model's genes. For each share:
macro-F1 of kNN label transfer (``tl.cellular_map``) and of the classifier (``tl.cellular_annotate``), the mean
uncertainty, the expected calibration error, and the wrong-label rate among confident and uncertain cells, for the
model used directly and for its refit on the shared genes (``model.restrict_to_genes``), against PCA + 15-NN fitted
on the shared genes.

    python benchmarks/panel_robustness.py --out benchmarks/results            # 3 seeds
    python benchmarks/panel_robustness.py --seeds 0 --out /tmp/panels         # quicker

Writes ``panel_robustness.csv`` (one row per seed, model, share and path) and ``panel_robustness.md`` (means ± sd).
Resumable: rows already in the CSV are not recomputed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

SHARES = (1.0, 0.5, 0.2, 0.1, 0.05)
MODELS = {
    "default": {},
    "panel-robust": {"panel_masking": 0.5, "depth_thinning": 0.5},
}
KEYS = ["seed", "model", "gene_share", "path"]


def _ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    gaps = np.bincount(bins, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gaps).sum() / max(confidence.size, 1))


def _pca_knn(reference: ad.AnnData, query: ad.AnnData, genes: list[str], target_sum: float) -> np.ndarray:
    import cellular

    reference = reference[:, genes]
    reference = reference[np.asarray(reference.X.sum(axis=1)).ravel() > 0]  # as the refit, without empty cells
    joint = ad.concat([reference, query[:, genes]])
    cellular.pp.normalize_log1p(joint, target_sum=target_sum)
    x = joint.X.toarray()
    n_ref = reference.n_obs
    pca = PCA(n_components=min(50, len(genes) - 1), random_state=0).fit(x[:n_ref])
    knn = KNeighborsClassifier(n_neighbors=15).fit(pca.transform(x[:n_ref]), reference.obs["cell_type"].astype(str))
    return knn.predict(pca.transform(x[n_ref:]))


def _macro_f1(truth: np.ndarray, known: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-F1 over the true classes of cells of trained types, as the field benchmark scores it."""
    present = sorted(set(truth[known]))
    return f1_score(truth[known], predicted[known], labels=present, average="macro", zero_division=0.0)


def _scores(truth, known, probabilities, classes, uncertainty) -> dict:
    """Forced-choice macro-F1 (argmax), uncertainty, calibration and wrong-label rates of confident/uncertain cells."""
    predicted = np.asarray(classes)[probabilities.argmax(axis=1)]
    wrong = predicted != truth
    confident = uncertainty < 0.5
    return {
        "macro_f1": _macro_f1(truth, known, predicted),
        "mean_uncertainty": float(uncertainty[known].mean()),
        "ece": _ece(probabilities[known].max(axis=1), (~wrong[known]).astype(float)),
        "wrong_confident": float(wrong[known & confident].mean()) if (known & confident).any() else np.nan,
        "wrong_uncertain": float(wrong[known & ~confident].mean()) if (known & ~confident).any() else np.nan,
    }


def run(seeds: list[int], data_dir: Path, out: Path) -> pd.DataFrame:
    import cellular

    logging.getLogger("cellular").setLevel(logging.ERROR)
    reference = ad.read_h5ad(data_dir / "pbmc_symphony_3tech.h5ad")
    query = ad.read_h5ad(data_dir / "pbmc3k_seurat.h5ad")
    csv = out / "panel_robustness.csv"
    rows = pd.read_csv(csv).to_dict("records") if csv.exists() else []
    done = {tuple(row[k] for k in KEYS) for row in rows}
    truth = query.obs["cell_type"].astype(str).to_numpy()
    for seed in seeds:
        for model_name, settings in MODELS.items():
            needed = [
                (seed, model_name, share, path)
                for share in SHARES
                for path in ("direct", "refit", "pca_knn")
                if (seed, model_name, share, path) not in done
            ]
            if not needed:
                continue
            adata = reference.copy()
            cellular.CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
            start = time.perf_counter()
            model = cellular.CELLULAR(adata, seed=seed, **settings)
            model.train(progress_bar=False)
            model.build_reference_index(adata)
            train_seconds = time.perf_counter() - start
            known = np.isin(truth, model.cell_types)
            shared = [g for g in model.genes if g in set(query.var_names)]
            rng = np.random.default_rng(seed)
            for share in SHARES:
                n_genes = min(len(shared), int(round(share * len(model.genes))))
                genes = shared if n_genes == len(shared) else sorted(rng.choice(shared, n_genes, replace=False))
                for path in ("direct", "refit", "pca_knn"):
                    if (seed, model_name, share, path) in done:
                        continue
                    if path == "pca_knn" and model_name != "default":
                        continue
                    sub = query[:, genes].copy()
                    # Cells without a count over the panel cannot be normalised (the package refuses them).
                    measured = np.asarray(sub.X.sum(axis=1)).ravel() > 0
                    sub = sub[measured].copy()
                    cell_truth, cell_known = truth[measured], known[measured]
                    start = time.perf_counter()
                    row = {"seed": seed, "model": model_name, "gene_share": share, "path": path}
                    row["n_genes"] = len(genes)
                    row["n_cells"] = int(sub.n_obs)
                    if path == "pca_knn":
                        row["macro_f1"] = _macro_f1(
                            cell_truth, cell_known, _pca_knn(adata, sub, genes, model.target_sum)
                        )
                    else:
                        cellular.tl.cellular_map(sub, model, panel=path)
                        cellular.tl.cellular_annotate(sub, model, panel=path, novel_as_unknown=False)
                        uns = sub.uns["cellular"]
                        row["expression_share"] = uns["cellular_map"]["params"]["expression_share"]
                        scores = _scores(
                            cell_truth,
                            cell_known,
                            sub.obsm["cellular_cell_type_probabilities"],
                            uns["cellular_map"]["levels"]["cell_type"]["classes"],
                            sub.obs["cellular_cell_type_uncertainty"].to_numpy(),
                        )
                        row.update({f"map_{k}": v for k, v in scores.items()})
                        confidence = sub.obs["cellular_label_confidence"].to_numpy()
                        scores = _scores(
                            cell_truth,
                            cell_known,
                            sub.obsm["cellular_label_probabilities"],
                            uns["cellular_label"]["classes"],
                            1.0 - confidence,
                        )
                        row.update({f"classifier_{k}": v for k, v in scores.items()})
                    row["seconds"] = time.perf_counter() - start
                    row["train_seconds"] = train_seconds
                    rows.append(row)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                    pd.DataFrame(rows).to_csv(csv, index=False)
    return pd.DataFrame(rows)


def report(frame: pd.DataFrame, out: Path) -> None:
    columns = [
        "n_genes",
        "expression_share",
        "map_macro_f1",
        "macro_f1",
        "classifier_macro_f1",
        "map_mean_uncertainty",
        "map_ece",
        "classifier_ece",
        "map_wrong_confident",
        "map_wrong_uncertain",
        "seconds",
    ]
    columns = [c for c in columns if c in frame]
    grouped = frame.groupby(["model", "path", "gene_share"], sort=False)[columns]
    mean, sd = grouped.mean(), grouped.std().fillna(0.0)
    table = mean.copy().astype(object)
    for column in columns:
        table[column] = [
            "" if pd.isna(m) else (f"{m:.0f}" if column == "n_genes" else f"{m:.3f} ± {s:.3f}")
            for m, s in zip(mean[column], sd[column], strict=True)
        ]
    n_seeds = frame["seed"].nunique()
    text = (
        "<!-- generated by benchmarks/panel_robustness.py; do not edit -->\n\n"
        f"pbmc3k_seurat mapped onto pbmc_symphony_3tech keeping a share of the model's genes; mean ± sd over "
        f"{n_seeds} seed(s). `macro_f1` is PCA + 15-NN on the shared genes.\n\n" + _markdown(table.reset_index()) + "\n"
    )
    (out / "panel_robustness.md").write_text(text)
    print(text)


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CELLULAR_DATA_DIR", "../shared/data")))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report(run(args.seeds, args.data_dir, args.out), args.out)


if __name__ == "__main__":
    main()
