"""Training throughput and peak memory of CELLULAR on synthetic data.

Each size runs in its own process so that peak RSS belongs to that size alone. Prints one line per run and a
markdown table at the end, written to ``benchmarks/results/train_speed.{csv,md}`` (CPU runs of the default sizes).

    python benchmarks/train_speed.py                    # 10k and 100k cells x 2000 genes, CPU
    python benchmarks/train_speed.py --cells 10000 --epochs 3 --device cuda
    python benchmarks/train_speed.py --cells 10000 --encoders mlp gene_grid --out encoder_speed   # the two encoders
    python benchmarks/train_speed.py --cells 10000 --widths default paper --library-size 300 --out widths_speed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_one(
    n_cells: int,
    n_genes: int,
    epochs: int,
    batch_size: int,
    device: str,
    library_size: float,
    encoder: str,
    widths: str = "default",
) -> dict:
    import numpy as np
    import torch

    import cellular

    t0 = time.perf_counter()
    adata = cellular.data.synthetic_counts(
        n_cells, n_genes, n_types=12, n_batches=4, mean_library_size=library_size, seed=0
    )
    density = adata.X.nnz / (adata.n_obs * adata.n_vars)
    t_data = time.perf_counter() - t0
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cellular.CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    t0 = time.perf_counter()
    hidden_sizes = "paper" if widths == "paper" else None
    model = cellular.CELLULAR(adata, n_top_genes=n_genes, encoder=encoder, hidden_sizes=hidden_sizes)
    t_init = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        early_stopping=False,
        accelerator=device,
        progress_bar=False,
        classifier=False,
    )
    t_train = time.perf_counter() - t0
    n_train = len(model.train_indices)
    # Per-epoch figures include the validation pass, as a user experiences them.
    cells_per_s = n_train * epochs / t_train

    t0 = time.perf_counter()
    model.train_classifier(accelerator=device)
    t_classifier = time.perf_counter() - t0

    t0 = time.perf_counter()
    z = model.get_latent_representation(accelerator=device)
    t_embed = time.perf_counter() - t0
    assert np.isfinite(z).all()
    return {
        "encoder": encoder,
        "widths": widths if encoder == "mlp" else "",
        "cells": n_cells,
        "genes": n_genes,
        "density": round(density, 3),
        "device": device if device != "cuda" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "epochs": epochs,
        "batch_size": batch_size,
        "data_s": round(t_data, 1),
        "setup_s (HVG+PCA targets)": round(t_init, 1),
        "train_s": round(t_train, 1),
        "train_cells_per_s": round(cells_per_s),
        "classifier_head_s (embed + fit + calibrate)": round(t_classifier, 1),
        "embed_cells_per_s": round(n_cells / t_embed),
        "peak_rss_data_only_mb": round(rss_data),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoders", nargs="+", choices=("mlp", "gene_grid"), default=["mlp"])
    parser.add_argument(
        "--widths", nargs="+", choices=("default", "paper"), default=["default"], help="MLP hidden widths"
    )
    parser.add_argument("--out", default="train_speed", help="name of the results files in benchmarks/results")
    parser.add_argument("--library-size", type=float, default=3000.0, help="mean counts per cell (sets the density)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results as they are")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        row = run_one(
            args.cells[0],
            args.genes,
            args.epochs,
            args.batch_size,
            args.device,
            args.library_size,
            args.encoders[0],
            args.widths[0],
        )
        print(json.dumps(row))
        return
    rows = []
    for n_cells, encoder, widths in [(n, e, w) for n in args.cells for e in args.encoders for w in args.widths]:
        command = [
            sys.executable,
            __file__,
            "--single",
            "--cells",
            str(n_cells),
            "--genes",
            str(args.genes),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
            "--library-size",
            str(args.library_size),
            "--encoders",
            encoder,
            "--widths",
            widths,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        rows.append(row)
    import pandas as pd

    table = pd.DataFrame(rows)
    text = (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}; {args.epochs} epochs, batch size {args.batch_size}\n\n"
        + table.to_markdown(index=False)
        + "\n"
    )
    print("\n" + text)
    if args.device == "cpu" and not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        table.to_csv(RESULTS / f"{args.out}.csv", index=False)
        (RESULTS / f"{args.out}.md").write_text(text)


if __name__ == "__main__":
    main()
