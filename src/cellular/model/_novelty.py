"""Per-cell novelty scores against the reference cell types, calibrated by split-conformal inference."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cellular.metrics import conformal_pvalues

from ._novelty_spaces import LinearProbe, NoveltySpaces, PCASpace, unit_rows

# Quantile of the held-out reference cells that puts the two score components on one scale.
_SPREAD_PRIOR_CELLS = 10.0
_SCALE_QUANTILE = 0.9


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
    spaces
        The encoder's first hidden layer and, optionally, its input genes, with training cells in them; the score
        then adds the mean distance to the nearest training cells in each (``None``: a model saved before).
    hidden_scale, hidden_weight, gene_scale, gene_weight
        90 % quantile of each distance on the calibration cells, and its weight in the score.
    gene_uncertainty_scale, gene_uncertainty_weight
        The same for the gene classifier's uncertainty (kept in the spaces only when its weight is positive).
    matching_gene_weight
        The gene distance's weight in the score batch moment matching leaves likely novel cells out by
        (:meth:`matching_scores`); ``None``: ``gene_weight``.
    matching_calibration_scores
        Sorted calibration scores at ``matching_gene_weight`` (``None``: ``calibration_scores``, the weights being
        equal).
    query_calibration_scores
        Sorted scores of the same calibration cells read the way a query batch is read (matched by moments
        estimated from their own cells): the conformal scores of :meth:`pvalues` when present. ``None`` for a
        model that does not match batch moments, a calibration under a query's gene panel (whose cells are read as
        a query already) and models saved before.
    """

    prototypes: np.ndarray
    spreads: np.ndarray
    distance_scale: float
    uncertainty_scale: float
    uncertainty_weight: float
    calibration_scores: np.ndarray
    calibration_source: str
    spaces: NoveltySpaces | None = None
    hidden_scale: float = 1.0
    hidden_weight: float = 1.0
    gene_scale: float = 1.0
    gene_weight: float = 0.0
    query_calibration_scores: np.ndarray | None = None
    gene_uncertainty_scale: float = 1.0
    gene_uncertainty_weight: float = 0.0
    matching_gene_weight: float | None = None
    matching_calibration_scores: np.ndarray | None = None

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
        spaces: NoveltySpaces | None = None,
        projections_calibration: np.ndarray | None = None,
        hidden_weight: float = 1.0,
        gene_weight: float = 0.0,
        gene_uncertainty_weight: float = 0.0,
        matching_gene_weight: float | None = None,
    ) -> NoveltyReference:
        """Prototypes and spreads from training cells, score scales and calibration scores from held-out cells.

        With ``spaces`` (fitted on training cells) and the calibration cells' projections into them
        (``projections_calibration``), the score adds the hidden-layer distance with weight ``hidden_weight`` and
        the input-gene distance with weight ``gene_weight`` and, when the spaces keep it, the gene classifier's
        uncertainty with weight ``gene_uncertainty_weight``. Batch moment matching scores cells with the gene
        distance at ``matching_gene_weight`` instead (``None``: ``gene_weight``).
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
            spaces=spaces,
            hidden_weight=float(hidden_weight),
            gene_weight=float(gene_weight),
            gene_uncertainty_weight=float(gene_uncertainty_weight),
            matching_gene_weight=None
            if matching_gene_weight is None or float(matching_gene_weight) == float(gene_weight)
            else float(matching_gene_weight),
        )
        return reference.recalibrated(z_calibration, probabilities_calibration, projections_calibration)

    def recalibrated(
        self, z_calibration: np.ndarray, probabilities_calibration: np.ndarray, projections_calibration=None
    ) -> NoveltyReference:
        """A copy with score scales and conformal scores taken from these calibration cells (prototypes kept)."""
        distance, _ = self.nearest_type(z_calibration)
        uncertainty = 1.0 - probabilities_calibration.max(axis=1)
        reference = replace(
            self,
            distance_scale=max(float(np.quantile(distance, _SCALE_QUANTILE)), 1e-6),
            uncertainty_scale=max(float(np.quantile(uncertainty, _SCALE_QUANTILE)), 1e-3),
            query_calibration_scores=None,
        )
        parts = self.space_distances(projections_calibration)
        # On well-separated types the held-out cells' entropies are tiny, so the gene classifier's uncertainty gets a
        # small scale and a cell it is unsure about is scored mostly by it: by design, its p-value stays conformal.
        for name, values in zip(("hidden_scale", "gene_scale", "gene_uncertainty_scale"), parts, strict=True):
            if values is not None:
                setattr(reference, name, max(float(np.quantile(values, _SCALE_QUANTILE)), 1e-12))
        reference.calibration_scores = np.sort(reference.combine(distance, uncertainty, *parts))
        if reference.matching_gene_weight is not None:
            matching = reference.combine(distance, uncertainty, *parts, gene_weight=reference.matching_gene_weight)
            reference.matching_calibration_scores = np.sort(matching)
        return reference

    def nearest_type(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spread-scaled cosine distance to the nearest prototype, and that prototype's type code."""
        scaled = (1.0 - unit_rows(z) @ self.prototypes.T) / self.spreads[None, :]
        nearest = scaled.argmin(axis=1)
        return scaled[np.arange(scaled.shape[0]), nearest], nearest

    def space_distances(
        self, projections: np.ndarray | None
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Hidden-layer and gene distances and gene-classifier uncertainties of projected cells (``None``: no part)."""
        if self.spaces is None:
            return None, None, None
        if projections is None:
            raise ValueError(
                "This model's novelty score needs the cells' projections into its hidden-layer and gene spaces; pass "
                "hidden=model.embed_query(adata).hidden."
            )
        return self.spaces.distances(projections)

    def scores(
        self,
        z: np.ndarray,
        probabilities: np.ndarray,
        projections: np.ndarray | None = None,
        gene_weight: float | None = None,
    ) -> np.ndarray:
        """Novelty score of embedded cells given their class probabilities (and projections into the spaces).

        ``gene_weight`` replaces the reference's own weight of the gene distance (``None``: keep it).
        """
        distance, _ = self.nearest_type(z)
        return self.combine(
            distance, 1.0 - probabilities.max(axis=1), *self.space_distances(projections), gene_weight=gene_weight
        )

    def matching_scores(
        self, z: np.ndarray, probabilities: np.ndarray, projections: np.ndarray | None = None
    ) -> np.ndarray:
        """The score batch moment matching reads: :meth:`scores` with the gene distance at ``matching_gene_weight``.

        Matching scores a query batch before its moments are settled, on inputs standardised by a first estimate
        that its novel cells still shift; a gene distance weighted above the matching weight lets that estimate
        pick the cells that set the final one (benchmarks page, "Novelty score parts").
        """
        return self.scores(z, probabilities, projections, gene_weight=self.matching_gene_weight)

    def combine(
        self,
        distance: np.ndarray,
        uncertainty: np.ndarray,
        hidden_distance: np.ndarray | None = None,
        gene_distance: np.ndarray | None = None,
        gene_uncertainty: np.ndarray | None = None,
        gene_weight: float | None = None,
    ) -> np.ndarray:
        """Scaled prototype distance plus the other parts (uncertainties, distances), each weighted on its scale.

        ``gene_weight`` replaces the reference's own weight of the gene distance (``None``: keep it).
        """
        score = distance / self.distance_scale + self.uncertainty_weight * uncertainty / self.uncertainty_scale
        if hidden_distance is not None:
            score = score + self.hidden_weight * hidden_distance / self.hidden_scale
        if gene_distance is not None:
            weight = self.gene_weight if gene_weight is None else gene_weight
            score = score + weight * gene_distance / self.gene_scale
        if gene_uncertainty is not None:
            score = score + self.gene_uncertainty_weight * gene_uncertainty / self.gene_uncertainty_scale
        return score

    def score_weights(self) -> dict[str, float]:
        """The weight of each part of the score (the prototype distance's is 1; 0 for a part left out)."""
        spaces = self.spaces or NoveltySpaces(None)
        return {
            "prototype_distance": 1.0,
            "uncertainty": float(self.uncertainty_weight),
            "hidden_distance": float(self.hidden_weight) if self.spaces is not None else 0.0,
            "gene_distance": float(self.gene_weight) if spaces.genes is not None else 0.0,
            "gene_uncertainty": float(self.gene_uncertainty_weight) if spaces.gene_uncertainty is not None else 0.0,
        }

    @property
    def conformal_scores(self) -> np.ndarray:
        """The calibration scores query p-values are computed against (read as a query when available)."""
        return self.calibration_scores if self.query_calibration_scores is None else self.query_calibration_scores

    def pvalues(self, scores: np.ndarray) -> np.ndarray:
        """Split-conformal p-values of a query's novelty scores."""
        return conformal_pvalues(self.conformal_scores, scores)

    def matching_pvalues(self, scores: np.ndarray) -> np.ndarray:
        """P-values of :meth:`matching_scores` against the calibration cells read with their stored batch moments.

        Batch moment matching uses these to leave likely novel cells out of a query batch's moments: stricter than
        :meth:`pvalues`, it keeps the moments of a batch that holds an unseen type closer to its known cells.
        """
        calibration = self.matching_calibration_scores
        return conformal_pvalues(self.calibration_scores if calibration is None else calibration, scores)

    def score_threshold(self, alpha: float) -> float:
        """Smallest score whose conformal p-value (:meth:`pvalues`) is at most ``alpha`` (``inf`` when none can be)."""
        calibration = self.conformal_scores
        n = calibration.size
        # p(s) <= alpha  <=>  #{calibration >= s} <= alpha * (n + 1) - 1
        allowed = int(np.floor(alpha * (n + 1) - 1 + 1e-9))
        if allowed < 0:
            return float("inf")
        if allowed >= n:
            return float("-inf")
        return float(np.nextafter(calibration[n - allowed - 1], np.inf))

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "prototypes": self.prototypes,
            "spreads": self.spreads,
            "calibration_scores": self.calibration_scores,
        }
        if self.query_calibration_scores is not None:
            arrays["query_calibration_scores"] = self.query_calibration_scores
        if self.matching_calibration_scores is not None:
            arrays["matching_calibration_scores"] = self.matching_calibration_scores
        if self.spaces is not None:
            arrays.update(self.spaces.hidden.to_arrays("hidden"))
            if self.spaces.genes is not None:
                arrays.update(self.spaces.genes.to_arrays("gene"))
            if self.spaces.gene_uncertainty is not None:
                arrays.update(self.spaces.gene_uncertainty.to_arrays("gene_uncertainty"))
        return arrays

    def to_metadata(self) -> dict:
        return {
            "distance_scale": self.distance_scale,
            "uncertainty_scale": self.uncertainty_scale,
            "uncertainty_weight": self.uncertainty_weight,
            "calibration_source": self.calibration_source,
            "hidden_scale": self.hidden_scale,
            "hidden_weight": self.hidden_weight,
            "gene_scale": self.gene_scale,
            "gene_weight": self.gene_weight,
            "gene_uncertainty_scale": self.gene_uncertainty_scale,
            "gene_uncertainty_weight": self.gene_uncertainty_weight,
            "matching_gene_weight": self.matching_gene_weight,
        }

    @classmethod
    def from_saved(cls, arrays: dict[str, np.ndarray], metadata: dict, n_genes: int | None = None) -> NoveltyReference:
        """The reference :meth:`to_arrays` and :meth:`to_metadata` saved; a gene space must span ``n_genes``."""
        hidden = PCASpace.from_arrays(arrays, "hidden", unit_length=True)
        genes = PCASpace.from_arrays(arrays, "gene", unit_length=False, n_features=n_genes)
        probe = LinearProbe.from_arrays(arrays, "gene_uncertainty", n_features=n_genes)
        if (genes is not None or probe is not None) and hidden is None:
            part = "gene space" if genes is not None else "gene_uncertainty probe"
            raise ValueError(f"The saved novelty {part} is inconsistent; the model file is damaged.")
        calibration = np.asarray(arrays["calibration_scores"], dtype=np.float64)
        query_calibration = arrays.get("query_calibration_scores")
        if query_calibration is not None:
            query_calibration = np.asarray(query_calibration, dtype=np.float64)
            if query_calibration.shape != calibration.shape:
                raise ValueError("The saved novelty calibration scores are inconsistent; the model file is damaged.")
        matching_weight = metadata.get("matching_gene_weight")
        matching_calibration = arrays.get("matching_calibration_scores")
        if (matching_weight is None) != (matching_calibration is None) or (
            matching_calibration is not None and np.shape(matching_calibration) != calibration.shape
        ):
            raise ValueError("The saved novelty matching scores are inconsistent; the model file is damaged.")
        return cls(
            prototypes=np.asarray(arrays["prototypes"], dtype=np.float32),
            spreads=np.asarray(arrays["spreads"], dtype=np.float64),
            distance_scale=float(metadata["distance_scale"]),
            uncertainty_scale=float(metadata["uncertainty_scale"]),
            uncertainty_weight=float(metadata["uncertainty_weight"]),
            calibration_scores=calibration,
            calibration_source=str(metadata["calibration_source"]),
            spaces=None if hidden is None else NoveltySpaces(hidden, genes, probe),
            hidden_scale=float(metadata.get("hidden_scale", 1.0)),
            hidden_weight=float(metadata.get("hidden_weight", 1.0)),
            gene_scale=float(metadata.get("gene_scale", 1.0)),
            gene_weight=float(metadata.get("gene_weight", 0.0)) if genes is not None else 0.0,
            query_calibration_scores=query_calibration,
            gene_uncertainty_scale=float(metadata.get("gene_uncertainty_scale", 1.0)),
            gene_uncertainty_weight=float(metadata.get("gene_uncertainty_weight", 0.0)) if probe is not None else 0.0,
            matching_gene_weight=None if matching_weight is None else float(matching_weight),
            matching_calibration_scores=None
            if matching_calibration is None
            else np.asarray(matching_calibration, dtype=np.float64),
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
