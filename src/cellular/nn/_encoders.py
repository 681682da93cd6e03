"""The encoders a CELLULAR model can use, by name.

Every one maps normalised expression to an embedding through ``forward(x, gene_mask)``, ``hidden(x, gene_mask)``
and ``from_hidden(hidden)``.
"""

from __future__ import annotations

from torch import nn

from ._encoder import CellularEncoder
from ._gene_grid import GeneGridEncoder

ENCODERS: dict[str, type[nn.Module]] = {"mlp": CellularEncoder, "gene_grid": GeneGridEncoder}


def make_encoder(name: str, n_input: int, n_latent: int, dropout_rate: float) -> nn.Module:
    """A fresh encoder of kind ``name`` (``"mlp"`` or ``"gene_grid"``)."""
    if name not in ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {name!r}.")
    return ENCODERS[name](n_input, n_latent=n_latent, dropout_rate=dropout_rate)
