"""Can the encoder's first block run faster from the sparse minibatch? Forward + backward time on CPU.

The first block is ``LayerNorm(genes) -> Linear(genes, genes/2)``. Three ways to compute it, all exact:

- ``dense``: the module as it is (``torch.nn.LayerNorm`` then ``torch.nn.Linear``) on a dense minibatch;
- ``folded dense``: the LayerNorm's affine folded into the Linear (``W * gamma``, bias ``W @ beta + b``), so autograd
  needs no gradient of the normalised input (one matrix product fewer in the backward pass);
- ``sparse``: the row mean and variance from the non-zeros and ``x_csr @ (W * gamma).T`` with rank-one
  corrections for the mean (``torch.sparse.mm`` on a CSR minibatch), never densifying the input.

Prints the time per minibatch and the largest deviation from ``dense`` (values and parameter gradients) for each
density, and writes ``benchmarks/results/first_block.{csv,md}``.

    python benchmarks/first_block.py
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

RESULTS = Path(__file__).parent / "results"


def dense_block(x, norm, linear):
    return linear(norm(x))


def folded_block(x, norm, linear):
    mean = x.mean(1, keepdim=True)
    variance = x.var(1, unbiased=False, keepdim=True)
    normalised = (x - mean) * torch.rsqrt(variance + norm.eps)
    return torch.addmm(linear.bias + linear.weight @ norm.bias, normalised, (linear.weight * norm.weight).t())


def sparse_block(x_csr, norm, linear):
    n_cells, n_genes = x_csr.shape
    values = x_csr.values().double()
    rows = torch.repeat_interleave(torch.arange(n_cells), x_csr.crow_indices().diff())
    mean = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, rows, values) / n_genes
    square = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, rows, values.square()) / n_genes
    inv_std = torch.rsqrt((square - mean.square()).clamp_min(0) + norm.eps)
    scaled = linear.weight * norm.weight
    product = torch.sparse.mm(x_csr, scaled.t())
    correction = (mean * inv_std).float()[:, None] * scaled.sum(1)[None, :]
    return product * inv_std.float()[:, None] - correction + (linear.bias + linear.weight @ norm.bias)


def time_block(block, x, parameters, repeats: int) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    def step():
        for parameter in parameters:
            parameter.grad = None
        out = block(x)
        out.square().mean().backward()
        return out

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        out = step()
    elapsed = (time.perf_counter() - start) / repeats
    return elapsed, out.detach(), [p.grad.clone() for p in parameters]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=256, help="minibatch size")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(args.genes), torch.nn.Linear(args.genes, args.genes // 2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.1, 0.1)
    parameters = [norm.weight, norm.bias, linear.weight, linear.bias]
    rows = []
    for density in args.densities:
        matrix = sp.random(args.cells, args.genes, density=density, format="csr", dtype=np.float32, random_state=0)
        matrix.data = np.log1p(matrix.data * 20).astype(np.float32)  # log-normalised-like values
        x = torch.from_numpy(matrix.toarray())
        x_csr = torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int64)),
            torch.from_numpy(matrix.indices.astype(np.int64)),
            torch.from_numpy(matrix.data),
            size=matrix.shape,
        )
        reference_time, reference, reference_grads = time_block(
            lambda v: dense_block(v, norm, linear), x, parameters, args.repeats
        )
        for name, block, data in (
            ("dense", dense_block, x),
            ("folded dense", folded_block, x),
            ("sparse", sparse_block, x_csr),
        ):
            elapsed, out, grads = time_block(lambda v, b=block: b(v, norm, linear), data, parameters, args.repeats)
            grad_error = max(
                float((g - r).abs().max() / r.abs().max().clamp_min(1e-12))
                for g, r in zip(grads, reference_grads, strict=True)
            )
            row = {
                "density": density,
                "method": name,
                "ms_per_minibatch": round(elapsed * 1000, 2),
                "speed_vs_dense": round(reference_time / elapsed, 2),
                "max_abs_value_error": float(f"{float((out - reference).abs().max()):.1e}"),
                "max_rel_grad_error": float(f"{grad_error:.1e}"),
            }
            print(row, flush=True)
            rows.append(row)
    table = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "first_block.csv", index=False)
    header = (
        f"First block forward + backward, {args.cells} cells x {args.genes} genes, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}\n\n"
    )
    (RESULTS / "first_block.md").write_text(header + table.to_markdown(index=False) + "\n")
    print(header + table.to_markdown(index=False))


if __name__ == "__main__":
    main()
