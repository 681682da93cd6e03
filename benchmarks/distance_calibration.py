"""How many known cells the reference index's distance p-values flag, by what calibrates them.

``tl.cellular_map`` writes each query cell's mean distance to its 15 nearest reference cells and a conformal p-value
of it. Three calibrations of that p-value are compared at alpha = 0.05:

- ``reference cells``: reference cells' distances to the rest of the reference (what an index made with
  ``ReferenceIndex.from_embedding`` uses; every index did before held-out cells);
- ``held-out cells``: the model's held-out reference cells embedded as a query, every gene (an index built from the
  model);
- ``as served``: what ``tl.cellular_map`` writes: the held-out cells read under the query's gene panel when the query
  lacks some of the model's genes and the model serves it, else the previous row.

Two kinds of query, one default model each (seeds 0, 1, 2):

- ``map``: pbmc3k (another lab, 170 of the model's genes missing) onto Symphony with one type left out of the
  reference (B cells, NK cells or CD14 monocytes): the share of known-type cells flagged, and of the left-out type;
- ``lobo``: each batch of the ``--datasets`` held out of the reference and mapped onto it: the share of its cells of
  the reference's types flagged.

    python -m benchmarks.distance_calibration                  # map + lobo on Symphony, Kang, CellBench; seeds 0 1 2
    python -m benchmarks.distance_calibration --seeds 0 --datasets pbmc_symphony_3tech

Writes ``distance_calibration.csv`` (one row per fold, seed and calibration; resumable: finished (task, dataset,
seed) groups are skipped) and ``distance_calibration.md``.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._script import resumed_rows, script_main, script_parser, seed_mean_sd

DATASETS = ["pbmc_symphony_3tech", "pbmc_kang2018_ifnb_subset", "cellbench_lung_celllines"]
MAP_REFERENCE, MAP_QUERY = "pbmc_symphony_3tech", "pbmc3k_seurat"
LEFT_OUT = ["B cell", "NK cell", "CD14 Monocyte"]
CALIBRATIONS = ["reference cells", "held-out cells", "as served"]
ALPHA = 0.05
K = 15
KEYS = ["task", "dataset", "seed"]


def _mapped_rows(reference, query, seed: int, base: dict, novel: np.ndarray | None) -> list[dict]:
    """Train a default model on ``reference``, map ``query`` and score each calibration's flags."""
    import cellular
    from cellular.metrics import conformal_pvalues

    counts = reference.obs["cell_type"].value_counts()
    reference = reference[reference.obs["cell_type"].isin(counts[counts >= 2].index)].copy()
    reference.obs["cell_type"] = pd.Categorical(reference.obs["cell_type"].astype(str))
    cellular.CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = cellular.CELLULAR(reference, seed=seed)
    model.train(progress_bar=False)
    index = model.build_reference_index(reference, label_keys=["cell_type"])
    query = query.copy()
    cellular.tl.cellular_map(query, model, k=K, min_gene_overlap=0.0)
    distances = query.obs["cellular_distance"].to_numpy()
    on_reference_cells = cellular.ReferenceIndex.from_embedding(
        index.embedding, {"cell_type": reference.obs["cell_type"].to_numpy()}, index.cell_names
    )
    pvalues = {
        "reference cells": conformal_pvalues(on_reference_cells.reference_mean_distances(K), distances),
        "held-out cells": conformal_pvalues(index.reference_mean_distances(K), distances),
        "as served": query.obs["cellular_distance_pvalue"].to_numpy(),
    }
    known = query.obs["cell_type"].isin(reference.obs["cell_type"].cat.categories).to_numpy()
    served = query.uns["cellular"]["cellular_map"]["params"]["distance_calibration"]
    rows = []
    for calibration, values in pvalues.items():
        flagged = values <= ALPHA
        rows.append(
            {
                **base,
                "seed": seed,
                "calibration": calibration,
                "served_by": served,
                "known_flagged": float(flagged[known].mean()),
                "novel_flagged": float(flagged[novel].mean()) if novel is not None and novel.any() else np.nan,
            }
        )
    return rows


def run(datasets: list[str], seeds: list[int], data_dir: Path, out: Path) -> pd.DataFrame:
    from benchmarks._folds import load_dataset

    csv = out / "distance_calibration.csv"
    rows, done = resumed_rows(csv, KEYS)
    groups = [("map", f"{MAP_QUERY} onto {MAP_REFERENCE}")] + [("lobo", name) for name in datasets]
    for task, dataset in groups:
        for seed in seeds:
            if (task, dataset, str(seed)) in done:
                continue
            new = []
            if task == "map":
                atlas, query = load_dataset(MAP_REFERENCE, data_dir), load_dataset(MAP_QUERY, data_dir)
                for cell_type in LEFT_OUT:
                    reference = atlas[atlas.obs["cell_type"] != cell_type]
                    novel = (query.obs["cell_type"] == cell_type).to_numpy()
                    base = {"task": task, "dataset": dataset, "fold": f"without {cell_type}"}
                    new += _mapped_rows(reference, query, seed, base, novel)
            else:
                adata = load_dataset(dataset, data_dir)
                for batch in adata.obs["batch"].cat.categories:
                    held_out = (adata.obs["batch"] == batch).to_numpy()
                    base = {"task": task, "dataset": dataset, "fold": str(batch)}
                    new += _mapped_rows(adata[~held_out], adata[held_out], seed, base, None)
            rows += new
            pd.DataFrame(rows).to_csv(csv, index=False)
            flags = {row["calibration"]: [] for row in new}
            for row in new:
                flags[row["calibration"]].append(row["known_flagged"])
            summary = ", ".join(f"{name} {np.mean(values):.3f}" for name, values in flags.items())
            print(f"{task} {dataset} | seed {seed}: known flagged {summary}", flush=True)
    return pd.DataFrame(rows)


def report(frame: pd.DataFrame, out: Path) -> str:
    seeds = ", ".join(str(seed) for seed in sorted(set(frame["seed"])))
    lines = [
        "<!-- generated by benchmarks/distance_calibration.py; do not edit -->",
        "",
        f"Share of query cells with a distance p-value <= {ALPHA} ({K} neighbours), seeds {seeds}, machine: "
        f"{platform.machine()} CPU. Known: cells of the reference's types; left out: the type removed from the "
        "reference (map rows). Mean over folds, then mean ± sd over seeds; per fold below.",
        "",
        "| task | dataset | calibration | known flagged | left-out type flagged |",
        "|---|---|---|---|---|",
    ]
    order = {name: position for position, name in enumerate(CALIBRATIONS)}
    groups = frame.groupby(["task", "dataset", "calibration"], sort=False)
    for (task, dataset, calibration), part in sorted(
        groups, key=lambda item: (item[0][0] != "map", item[0][1], order[item[0][2]])
    ):
        lines.append(
            f"| {task} | {dataset} | {calibration} | {seed_mean_sd(part, 'known_flagged')} | "
            f"{seed_mean_sd(part, 'novel_flagged')} |"
        )
    per_fold = frame.pivot_table(
        index=["task", "dataset", "fold"], columns="calibration", values="known_flagged", aggfunc="mean"
    )
    lines += [
        "",
        "Known cells flagged per fold (mean over seeds):",
        "",
        "| task | dataset | fold | " + " | ".join(CALIBRATIONS) + " |",
        "|---|---|---|" + "---|" * len(CALIBRATIONS),
    ]
    for (task, dataset, fold), values in per_fold.iterrows():
        lines.append(f"| {task} | {dataset} | {fold} | " + " | ".join(f"{values[c]:.3f}" for c in CALIBRATIONS) + " |")
    text = "\n".join(lines) + "\n"
    (out / "distance_calibration.md").write_text(text)
    return text


def main() -> None:
    parser = script_parser(__doc__, DATASETS)
    script_main(
        parser, "distance_calibration", lambda args: run(args.datasets, args.seeds, args.data_dir, args.out), report
    )


if __name__ == "__main__":
    main()
