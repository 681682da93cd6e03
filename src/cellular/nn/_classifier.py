"""Cell-type classifier head on the CELLULAR embedding and its probability calibration."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CellTypeClassifier(nn.Module):
    """The paper's classifier: an MLP with two hidden layers and dropout on the (frozen) embedding.

    ``Linear(n_latent, h1) -> LayerNorm -> ReLU -> Dropout -> Linear(h1, h2) -> LayerNorm -> ReLU -> Dropout ->
    Linear(h2, n_types)``. The network returns **logits**; probabilities are one softmax of the logits divided by the
    calibration temperature (the original package applied a softmax twice, which flattens every probability towards
    uniform).

    Parameters
    ----------
    n_latent
        Embedding dimension.
    n_types
        Number of cell types.
    hidden_sizes
        Widths of the two hidden layers.
    dropout_rate
        Dropout after each hidden layer.
    """

    def __init__(self, n_latent: int, n_types: int, hidden_sizes: tuple[int, int] = (256, 128), dropout_rate=0.2):
        super().__init__()
        if len(hidden_sizes) != 2 or min(hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be two positive widths, got {hidden_sizes}.")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        first, second = (int(size) for size in hidden_sizes)
        self.layers = nn.Sequential(
            nn.Linear(n_latent, first),
            nn.LayerNorm(first),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(first, second),
            nn.LayerNorm(second),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(second, n_types),
        )

    def forward(self, z: Tensor) -> Tensor:
        """Logits of a ``(n_cells, n_latent)`` batch of embeddings."""
        return self.layers(z)


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """Temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)`` (Guo et al., 2017).

    One scalar fitted on held-out cells; it changes confidences but never the predicted class.

    Parameters
    ----------
    logits
        ``(n_cells, n_types)`` held-out logits.
    labels
        ``(n_cells,)`` true type codes.
    max_iter
        L-BFGS iterations.

    Returns
    -------
    The fitted temperature, clipped to ``[0.05, 20]``.
    """
    if logits.shape[0] == 0:
        raise ValueError("Temperature scaling needs at least one held-out cell.")
    logits = logits.detach().to(torch.float64)
    labels = labels.to(logits.device, torch.long)
    log_temperature = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp().clamp(0.05, 20.0))
