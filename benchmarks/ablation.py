"""Ablation of CELLULAR's training choices on the field benchmark's lobo folds and map pairs.

Each variant changes the model's settings (``CELLULAR(**kwargs)``, and the classifier head's); every fold is scored
by macro-F1 of the classifier head and of the reference-index kNN vote, exactly as ``python -m benchmarks.run``
scores them.

    python -m benchmarks.ablation --seeds 0 1 2 --out benchmarks/results            # all variants
    python -m benchmarks.ablation --variants default "panel masking 0.2" --seeds 0  # quicker
    python -m benchmarks.ablation --variants default --overwrite                     # measure again after a change

Writes ``ablation.csv`` (one row per variant, fold, seed and path; resumable: finished (variant, dataset, seed)
groups are skipped) and ``ablation.md`` (per dataset, mean ± sd over seeds of the fold means).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

# Model settings (``CELLULAR(**kwargs)``); "train" holds settings of the encoder's training (``train``) and
# "classifier" those of the classifier head (``train_classifier``).
FORMER_DEFAULT = {"hidden_sizes": "paper", "classifier": {"lr": 1e-3}}
VARIANTS = {
    "default": {},
    "2,000 HVGs (former default)": {"n_top_genes": 2000},
    "1,000 HVGs": {"n_top_genes": 1000},
    "paper widths, head lr 1e-3 (former default)": FORMER_DEFAULT,
    "hidden 256/128, head lr 1e-3": {"classifier": {"lr": 1e-3}},
    "encoder patience 10, lr 2e-3": {"train": {"early_stopping_patience": 10, "lr": 2e-3}},
    "default + panel masking 0.5 + depth thinning 0.5": {"panel_masking": 0.5, "depth_thinning": 0.5},
    "default + panel masking 0.2": {"panel_masking": 0.2},
    "default + panel masking 0.5": {"panel_masking": 0.5},
    "default + depth thinning 0.5": {"depth_thinning": 0.5},
    "panel masking 0.5 + depth thinning 0.5": {**FORMER_DEFAULT, "panel_masking": 0.5, "depth_thinning": 0.5},
    "panel masking 0.5": {**FORMER_DEFAULT, "panel_masking": 0.5},
    "depth thinning 0.5": {**FORMER_DEFAULT, "depth_thinning": 0.5},
    "panel masking 0.2": {**FORMER_DEFAULT, "panel_masking": 0.2},
}
# Variants whose committed rows were measured on the former default before batch moment matching (and before every
# later change of the defaults); the report says so. Every other column was measured with the code of December 2026.
BEFORE_MOMENT_MATCHING = [
    "panel masking 0.5 + depth thinning 0.5",
    "panel masking 0.5",
    "depth thinning 0.5",
    "panel masking 0.2",
]
KEYS = ["variant", "spec", "seed"]


def _fold_rows(fold, variant: str, settings: dict, seed: int) -> list[dict]:
    import cellular
    from benchmarks._folds import BATCH, LABELS, UNLABELLED
    from benchmarks._methods import aligned
    from benchmarks._scoring import annotation_scores

    train = fold.train.copy()
    start = time.perf_counter()
    cellular.CELLULAR.setup_anndata(train, labels_key=LABELS, batch_key=BATCH, unlabeled_category=UNLABELLED)
    model_kwargs = {key: value for key, value in settings.items() if key not in ("train", "classifier")}
    model = cellular.CELLULAR(train, seed=seed, **model_kwargs)
    model.train(progress_bar=False, classifier_kwargs=settings.get("classifier"), **settings.get("train", {}))
    fit_seconds = time.perf_counter() - start
    test_z = model.get_latent_representation(fold.test, min_gene_overlap=0.0)
    classifier = pd.DataFrame(model.probabilities_from_embedding(test_z), columns=model.cell_types)
    index = cellular.ReferenceIndex.from_embedding(
        model.get_latent_representation(),
        labels={LABELS: train.obs[LABELS].to_numpy()},
        temperature=float(model.module.temperature.detach()),
        unlabeled_category=UNLABELLED,
        seed=seed,
    )
    transfer = index.transfer_labels(test_z, k=15)
    knn = pd.DataFrame(transfer.probabilities[LABELS], columns=transfer.classes[LABELS])
    rows = []
    for path, frame in (("classifier", classifier), ("knn", knn)):
        scores = annotation_scores(fold, aligned(frame, fold.classes))
        rows.append(
            {
                "variant": variant,
                "task": fold.task,
                "dataset": fold.dataset if fold.task == "lobo" else fold.name,
                "fold": fold.name,
                "seed": seed,
                "path": path,
                "macro_f1": scores.get("macro_f1", np.nan),
                "fit_seconds": fit_seconds,
            }
        )
    return rows


def run(
    variants: list[str], specs: list[tuple[str, str]], seeds: list[int], data_dir: Path, out: Path, overwrite: bool
):
    from benchmarks.run import folds_for

    csv = out / "ablation.csv"
    frame = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=[*KEYS])
    done = set(map(tuple, frame[KEYS].astype(str).to_numpy())) if len(frame) else set()
    rows = frame.to_dict("records")
    for kind, spec in specs:
        for seed in seeds:
            for variant in variants:
                if (variant, spec, str(seed)) in done and not overwrite:
                    continue
                new = []
                for fold in folds_for(kind, spec, data_dir, seed):
                    new += _fold_rows(fold, variant, VARIANTS[variant], seed)
                for row in new:
                    row["spec"] = spec
                rows = [
                    row for row in rows if (row["variant"], row["spec"], str(row["seed"])) != (variant, spec, str(seed))
                ]
                rows += new
                pd.DataFrame(rows).to_csv(csv, index=False)
                summary = pd.DataFrame(new).groupby("path")["macro_f1"].mean().round(3).to_dict()
                print(f"{variant:>18} | {spec} | seed {seed}: {summary}", flush=True)
    return pd.DataFrame(rows)


def report(frame: pd.DataFrame, out: Path) -> str:
    per_seed = frame.groupby(["dataset", "path", "variant", "seed"])["macro_f1"].mean()
    mean = per_seed.groupby(["dataset", "path", "variant"]).mean().unstack("variant")
    sd = per_seed.groupby(["dataset", "path", "variant"]).std().unstack("variant").fillna(0.0)
    seeds = per_seed.groupby(["dataset", "path", "variant"]).size().unstack("variant")
    variants = [v for v in VARIANTS if v in mean.columns]
    lines = [
        "<!-- generated by benchmarks/ablation.py; do not edit -->",
        "",
        "Macro-F1 (mean ± sd over seeds of the mean over folds; lobo rows are leave-one-batch-out, map rows name the "
        "query). The best variant of each row is in bold.",
        "",
        "| dataset | path | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for (dataset, path), row in mean.iterrows():
        best = row[variants].max()
        cells = []
        for variant in variants:
            value, spread, n = row[variant], sd.loc[(dataset, path), variant], seeds.loc[(dataset, path), variant]
            text = "" if pd.isna(value) else f"{value:.3f} ± {spread:.3f} (n={int(n)})"
            cells.append(f"**{text}**" if value == best else text)
        lines.append(f"| {dataset} | {path} | " + " | ".join(cells) + " |")
    stale = [variant for variant in BEFORE_MOMENT_MATCHING if variant in variants]
    if stale:
        lines += [
            "",
            "Measured on the former default (paper widths, head lr 1e-3, 2,000 genes) before batch moment matching "
            f"and every later change of the defaults (the other columns with today's code): {', '.join(stale)}.",
        ]
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    return text


def main() -> None:
    from benchmarks._folds import LOBO_DATASETS, MAP_PAIRS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="*", default=LOBO_DATASETS)
    parser.add_argument("--map-pairs", nargs="*", default=[f"{q}:{r}" for q, r in MAP_PAIRS])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CELLULAR_DATA_DIR", "../shared/data")))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--overwrite", action="store_true", help="measure finished groups again, replacing their rows as each finishes"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    specs = [("lobo", name) for name in args.datasets] + [("map", pair) for pair in args.map_pairs]
    if args.report_only:
        frame = pd.read_csv(args.out / "ablation.csv")
    else:
        import logging
        import warnings

        logging.getLogger("cellular").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
        frame = run(args.variants, specs, args.seeds, args.data_dir, args.out, args.overwrite)
    print(report(frame, args.out))


if __name__ == "__main__":
    main()
