"""The CELLULAR encoder network."""

from __future__ import annotations

from torch import Tensor, nn


class CellularEncoder(nn.Module):
    """The paper's MLP encoder from normalised expression to the embedding.

    ``LayerNorm -> Linear(d, d/2) -> LayerNorm -> ReLU -> Dropout -> Linear(d/2, d/4) -> LayerNorm -> ReLU ->
    Linear(d/4, n_latent)`` with ``d`` the number of input genes.

    Parameters
    ----------
    n_input
        Number of input genes ``d``.
    n_latent
        Embedding dimension.
    dropout_rate
        Dropout after the first hidden layer.
    """

    def __init__(self, n_input: int, n_latent: int = 100, dropout_rate: float = 0.2):
        super().__init__()
        n_hidden_1 = max(n_input // 2, 1)
        n_hidden_2 = max(n_input // 4, 1)
        self.layers = nn.Sequential(
            nn.LayerNorm(n_input),
            nn.Linear(n_input, n_hidden_1),
            nn.LayerNorm(n_hidden_1),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(n_hidden_1, n_hidden_2),
            nn.LayerNorm(n_hidden_2),
            nn.ReLU(),
            nn.Linear(n_hidden_2, n_latent),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Embed a ``(n_cells, n_input)`` batch of normalised expression."""
        return self.layers(x)
