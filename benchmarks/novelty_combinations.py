"""Other ways to build the novelty score from its parts, on the field benchmark's leave-one-cell-type-out folds.

For every ``novel`` fold one default model is trained; its novelty table gives, for the test cells and for the
calibration cells (labelled cells held out of encoder training), the prototype distance, the uncertainty, the
hidden-layer distance and the input-gene distance. One more part is computed here: the same input-gene distance
after standardising each gene on the training cells (clipped at 10, as ``sc.pp.scale``) before the PCA, so lowly
expressed marker genes count as much as abundant ones (the inputs are taken from the model's reader). Each
combination scales every part by its 90 % quantile on the calibration cells, as the package does, and combines the
distances by a p-norm (p = 1 is the package's sum, large p tends to their maximum), then adds the weighted
uncertainty; conformal p-values come from the calibration cells' combined scores.

    python -m benchmarks.novelty_combinations                 # three datasets, seeds 0 1 2 (about 15 minutes)
    python -m benchmarks.novelty_combinations --report-only

Writes ``novelty_combinations.csv`` (one row per fold, seed and combination; resumable by (dataset, seed)) and
``novelty_combinations.md``: AUROC, the share of known-type test cells flagged at alpha = 0.05, and the share of
the held-out type's cells flagged (power). An exploration: the first ``sum`` row adds the package's three distances
at equal weights; the package itself weights the gene distance 3 and adds the gene classifier's uncertainty where
the reference vouches for it, and its gene space is already standardised (so the ``genes`` and ``standardised
genes`` rows coincide).
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._script import encoder_inputs, run_novel_folds, script_main, script_parser

DATASETS = ["cellbench_lung_celllines", "pancreas_endocrinogenesis_mouse", "pbmc_symphony_3tech"]
ALPHA = 0.05
SCALE_QUANTILE = 0.9
UNCERTAINTY_WEIGHT = 0.1
PARTS = {"prototype": "distance", "hidden": "hidden_distance", "genes": "gene_distance"}
COMBINATIONS = {
    "sum: prototype + hidden + genes (the package's distances, equal weights)": (("prototype", "hidden", "genes"), 1),
    "sum: prototype + hidden + standardised genes": (("prototype", "hidden", "standardised genes"), 1),
    "sum: prototype + hidden + genes + standardised genes": (
        ("prototype", "hidden", "genes", "standardised genes"),
        1,
    ),
    "2-norm: prototype + hidden + standardised genes": (("prototype", "hidden", "standardised genes"), 2),
    "max: prototype + hidden + genes": (("prototype", "hidden", "genes"), np.inf),
    "max: prototype + hidden + standardised genes": (("prototype", "hidden", "standardised genes"), np.inf),
}


def _standardised_gene_distances(model, train, calibration_rows, test) -> tuple[np.ndarray, np.ndarray]:
    """Mean 15-NN distance to the labelled training cells in standardised input genes (PCA 50): calibration, test."""
    from cellular.model._novelty_spaces import PCASpace

    labels = model.registered_labels()
    training_rows = np.asarray(model.train_indices_)
    reference = encoder_inputs(model, train[training_rows[labels[training_rows] >= 0]])
    mean, sd = reference.mean(axis=0), reference.std(axis=0)
    sd[sd == 0] = 1.0

    def standardised(values):
        return np.minimum((values - mean) / sd, 10.0).astype(np.float32)

    space = PCASpace.fit(standardised(reference), model.seed, unit_length=False)

    def distances(adata):
        return space.distances(space.project(standardised(encoder_inputs(model, adata))))

    return distances(train[calibration_rows]), distances(test)


def _combined(parts: dict[str, np.ndarray], scales: dict[str, float], names, power: float, uncertainty, scale_u):
    scaled = np.array([parts[name] / scales[name] for name in names], dtype=np.float64)
    if np.isinf(power):
        combined = scaled.max(axis=0)
    else:
        combined = (scaled**power).sum(axis=0) ** (1.0 / power)
    return combined + UNCERTAINTY_WEIGHT * uncertainty / scale_u


def _fold_rows(fold, seed: int) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    import cellular
    from benchmarks._methods import BATCH, LABELS, UNLABELLED
    from cellular.metrics import conformal_pvalues

    train = fold.train.copy()
    cellular.CELLULAR.setup_anndata(train, labels_key=LABELS, batch_key=BATCH, unlabeled_category=UNLABELLED)
    model = cellular.CELLULAR(train, seed=seed)
    model.train(progress_bar=False)
    labels = model.registered_labels()
    calibration_rows = np.asarray(model.validation_indices_)
    calibration_rows = calibration_rows[labels[calibration_rows] >= 0]
    tables = {
        "calibration": model.get_novelty_scores(train[calibration_rows], min_gene_overlap=0.0),
        "test": model.get_novelty_scores(fold.test, min_gene_overlap=0.0),
    }
    calibration_genes, test_genes = _standardised_gene_distances(model, train, calibration_rows, fold.test)
    parts = {
        split: {name: table[column].to_numpy() for name, column in PARTS.items()} for split, table in tables.items()
    }
    parts["calibration"]["standardised genes"] = calibration_genes
    parts["test"]["standardised genes"] = test_genes
    scales = {
        name: max(float(np.quantile(values, SCALE_QUANTILE)), 1e-6) for name, values in parts["calibration"].items()
    }
    uncertainty = {split: table["uncertainty"].to_numpy() for split, table in tables.items()}
    scale_u = max(float(np.quantile(uncertainty["calibration"], SCALE_QUANTILE)), 1e-3)
    is_novel = (fold.test.obs[LABELS] == fold.novel_type).to_numpy()
    base = {"dataset": fold.dataset, "fold": fold.name, "seed": seed}
    rows = []
    for combination, (names, power) in COMBINATIONS.items():
        scores = {split: _combined(parts[split], scales, names, power, uncertainty[split], scale_u) for split in parts}
        flagged = conformal_pvalues(np.sort(scores["calibration"]), scores["test"]) <= ALPHA
        rows.append(
            {
                **base,
                "combination": combination,
                "auroc": roc_auc_score(is_novel, scores["test"]),
                "known_flagged": float(flagged[~is_novel].mean()),
                "novel_flagged": float(flagged[is_novel].mean()),
            }
        )
    return rows


def run(datasets: list[str], seeds: list[int], data_dir: Path, out: Path) -> pd.DataFrame:
    def progress(new: list[dict]) -> str:
        return f"{len({row['fold'] for row in new})} folds"

    return run_novel_folds(out / "novelty_combinations.csv", datasets, seeds, data_dir, _fold_rows, progress)


def report(frame: pd.DataFrame, out: Path) -> str:
    datasets = sorted(set(frame["dataset"]))
    per_seed = frame.groupby(["combination", "dataset", "seed"])[["auroc", "known_flagged", "novel_flagged"]].mean()

    def cell(combination: str, dataset: str, metric: str) -> str:
        values = per_seed.loc[(combination, dataset), metric]
        spread = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
        return f"{values.mean():.3f}{spread}"

    seeds = ", ".join(str(seed) for seed in sorted(set(frame["seed"])))
    header = (
        [f"{name} AUROC" for name in datasets]
        + ["mean AUROC"]
        + [f"{name} known flagged" for name in datasets]
        + [f"{name} novel flagged" for name in datasets]
    )
    lines = [
        "<!-- generated by benchmarks/novelty_combinations.py; do not edit -->",
        "",
        f"Leave-one-cell-type-out folds of the field benchmark, seeds {seeds}, machine: {platform.machine()} CPU. "
        "Mean over folds, then mean ± sd over seeds. Flagged: share of known-type (or held-out-type) test cells with "
        f"conformal p-value <= {ALPHA}.",
        "",
        "| combination | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for combination in COMBINATIONS:
        if combination not in per_seed.index.get_level_values(0):
            continue
        mean_auroc = per_seed.loc[combination, "auroc"].groupby("seed").mean()
        spread = f" ± {mean_auroc.std(ddof=1):.3f}" if len(mean_auroc) > 1 else ""
        cells = [cell(combination, name, "auroc") for name in datasets] + [f"{mean_auroc.mean():.3f}{spread}"]
        cells += [cell(combination, name, "known_flagged") for name in datasets]
        cells += [cell(combination, name, "novel_flagged") for name in datasets]
        lines.append(f"| {combination} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "novelty_combinations.md").write_text(text)
    return text


def main() -> None:
    parser = script_parser(__doc__, DATASETS)
    script_main(
        parser, "novelty_combinations", lambda args: run(args.datasets, args.seeds, args.data_dir, args.out), report
    )


if __name__ == "__main__":
    main()
