"""Reference index speed: build and query time, cells/s, peak RSS and recall@k against exact search.

Synthetic CELLULAR-like embeddings (:func:`cellular.data.synthetic_embedding`, 100 dimensions, 50 types) for
references of 10k / 100k / 1M cells and a 100k-cell query, per backend: ``pynndescent`` (serial, deterministic
queries), ``pynndescent-parallel`` (queries on all cores) and ``exact`` (CPU, and CUDA too when a GPU is present).
Each (size, backend) runs in its own process, so its peak RSS is its own.

    python benchmarks/map_speed.py --out benchmarks/results
    python benchmarks/map_speed.py --sizes 10000 100000 --n-query 20000   # quicker

``--startup`` measures what a user of ``cellular map`` waits for instead: an index of ``--sizes`` cells is built and
saved once, then two fresh processes each load it and answer a 1,000-cell query (exact: below
``EXACT_SEARCH_BUDGET``) and twice a ``--n-query``-cell query through the graph, the first of which includes numba's
compilation of pynndescent's search (table ``map_startup.md``).

    python benchmarks/map_speed.py --startup --sizes 50000 --out benchmarks/results

Exact search on CPU is timed on a query subset (``--exact-cpu-queries``) above 100k reference cells, where a full
100k-cell query would take minutes; recall@k is measured on ``--recall-queries`` query cells against exact search.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _worker(args) -> dict:
    import torch

    from cellular import ReferenceIndex
    from cellular.data import synthetic_embedding
    from cellular.index import _reference, exact_knn

    # This table measures each backend's own search: no query is diverted to exact search by the start-up budget.
    _reference.EXACT_SEARCH_BUDGET = 0
    reference, types = synthetic_embedding(args.size, args.n_latent, seed=0)
    queries, _ = synthetic_embedding(args.n_query, args.n_latent, seed=1)
    labels = {"cell_type": np.array([f"type_{t}" for t in range(50)])[types]}
    device = "cuda" if args.backend == "exact-cuda" else "cpu"
    backend = args.backend.split("-")[0]
    parallel = args.backend == "pynndescent-parallel"

    # numba compiles pynndescent's kernels once per process; time that apart from the build itself.
    start = time.perf_counter()
    ReferenceIndex.from_embedding(reference[:2_000], backend=backend, device=device, parallel_search=parallel)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    index = ReferenceIndex.from_embedding(reference, labels, backend=backend, device=device, parallel_search=parallel)
    build_seconds = time.perf_counter() - start

    timed = queries
    if backend == "exact" and device == "cpu" and args.size > 100_000:
        timed = queries[: args.exact_cpu_queries]
    index.query(timed[:1000], k=args.k)  # compile / warm up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    found, _ = index.query(timed, k=args.k)
    query_seconds = time.perf_counter() - start
    start = time.perf_counter()
    index.transfer_labels(timed, k=args.k)
    transfer_seconds = time.perf_counter() - start

    probe = queries[: args.recall_queries]
    truth, _ = exact_knn(torch.from_numpy(reference), probe, args.k, metric="cosine")
    hits = (found[: len(probe), :, None] == truth[:, None, :]).any(axis=2)
    return {
        "reference_cells": args.size,
        "backend": args.backend,
        "device": device,
        "query_cells_timed": len(timed),
        "compile_seconds": warmup_seconds,
        "build_seconds": build_seconds,
        "query_seconds": query_seconds,
        "query_cells_per_second": len(timed) / query_seconds,
        "transfer_cells_per_second": len(timed) / transfer_seconds,
        f"recall_at_{args.k}": float(hits.mean()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _startup_worker(args) -> dict:
    """One fresh process: load the saved index and answer a first and a second query."""
    start = time.perf_counter()
    from cellular import ReferenceIndex
    from cellular.data import synthetic_embedding

    import_seconds = time.perf_counter() - start
    queries, _ = synthetic_embedding(args.n_query, args.n_latent, seed=1)
    start = time.perf_counter()
    index = ReferenceIndex.load(args.index_dir)
    row = {"import_seconds": import_seconds, "load_seconds": time.perf_counter() - start}
    # A small query (answered exactly, EXACT_SEARCH_BUDGET), then a large one twice: the first pays numba's
    # compilation of pynndescent's search, the second does not.
    for name, cells in (
        ("small_query", queries[:1000]),
        ("large_query_first", queries),
        ("large_query_second", queries),
    ):
        start = time.perf_counter()
        index.transfer_labels(cells, k=args.k)
        row[f"{name}_seconds"] = time.perf_counter() - start
    return row


def _startup(args) -> None:
    import tempfile

    import pandas as pd

    from cellular import ReferenceIndex
    from cellular.data import synthetic_embedding

    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            reference, types = synthetic_embedding(size, args.n_latent, seed=0)
            labels = {"cell_type": np.array([f"type_{t}" for t in range(50)])[types]}
            start = time.perf_counter()
            ReferenceIndex.from_embedding(reference, labels, backend=args.startup_backend).save(Path(folder) / "index")
            build_seconds = time.perf_counter() - start
            for process in (1, 2):
                command = [sys.executable, __file__, "--startup-worker", "--index-dir", str(Path(folder) / "index")]
                command += ["--n-latent", str(args.n_latent), "-k", str(args.k), "--n-query", str(args.n_query)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                row = {"reference_cells": size, "backend": args.startup_backend, "process": process}
                row["build_and_save_seconds"] = build_seconds
                row.update(json.loads(output.strip().splitlines()[-1]))
                rows.append(row)
                print(
                    f"{size:>9,} cells  {args.startup_backend}  process {process}: "
                    f"import {row['import_seconds']:.1f} s, load "
                    f"{row['load_seconds']:.1f} s, 1,000-cell query {row['small_query_seconds']:.2f} s, "
                    f"{args.n_query:,}-cell query {row['large_query_first_seconds']:.1f} s then "
                    f"{row['large_query_second_seconds']:.1f} s",
                    flush=True,
                )
    if args.out is not None:
        table = pd.DataFrame(rows)
        path = args.out / "map_startup.csv"
        if path.exists():  # one table for every backend measured
            table = pd.concat([pd.read_csv(path).query("backend != @args.startup_backend"), table], ignore_index=True)
        table.to_csv(path, index=False)
        header = (
            "Generated by `python benchmarks/map_speed.py --startup [--startup-backend faiss] --out "
            f"benchmarks/results` (fresh processes loading a saved index; k = {args.k}, {args.n_latent} dimensions, "
            "large query "
            f"{args.n_query:,} cells).\n\n"
        )
        (args.out / "map_startup.md").write_text(header + _markdown(table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=["pynndescent", "pynndescent-parallel", "exact"])
    parser.add_argument("--n-query", type=int, default=100_000)
    parser.add_argument("--n-latent", type=int, default=100)
    parser.add_argument("-k", type=int, default=15)
    parser.add_argument("--recall-queries", type=int, default=2_000)
    parser.add_argument("--exact-cpu-queries", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None, help="folder for map_speed.csv and map_speed.md")
    parser.add_argument("--startup", action="store_true", help="measure load and first-query time in fresh processes")
    parser.add_argument("--startup-backend", default="pynndescent", help="index backend of --startup")
    parser.add_argument("--startup-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.startup_worker:
        print(json.dumps(_startup_worker(args)))
        return
    if args.startup:
        _startup(args)
        return

    import torch

    backends = list(args.backends)
    if "exact" in backends and torch.cuda.is_available():
        backends.append("exact-cuda")
    rows = []
    for size in args.sizes:
        for backend in backends:
            command = [sys.executable, __file__, "--worker", "--size", str(size), "--backend", backend]
            command += ["--n-query", str(args.n_query), "--n-latent", str(args.n_latent), "-k", str(args.k)]
            command += ["--recall-queries", str(args.recall_queries)]
            command += ["--exact-cpu-queries", str(args.exact_cpu_queries)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{size:>9,} cells  {backend:<12} build {row['build_seconds']:7.1f} s  "
                f"query {row['query_cells_per_second']:>9,.0f} cells/s  "
                f"recall@{args.k} {row[f'recall_at_{args.k}']:.3f}  peak RSS {row['peak_rss_mb']:,.0f} MB",
                flush=True,
            )
    table = pd.DataFrame(rows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "map_speed.csv"
        if path.exists():  # rows of other sizes and backends are kept
            previous = pd.read_csv(path)
            measured = set(zip(table["reference_cells"], table["backend"], strict=True))
            keep = [pair not in measured for pair in zip(previous["reference_cells"], previous["backend"], strict=True)]
            table = pd.concat([previous[keep], table], ignore_index=True).sort_values(
                ["reference_cells", "backend"], kind="stable"
            )
        table.to_csv(path, index=False)
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
        if torch.cuda.is_available():
            machine += f", {torch.cuda.get_device_name()}"
        header = (
            f"Generated by `python benchmarks/map_speed.py --out benchmarks/results` ({machine}; "
            f"{args.n_query:,} query cells, k = {args.k}, {args.n_latent} dimensions).\n\n"
        )
        columns = {
            "reference_cells": "reference cells",
            "backend": "backend",
            "build_seconds": "build (s)",
            "compile_seconds": "first-use compile (s)",
            "query_cells_per_second": "query cells/s",
            "transfer_cells_per_second": "label transfer cells/s",
            f"recall_at_{args.k}": f"recall@{args.k}",
            "peak_rss_mb": "peak RSS (MB)",
            "query_cells_timed": "query cells timed",
        }
        shown = table[list(columns)].rename(columns=columns)
        (args.out / "map_speed.md").write_text(header + _markdown(shown) + "\n")


def _markdown(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if value < 1 else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
