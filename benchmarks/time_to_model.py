"""Time to a trained CELLULAR model on the field benchmark's small references, and what it buys.

For each leave-one-batch-out fold of the given datasets and each variant, one thread (``torch.set_num_threads``):
setup and model construction, encoder training, then classifier head + calibration, each timed; the held-out
batch is scored by the classifier's macro-F1 on known types, as ``python -m benchmarks.run`` scores it. The
issue target is a median time to a trained model of at most 5 s over Symphony and Kang folds.

    python -m benchmarks.time_to_model                                   # every variant, seeds 0 1 2
    python -m benchmarks.time_to_model --variants default --seeds 0

Writes ``time_to_model.csv`` (one row per variant, fold and seed; resumable: finished (variant, dataset, seed)
groups are skipped) and ``time_to_model.md``.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._script import resumed_rows, script_main, script_parser

# Model settings (``CELLULAR(**kwargs)``); "classifier" holds settings of the classifier head (``train_classifier``);
# "train" holds arguments of ``train`` ("step_budget" sets ``max_epochs`` the way the default does for 2,000 steps);
# "input_norm_affine" gives the encoder's input LayerNorm per-gene affine parameters, as before they were dropped.
# Variants measured before early stopping ignored decreases below 0.005 keep the former min delta of 0.
_MIN_DELTA_0 = {"early_stopping_min_delta": 0.0}
# Every variant but the default was measured before the default gene count became half of the genes: they read 2,000
# (every gene of these references) and keep that setting.
_MEASURED_WITH_2000_GENES = {
    "2,000 HVGs (former default)": {},
    "early-stopping min delta 0 (former default)": {"train": _MIN_DELTA_0},
    "input LayerNorm with affine, min delta 0 (former default)": {"input_norm_affine": True, "train": _MIN_DELTA_0},
    "paper widths, head lr 1e-3, min delta 0 (former default)": {
        "hidden_sizes": "paper",
        "classifier": {"lr": 1e-3},
        "train": _MIN_DELTA_0,
    },
    "hidden 256/128, head lr 1e-3, min delta 0": {"classifier": {"lr": 1e-3}, "train": _MIN_DELTA_0},
    "early-stopping patience 10, min delta 0": {"train": {"early_stopping_patience": 10, **_MIN_DELTA_0}},
    "1,000-step budget, min delta 0": {"train": {"step_budget": 1000, **_MIN_DELTA_0}},
    "patience 10, 1,000-step budget, min delta 0": {
        "train": {"early_stopping_patience": 10, "step_budget": 1000, **_MIN_DELTA_0}
    },
    "500-step budget, min delta 0": {"train": {"step_budget": 500, **_MIN_DELTA_0}},
    "300-step budget, min delta 0": {"train": {"step_budget": 300, **_MIN_DELTA_0}},
    "1,000-step budget": {"train": {"step_budget": 1000}},
    "500-step budget": {"train": {"step_budget": 500}},
}
VARIANTS = {
    "default": {},
    "without the gene classifier": {"classifier": {"gene_classifier": False}},
    **{name: {"n_top_genes": 2000, **settings} for name, settings in _MEASURED_WITH_2000_GENES.items()},
}
DATASETS = ["pbmc_symphony_3tech", "pbmc_kang2018_ifnb_subset"]
KEYS = ["variant", "dataset", "seed"]
BENCHMARK_ONLY = ("classifier", "input_norm_affine", "train")


def _fold_row(fold, variant: str, seed: int) -> dict:
    import torch

    import cellular
    from benchmarks._folds import BATCH, LABELS, UNLABELLED
    from benchmarks._methods import aligned
    from benchmarks._scoring import annotation_scores
    from cellular.model._training import default_max_epochs

    train = fold.train.copy()
    start = time.perf_counter()
    cellular.CELLULAR.setup_anndata(train, labels_key=LABELS, batch_key=BATCH, unlabeled_category=UNLABELLED)
    settings = VARIANTS[variant]
    model = cellular.CELLULAR(
        train, seed=seed, **{key: value for key, value in settings.items() if key not in BENCHMARK_ONLY}
    )
    if settings.get("input_norm_affine"):  # same initial weights otherwise: LayerNorm initialisation draws nothing
        n_genes = len(model.genes)
        model.module.encoder.layers[0] = torch.nn.LayerNorm(n_genes, elementwise_affine=True)
    built = time.perf_counter()
    train_kwargs = dict(settings.get("train", {}))
    if "step_budget" in train_kwargs:  # the training split is 90 % of the cells
        n_train = math.ceil(0.9 * train.n_obs)
        train_kwargs["max_epochs"] = default_max_epochs(n_train, 256, steps=train_kwargs.pop("step_budget"))
    model.train(progress_bar=False, classifier=False, **train_kwargs)
    encoded = time.perf_counter()
    model.train_classifier(**settings.get("classifier", {}))
    finished = time.perf_counter()
    test_z = model.get_latent_representation(fold.test, min_gene_overlap=0.0)
    probabilities = pd.DataFrame(model.probabilities_from_embedding(test_z), columns=model.cell_types)
    scores = annotation_scores(fold, aligned(probabilities, fold.classes))
    encoder_params = sum(parameter.numel() for parameter in model.module.encoder.parameters())
    return {
        "variant": variant,
        "dataset": fold.dataset,
        "fold": fold.name,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "n_train_cells": train.n_obs,
        "encoder_parameters": encoder_params,
        "epochs_run": model.training_summary_["epochs_run"],
        "setup_seconds": built - start,
        "encoder_seconds": encoded - built,
        "head_seconds": finished - encoded,
        "fit_seconds": finished - start,
        "macro_f1": scores.get("macro_f1", np.nan),
    }


def run(variants: list[str], datasets: list[str], seeds: list[int], data_dir: Path, out: Path) -> pd.DataFrame:
    from benchmarks.run import folds_for

    csv = out / "time_to_model.csv"
    rows, done = resumed_rows(csv, KEYS)
    for dataset in datasets:
        for seed in seeds:
            for variant in variants:
                if (variant, dataset, str(seed)) in done:
                    continue
                new = [_fold_row(fold, variant, seed) for fold in folds_for("lobo", dataset, data_dir, seed)]
                rows += new
                pd.DataFrame(rows).to_csv(csv, index=False)
                fits = ", ".join(f"{row['fold']} {row['fit_seconds']:.1f} s F1 {row['macro_f1']:.3f}" for row in new)
                print(f"{variant:>15} | {dataset} | seed {seed}: {fits}", flush=True)
    return pd.DataFrame(rows)


def report(frame: pd.DataFrame, out: Path) -> str:
    variants = [v for v in VARIANTS if v in set(frame["variant"])]
    lines = [
        "<!-- generated by benchmarks/time_to_model.py; do not edit -->",
        "",
        f"Leave-one-batch-out folds, {int(frame['threads'].max())} thread, machine: {platform.machine()} CPU "
        "(the project's 2-core machine). Times are medians over folds and seeds in seconds; macro-F1 (classifier "
        "head, known types of the held-out batch) is the mean ± sd over seeds of the mean over folds.",
        "",
        "| dataset | variant | encoder parameters | epochs | setup s | encoder s | head + calibration s | "
        "time to model s | macro-F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = [(name, frame[frame["dataset"] == name]) for name in sorted(set(frame["dataset"]))]
    groups.append(("all folds", frame))
    for dataset, rows in groups:
        for variant in variants:
            part = rows[rows["variant"] == variant]
            if part.empty:
                continue
            per_seed = part.groupby("seed")["macro_f1"].mean()
            spread = per_seed.std(ddof=1) if len(per_seed) > 1 else 0.0
            lines.append(
                f"| {dataset} | {variant} | {int(part['encoder_parameters'].median()):,} | "
                f"{part['epochs_run'].median():.0f} | {part['setup_seconds'].median():.1f} | "
                f"{part['encoder_seconds'].median():.1f} | {part['head_seconds'].median():.1f} | "
                f"**{part['fit_seconds'].median():.1f}** | {per_seed.mean():.3f} ± {spread:.3f} (n={len(per_seed)}) |"
            )
    text = "\n".join(lines) + "\n"
    (out / "time_to_model.md").write_text(text)
    return text


def main() -> None:
    parser = script_parser(__doc__, DATASETS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    script_main(
        parser,
        "time_to_model",
        lambda args: run(args.variants, args.datasets, args.seeds, args.data_dir, args.out),
        report,
    )


if __name__ == "__main__":
    main()
