"""The encoders a CELLULAR model can use, by name.

Every one maps normalised expression to an embedding through ``forward(x, gene_mask)``, ``hidden(x, gene_mask)``
and ``from_hidden(hidden)``.
"""

from __future__ import annotations

from torch import nn

from ._encoder import CellularEncoder, check_hidden_sizes
from ._gene_grid import GeneGridEncoder

ENCODERS: dict[str, type[nn.Module]] = {"mlp": CellularEncoder, "gene_grid": GeneGridEncoder}


def make_encoder(
    name: str,
    n_input: int,
    n_latent: int,
    dropout_rate: float,
    hidden_sizes: tuple[int, int] | None = None,
    input_norm_affine: bool = False,
) -> nn.Module:
    """A fresh encoder of kind ``name`` (``"mlp"`` or ``"gene_grid"``).

    ``hidden_sizes`` sets the MLP's widths and ``input_norm_affine`` gives its input LayerNorm per-gene affine
    parameters (see :class:`CellularEncoder`).
    """
    if name not in ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {name!r}.")
    hidden_sizes = check_encoder_hidden_sizes(name, hidden_sizes)
    options = {} if hidden_sizes is None else {"hidden_sizes": hidden_sizes}
    if name == "mlp":
        options["input_affine"] = bool(input_norm_affine)
    return ENCODERS[name](n_input, n_latent=n_latent, dropout_rate=dropout_rate, **options)


def check_encoder_hidden_sizes(name: str, hidden_sizes) -> tuple[int, int] | None:
    """``hidden_sizes`` checked for encoder ``name``: only the mlp encoder has hidden widths to set."""
    if hidden_sizes is None:
        return None
    if name != "mlp":
        raise ValueError(
            f"hidden_sizes sets the widths of the mlp encoder; the {name} encoder has no such layers. Leave "
            "hidden_sizes=None with this encoder."
        )
    return check_hidden_sizes(hidden_sizes)
