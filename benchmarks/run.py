"""Field benchmark: CELLULAR against PCA, Harmony, scVI, scANVI, CellTypist, RandomForest and GBDT on real data.

Tasks (each method is trained here, on the fold's training cells only):

* ``lobo``: leave one batch out; annotation scores of the held-out batch (cells whose type occurs in training);
* ``integration``: scIB metrics (scib-metrics) of the training + held-out cells' embedding on the same folds;
* ``map``: a query dataset mapped onto a reference dataset on their shared genes (``--map-pairs QUERY:REFERENCE``);
* ``novel``: leave one cell type out; AUROC / AUPRC of each method's novelty score for the removed type.

    python -m benchmarks.run                                            # every task, method and default dataset
    python -m benchmarks.run --tasks lobo --methods cellular pca_knn --datasets my_atlas.h5ad --seeds 0 1 2

Each (task, dataset, seed) is written to ``OUT/raw/`` as soon as it finishes and is skipped when rerun (delete the
file or pass ``--overwrite`` to redo it), so a long run can be resumed or split over processes. At the end every raw
file under ``OUT/raw/`` is merged into ``OUT/results.csv`` (long format: task, dataset, fold, seed, method, metric,
value), ``OUT/summary.md`` and figures (``OUT/*.png``); ``--report-only`` redoes just that step.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

TASKS = ("lobo", "integration", "map", "novel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks._folds import LOBO_DATASETS, MAP_PAIRS, NOVEL_DATASETS
    from benchmarks._methods import METHODS

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="dataset names in --data-dir or paths to .h5ad files with obs['cell_type'] and obs['batch'] "
        f"(default: lobo/integration {LOBO_DATASETS}, novel {NOVEL_DATASETS})",
    )
    parser.add_argument(
        "--map-pairs",
        nargs="+",
        default=[f"{query}:{reference}" for query, reference in MAP_PAIRS],
        help="QUERY:REFERENCE pairs for the map task; QUERY@N keeps N random genes of those shared (a small panel)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on every neural network's epochs")
    parser.add_argument("--max-folds", type=int, default=None, help="use only the first N folds of each dataset")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per method (timings use these)")
    parser.add_argument("--data-dir", default=os.environ.get("CELLULAR_DATA_DIR", "../shared/data"))
    parser.add_argument("--out", default="benchmarks/results/field")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute raw results that already exist (only the rows of the --methods given; others are kept)",
    )
    parser.add_argument("--report-only", action="store_true", help="only merge raw results and write the report")
    parser.add_argument("--no-figures", action="store_true")
    return parser.parse_args(argv)


def limit_library_threads(threads: int) -> None:
    """Thread limits of the numerical libraries; only effective before they load, so only the script entry calls it
    (``main`` called in-process, e.g. by the tests, leaves the environment alone)."""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run_fold(fold, methods, settings, score_annotation: bool, score_integration: bool) -> list[dict]:
    from benchmarks._methods import METHODS, FoldCache
    from benchmarks._scoring import (
        PeakMemory,
        annotation_scores,
        hierarchical_scores,
        novelty_scores,
        scib_scores,
    )

    rows: list[dict] = []
    cache = FoldCache()
    embeddings = {}

    # An integration-only shard of lobo folds scores no labels: its timings are the integration task's, so that they
    # do not stand for (or, through drop_superseded, replace) the lobo rows of another shard.
    timing_task = "integration" if fold.task == "lobo" and not score_annotation else fold.task

    def add(method: str, metric: str, value: float, task: str | None = None) -> None:
        rows.append(
            {
                "task": task or fold.task,
                "dataset": fold.dataset,
                "fold": fold.name,
                "seed": settings.seed,
                "method": method,
                "metric": metric,
                "value": float(value),
            }
        )

    summary = []
    for key in methods:
        method = METHODS[key]
        try:
            with PeakMemory() as memory:
                output = method.run(fold, cache, settings)
        except Exception:  # a failing baseline is reported, the run goes on
            print(f"    {key} failed on {fold.dataset} / {fold.name}:\n{traceback.format_exc()}", flush=True)
            add(key, "failed", 1.0)
            continue
        if score_annotation:
            scores = annotation_scores(fold, output.probabilities)
            scores.update(hierarchical_scores(fold, output.probabilities, output.labels))
            summary.append(f"{key}={scores.get('macro_f1', float('nan')):.3f}")
        elif fold.task == "novel":
            scores = novelty_scores(fold, output.novelty)
            summary.append(f"{key}={scores['auroc']:.3f}")
        else:
            scores = {}
        for metric, value in scores.items():
            add(key, metric, value)
        add(key, "fit_seconds", output.fit_seconds, timing_task)
        add(key, "predict_seconds", output.predict_seconds, timing_task)
        add(key, "fit_cells_per_second", fold.train.n_obs / max(output.fit_seconds, 1e-9), timing_task)
        add(key, "predict_cells_per_second", fold.test.n_obs / max(output.predict_seconds, 1e-9), timing_task)
        add(key, "peak_rss_mb", memory.peak_mb, timing_task)
        if score_integration and method.embedding and output.embedding is not None:
            embeddings[key] = output.embedding
    if embeddings:
        integration = scib_scores(fold, embeddings, settings.threads)
        for key, metrics in integration.items():
            for metric, value in metrics.items():
                rows.append(
                    {
                        "task": "integration",
                        "dataset": fold.dataset,
                        "fold": fold.name,
                        "seed": settings.seed,
                        "method": key,
                        "metric": metric,
                        "value": float(value),
                    }
                )
        summary.append("scIB total " + " ".join(f"{k}={m['Total']:.3f}" for k, m in integration.items()))
    print(f"  {fold.task} {fold.dataset} / {fold.name} (seed {settings.seed}): " + " ".join(summary), flush=True)
    return rows


def jobs(args: argparse.Namespace):
    """(shard name, fold kind, dataset spec) for every piece of work the arguments ask for."""
    from benchmarks._folds import LOBO_DATASETS, NOVEL_DATASETS

    wanted = set(args.tasks)
    if wanted & {"lobo", "integration"}:
        kind = "+".join(task for task in ("lobo", "integration") if task in wanted)
        for spec in args.datasets or LOBO_DATASETS:
            yield kind, "lobo", spec
    if "map" in wanted:
        for pair in args.map_pairs:
            yield "map", "map", pair
    if "novel" in wanted:
        for spec in args.datasets or NOVEL_DATASETS:
            yield "novel", "novel", spec


def folds_for(kind: str, spec: str, data_dir: Path, seed: int):
    from benchmarks._folds import dataset_name, load_dataset, lobo_folds, map_fold, novel_folds

    if kind == "map":
        query, _, reference = spec.partition(":")
        if not reference:
            raise ValueError(
                f"--map-pairs entries look like QUERY:REFERENCE (or QUERY@N_GENES:REFERENCE), got {spec!r}"
            )
        query, _, n_genes = query.partition("@")
        yield map_fold(
            dataset_name(query),
            load_dataset(query, data_dir),
            dataset_name(reference),
            load_dataset(reference, data_dir),
            n_genes=int(n_genes) if n_genes else None,
        )
        return
    adata = load_dataset(spec, data_dir)
    if kind == "lobo":
        if adata.obs["batch"].nunique() < 2:
            print(f"  skipping {spec}: lobo needs at least two batches", flush=True)
            return
        yield from lobo_folds(dataset_name(spec), adata)
    else:
        yield from novel_folds(dataset_name(spec), adata, seed=seed)


def shard_path(out: Path, shard: str, spec: str, seed: int) -> Path:
    from benchmarks._folds import dataset_name

    name = spec.replace(":", "_onto_") if ":" in spec else dataset_name(spec)
    name = "_onto_".join(dataset_name(part) for part in name.split("_onto_"))
    return out / "raw" / f"{shard}__{name}__seed{seed}.csv"


def drop_superseded(path: Path, frame, methods: list[str]) -> None:
    """Remove ``methods``' rows of the tasks in ``frame`` from the other shards of the same dataset and seed.

    A lobo task runs in the ``lobo`` and the ``lobo+integration`` shards; the merge keeps one row per fold and method,
    so a fresh result written to one shard must not leave a stale one in the other.
    """
    import pandas as pd

    suffix = path.name.split("__", 1)[1]
    tasks = set(frame["task"]) if len(frame) else set()
    for other in path.parent.glob(f"*__{suffix}"):
        if other == path:
            continue
        rows = pd.read_csv(other, dtype={"fold": str})
        stale = rows["method"].isin(methods) & rows["task"].isin(tasks)
        if stale.any():
            rows[~stale].to_csv(other, index=False)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import logging

    import torch

    quiet = ("scvi", "lightning", "pytorch_lightning", "lightning.pytorch", "cellular", "celltypist", "jax")
    saved_levels = {name: logging.getLogger(name).level for name in quiet}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(args, argv)
    finally:
        torch.set_num_threads(saved_threads)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def _run(args: argparse.Namespace, argv: list[str] | None) -> Path:
    import pandas as pd

    from benchmarks._methods import METHODS, Settings
    from benchmarks._report import write_report

    out = Path(args.out)
    data_dir = Path(args.data_dir)
    methods = [key for key in args.methods if _available(METHODS[key].requires)]
    for key in set(args.methods) - set(methods):
        print(f"skipping {key}: it needs the package {METHODS[key].requires} (pip install -e '.[bench]')", flush=True)
    if not args.report_only:
        start = time.perf_counter()
        for shard, kind, spec in jobs(args):
            for seed in args.seeds:
                path = shard_path(out, shard, spec, seed)
                if path.exists() and not args.overwrite:
                    print(f"{path} exists, skipped (--overwrite recomputes it)", flush=True)
                    continue
                settings = Settings(seed=seed, threads=args.threads, max_epochs=args.max_epochs)
                rows = []
                for number, fold in enumerate(folds_for(kind, spec, data_dir, seed)):
                    if args.max_folds is not None and number >= args.max_folds:
                        break
                    rows += run_fold(fold, methods, settings, "lobo" in shard or kind == "map", "integration" in shard)
                path.parent.mkdir(parents=True, exist_ok=True)
                frame = pd.DataFrame(rows)
                if path.exists():
                    # --overwrite with a subset of the methods replaces only their rows.
                    kept = pd.read_csv(path)
                    frame = pd.concat([kept[~kept["method"].isin(methods)], frame], ignore_index=True)
                frame.to_csv(path, index=False)
                drop_superseded(path, frame, methods)
        print(f"benchmark work took {time.perf_counter() - start:.0f} s", flush=True)
    machine = _machine(args.threads)
    given = argv if argv is not None else sys.argv[1:]
    reproduce = [arg for arg in given if arg not in ("--report-only", "--overwrite", "--no-figures")]
    command = " ".join(["python -m benchmarks.run", *reproduce])
    return write_report(out, command=command, machine=machine, figures=not args.no_figures)


def _available(package: str | None) -> bool:
    return package is None or importlib.util.find_spec(package) is not None


def _machine(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, {threads} thread(s) per method, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


if __name__ == "__main__":
    limit_library_threads(parse_args().threads)
    main()
