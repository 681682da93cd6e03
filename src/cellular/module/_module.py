"""Torch module holding the CELLULAR encoder, its learnable temperature and the combined loss."""

from __future__ import annotations

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import Tensor, nn

from cellular.nn import (
    batch_mixing_loss,
    centroid_distance_loss,
    check_grid_positions,
    make_encoder,
    random_panel_masks,
    soft_nearest_neighbour_loss,
)

GENE_MASK_KEY = "gene_mask"


class CellularModule(BaseModuleClass):
    """Encoder plus CELLULAR loss.

    Parameters
    ----------
    n_input
        Number of input genes.
    n_labels
        Number of known cell types (codes ``0 .. n_labels - 1``; any other code is treated as unlabelled).
    n_batch
        Number of batches.
    n_latent
        Embedding dimension.
    dropout_rate
        Encoder dropout.
    class_weights, batch_weights
        Per-type and per-batch weights of the supervised and batch terms; uniform when ``None``.
    centroid_targets
        ``(n_labels, n_labels)`` target distances between type centroids; the centroid term is off when ``None``.
    snn_weight, batch_weight, centroid_weight
        Weights of the three loss terms (0.9 / 0.1 / 1.0 in the paper).
    temperature_init, temperature_min, temperature_max
        Initial value and clamp range of the learnable temperature of the supervised term.
    batch_temperature
        Fixed temperature of the batch term.
    panel_masking
        Share of training cells whose input is restricted to a random gene panel (see
        :func:`cellular.nn.random_panel_masks`); ``0`` trains on every gene and reads absent genes of a query as
        zero expression, anything above makes the encoder mask-aware (absent genes are read as not measured).
    min_panel_fraction
        Smallest share of genes a simulated panel keeps.
    encoder
        ``"mlp"`` (:class:`~cellular.nn.CellularEncoder`, the paper's) or ``"gene_grid"``
        (:class:`~cellular.nn.GeneGridEncoder`, Spoticell's fingerprint encoder).
    hidden_sizes
        Widths of the MLP encoder's two hidden layers; the paper's ``(n_input/2, n_input/4)`` when ``None``.
    grid_positions
        Gene-grid layout (grid cell of each gene) of a ``"gene_grid"`` encoder; input order when ``None``.
    input_norm_affine
        Per-gene affine parameters in the MLP encoder's input LayerNorm: off for new models (they only
        re-parametrise the first Linear layer and cost training time), on in models saved by earlier versions.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_batch: int,
        n_latent: int = 100,
        dropout_rate: float = 0.2,
        class_weights: Tensor | None = None,
        batch_weights: Tensor | None = None,
        centroid_targets: Tensor | None = None,
        snn_weight: float = 0.9,
        batch_weight: float = 0.1,
        centroid_weight: float = 1.0,
        temperature_init: float = 0.25,
        temperature_min: float = 0.1,
        temperature_max: float = 2.0,
        batch_temperature: float = 0.5,
        panel_masking: float = 0.0,
        min_panel_fraction: float = 0.1,
        encoder: str = "mlp",
        grid_positions: Tensor | None = None,
        hidden_sizes: tuple[int, int] | None = None,
        input_norm_affine: bool = False,
    ):
        super().__init__()
        if not temperature_min <= temperature_init <= temperature_max:
            raise ValueError(
                f"temperature_init={temperature_init} lies outside [temperature_min, temperature_max] = "
                f"[{temperature_min}, {temperature_max}]; choose an initial temperature inside the clamp range."
            )
        self.n_input = n_input
        self.n_labels = n_labels
        self.n_batch = n_batch
        self.n_latent = n_latent
        self.snn_weight = snn_weight
        self.batch_weight = batch_weight
        self.centroid_weight = centroid_weight
        self.temperature_min = temperature_min
        self.temperature_max = temperature_max
        self.batch_temperature = batch_temperature
        self.panel_masking = panel_masking
        self.min_panel_fraction = min_panel_fraction

        self.encoder_name = encoder
        self.encoder = make_encoder(encoder, n_input, n_latent, dropout_rate, hidden_sizes, input_norm_affine)
        if grid_positions is not None:
            if encoder != "gene_grid":
                raise ValueError("grid_positions is a gene_grid encoder's layout; the mlp encoder has none.")
            positions = torch.as_tensor(grid_positions).long()
            check_grid_positions(positions, n_input)
            self.encoder.grid_positions.copy_(positions)
        self.temperature = nn.Parameter(torch.tensor(float(temperature_init)))
        self.register_buffer("class_weights", _or_uniform(class_weights, n_labels))
        self.register_buffer("batch_weights", _or_uniform(batch_weights, n_batch))
        self.register_buffer(
            "centroid_targets",
            centroid_targets.to(torch.float32) if centroid_targets is not None else torch.zeros(n_labels, n_labels),
        )

    def clamp_temperature_(self) -> None:
        """Project the learnable temperature back into its allowed range (called after each optimiser step)."""
        with torch.no_grad():
            self.temperature.clamp_(self.temperature_min, self.temperature_max)

    @property
    def mask_aware(self) -> bool:
        """Whether the encoder was trained to read a gene-measurement mask (absent genes are not zeros)."""
        return self.panel_masking > 0

    def _get_inference_input(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        x = tensors[REGISTRY_KEYS.X_KEY]
        gene_mask = tensors.get(GENE_MASK_KEY)
        if self.training and self.mask_aware:
            panels = random_panel_masks(
                x.shape[0],
                x.shape[1],
                probability=self.panel_masking,
                min_fraction=self.min_panel_fraction,
                device=x.device,
            )
            gene_mask = panels if gene_mask is None else panels & gene_mask.to(torch.bool)
        return {"x": x, "gene_mask": gene_mask}

    @auto_move_data
    def inference(self, x: Tensor, gene_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Embed normalised expression ``x``; a mask-aware encoder reads ``gene_mask`` (``True`` where measured)."""
        if not self.mask_aware:
            gene_mask = None
        return {"z": self.encoder(x, gene_mask)}

    def _get_generative_input(self, tensors: dict[str, Tensor], inference_outputs: dict[str, Tensor]) -> dict:
        return {}

    def generative(self) -> dict:
        """CELLULAR has no generative part."""
        return {}

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Tensor],
        generative_outputs: dict | None = None,
    ) -> LossOutput:
        """Weighted sum of the supervised, batch and centroid terms on one minibatch."""
        z = inference_outputs["z"]
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].reshape(-1).long()
        labels = torch.where((labels >= 0) & (labels < self.n_labels), labels, -1)
        batches = tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1).long()

        snn = soft_nearest_neighbour_loss(z, labels, self.temperature, self.class_weights)
        mixing = batch_mixing_loss(z, labels, batches, self.batch_temperature, self.batch_weights)
        centroid = centroid_distance_loss(z, labels, self.centroid_targets)
        total = self.snn_weight * snn + self.batch_weight * mixing + self.centroid_weight * centroid
        return LossOutput(
            loss=total,
            n_obs_minibatch=z.shape[0],
            extra_metrics={
                "snn_loss": snn.detach(),
                "batch_loss": mixing.detach(),
                "centroid_loss": centroid.detach(),
                "temperature": self.temperature.detach().clone(),
            },
        )

    def sample(self, *args, **kwargs):
        """CELLULAR is not generative; there is nothing to sample."""
        raise NotImplementedError("CELLULAR learns an embedding only and cannot sample expression.")


def _or_uniform(weights: Tensor | None, n: int) -> Tensor:
    """``weights``, or equal weights summing to one (as inverse-frequency weights do, so the terms keep their scale)."""
    return torch.full((n,), 1.0 / max(n, 1)) if weights is None else weights.to(torch.float32)
