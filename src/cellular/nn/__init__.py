from ._augment import random_panel_masks
from ._classifier import CellTypeClassifier, fit_temperature
from ._encoder import CellularEncoder, check_hidden_sizes, masked_layer_norm
from ._encoders import ENCODERS, check_encoder_hidden_sizes, make_encoder
from ._gene_classifier import (
    ABSENT_TYPE_LOGIT,
    MIN_ENTROPY,
    GeneLinearClassifier,
    fit_gene_classifier,
    held_out_type_aurocs,
    logit_entropy,
)
from ._gene_grid import GeneGridEncoder, ResidualConvBlock, check_grid_positions
from ._losses import (
    batch_mixing_loss,
    centroid_distance_loss,
    centroid_target_distances,
    hierarchical_cross_entropy,
    inverse_frequency_weights,
    soft_nearest_neighbour_loss,
)

__all__ = [
    "CellTypeClassifier",
    "CellularEncoder",
    "ENCODERS",
    "ABSENT_TYPE_LOGIT",
    "MIN_ENTROPY",
    "GeneGridEncoder",
    "GeneLinearClassifier",
    "ResidualConvBlock",
    "check_encoder_hidden_sizes",
    "check_grid_positions",
    "check_hidden_sizes",
    "make_encoder",
    "batch_mixing_loss",
    "centroid_distance_loss",
    "centroid_target_distances",
    "inverse_frequency_weights",
    "fit_gene_classifier",
    "fit_temperature",
    "held_out_type_aurocs",
    "logit_entropy",
    "hierarchical_cross_entropy",
    "masked_layer_norm",
    "random_panel_masks",
    "soft_nearest_neighbour_loss",
]
