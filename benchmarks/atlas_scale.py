"""Atlas scale: train, embed, index and map from backed h5ad files of 100k to 1M cells; time and peak memory.

Synthetic atlases (3,000 genes, about 10 % non-zero, 20 types, 8 batches) are written to disk chunk by chunk
(:func:`cellular.data.write_synthetic_h5ad`) and kept in ``--workdir`` between runs, with a 100k-cell query from
the same types. Each (size, mode) runs in its own process, so its peak RSS is its own, and does:

1. setup: ``setup_anndata`` + ``CELLULAR(adata)`` (gene selection, library target, PCA centroid targets);
2. training: a fixed number of optimiser steps (``--steps``), no classifier head;
3. embedding of every reference cell;
4. reference index build (pynndescent) on that embedding;
5. mapping the 100k-cell query (read from disk too in backed mode).

``backed`` reads both files with ``read_h5ad(..., backed="r")``; ``memory`` loads them; ``collection`` reads the
reference from :data:`COLLECTION_PARTS` files and the query from two (``cellular.data.read_collection``: several
h5ad files as one, expression on disk). Results go to
``benchmarks/results/atlas_scale.{csv,md,png}``; finished runs are kept and skipped (delete a row to rerun it).

    python benchmarks/atlas_scale.py             # 100k, 300k, 1M backed and collection; 100k, 300k memory
    python benchmarks/atlas_scale.py --sizes 100000 --modes backed     # one run
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

RESULTS = Path(__file__).parent / "results"
QUERY_CELLS = 100_000
COLLECTION_PARTS = 4


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _files(workdir: Path, n_cells: int, n_genes: int) -> tuple[Path, Path]:
    import cellular

    workdir.mkdir(parents=True, exist_ok=True)
    reference = workdir / f"atlas_{n_cells}x{n_genes}.h5ad"
    query = workdir / f"query_{QUERY_CELLS}x{n_genes}.h5ad"
    for path, cells, cell_seed in ((reference, n_cells, 1), (query, QUERY_CELLS, 2)):
        if not path.exists():
            partial = path.with_suffix(".partial.h5ad")
            cellular.data.write_synthetic_h5ad(partial, cells, n_genes, seed=0, cell_seed=cell_seed)
            partial.rename(path)
    return reference, query


def _collection_files(workdir: Path, n_cells: int, n_genes: int) -> tuple[list[Path], list[Path]]:
    """The reference in :data:`COLLECTION_PARTS` files and the query in two (distinct cell seeds: distinct names)."""
    import cellular

    workdir.mkdir(parents=True, exist_ok=True)
    paths = ([], [])
    for parts, cells, first_seed, name in (
        (paths[0], n_cells, 10, f"atlas_{n_cells}x{n_genes}"),
        (paths[1], QUERY_CELLS, 30, f"query_{QUERY_CELLS}x{n_genes}"),
    ):
        n_parts = COLLECTION_PARTS if parts is paths[0] else 2
        for part in range(n_parts):
            path = workdir / f"{name}_part{part + 1}of{n_parts}.h5ad"
            if not path.exists():
                partial = path.with_suffix(".partial.h5ad")
                cellular.data.write_synthetic_h5ad(
                    partial, cells // n_parts, n_genes, seed=0, cell_seed=first_seed + part
                )
                partial.rename(path)
            parts.append(path)
    return paths


def _read(paths, mode: str):
    import anndata as ad

    import cellular

    if mode == "collection":
        return cellular.data.read_collection(paths)
    return ad.read_h5ad(paths, backed="r" if mode == "backed" else None)


def run_one(n_cells: int, mode: str, n_genes: int, steps: int, workdir: Path) -> dict:
    import anndata as ad
    import numpy as np

    import cellular

    files = _collection_files if mode == "collection" else _files
    reference_path, query_path = files(workdir, n_cells, n_genes)  # written by the parent process
    row = {"cells": n_cells, "mode": mode, "genes": n_genes}
    start = time.perf_counter()
    reference = _read(reference_path, mode)
    row["read_s"] = round(time.perf_counter() - start, 1)
    row["rss_after_read_mb"] = round(_rss_mb())

    start = time.perf_counter()
    cellular.CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    model = cellular.CELLULAR(reference, n_top_genes=2000)
    row["setup_s"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    model.train(max_epochs=1, max_steps=steps, early_stopping=False, classifier=False, progress_bar=False)
    elapsed = time.perf_counter() - start
    row["train_s"] = round(elapsed, 1)
    row["train_cells_per_s"] = round(steps * 256 / elapsed)

    start = time.perf_counter()
    z = model.get_latent_representation()
    elapsed = time.perf_counter() - start
    row["embed_s"] = round(elapsed, 1)
    row["embed_cells_per_s"] = round(n_cells / elapsed)
    reference.obsm["X_cellular"] = z

    # pynndescent compiles its numba kernels on first use (about 40 s here, once per process): timed apart.
    start = time.perf_counter()
    warmup = ad.AnnData(obs=reference.obs.iloc[:2000].copy())
    warmup.obsm["X_cellular"] = z[:2000]
    cellular.ReferenceIndex.build(model, warmup, use_rep="X_cellular", backend="pynndescent")
    row["index_compile_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    index = model.build_reference_index(reference, use_rep="X_cellular")
    row["index_build_s"] = round(time.perf_counter() - start, 1)

    query = _read(query_path, mode)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    start = time.perf_counter()
    cellular.tl.cellular_map(query, model, index)
    elapsed = time.perf_counter() - start
    row["map_s"] = round(elapsed, 1)
    row["map_cells_per_s"] = round(QUERY_CELLS / elapsed)
    row["map_accuracy"] = round(float(np.mean(query.obs["cellular_cell_type"].astype(str).to_numpy() == truth)), 3)
    row["peak_rss_mb"] = round(_rss_mb())
    return row


def _plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    phases = ["setup_s", "train_s", "embed_s", "index_build_s", "map_s"]
    for mode, frame in table.groupby("mode"):
        frame = frame.sort_values("cells")
        total = frame[phases].sum(axis=1)
        axes[0].loglog(frame["cells"], total, "o-", label=f"{mode}: whole run")
        axes[1].loglog(frame["cells"], frame["peak_rss_mb"], "o-", label=mode)
    axes[0].set(xlabel="reference cells", ylabel="wall time (s)", title="time")
    axes[1].axhline(4096, color="grey", ls="--", lw=1, label="4 GB target")
    axes[1].set(xlabel="reference cells", ylabel="peak RSS (MB)", title="memory")
    for ax in axes:
        ax.legend(frameon=False, fontsize=8)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument(
        "--modes", nargs="+", default=["backed", "memory", "collection"], choices=["backed", "memory", "collection"]
    )
    parser.add_argument("--max-memory-cells", type=int, default=300_000, help="largest in-memory run")
    parser.add_argument("--genes", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cellular_atlas"))
    parser.add_argument("--single", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--write-files", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_files:
        files = _collection_files if args.write_files[1] == "collection" else _files
        files(args.workdir, int(args.write_files[0]), args.genes)
        return
    if args.single:
        row = run_one(int(args.single[0]), args.single[1], args.genes, args.steps, args.workdir)
        print(json.dumps(row))
        return

    import pandas as pd

    RESULTS.mkdir(exist_ok=True)
    csv = RESULTS / "atlas_scale.csv"
    done = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=["cells", "mode"])
    for n_cells in args.sizes:
        for mode in args.modes:
            if mode == "memory" and n_cells > args.max_memory_cells:
                continue
            if ((done["cells"] == n_cells) & (done["mode"] == mode)).any():
                continue
            # Written by a process of its own: Linux carries a parent's peak RSS over into its children.
            writer = [sys.executable, __file__, "--write-files", str(n_cells), mode, "--genes", str(args.genes)]
            subprocess.run([*writer, "--workdir", str(args.workdir)], check=True)
            command = [sys.executable, __file__, "--single", str(n_cells), mode, "--genes", str(args.genes)]
            command += ["--steps", str(args.steps), "--workdir", str(args.workdir)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run {n_cells} {mode} failed")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            done.to_csv(csv, index=False)
    table = done.sort_values(["mode", "cells"]).reset_index(drop=True)
    header = (
        f"Generated by `python benchmarks/atlas_scale.py` ({platform.machine()}, 2 cores; synthetic counts, "
        f"{args.genes} genes, {args.steps} training steps of 256 cells, {QUERY_CELLS:,} query cells).\n\n"
    )
    (RESULTS / "atlas_scale.md").write_text(header + table.to_markdown(index=False) + "\n")
    _plot(table, RESULTS / "atlas_scale.png")
    print(header + table.to_markdown(index=False))


if __name__ == "__main__":
    main()
