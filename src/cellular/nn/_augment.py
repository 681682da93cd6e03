"""Training-time simulation of query gene panels (which genes a dataset measures)."""

from __future__ import annotations

import torch
from torch import Tensor


def random_panel_masks(
    n_cells: int,
    n_genes: int,
    *,
    probability: float,
    min_fraction: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random gene-measurement masks, one per cell, as different labs' gene panels would give.

    Each cell is masked with ``probability``; a masked cell keeps a fraction drawn uniformly from
    ``[min_fraction, 1]`` of the genes. Half of the masked cells keep a uniformly random subset; the other half keep
    a contiguous block of one random gene order shared by the minibatch, so these panels overlap heavily with each
    other and whole blocks of genes are missing together, as between two gene panels.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the masks.
    probability
        Share of cells that get a mask (the others measure every gene).
    min_fraction
        Smallest share of genes a masked cell keeps.
    device
        Device of the masks.
    generator
        Random generator (the global one when ``None``).

    Returns
    -------
    ``(n_cells, n_genes)`` boolean tensor, ``True`` where a gene is measured.
    """
    if not 0.0 <= probability <= 1.0 or not 0.0 < min_fraction <= 1.0:
        raise ValueError(
            f"panel masking needs probability in [0, 1] and min_fraction in (0, 1], got {probability} and "
            f"{min_fraction}."
        )

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, device=device, generator=generator)

    masked = uniform(n_cells) < probability
    kept = min_fraction + (1.0 - min_fraction) * uniform(n_cells)
    blockwise = uniform(n_cells) < 0.5
    random_subset = uniform(n_cells, n_genes) < kept[:, None]
    gene_rank = torch.randperm(n_genes, device=device, generator=generator).to(kept.dtype)
    start = torch.floor(uniform(n_cells) * n_genes)
    block = torch.remainder(gene_rank[None, :] - start[:, None], n_genes) < kept[:, None] * n_genes
    keep = torch.where(blockwise[:, None], block, random_subset)
    keep = keep | ~masked[:, None]
    # A cell must keep at least one gene.
    empty = ~keep.any(dim=1)
    keep[empty, 0] = True
    return keep
