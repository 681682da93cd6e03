"""The figures the documentation quotes that no other benchmark produces, generated rather than typed.

1. Leave-one-technology-out on ``pbmc_symphony_3tech``: 15-NN label transfer in the CELLULAR embedding against PCA,
   per held-out technology, with default settings (``lobo_embedding.md``).
2. The settings behind the defaults (``defaults.md``): the paper's settings, class-balanced sampling, dropout 0.5,
   and the default (balanced sampling with weight decay 1e-3); mean macro-F1 over the three held-out technologies.
3. ``pbmc3k_seurat`` mapped onto all of ``pbmc_symphony_3tech`` (``pbmc3k_map.md``): the index vote averaged with the
   gene classifier (``tl.cellular_map``), a refit on the shared genes, ``tl.cellular_annotate`` (the classifier head
   averaged with the gene classifier), and PCA + 15-NN on the shared genes.

    python benchmarks/docs_tables.py --out benchmarks/results        # about 5 minutes on 2 cores

Seed 0; single runs on 1,200 cells, so differences of 0.01 are within noise.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, f1_score, silhouette_score
from sklearn.neighbors import KNeighborsClassifier

import cellular
from cellular import CELLULAR

SETTINGS = {
    "paper (weight decay 5e-5, shuffled epochs)": ({}, {"weight_decay": 5e-5, "balanced_sampling": False}),
    "class-balanced sampling, weight decay 5e-5": ({}, {"weight_decay": 5e-5, "balanced_sampling": True}),
    "class-balanced sampling, dropout 0.5, weight decay 5e-5": (
        {"dropout_rate": 0.5},
        {"weight_decay": 5e-5, "balanced_sampling": True},
    ),
    "default (class-balanced sampling, weight decay 1e-3)": ({}, {}),
}
DEFAULT = "default (class-balanced sampling, weight decay 1e-3)"


def _mark_singletons(adata, key="cell_type"):
    counts = adata.obs[key].value_counts()
    rare = counts.index[counts < 2]
    adata.obs[key] = adata.obs[key].astype(str).where(~adata.obs[key].isin(rare), "Unknown").astype("category")


def _log_expression(adata, genes, target_sum):
    return cellular.pp.normalize_log1p(adata[:, genes], target_sum=target_sum, copy=True).X.toarray()


def _knn_scores(reference, reference_labels, query, query_labels, metric):
    knn = KNeighborsClassifier(n_neighbors=15, metric=metric).fit(reference, reference_labels)
    predicted = knn.predict(query)
    return accuracy_score(query_labels, predicted), f1_score(query_labels, predicted, average="macro")


def lobo(symphony) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for held_out in ("3pv1", "5p", "3pv2"):
        train = symphony[symphony.obs["batch"] != held_out].copy()
        test = symphony[symphony.obs["batch"] == held_out].copy()
        _mark_singletons(train)
        for name, (model_kwargs, train_kwargs) in SETTINGS.items():
            data = train.copy()
            CELLULAR.setup_anndata(data, labels_key="cell_type", batch_key="batch")
            model = CELLULAR(data, seed=0, **model_kwargs)
            model.train(progress_bar=False, classifier=False, **train_kwargs)
            labels = data.obs["cell_type"].astype(str).to_numpy()
            known_train = np.isin(labels, model.cell_types)
            test_labels = test.obs["cell_type"].astype(str).to_numpy()
            known = np.isin(test_labels, model.cell_types)
            z_train, z_test = model.get_latent_representation(), model.get_latent_representation(test)
            accuracy, f1 = _knn_scores(
                z_train[known_train], labels[known_train], z_test[known], test_labels[known], "cosine"
            )
            row = {"held_out": held_out, "setting": name, "accuracy": accuracy, "macro_f1": f1}
            if name == DEFAULT:
                row["silhouette"] = silhouette_score(z_test[known], test_labels[known], metric="cosine")
                pca = PCA(n_components=50, random_state=0).fit(_log_expression(data, model.genes, model.target_sum))
                p_train = pca.transform(_log_expression(data, model.genes, model.target_sum))
                p_test = pca.transform(_log_expression(test, model.genes, model.target_sum))
                row["pca_accuracy"], row["pca_macro_f1"] = _knn_scores(
                    p_train[known_train], labels[known_train], p_test[known], test_labels[known], "euclidean"
                )
                row["pca_silhouette"] = silhouette_score(p_test[known], test_labels[known])
            rows.append(row)
            print(f"  {held_out:5s} {name:60s} accuracy {accuracy:.3f} macro-F1 {f1:.3f}", flush=True)
    table = pd.DataFrame(rows)
    default = table[table["setting"] == DEFAULT].drop(columns="setting").set_index("held_out")
    default.loc["mean"] = default.mean()
    settings = table.pivot(index="setting", columns="held_out", values="macro_f1")[["3pv1", "5p", "3pv2"]]
    settings["mean"] = settings.mean(axis=1)
    return default, settings.loc[list(SETTINGS)]


def pbmc3k_map(symphony, pbmc3k) -> pd.DataFrame:
    reference = symphony.copy()
    _mark_singletons(reference)
    CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(reference, n_top_genes=reference.n_vars, seed=0)
    model.train(progress_bar=False)
    model.build_reference_index(reference)
    truth = pbmc3k.obs["cell_type"].astype(str).to_numpy()
    shared = [gene for gene in model.genes if gene in set(pbmc3k.var_names)]

    def scores(predicted):
        predicted = np.asarray(predicted, dtype=str)
        return accuracy_score(truth, predicted), f1_score(truth, predicted, average="macro", labels=np.unique(truth))

    rows = {}
    mapped = cellular.tl.cellular_map(pbmc3k, model, panel="direct", copy=True)
    rows["CELLULAR index, 15-NN vote + gene classifier (`cellular_map`)"] = scores(mapped.obs["cellular_cell_type"])
    refit = cellular.tl.cellular_map(pbmc3k, model, panel="refit", copy=True)
    rows[f"CELLULAR, model refitted on the {len(shared):,} shared genes"] = scores(refit.obs["cellular_cell_type"])
    annotated = cellular.tl.cellular_annotate(pbmc3k, model, novel_as_unknown=False, panel="direct", copy=True)
    rows["CELLULAR head + gene classifier (`cellular_annotate`, no novelty filter)"] = scores(
        annotated.obs["cellular_label"]
    )
    labels = reference.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(labels, model.cell_types)
    pca = PCA(n_components=50, random_state=0).fit(_log_expression(reference, shared, model.target_sum))
    knn = KNeighborsClassifier(n_neighbors=15).fit(
        pca.transform(_log_expression(reference, shared, model.target_sum))[known], labels[known]
    )
    rows["PCA + 15-NN on the shared genes"] = scores(
        knn.predict(pca.transform(_log_expression(pbmc3k, shared, model.target_sum)))
    )
    table = pd.DataFrame(rows, index=["accuracy", "macro_f1"]).T
    table.index.name = "method"
    for name, value in table["accuracy"].items():
        print(f"  {name:70s} accuracy {value:.3f} macro-F1 {table.loc[name, 'macro_f1']:.3f}", flush=True)
    return table


def _markdown(table: pd.DataFrame, header: str) -> str:
    shown = table.reset_index()
    lines = ["| " + " | ".join(str(c) for c in shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    for row in shown.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return header + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for the .md and .csv tables")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("cellular").setLevel(logging.ERROR)
    symphony = cellular.data.read_shared_dataset("pbmc_symphony_3tech")
    pbmc3k = cellular.data.read_shared_dataset("pbmc3k_seurat")
    print("Leave-one-technology-out on pbmc_symphony_3tech:")
    default, settings = lobo(symphony)
    print("pbmc3k_seurat mapped onto pbmc_symphony_3tech:")
    mapping = pbmc3k_map(symphony, pbmc3k)
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    command = "Generated by `python benchmarks/docs_tables.py --out benchmarks/results` (seed 0, CPU)."
    outputs = {
        "lobo_embedding": (default, f"{command} 15-NN label transfer from the two training technologies."),
        "defaults": (settings, f"{command} Macro-F1 of 15-NN label transfer per held-out technology."),
        "pbmc3k_map": (mapping, f"{command} All 2,638 pbmc3k cells; `Unknown` counts as wrong."),
    }
    for name, (table, header) in outputs.items():
        table.to_csv(args.out / f"{name}.csv")
        (args.out / f"{name}.md").write_text(_markdown(table, header))
    print(f"wrote {', '.join(outputs)} to {args.out}")


if __name__ == "__main__":
    main()
