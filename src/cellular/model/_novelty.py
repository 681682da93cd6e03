"""Per-cell novelty scores against the reference cell types, calibrated by split-conformal inference."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cellular.metrics import conformal_pvalues

# Quantile of the held-out reference cells that puts the two score components on one scale.
_SPREAD_PRIOR_CELLS = 10.0
_SCALE_QUANTILE = 0.9


def unit_rows(z: np.ndarray) -> np.ndarray:
    """Rows of ``z`` scaled to unit length (the CELLULAR loss compares cells by cosine similarity)."""
    z = np.asarray(z, dtype=np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


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
    """

    prototypes: np.ndarray
    spreads: np.ndarray
    distance_scale: float
    uncertainty_scale: float
    uncertainty_weight: float
    calibration_scores: np.ndarray
    calibration_source: str

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
    ) -> NoveltyReference:
        """Prototypes and spreads from training cells, score scales and calibration scores from held-out cells."""
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
        )
        return reference.recalibrated(z_calibration, probabilities_calibration)

    def recalibrated(self, z_calibration: np.ndarray, probabilities_calibration: np.ndarray) -> NoveltyReference:
        """A copy with score scales and conformal scores taken from these calibration cells (prototypes kept)."""
        distance, _ = self.nearest_type(z_calibration)
        uncertainty = 1.0 - probabilities_calibration.max(axis=1)
        reference = replace(
            self,
            distance_scale=max(float(np.quantile(distance, _SCALE_QUANTILE)), 1e-6),
            uncertainty_scale=max(float(np.quantile(uncertainty, _SCALE_QUANTILE)), 1e-3),
        )
        reference.calibration_scores = np.sort(reference.scores(z_calibration, probabilities_calibration))
        return reference

    def nearest_type(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spread-scaled cosine distance to the nearest prototype, and that prototype's type code."""
        scaled = (1.0 - unit_rows(z) @ self.prototypes.T) / self.spreads[None, :]
        nearest = scaled.argmin(axis=1)
        return scaled[np.arange(scaled.shape[0]), nearest], nearest

    def scores(self, z: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """Novelty score of embedded cells given their class probabilities."""
        distance, _ = self.nearest_type(z)
        return self.combine(distance, 1.0 - probabilities.max(axis=1))

    def combine(self, distance: np.ndarray, uncertainty: np.ndarray) -> np.ndarray:
        """Scaled prototype distance plus weighted uncertainty, each on its calibration scale."""
        return distance / self.distance_scale + self.uncertainty_weight * uncertainty / self.uncertainty_scale

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
        return {
            "prototypes": self.prototypes,
            "spreads": self.spreads,
            "calibration_scores": self.calibration_scores,
        }

    def to_metadata(self) -> dict:
        return {
            "distance_scale": self.distance_scale,
            "uncertainty_scale": self.uncertainty_scale,
            "uncertainty_weight": self.uncertainty_weight,
            "calibration_source": self.calibration_source,
        }

    @classmethod
    def from_saved(cls, arrays: dict[str, np.ndarray], metadata: dict) -> NoveltyReference:
        return cls(
            prototypes=np.asarray(arrays["prototypes"], dtype=np.float32),
            spreads=np.asarray(arrays["spreads"], dtype=np.float64),
            distance_scale=float(metadata["distance_scale"]),
            uncertainty_scale=float(metadata["uncertainty_scale"]),
            uncertainty_weight=float(metadata["uncertainty_weight"]),
            calibration_scores=np.asarray(arrays["calibration_scores"], dtype=np.float64),
            calibration_source=str(metadata["calibration_source"]),
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
