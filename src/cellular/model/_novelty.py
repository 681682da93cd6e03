"""Per-cell novelty scores against the reference cell types, calibrated by split-conformal inference."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from cellular.index import exact_knn
from cellular.metrics import conformal_pvalues

# Quantile of the held-out reference cells that puts the two score components on one scale.
_SPREAD_PRIOR_CELLS = 10.0
_SCALE_QUANTILE = 0.9
# The hidden-layer part of the score: PCA components kept, training cells compared against, neighbours averaged.
HIDDEN_COMPONENTS = 50
MAX_HIDDEN_REFERENCE_CELLS = 20_000
HIDDEN_NEIGHBORS = 15


def unit_rows(z: np.ndarray) -> np.ndarray:
    """Rows of ``z`` scaled to unit length (the CELLULAR loss compares cells by cosine similarity)."""
    z = np.asarray(z, dtype=np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


@dataclass
class HiddenSpace:
    """The encoder's first hidden layer, reduced by PCA, with a sample of training cells to measure distances to.

    Attributes
    ----------
    mean, components
        PCA of the hidden activations of training cells: ``(n_hidden,)`` and ``(n_hidden, n_components)``.
    reference
        ``(n_cells, n_components)`` unit-length projections of up to :data:`MAX_HIDDEN_REFERENCE_CELLS` training
        cells.
    """

    mean: np.ndarray
    components: np.ndarray
    reference: np.ndarray

    @classmethod
    def fit(cls, hidden: np.ndarray, seed: int, n_components: int = HIDDEN_COMPONENTS) -> HiddenSpace:
        """PCA of training cells' hidden activations (a sample of them when there are many)."""
        rng = np.random.default_rng(seed)
        if hidden.shape[0] > MAX_HIDDEN_REFERENCE_CELLS:
            hidden = hidden[np.sort(rng.choice(hidden.shape[0], MAX_HIDDEN_REFERENCE_CELLS, replace=False))]
        mean = hidden.mean(axis=0)
        n_components = max(1, min(n_components, hidden.shape[0] - 1, hidden.shape[1]))
        _, _, right = torch.pca_lowrank(torch.from_numpy(hidden - mean), q=n_components, center=False, niter=4)
        space = cls(mean.astype(np.float32), right.numpy().astype(np.float32), np.zeros((0, n_components), np.float32))
        space.reference = space.project(hidden)
        return space

    def project(self, hidden: np.ndarray) -> np.ndarray:
        """Unit-length PCA projections of hidden activations."""
        return unit_rows((np.asarray(hidden, dtype=np.float32) - self.mean) @ self.components)

    def distances(self, projected: np.ndarray, k: int = HIDDEN_NEIGHBORS) -> np.ndarray:
        """Mean distance of projected cells to their ``k`` nearest reference cells."""
        reference = torch.from_numpy(np.ascontiguousarray(self.reference))
        k = min(k, self.reference.shape[0])
        _, distances = exact_knn(reference, projected.astype(np.float32), k, metric="euclidean")
        return distances.mean(axis=1).astype(np.float64)


@dataclass
class NoveltyReference:
    """What novelty scoring needs to know about the reference cell types.

    Attributes
    ----------
    prototypes
        ``(n_types, n_latent)`` unit-length mean direction of each type's training cells.
    spreads
        ``(n_types,)`` median cosine distance of each type's training cells to its prototype.
    distance_scale, uncertainty_scale
        90 % quantiles of the two score components on the calibration cells.
    uncertainty_weight
        Weight of the uncertainty part of the score relative to the distance part.
    calibration_scores
        Sorted novelty scores of the calibration cells (held-out reference cells of known types).
    calibration_source
        ``"validation"`` when the calibration cells were held out of encoder training, ``"training"`` otherwise.
    hidden
        The encoder's first hidden layer and training cells in it; the score then adds the mean distance to the
        nearest training cells there (``None``: a model saved before this part existed).
    hidden_scale, hidden_weight
        90 % quantile of that distance on the calibration cells, and its weight in the score.
    """

    prototypes: np.ndarray
    spreads: np.ndarray
    distance_scale: float
    uncertainty_scale: float
    uncertainty_weight: float
    calibration_scores: np.ndarray
    calibration_source: str
    hidden: HiddenSpace | None = None
    hidden_scale: float = 1.0
    hidden_weight: float = 1.0

    @classmethod
    def fit(
        cls,
        z_train: np.ndarray,
        labels_train: np.ndarray,
        n_types: int,
        z_calibration: np.ndarray,
        probabilities_calibration: np.ndarray,
        calibration_source: str,
        uncertainty_weight: float = 0.1,
        hidden: HiddenSpace | None = None,
        hidden_calibration: np.ndarray | None = None,
        hidden_weight: float = 1.0,
    ) -> NoveltyReference:
        """Prototypes and spreads from training cells, score scales and calibration scores from held-out cells.

        With ``hidden`` (fitted on training cells) and the calibration cells' projections in it
        (``hidden_calibration``), the score adds the hidden-layer distance with weight ``hidden_weight``.
        """
        unit = unit_rows(z_train)
        counts = np.bincount(labels_train, minlength=n_types)
        sums = np.zeros((n_types, unit.shape[1]), dtype=np.float64)
        np.add.at(sums, labels_train, unit)
        prototypes = unit_rows(sums / np.maximum(counts, 1)[:, None])
        own_distance = 1.0 - np.einsum("ij,ij->i", unit, prototypes[labels_train])
        spreads = np.ones(n_types, dtype=np.float64)
        order = np.argsort(labels_train, kind="stable")
        for code, group in enumerate(np.split(own_distance[order], np.cumsum(counts)[:-1])):
            if group.size:
                spreads[code] = max(float(np.median(group)), 1e-4)
        spreads = shrink_spreads(spreads, counts)
        reference = cls(
            prototypes=prototypes.astype(np.float32),
            spreads=spreads,
            distance_scale=1.0,
            uncertainty_scale=1.0,
            uncertainty_weight=float(uncertainty_weight),
            calibration_scores=np.zeros(0),
            calibration_source=calibration_source,
            hidden=hidden,
            hidden_weight=float(hidden_weight),
        )
        return reference.recalibrated(z_calibration, probabilities_calibration, hidden_calibration)

    def recalibrated(
        self, z_calibration: np.ndarray, probabilities_calibration: np.ndarray, hidden_calibration=None
    ) -> NoveltyReference:
        """A copy with score scales and conformal scores taken from these calibration cells (prototypes kept)."""
        distance, _ = self.nearest_type(z_calibration)
        uncertainty = 1.0 - probabilities_calibration.max(axis=1)
        reference = replace(
            self,
            distance_scale=max(float(np.quantile(distance, _SCALE_QUANTILE)), 1e-6),
            uncertainty_scale=max(float(np.quantile(uncertainty, _SCALE_QUANTILE)), 1e-3),
        )
        hidden_distance = None
        if self.hidden is not None:
            hidden_distance = self.hidden.distances(hidden_calibration)
            reference.hidden_scale = max(float(np.quantile(hidden_distance, _SCALE_QUANTILE)), 1e-6)
        reference.calibration_scores = np.sort(reference.combine(distance, uncertainty, hidden_distance))
        return reference

    def nearest_type(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spread-scaled cosine distance to the nearest prototype, and that prototype's type code."""
        scaled = (1.0 - unit_rows(z) @ self.prototypes.T) / self.spreads[None, :]
        nearest = scaled.argmin(axis=1)
        return scaled[np.arange(scaled.shape[0]), nearest], nearest

    def hidden_distances(self, hidden: np.ndarray | None) -> np.ndarray | None:
        """Hidden-layer distances of cells given their projections (``None`` when the score has no such part)."""
        if self.hidden is None:
            return None
        if hidden is None:
            raise ValueError("This novelty score needs the cells' hidden-layer projections.")
        return self.hidden.distances(hidden)

    def scores(self, z: np.ndarray, probabilities: np.ndarray, hidden: np.ndarray | None = None) -> np.ndarray:
        """Novelty score of embedded cells given their class probabilities (and hidden-layer projections)."""
        distance, _ = self.nearest_type(z)
        return self.combine(distance, 1.0 - probabilities.max(axis=1), self.hidden_distances(hidden))

    def combine(
        self, distance: np.ndarray, uncertainty: np.ndarray, hidden_distance: np.ndarray | None = None
    ) -> np.ndarray:
        """Scaled prototype distance plus weighted uncertainty and hidden-layer distance, each on its own scale."""
        score = distance / self.distance_scale + self.uncertainty_weight * uncertainty / self.uncertainty_scale
        if hidden_distance is not None:
            score = score + self.hidden_weight * hidden_distance / self.hidden_scale
        return score

    def pvalues(self, scores: np.ndarray) -> np.ndarray:
        """Split-conformal p-values of novelty scores."""
        return conformal_pvalues(self.calibration_scores, scores)

    def score_threshold(self, alpha: float) -> float:
        """Smallest score whose conformal p-value is at most ``alpha`` (``inf`` when none can be)."""
        n = self.calibration_scores.size
        # p(s) <= alpha  <=>  #{calibration >= s} <= alpha * (n + 1) - 1
        allowed = int(np.floor(alpha * (n + 1) - 1 + 1e-9))
        if allowed < 0:
            return float("inf")
        if allowed >= n:
            return float("-inf")
        return float(np.nextafter(self.calibration_scores[n - allowed - 1], np.inf))

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "prototypes": self.prototypes,
            "spreads": self.spreads,
            "calibration_scores": self.calibration_scores,
        }
        if self.hidden is not None:
            arrays.update(
                hidden_mean=self.hidden.mean,
                hidden_components=self.hidden.components,
                hidden_reference=self.hidden.reference,
            )
        return arrays

    def to_metadata(self) -> dict:
        return {
            "distance_scale": self.distance_scale,
            "uncertainty_scale": self.uncertainty_scale,
            "uncertainty_weight": self.uncertainty_weight,
            "calibration_source": self.calibration_source,
            "hidden_scale": self.hidden_scale,
            "hidden_weight": self.hidden_weight,
        }

    @classmethod
    def from_saved(cls, arrays: dict[str, np.ndarray], metadata: dict) -> NoveltyReference:
        hidden = None
        if "hidden_components" in arrays:
            components = np.asarray(arrays["hidden_components"], dtype=np.float32)
            mean = np.asarray(arrays["hidden_mean"], dtype=np.float32)
            reference = np.asarray(arrays["hidden_reference"], dtype=np.float32)
            if mean.shape != components.shape[:1] or reference.shape[1:] != components.shape[1:]:
                raise ValueError("The saved novelty hidden-layer space is inconsistent; the model file is damaged.")
            hidden = HiddenSpace(mean, components, reference)
        return cls(
            prototypes=np.asarray(arrays["prototypes"], dtype=np.float32),
            spreads=np.asarray(arrays["spreads"], dtype=np.float64),
            distance_scale=float(metadata["distance_scale"]),
            uncertainty_scale=float(metadata["uncertainty_scale"]),
            uncertainty_weight=float(metadata["uncertainty_weight"]),
            calibration_scores=np.asarray(arrays["calibration_scores"], dtype=np.float64),
            calibration_source=str(metadata["calibration_source"]),
            hidden=hidden,
            hidden_scale=float(metadata.get("hidden_scale", 1.0)),
            hidden_weight=float(metadata.get("hidden_weight", 1.0)),
        )


def shrink_spreads(spreads: np.ndarray, counts: np.ndarray, prior_cells: float = _SPREAD_PRIOR_CELLS) -> np.ndarray:
    """Shrink each type's spread towards the median spread, in log space, with weight ``prior_cells``.

    A spread estimated from a handful of cells is noise: a 3-cell type can look ten times wider than the others and
    then absorb any far-away cell as "near" it, hiding novel cells. Each type's log-spread is averaged with the
    median log-spread of the types with cells, weighted by its cell count against ``prior_cells`` pseudo-cells, so
    well-populated types keep their own spread and tiny ones move towards the typical one.
    """
    present = counts > 0
    if not present.any():
        return spreads
    pooled = float(np.median(np.log(spreads[present])))
    shrunk = (counts * np.log(spreads) + prior_cells * pooled) / (counts + prior_cells)
    return np.where(present, np.exp(shrunk), spreads)
