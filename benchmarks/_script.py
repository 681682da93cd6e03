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
