"""The CELLULAR encoder network."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn


class CellularEncoder(nn.Module):
    """The paper's MLP encoder from normalised expression to the embedding.

    ``LayerNorm -> Linear(d, h1) -> LayerNorm -> ReLU -> Dropout -> Linear(h1, h2) -> LayerNorm -> ReLU ->
    Linear(h2, n_latent)`` with ``d`` the number of input genes and, by default, the paper's widths ``h1 = d/2`` and
    ``h2 = d/4``.

    The first LayerNorm has no per-gene affine parameters by default: a per-gene scale and shift before a Linear layer
    only re-parametrise that layer's weights and bias, and without them training need not back-propagate into the
    input (a fifth of a training step's compute). Models saved before this change keep theirs (``input_affine``).

    Given a mask of the genes a cell's data measures, the first LayerNorm takes its mean and variance over the
    measured genes only and the unmeasured genes enter the first Linear as zero, so an absent gene is read as "not
    measured" rather than as "not expressed". The second LayerNorm removes the scale change of the first Linear's
    output that fewer inputs bring.

    Parameters
    ----------
    n_input
        Number of input genes ``d``.
    n_latent
        Embedding dimension.
    dropout_rate
        Dropout after the first hidden layer.
    hidden_sizes
        Widths ``(h1, h2)`` of the two hidden layers; the paper's ``(d/2, d/4)`` when ``None``. The first layer is
        most of the encoder's work (``d * h1`` weights), so narrower layers train proportionally faster.
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int = 100,
        dropout_rate: float = 0.2,
        hidden_sizes: tuple[int, int] | None = None,
        input_affine: bool = False,
    ):
        super().__init__()
        if hidden_sizes is None:
            hidden_sizes = (max(n_input // 2, 1), max(n_input // 4, 1))
        n_hidden_1, n_hidden_2 = check_hidden_sizes(hidden_sizes)
        self.layers = nn.Sequential(
            nn.LayerNorm(n_input, elementwise_affine=input_affine),
            nn.Linear(n_input, n_hidden_1),
            nn.LayerNorm(n_hidden_1),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(n_hidden_1, n_hidden_2),
            nn.LayerNorm(n_hidden_2),
            nn.ReLU(),
            nn.Linear(n_hidden_2, n_latent),
        )

    def forward(self, x: Tensor, gene_mask: Tensor | None = None) -> Tensor:
        """Embed a ``(n_cells, n_input)`` batch of normalised expression.

        Parameters
        ----------
        x
            Normalised expression; values of unmeasured genes are ignored.
        gene_mask
            ``True`` where a gene is measured: ``(n_input,)`` for one panel shared by all cells, or
            ``(n_cells, n_input)``. Every gene is measured when ``None``.
        """
        return self.from_hidden(self.hidden(x, gene_mask))

    def from_hidden(self, hidden: Tensor) -> Tensor:
        """The rest of the network: the embedding of first-hidden-block outputs (see :meth:`hidden`)."""
        return self.layers[4:](hidden)

    def hidden(self, x: Tensor, gene_mask: Tensor | None = None) -> Tensor:
        """Output of the first hidden block (``LayerNorm -> Linear -> LayerNorm -> ReLU``), before dropout.

        Closer to the genes than the embedding, it keeps differences the contrastive loss collapses (an unseen
        type that resembles a trained one); novelty scores use it. Arguments as in :meth:`forward`.
        """
        if gene_mask is None:
            return self.layers[:4](x)
        first_norm = self.layers[0]
        normalized = masked_layer_norm(x, gene_mask, first_norm.weight, first_norm.bias, first_norm.eps)
        return self.layers[1:4](normalized)


def check_hidden_sizes(hidden_sizes) -> tuple[int, int]:
    """``hidden_sizes`` as two positive integers, or a ``ValueError`` naming the fix."""
    sizes = list(hidden_sizes) if isinstance(hidden_sizes, list | tuple) else None
    if sizes is None or len(sizes) != 2 or not all(_is_positive_integer(size) for size in sizes):
        raise ValueError(
            f"hidden_sizes must be two positive integers (the widths of the two hidden layers), got "
            f"{hidden_sizes!r}; pass e.g. (256, 128)."
        )
    return int(sizes[0]), int(sizes[1])


def _is_positive_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def masked_layer_norm(x: Tensor, gene_mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the measured genes of each row; unmeasured genes come out as exactly zero.

    With every gene measured this equals ``torch.nn.functional.layer_norm`` (within float rounding).

    Parameters
    ----------
    x
        ``(n_cells, n_genes)`` input.
    gene_mask
        ``(n_genes,)`` or ``(n_cells, n_genes)``, ``True`` where measured.
    weight, bias, eps
        The LayerNorm's affine parameters (``None`` for none) and epsilon.
    """
    mask = gene_mask.to(device=x.device, dtype=x.dtype).expand_as(x)
    n_measured = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (x * mask).sum(dim=1, keepdim=True) / n_measured
    centred = (x - mean) * mask
    variance = centred.square().sum(dim=1, keepdim=True) / n_measured
    normalized = centred * torch.rsqrt(variance + eps)
    if weight is not None:
        normalized = normalized * weight
    if bias is not None:
        normalized = (normalized + bias) * mask
    return normalized
