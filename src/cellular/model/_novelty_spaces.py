"""Where the novelty score measures distances besides the embedding.

PCA spaces of the encoder's first hidden layer and of its input genes, and the gene classifier's uncertainty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cellular.index import exact_knn
from cellular.nn import logit_entropy

# The hidden-layer and gene parts of the score: PCA components kept, training cells compared against, neighbours
# averaged.
HIDDEN_COMPONENTS = 50
MAX_HIDDEN_REFERENCE_CELLS = 20_000
HIDDEN_NEIGHBORS = 15
# Standardised genes are clipped here, as sc.pp.scale(max_value=10) does before a PCA.
STANDARDIZED_CLIP = 10.0


def unit_rows(z: np.ndarray) -> np.ndarray:
    """Rows of ``z`` scaled to unit length (the CELLULAR loss compares cells by cosine similarity)."""
    z = np.asarray(z, dtype=np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


@dataclass
class PCASpace:
    """Cells reduced by PCA, with a sample of training cells to measure distances to.

    Attributes
    ----------
    mean, components
        PCA of training cells: ``(n_features,)`` and ``(n_features, n_components)``.
    reference
        ``(n_cells, n_components)`` projections of up to :data:`MAX_HIDDEN_REFERENCE_CELLS` training cells.
    unit_length
        Whether projections are scaled to unit length (directions compared, as in the hidden layer) or kept as they
        are (expression levels compared, as in the input genes).
    scale
        ``(n_features,)`` standard deviation of each feature on the training cells when features are standardised
        before the PCA (clipped at :data:`STANDARDIZED_CLIP`, as ``sc.pp.scale`` does), so lowly expressed marker
        genes weigh as much as highly expressed ones; ``None``: features read as they are.
    radius
        ``(n_cells,)`` mean distance of each reference cell to its nearest other reference cells. With it,
        :meth:`distances` are relative to the local density of the reference (1: as close as the reference cells
        are to each other there); ``None``: plain distances.
    type_scale
        ``(n_cells,)`` divides the distance of a cell whose nearest reference cell is this one: for a cell of a type
        with fewer reference cells than neighbours averaged, how much farther its type's cells lie from their
        neighbours than the typical type's do (the ratio of medians, at least 1); 1 for every other cell. A type of
        a few cells has few of its own among any cell's neighbours, so its query cells would read as novel;
        ``None``: no scaling.
    """

    mean: np.ndarray
    components: np.ndarray
    reference: np.ndarray
    unit_length: bool = True
    scale: np.ndarray | None = None
    radius: np.ndarray | None = None
    type_scale: np.ndarray | None = None

    @classmethod
    def fit(
        cls,
        values: np.ndarray,
        seed: int,
        unit_length: bool,
        *,
        standardize: bool = False,
        relative: bool = False,
        labels: np.ndarray | None = None,
        n_components: int = HIDDEN_COMPONENTS,
    ) -> PCASpace:
        """PCA of training cells' values (a sample of them when there are many).

        ``standardize`` scales features to unit variance first; ``relative`` makes :meth:`distances` relative to
        the reference cells' own neighbour distances; ``labels`` (the cells' type codes) sets :attr:`type_scale`.
        """
        rng = np.random.default_rng(seed)
        if values.shape[0] > MAX_HIDDEN_REFERENCE_CELLS:
            kept = np.sort(rng.choice(values.shape[0], MAX_HIDDEN_REFERENCE_CELLS, replace=False))
            values = values[kept]
            labels = None if labels is None else np.asarray(labels)[kept]
        values = np.asarray(values, dtype=np.float32)
        mean = values.mean(axis=0)
        scale = None
        if standardize:
            scale = values.std(axis=0)
            scale[scale == 0] = 1.0
        n_components = max(1, min(n_components, values.shape[0] - 1, values.shape[1]))
        space = cls(mean, np.zeros((values.shape[1], 0), np.float32), np.zeros((0, 0), np.float32), unit_length, scale)
        centered = space._centered(values)
        # The randomized solver draws from torch's global generator: seed a private copy of it, so the same seed
        # gives the same space whatever ran before in the process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, _, right = torch.pca_lowrank(torch.from_numpy(centered), q=n_components, center=False, niter=4)
        space.components = right.numpy().astype(np.float32)
        space.reference = space._projected(centered)
        if relative:  # each reference cell's own row comes first among its neighbours: leave it out
            _, distances = space._nearest(space.reference, HIDDEN_NEIGHBORS + 1)
            space.radius = np.maximum(distances[:, 1:].mean(axis=1), 1e-6).astype(np.float32)
        if labels is not None:
            space.type_scale = space._small_type_scale(np.asarray(labels, dtype=np.int64))
        return space

    def _small_type_scale(self, labels: np.ndarray) -> np.ndarray:
        """:attr:`type_scale` of the reference cells, whose type codes are ``labels``."""
        sizes = np.bincount(labels)
        _, distances = self._nearest(self.reference, HIDDEN_NEIGHBORS + 1)
        own = distances[:, 1:].mean(axis=1)  # each cell's own row comes first among its neighbours
        order = np.argsort(labels, kind="stable")
        groups = np.split(own[order], np.cumsum(sizes)[:-1])
        spreads = np.array([np.median(group) if group.size else np.nan for group in groups])
        ratio = np.maximum(spreads / max(float(np.nanmedian(spreads)), 1e-12), 1.0)
        small = (sizes > 0) & (sizes < HIDDEN_NEIGHBORS)
        return np.where(small, ratio, 1.0)[labels].astype(np.float32)

    def _centered(self, values: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        centered = np.asarray(values, dtype=np.float32) - self.mean
        if self.scale is not None:  # in place: a query's chunk of genes is the largest array here
            centered /= self.scale
            np.clip(centered, -STANDARDIZED_CLIP, STANDARDIZED_CLIP, out=centered)
        if present is not None and not present.all():
            centered[:, ~present] = 0.0
        return centered

    def _projected(self, centered: np.ndarray) -> np.ndarray:
        projected = centered @ self.components
        return unit_rows(projected) if self.unit_length else projected

    def project(self, values: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """Projections of cells; features not ``present`` in the data are read at the training mean."""
        return self._projected(self._centered(values, present))

    def _nearest(self, projected: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of and distances to the ``k`` nearest reference cells of projected cells."""
        reference = torch.from_numpy(np.ascontiguousarray(self.reference))
        k = min(k, self.reference.shape[0])
        return exact_knn(reference, np.ascontiguousarray(projected, dtype=np.float32), k, metric="euclidean")

    def distances(self, projected: np.ndarray, k: int = HIDDEN_NEIGHBORS) -> np.ndarray:
        """Mean distance of projected cells to their ``k`` nearest reference cells.

        Relative to those cells' own neighbour distances when the space has a :attr:`radius`; divided by the
        nearest reference cell's :attr:`type_scale` when the space has one.
        """
        indices, distances = self._nearest(projected, k)
        mean = distances.mean(axis=1).astype(np.float64)
        if self.type_scale is not None and indices.shape[0]:
            mean = mean / self.type_scale[indices[:, 0]]
        return mean if self.radius is None else mean / self.radius[indices].mean(axis=1)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {
            f"{prefix}_mean": self.mean,
            f"{prefix}_components": self.components,
            f"{prefix}_reference": self.reference,
        }
        if self.scale is not None:
            arrays[f"{prefix}_scale"] = self.scale
        if self.radius is not None:
            arrays[f"{prefix}_radius"] = self.radius
        if self.type_scale is not None:
            arrays[f"{prefix}_type_scale"] = self.type_scale
        return arrays

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], prefix: str, unit_length: bool, n_features: int | None = None
    ) -> PCASpace | None:
        """The space saved under ``prefix`` (``None`` when absent), checked against ``n_features`` when given."""
        if f"{prefix}_components" not in arrays:
            return None
        components = np.asarray(arrays[f"{prefix}_components"], dtype=np.float32)
        mean = np.asarray(arrays[f"{prefix}_mean"], dtype=np.float32)
        reference = np.asarray(arrays[f"{prefix}_reference"], dtype=np.float32)
        scale, radius, type_scale = (arrays.get(f"{prefix}_{name}") for name in ("scale", "radius", "type_scale"))
        scale = None if scale is None else np.asarray(scale, dtype=np.float32)
        radius = None if radius is None else np.asarray(radius, dtype=np.float32)
        type_scale = None if type_scale is None else np.asarray(type_scale, dtype=np.float32)
        fits = n_features is None or mean.shape == (n_features,)
        fits &= mean.shape == components.shape[:1] and reference.shape[1:] == components.shape[1:]
        fits &= scale is None or (scale.shape == mean.shape and bool(np.all(scale > 0)))
        fits &= radius is None or (radius.shape == reference.shape[:1] and bool(np.all(radius > 0)))
        fits &= type_scale is None or (
            type_scale.shape == reference.shape[:1] and bool(np.all(np.isfinite(type_scale) & (type_scale >= 1)))
        )
        if not fits:
            raise ValueError(f"The saved novelty {prefix} space is inconsistent; the model file is damaged.")
        return cls(mean, components, reference, unit_length, scale, radius, type_scale)


@dataclass
class LinearProbe:
    """The uncertainty of a linear classifier on the encoder's inputs: the entropy of its probabilities.

    A copy of the gene classifier kept with the novelty score, so that every path that projects cells into the
    novelty spaces (queries, calibration cells, a query's gene panel) also gets this part.

    Attributes
    ----------
    mean
        ``(n_genes,)`` training mean of the inputs; genes a query does not measure are read there.
    weight, bias
        ``(n_types, n_genes)`` and ``(n_types,)``: logits are ``(x - mean) @ weight.T + bias``.
    temperature
        Divides the logits before the softmax (1 for the gene classifier's probe: see
        :meth:`~cellular.model.CELLULAR.gene_classifier_probe`).
    """

    mean: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    temperature: float

    def uncertainty(self, inputs: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """Entropy (nats, at least :data:`cellular.nn.MIN_ENTROPY`) of the probabilities; absent genes at the mean."""
        centered = np.asarray(inputs, dtype=np.float32) - self.mean
        if present is not None and not present.all():
            centered[:, ~present] = 0.0
        return logit_entropy((centered @ self.weight.T + self.bias).astype(np.float64) / self.temperature)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}_mean": self.mean,
            f"{prefix}_weight": self.weight,
            f"{prefix}_bias": self.bias,
            f"{prefix}_temperature": np.asarray([self.temperature], dtype=np.float32),
        }

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], prefix: str, n_features: int | None = None
    ) -> LinearProbe | None:
        """The probe saved under ``prefix`` (``None`` when absent), checked against ``n_features`` when given."""
        names = ("mean", "weight", "bias", "temperature")
        present = [f"{prefix}_{name}" in arrays for name in names]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(f"The saved novelty {prefix} probe is inconsistent; the model file is damaged.")
        mean, weight, bias, temperature = (np.asarray(arrays[f"{prefix}_{name}"], dtype=np.float32) for name in names)
        fits = n_features is None or mean.shape == (n_features,)
        fits &= weight.ndim == 2 and weight.shape[1:] == mean.shape and bias.shape == weight.shape[:1]
        fits &= temperature.shape == (1,) and bool(np.isfinite(temperature).all() and temperature[0] > 0)
        fits &= bool(np.isfinite(weight).all() and np.isfinite(bias).all() and np.isfinite(mean).all())
        if not fits:
            raise ValueError(f"The saved novelty {prefix} probe is inconsistent; the model file is damaged.")
        return cls(mean, weight, bias, float(temperature[0]))


@dataclass
class NoveltySpaces:
    """Where the novelty score measures distances to training cells besides the embedding.

    Attributes
    ----------
    hidden
        The encoder's first hidden layer (unit-length PCA projections): keeps differences the contrastive embedding
        collapses.
    genes
        The encoder's input (log-normalised, batch-matched expression; PCA projections at their scale), or ``None``:
        keeps differences the encoder's weights discard, e.g. between stages of a differentiation trajectory.
    gene_uncertainty
        The gene classifier's uncertainty on the encoder's input, or ``None``: marks cells a linear model on the
        genes cannot place among the known types, e.g. a cell line between two others.
    """

    hidden: PCASpace
    genes: PCASpace | None = None
    gene_uncertainty: LinearProbe | None = None

    @property
    def reads_inputs(self) -> bool:
        """Whether :meth:`project` needs the encoder's inputs (a gene space or the gene classifier's uncertainty)."""
        return self.genes is not None or self.gene_uncertainty is not None

    def project(
        self, inputs: np.ndarray | None, activations: np.ndarray, present: np.ndarray | None = None
    ) -> np.ndarray:
        """One row per cell: hidden-layer projection, input projection and gene-classifier uncertainty (if kept)."""
        parts = [self.hidden.project(activations)]
        if self.genes is not None:
            parts.append(self.genes.project(inputs, present))
        if self.gene_uncertainty is not None:
            parts.append(self.gene_uncertainty.uncertainty(inputs, present)[:, None].astype(np.float32))
        return np.hstack(parts) if len(parts) > 1 else parts[0]

    def distances(self, projections: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Hidden-layer distances, input distances and gene-classifier uncertainties of :meth:`project` rows.

        ``None`` for a part the spaces do not keep.
        """
        n_hidden = self.hidden.components.shape[1]
        n_genes = 0 if self.genes is None else self.genes.components.shape[1]
        width = n_hidden + n_genes + (0 if self.gene_uncertainty is None else 1)
        if projections.ndim != 2 or projections.shape[1] != width:
            raise ValueError(
                f"The novelty projections have {projections.shape[1:]} columns where this model's spaces have {width}: "
                "they come from another model. Pass hidden=model.embed_query(adata).hidden from this model."
            )
        hidden = self.hidden.distances(projections[:, :n_hidden])
        genes = None if self.genes is None else self.genes.distances(projections[:, n_hidden : n_hidden + n_genes])
        uncertainty = None if self.gene_uncertainty is None else projections[:, -1].astype(np.float64)
        return hidden, genes, uncertainty
