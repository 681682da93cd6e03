"""What the resumable per-fold benchmark scripts share: their arguments, a quiet one-thread setup, resumed rows, the
run-or-report entry point and the encoder inputs some of them score."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd


def script_parser(doc: str, datasets: list[str]) -> argparse.ArgumentParser:
    """``--datasets --seeds --threads --data-dir --out --report-only``, with the script's docstring as help."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=datasets)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CELLULAR_DATA_DIR", "../shared/data")))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--report-only", action="store_true")
    return parser


def quiet_threads(threads: int) -> None:
    """Run torch on ``threads`` threads, with the package's logs and library warnings silenced."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(threads)
    logging.getLogger("cellular").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def resumed_rows(csv: Path, keys: list[str]) -> tuple[list[dict], set[tuple[str, ...]]]:
    """Rows already written to ``csv`` and the ``keys`` tuples (as text) they finish; nothing when it is absent."""
    frame = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=keys)
    done = set(map(tuple, frame[keys].astype(str).to_numpy())) if len(frame) else set()
    return frame.to_dict("records"), done


def script_main(
    parser: argparse.ArgumentParser,
    name: str,
    run: Callable[[argparse.Namespace], pd.DataFrame],
    report: Callable[[pd.DataFrame, Path], str],
) -> None:
    """Parse the arguments; run (``run(args)``, quiet threads) or, with ``--report-only``, read ``name``.csv; then
    print and write the report."""
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        frame = pd.read_csv(args.out / f"{name}.csv")
    else:
        quiet_threads(args.threads)
        frame = run(args)
    print(report(frame, args.out))


def seed_mean_sd(part: pd.DataFrame, metric: str) -> str:
    """``metric`` averaged over each seed's rows, then "mean ± sd" over seeds ("–" when it is missing everywhere)."""
    per_seed = part.groupby("seed")[metric].mean()
    if per_seed.isna().all():
        return "–"
    spread = f" ± {per_seed.std(ddof=1):.3f}" if len(per_seed) > 1 else ""
    return f"{per_seed.mean():.3f}{spread}"


def encoder_inputs(model, adata) -> np.ndarray:
    """What ``model``'s encoder reads for ``adata`` (log-normalised, batch-matched genes), dense, via its reader."""
    from cellular.model import SAME_AS_TRAINING

    expression, _ = model._read(adata, SAME_AS_TRAINING, None, None, 0.0)
    return expression.rows(np.arange(expression.n_cells))


def run_novel_folds(
    csv: Path,
    datasets: list[str],
    seeds: list[int],
    data_dir: Path,
    fold_rows: Callable,
    progress: Callable[[list[dict]], str],
) -> pd.DataFrame:
    """``fold_rows(fold, seed)`` over the field benchmark's ``novel`` folds of each dataset and seed, resumable by
    (dataset, seed) in ``csv`` (rewritten after each group); ``progress(new_rows)`` is printed after each group."""
    from benchmarks.run import folds_for

    rows, done = resumed_rows(csv, ["dataset", "seed"])
    for dataset in datasets:
        for seed in seeds:
            if (dataset, str(seed)) in done:
                continue
            new = [row for fold in folds_for("novel", dataset, data_dir, seed) for row in fold_rows(fold, seed)]
            rows += new
            pd.DataFrame(rows).to_csv(csv, index=False)
            print(f"{dataset} | seed {seed}: {progress(new)}", flush=True)
    return pd.DataFrame(rows)


def novelty_score_table(frame: pd.DataFrame, scores: list[str], header: str) -> list[str]:
    """Markdown rows: for each of ``scores`` (``frame["score"]`` values), AUROC per dataset, the mean over datasets
    and the share of known-type cells flagged per dataset, each "mean ± sd" over seeds."""
    datasets = sorted(set(frame["dataset"]))
    lines = [
        f"| {header} | "
        + " | ".join(f"{name} AUROC" for name in datasets)
        + " | mean AUROC | "
        + " | ".join(f"{name} known flagged" for name in datasets)
        + " |",
        "|---|" + "---|" * (2 * len(datasets) + 1),
    ]
    for score in scores:
        rows = frame[frame["score"] == score]
        if rows.empty:
            continue
        aurocs = [seed_mean_sd(rows[rows["dataset"] == name], "auroc") for name in datasets]
        per_dataset = rows.groupby(["seed", "dataset"])["auroc"].mean().groupby("seed").mean()
        spread = f" ± {per_dataset.std(ddof=1):.3f}" if len(per_dataset) > 1 else ""
        flags = [seed_mean_sd(rows[rows["dataset"] == name], "known_flagged") for name in datasets]
        lines.append(
            f"| {score} | " + " | ".join(aurocs) + f" | {per_dataset.mean():.3f}{spread} | " + " | ".join(flags) + " |"
        )
    return lines
