"""The gene-grid fingerprint encoder (Spoticell): genes on a 2D grid, read by a CNN and a transformer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cellular.data._layout import grid_side

from ._encoder import masked_layer_norm

GRID_CHANNELS = (16, 32, 64, 128)
PATH_WIDTH = 128


class ResidualConvBlock(nn.Module):
    """``conv3x3 (stride) -> GroupNorm -> ReLU -> conv3x3 -> GroupNorm`` plus a (projected) shortcut, then ReLU."""

    def __init__(self, n_in: int, n_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(min(8, n_out), n_out),
            nn.ReLU(),
            nn.Conv2d(n_out, n_out, 3, padding=1, bias=False),
            nn.GroupNorm(min(8, n_out), n_out),
        )
        self.shortcut = (
            nn.Identity()
            if n_in == n_out and stride == 1
            else nn.Sequential(nn.Conv2d(n_in, n_out, 1, stride=stride, bias=False), nn.GroupNorm(min(8, n_out), n_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class GeneGridEncoder(nn.Module):
    """Spoticell's fingerprint encoder: each cell as an image of its genes, read by two paths and fused.

    The cell's normalised expression (LayerNorm over the genes, over the measured genes only when a mask is given)
    is placed on a square grid, gene ``i`` at cell ``grid_positions[i]`` (a layout stored with the model: see
    :func:`cellular.data.gene_grid_layout`), with a second channel marking which grid cells hold a measured gene.
    A CNN path (a stem halving the grid, residual blocks of 16 -> 32 -> 64 -> 128 channels, each halving the grid
    after the first, then global average pooling) and a transformer path (the grid cut into patches of genes, each
    patch a token with a learned position, two pre-norm transformer layers, mean pooling) each
    give 128 features; their concatenation (256, :meth:`hidden`) goes through the fusion layers
    ``256 -> 128 -> n_latent`` (64 in Spoticell) to the fingerprint.

    Same interface as :class:`~cellular.nn.CellularEncoder` (``forward``, ``hidden``, ``from_hidden``), so the
    model, index, novelty and annotation use it unchanged.

    Parameters
    ----------
    n_input
        Number of input genes.
    n_latent
        Fingerprint dimension.
    dropout_rate
        Dropout in the fusion layers and the transformer.
    grid_positions
        Grid cell of each input gene, distinct values in ``[0, side**2)``; genes in input order on the grid when
        ``None``.
    n_patches_per_side
        The transformer's tokens are the grid cut into ``n_patches_per_side`` x ``n_patches_per_side`` patches of
        genes (25 tokens by default: 9 x 9 genes each for 2,000 genes).
    d_model, n_heads, n_layers
        Width, attention heads and depth of the transformer path.
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int = 64,
        dropout_rate: float = 0.2,
        grid_positions: Tensor | None = None,
        n_patches_per_side: int = 5,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
    ):
        super().__init__()
        self.n_input = n_input
        self.side = grid_side(n_input)
        positions = torch.arange(n_input) if grid_positions is None else torch.as_tensor(grid_positions).long()
        check_grid_positions(positions, n_input)
        self.register_buffer("grid_positions", positions.clone())
        self.input_norm = nn.LayerNorm(n_input)

        first, *rest = GRID_CHANNELS
        # The stem halves the grid: one gene per pixel makes full-resolution convolutions most of the cost.
        self.stem = nn.Sequential(
            nn.Conv2d(2, first, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, first), nn.ReLU()
        )
        blocks = [ResidualConvBlock(first, first, stride=1)]
        blocks += [ResidualConvBlock(n_in, n_out, stride=2) for n_in, n_out in zip(GRID_CHANNELS, rest, strict=False)]
        self.conv_blocks = nn.Sequential(*blocks)

        self.patch_size = math.ceil(self.side / n_patches_per_side)
        n_patches = math.ceil(self.side / self.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(2, d_model, self.patch_size, stride=self.patch_size)
        self.patch_positions = nn.Parameter(torch.zeros(1, n_patches, d_model))
        nn.init.normal_(self.patch_positions, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout_rate, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.transformer_out = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, PATH_WIDTH))

        self.fusion = nn.Sequential(
            nn.Linear(2 * PATH_WIDTH, 128),
            nn.LayerNorm(128),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(128, n_latent),
        )

    def forward(self, x: Tensor, gene_mask: Tensor | None = None) -> Tensor:
        """Fingerprint of a ``(n_cells, n_input)`` batch of normalised expression (mask as in ``CellularEncoder``)."""
        return self.from_hidden(self.hidden(x, gene_mask))

    def from_hidden(self, hidden: Tensor) -> Tensor:
        """The fusion layers: fingerprints of the concatenated path outputs (:meth:`hidden`)."""
        return self.fusion(hidden)

    def hidden(self, x: Tensor, gene_mask: Tensor | None = None) -> Tensor:
        """The two paths' concatenated outputs, ``(n_cells, 256)``: the layer the novelty score reads."""
        image = self.grid_image(x, gene_mask)
        cnn = self.conv_blocks(self.stem(image)).mean(dim=(2, 3))
        side = self.patch_size * math.ceil(self.side / self.patch_size)
        padded = nn.functional.pad(image, (0, side - self.side, 0, side - self.side))
        tokens = self.patch_embedding(padded).flatten(2).transpose(1, 2) + self.patch_positions
        attended = self.transformer(tokens).mean(dim=1)
        return torch.cat([cnn, self.transformer_out(attended)], dim=1)

    def grid_image(self, x: Tensor, gene_mask: Tensor | None = None) -> Tensor:
        """``(n_cells, 2, side, side)``: normalised expression and the measured-gene mask on the grid."""
        norm = self.input_norm
        if gene_mask is None:
            values = nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            measured = torch.ones_like(x)
        else:
            values = masked_layer_norm(x, gene_mask, norm.weight, norm.bias, norm.eps)
            measured = gene_mask.to(device=x.device, dtype=x.dtype).expand_as(x)
        n_cells = x.shape[0]
        grid = x.new_zeros(n_cells, 2, self.side * self.side)
        grid[:, 0, self.grid_positions] = values
        grid[:, 1, self.grid_positions] = measured
        return grid.view(n_cells, 2, self.side, self.side)


def check_grid_positions(positions: Tensor, n_genes: int) -> None:
    """Raise ``ValueError`` unless ``positions`` gives ``n_genes`` distinct cells of the ``grid_side`` square grid."""
    side = grid_side(n_genes)
    if (
        positions.ndim != 1
        or positions.numel() != n_genes
        or (positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= side * side))
        or torch.unique(positions).numel() != positions.numel()
    ):
        raise ValueError(
            f"A gene-grid layout must place each of the {n_genes} genes on its own cell of the {side} x {side} grid "
            f"(distinct positions in [0, {side * side})); got {positions.numel()} positions. Recompute the layout "
            "with cellular.data.gene_grid_layout."
        )
