"""Label transfer from several sources: classifier head, kNN vote, gene classifier, scikit-learn's logistic regression.

For every fold of the annotation tasks where CELLULAR trails a baseline or sits close to one (Kang and Symphony
leave-one-batch-out, Baron, the three map pairs onto Symphony), one default model is trained (the field benchmark's
``cellular`` model). Sources of class probabilities: its classifier head; the reference index's kNN vote alone; the
model's gene classifier (a calibrated logistic regression on the encoder's inputs, fitted with the classifier head);
and scikit-learn's multinomial logistic regression (L2, ``C`` 0.1 and 1) fitted on all labelled training cells'
encoder inputs (log-normalised, batch-matched genes, taken from the model's reader), the exploration that led to the
gene classifier. Each source alone and each equal-weight average of probabilities (at most one linear model in an
average) is scored by macro-F1 over the test cells of trained types; the package's own sources also by the expected
calibration error of their largest probability. ``kNN + gene classifier`` is what
``tl.cellular_map`` transfers for the model's labels by default, ``head + gene classifier`` what
``tl.cellular_annotate`` labels cells with.

    python -m benchmarks.annotation_blends                    # every task, seeds 0 1 2 (about 10 minutes)
    python -m benchmarks.annotation_blends --seeds 0 --report-only

``--datasets`` takes task names here (``lobo:DATASET`` or ``map:QUERY:REFERENCE``).

Writes ``annotation_blends.csv`` (one row per fold, seed and source; resumable: finished (task, seed) groups are
skipped) and ``annotation_blends.md``.
"""

from __future__ import annotations

import platform
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._script import encoder_inputs, resumed_rows, script_main, script_parser

TASKS = [
    "lobo:pbmc_kang2018_ifnb_subset",
    "lobo:pbmc_symphony_3tech",
    "lobo:pancreas_baron_toy",
    "map:pbmc3k_seurat:pbmc_symphony_3tech",
    "map:pbmc3k_seurat@200:pbmc_symphony_3tech",
    "map:pbmc_kang2018_ifnb_subset:pbmc_symphony_3tech",
]
KEYS = ["task", "seed"]
REGULARISATION = (0.1, 1.0)
LINEAR_SOURCES = ("gene classifier",)
ECE_SOURCES = ("head", "kNN", "gene classifier", "kNN + gene classifier", "head + gene classifier")


def _sources(fold, seed: int) -> dict[str, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    from benchmarks._methods import (
        LABELS,
        FoldCache,
        Settings,
        _cellular_model,
        aligned,
        cellular_classifier,
        cellular_knn,
        labelled_mask,
    )

    cache, settings = FoldCache(), Settings(seed=seed)
    sources = {
        "head": cellular_classifier(fold, cache, settings, gene_classifier_weight=0).probabilities,
        "kNN": cellular_knn(fold, cache, settings, gene_classifier_weight=0).probabilities,
    }
    model, _ = _cellular_model(fold, cache, settings)
    genes = model.get_gene_classifier_probabilities(fold.test, min_gene_overlap=0.0)
    sources["gene classifier"] = aligned(genes, fold.classes)

    train_x, test_x = encoder_inputs(model, fold.train), encoder_inputs(model, fold.test)
    labelled = labelled_mask(fold)
    labels = fold.train.obs[LABELS].to_numpy()[labelled]
    for c in REGULARISATION:
        regression = LogisticRegression(C=c, max_iter=500).fit(train_x[labelled], labels)
        frame = pd.DataFrame(regression.predict_proba(test_x), columns=regression.classes_)
        sources[f"LR C={c:g}"] = aligned(frame, fold.classes)
    return sources


def _fold_rows(task: str, fold, seed: int) -> list[dict]:
    from sklearn.metrics import f1_score

    sources = _sources(fold, seed)
    blends = dict(sources)
    for size in (2, 3):
        for names in combinations(sources, size):
            if sum(name in LINEAR_SOURCES or name.startswith("LR") for name in names) <= 1:
                blends[" + ".join(names)] = np.mean([sources[name] for name in names], axis=0)
    from cellular.metrics import expected_calibration_error

    truth = fold.test_labels()
    known = np.isin(truth, fold.classes)
    present = sorted(set(truth[known]))
    codes = pd.Index(fold.classes).get_indexer(truth[known])
    rows = []
    for name, probabilities in blends.items():
        predicted = np.asarray(fold.classes)[probabilities.argmax(axis=1)][known]
        score = f1_score(truth[known], predicted, labels=present, average="macro", zero_division=0.0)
        ece = expected_calibration_error(probabilities[known], codes)
        rows.append({"task": task, "fold": fold.name, "seed": seed, "source": name, "macro_f1": score, "ece": ece})
    return rows


def run(tasks: list[str], seeds: list[int], data_dir: Path, out: Path) -> pd.DataFrame:
    from benchmarks.run import folds_for

    csv = out / "annotation_blends.csv"
    rows, done = resumed_rows(csv, KEYS)
    for task in tasks:
        kind, _, spec = task.partition(":")
        for seed in seeds:
            if (task, str(seed)) in done:
                continue
            new = [row for fold in folds_for(kind, spec, data_dir, seed) for row in _fold_rows(task, fold, seed)]
            rows += new
            pd.DataFrame(rows).to_csv(csv, index=False)
            print(f"{task} | seed {seed}: {len({row['fold'] for row in new})} folds", flush=True)
    return pd.DataFrame(rows)


def report(frame: pd.DataFrame, out: Path) -> str:
    text = _table(frame, "macro_f1", "Macro-F1")
    if "ece" in frame:
        text += "\n" + _table(frame[frame["source"].isin(ECE_SOURCES)], "ece", "Expected calibration error (15 bins)")
    (out / "annotation_blends.md").write_text(text)
    return text


def _table(frame: pd.DataFrame, metric: str, title: str) -> str:
    """One table of ``metric``: sources (best first: highest macro-F1, lowest error) by task, mean ± sd over seeds."""
    per_seed = frame.groupby(["source", "task", "seed"])[metric].mean()
    mean = per_seed.groupby(["source", "task"]).mean().unstack("task")
    sd = per_seed.groupby(["source", "task"]).std(ddof=1).unstack("task")
    tasks = [task for task in TASKS if task in mean.columns]
    overall = per_seed.groupby(["source", "seed"]).mean().groupby("source").mean()
    order = overall.sort_values(ascending=metric == "ece").index
    seeds = ", ".join(str(seed) for seed in sorted(set(frame["seed"])))
    lines = [
        *(["<!-- generated by benchmarks/annotation_blends.py; do not edit -->", ""] if metric == "macro_f1" else []),
        f"{title}, mean over folds, then mean ± sd over seeds {seeds}; machine: {platform.machine()} CPU. "
        + (
            "kNN: the reference index's vote alone; gene classifier: the model's calibrated logistic regression on "
            "the encoder's inputs; LR: scikit-learn's logistic regression on the same inputs of all labelled training "
            "cells; `a + b`: equal-weight average of probabilities (`kNN + gene classifier` is the package's label "
            "transfer, `head + gene classifier` its annotation)."
            if metric == "macro_f1"
            else "Test cells of trained types; the confidence is the largest probability."
        ),
        "",
        "| source | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for source in order:
        cells = []
        for task in tasks:
            spread = sd.loc[source, task]
            cells.append(f"{mean.loc[source, task]:.3f}" + ("" if np.isnan(spread) else f" ± {spread:.3f}"))
        lines.append(f"| {source} | " + " | ".join(cells) + f" | {overall[source]:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = script_parser(__doc__, TASKS)
    script_main(
        parser, "annotation_blends", lambda args: run(args.datasets, args.seeds, args.data_dir, args.out), report
    )


if __name__ == "__main__":
    main()
