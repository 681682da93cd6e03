"""A searchable reference atlas: embedding, labels and a kNN index, saved without pickle."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from cellular.data import check_finite_embedding
from cellular.metrics import conformal_pvalues

from . import _faiss, _nndescent
from ._calibration import (
    _CALIBRATION_NEIGHBORS,
    MIN_HELD_OUT_CALIBRATION_CELLS,
    ReferenceCalibrationMixin,
    drop_rows,
    unit_rows,
)
from ._exact import exact_knn, neighbor_distances
from ._inputs import as_embedding, cell_names_index, label_keys_of, label_levels
from ._options import BACKENDS, METRICS, REFERENCE_CELLS, resolve_device
from ._reference_io import ReferenceIndexIOMixin
from ._transfer import ClassEvidence, calibrate_votes, neighbor_weights, vote

logger = logging.getLogger(__name__)

EXACT_CPU_MAX_CELLS = 20_000
"""Below this many reference cells, ``backend="auto"`` searches exactly on CPU too: faster than building a graph."""

EXACT_SEARCH_BUDGET = 3e9
"""A pynndescent index answers a query of ``n`` cells exactly when ``n`` x reference cells is at most this. Exact
search on two CPU cores runs about 1.8e8 cell pairs a second, and numba compiles pynndescent's search for about 30 s
in every new process (its kernels are closures, which numba cannot cache on disk; measured by
``benchmarks/map_speed.py --startup``): below this budget the exact answer comes sooner, and it is exact."""


@dataclass
class LabelTransfer:
    """Result of :meth:`ReferenceIndex.transfer_labels` for ``n`` query cells and ``k`` neighbours.

    Attributes
    ----------
    indices, distances
        ``(n, k)`` reference neighbours (row numbers of the reference) and distances to them, nearest first.
    labels
        Per label level: categorical transferred labels (the level's classes plus the unknown label).
    probabilities
        Per level: ``(n, n_classes)`` weighted vote shares, columns as in ``classes``.
    classes
        Per level: the reference classes, in probability-column order.
    uncertainty
        Per level: ``1 -`` the largest vote share.
    mean_distance
        Mean distance to the ``k`` neighbours.
    distance_pvalue
        Conformal p-value of ``mean_distance`` against reference cells' own distances to the rest of the
        reference: small values mean the cell lies farther from the reference than reference cells do.
    """

    indices: np.ndarray
    distances: np.ndarray
    labels: dict[str, pd.Categorical] = field(default_factory=dict)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)
    mean_distance: np.ndarray | None = None
    distance_pvalue: np.ndarray | None = None


class ReferenceIndex(ReferenceCalibrationMixin, ReferenceIndexIOMixin):
    """A reference atlas ready for mapping: its embedding, one or more label levels, and a nearest-neighbour index.

    Build one from a trained model and the reference AnnData with :meth:`build` (or
    :meth:`cellular.CELLULAR.build_reference_index`), or from an embedding made elsewhere with
    :meth:`from_embedding`. Query cells embedded by the same model are then mapped with :meth:`query` (neighbours)
    and :meth:`transfer_labels`, or through :func:`cellular.tl.cellular_map`.

    Backends: ``"pynndescent"`` (approximate NN-descent graph search on CPU), ``"exact"`` (chunked torch
    similarity products and top-k on any device) and ``"auto"``: exact on CUDA and for references of at most
    ``EXACT_CPU_MAX_CELLS`` (20,000) cells, pynndescent otherwise.

    Parameters
    ----------
    embedding
        ``(n_cells, n_latent)`` reference embedding.
    labels
        Label levels (e.g. ``{"cell_type": ..., "lineage": ...}``), each one value per reference cell; values equal
        to ``unlabeled_category`` or missing do not vote.
    cell_names
        Names of the reference cells; ``"0" .. "n-1"`` when ``None``.
    metric
        ``"cosine"`` (the geometry the CELLULAR loss trains; distance ``1 - cos``) or ``"euclidean"``.
    backend
        ``"auto"``, ``"pynndescent"``, ``"exact"`` or ``"faiss"`` (an HNSW graph from FAISS, compiled ahead of time,
        so a new process searches without pynndescent's ~30 s compilation; ``pip install "cellular-sc[faiss]"``).
    device
        Torch device of the exact search (``"cpu"``, ``"cuda"``, ...); CUDA when available if ``None``.
    n_neighbors
        Degree of the pynndescent graph.
    search_epsilon
        pynndescent search breadth: larger is slower and more accurate (0.1 gives recall@15 near 0.95 at one
        million cells, see the benchmarks page).
    parallel_search
        Answer pynndescent queries on all cores (about twice as fast on two cores). Off by default: pynndescent's
        parallel search shares a random state between threads, so a few cells' neighbours can change from one
        call to the next; the serial search returns identical results for identical queries.
    temperature
        Width of the distance kernel of the label vote (``exp(-distance / temperature)``); when ``None``, the
        median distance of reference cells to their 15th neighbour.
    unlabeled_category
        Label value that marks reference cells without a label.
    seed
        Random state of the pynndescent graph and of the calibration sample.
    model_fingerprint
        Fingerprint of the model that made ``embedding`` (set by :meth:`build`): mapping with another model is
        refused.
    calibration_embedding
        Embedding of held-out cells of known types, made the way a query is embedded (for a model: read as a new
        batch, by the encoder that did not train on them): the distance p-values of :meth:`transfer_labels` are
        calibrated on their mean distances to their nearest reference cells, each skipping its nearest reference
        cell of the same name (``calibration_cell_names``): its own copy when it is in the reference too. Kept with
        the index, so any ``k`` is calibrated. At least :data:`MIN_HELD_OUT_CALIBRATION_CELLS` (20) cells. When
        ``None``, a sample of reference cells' distances to the rest of the reference: these cells trained the
        encoder and were read with their own batch's moments, so a query from another batch lies farther away and
        too many of its known cells get small p-values (:meth:`build` passes the model's held-out cells).
    calibration_cell_names
        Names of the ``calibration_embedding`` cells (to skip themselves in the reference).

    Attributes
    ----------
    calibration_source
        What the distance p-values are calibrated on: ``"held-out cells read as a query"`` or ``"reference cells"``.
    """

    def __init__(
        self,
        embedding: np.ndarray,
        labels: Mapping[str, Sequence] | pd.DataFrame | None = None,
        cell_names: Sequence[str] | None = None,
        *,
        metric: str = "cosine",
        backend: str = "auto",
        device: str | torch.device | None = None,
        n_neighbors: int = 30,
        search_epsilon: float = 0.1,
        parallel_search: bool = False,
        temperature: float | None = None,
        unlabeled_category: str = "Unknown",
        seed: int = 0,
        model_fingerprint: str | None = None,
        calibration_embedding: np.ndarray | None = None,
        calibration_cell_names: Sequence[str] | None = None,
        _graph: tuple[np.ndarray, np.ndarray] | None = None,
        _faiss_index: np.ndarray | None = None,
        _calibration: np.ndarray | None = None,
    ):
        embedding = as_embedding(embedding, "embedding")
        n_cells = embedding.shape[0]
        if n_cells < 2:
            raise ValueError(f"A reference index needs at least two cells, got {n_cells}.")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if n_neighbors < 2:
            raise ValueError(f"n_neighbors must be at least 2, got {n_neighbors}.")
        if search_epsilon < 0:
            raise ValueError(f"search_epsilon must be non-negative, got {search_epsilon}.")
        if metric == "cosine" and not (np.linalg.norm(embedding, axis=1) > 0).all():
            raise ValueError("The embedding has all-zero rows, which have no direction for the cosine metric.")
        self.embedding = embedding
        self.cell_names = cell_names_index(cell_names, n_cells)
        self.unlabeled_category = unlabeled_category
        self.labels = label_levels(labels, n_cells, unlabeled_category)
        self.metric = metric
        self.device = resolve_device(device)
        if backend == "auto":
            backend = "exact" if self.device.type == "cuda" or n_cells <= EXACT_CPU_MAX_CELLS else "pynndescent"
        self.backend = backend
        self.n_neighbors = int(min(n_neighbors, n_cells - 1))
        self.search_epsilon = float(search_epsilon)
        self.parallel_search = bool(parallel_search)
        self.seed = int(seed)
        self.model_fingerprint = model_fingerprint
        self._graph = _graph
        self._faiss_index = _faiss_index
        self._searcher = None
        self._reference_tensor = None
        self._prepare_search()
        self._calibration_embedding, self._calibration_cell_names = None, None
        self.calibration_source = REFERENCE_CELLS
        if calibration_embedding is not None:
            self._set_calibration_cells(calibration_embedding, calibration_cell_names)
        self._calibration = _calibration if _calibration is not None else self._calibration_for(_CALIBRATION_NEIGHBORS)
        self.temperature = float(temperature) if temperature is not None else self._default_temperature()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")

    # ------------------------------------------------------------ construction
    @classmethod
    def from_embedding(
        cls,
        embedding: np.ndarray,
        labels: Mapping[str, Sequence] | pd.DataFrame | None = None,
        cell_names: Sequence[str] | None = None,
        **kwargs,
    ) -> ReferenceIndex:
        """An index over a precomputed embedding (an atlas embedded elsewhere, a benchmark).

        Parameters
        ----------
        embedding
            ``(n_cells, n_latent)`` reference embedding.
        labels
            Label levels, one value per cell (a mapping of name to values, or a DataFrame).
        cell_names
            Names of the reference cells.
        **kwargs
            Options of :class:`ReferenceIndex` (``metric``, ``backend``, ``device``, ``n_neighbors``, ...).
        """
        return cls(embedding, labels, cell_names, **kwargs)

    @classmethod
    def build(
        cls,
        model,
        adata_ref,
        label_keys: Sequence[str] | str | None = None,
        *,
        use_rep: str | None = None,
        batch_size: int = 4096,
        layer: str | None = None,
        log_normalized: bool | None = None,
        gene_id_key: str | None = None,
        min_gene_overlap: float = 0.5,
        temperature: float | None = None,
        progress_bar: bool = False,
        **kwargs,
    ) -> ReferenceIndex:
        """Embed a reference AnnData with a trained model and index it.

        Parameters
        ----------
        model
            A trained :class:`~cellular.CELLULAR` model.
        adata_ref
            The reference cells (not modified).
        label_keys
            Columns of ``adata_ref.obs`` to transfer (one or more label levels); the model's ``labels_key`` when
            ``None`` and present in ``adata_ref.obs``.
        use_rep
            Key of ``adata_ref.obsm`` already holding this model's embedding of ``adata_ref``; embedded now when
            ``None``.
        batch_size, layer, log_normalized, gene_id_key, min_gene_overlap
            How to read and embed ``adata_ref``, as in :meth:`~cellular.CELLULAR.get_latent_representation`
            (``layer=None`` means the layer used in training).
        temperature
            Kernel width of the label vote; the model's learned temperature when ``None`` and ``metric="cosine"``,
            so the vote weights neighbours as the CELLULAR loss does.
        progress_bar
            Show a progress bar while embedding the reference (on stderr).
        **kwargs
            Options of :class:`ReferenceIndex` (``metric``, ``backend``, ``device``, ``n_neighbors``, ``seed``, ...).
            Unless ``calibration_embedding`` is among them, the distance p-values are calibrated on the model's
            held-out reference cells embedded as a query (:meth:`~cellular.CELLULAR.embed_calibration_cells`), when
            it keeps at least 20 cells held out of encoder training and ``adata_ref`` holds them all.
        """
        model.require_trained()
        label_keys = label_keys_of(label_keys, adata_ref, model.setup_args["labels_key"])
        labels = {key: adata_ref.obs[key].to_numpy() for key in label_keys}
        if use_rep is not None:
            if use_rep not in adata_ref.obsm:
                raise KeyError(f"use_rep={use_rep!r} is not in adata_ref.obsm (keys: {list(adata_ref.obsm.keys())}).")
            embedding = check_finite_embedding(
                adata_ref.obsm[use_rep], f"adata_ref.obsm[{use_rep!r}]", "Recompute it, or pass use_rep=None."
            )
            if embedding.shape != (adata_ref.n_obs, model.n_latent):
                raise ValueError(
                    f"adata_ref.obsm[{use_rep!r}] has shape {embedding.shape}, but the model embeds into "
                    f"{model.n_latent} dimensions; pass use_rep=None to embed the reference now."
                )
        else:
            embedding = model.get_latent_representation(
                adata_ref,
                batch_size=batch_size,
                layer=model.setup_args["layer"] if layer is None else layer,
                log_normalized=log_normalized,
                gene_id_key=gene_id_key,
                min_gene_overlap=min_gene_overlap,
                progress_bar=progress_bar,
            )
        if temperature is None and kwargs.get("metric", "cosine") == "cosine":
            temperature = float(model.module.temperature.detach())
        if "calibration_embedding" not in kwargs:
            held_out = model.embed_calibration_cells()
            # Only cells held out of this reference calibrate it: an index of other cells keeps its own calibration.
            if (
                held_out is not None
                and len(held_out[0]) >= MIN_HELD_OUT_CALIBRATION_CELLS
                and np.isin(held_out[0], np.asarray(adata_ref.obs_names, dtype=str)).all()
            ):
                kwargs["calibration_cell_names"], kwargs["calibration_embedding"] = held_out
        return cls(
            embedding,
            labels,
            adata_ref.obs_names,
            temperature=temperature,
            model_fingerprint=model.fingerprint,
            **kwargs,
        )

    # ------------------------------------------------------------- properties
    @property
    def n_cells(self) -> int:
        """Number of reference cells."""
        return self.embedding.shape[0]

    @property
    def n_latent(self) -> int:
        """Embedding dimension."""
        return self.embedding.shape[1]

    @property
    def label_levels(self) -> list[str]:
        """Names of the label levels."""
        return list(self.labels)

    def __repr__(self) -> str:
        levels = ", ".join(f"{name} ({len(values.categories)} classes)" for name, values in self.labels.items())
        return (
            f"ReferenceIndex: {self.n_cells} cells x {self.n_latent} dims, {self.metric} metric, {self.backend} "
            f"backend on {self.device}; labels: {levels or 'none'}."
        )

    # ------------------------------------------------------------------ search
    def _search_data(self) -> np.ndarray:
        if self.metric == "cosine":
            return unit_rows(self.embedding)
        return self.embedding

    def _prepare_search(self) -> None:
        data = np.ascontiguousarray(self._search_data())
        self._reference_tensor = torch.from_numpy(data).to(self.device)
        if self.backend == "pynndescent":
            if self._graph is None:
                logger.info("Building the pynndescent graph of %d reference cells.", self.n_cells)
                self._graph = _nndescent.build_graph(data, self.n_neighbors, self.seed)
        elif self.backend == "faiss":
            if self._faiss_index is None:
                logger.info("Building the FAISS HNSW index of %d reference cells.", self.n_cells)
                self._faiss_index = _faiss.build(data, self.n_neighbors)
            self._searcher = _faiss.searcher(self._faiss_index, self.n_cells, data.shape[1])

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        approximate = self.backend == "faiss" or (
            self.backend == "pynndescent" and queries.shape[0] * self.n_cells > EXACT_SEARCH_BUDGET
        )
        if approximate:
            if self.backend == "faiss":
                indices = _faiss.search(self._searcher, queries, k)
                incomplete = (indices < 0).any(axis=1)
                if incomplete.any():  # HNSW found fewer than k neighbours: those rows are searched exactly
                    exact, _ = exact_knn(self._reference_tensor, queries[incomplete], k, metric="euclidean")
                    indices[incomplete] = exact
            else:
                if self._searcher is None:  # compiled on first use, not on load: small queries never need it
                    data = self._reference_tensor.cpu().numpy()
                    self._searcher = _nndescent.searcher_from_graph(data, *self._graph, self.seed, self.parallel_search)
                indices = _nndescent.search(self._searcher, queries, k, self.search_epsilon)
            # Distances recomputed in torch: pynndescent's fastmath kernels can differ in the last bit between two
            # copies of the same data, and this way both backends share one formula.
            distances = neighbor_distances(self._reference_tensor, queries, indices, metric=self.metric)
            order = np.argsort(distances, axis=1, kind="stable")
            return np.take_along_axis(indices, order, axis=1), np.take_along_axis(distances, order, axis=1)
        return exact_knn(self._reference_tensor, queries, k, metric=self.metric)

    def query(self, embedding: np.ndarray, k: int = 15) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest reference cells of each query cell.

        Parameters
        ----------
        embedding
            ``(n_query, n_latent)`` query embedding, made by the model that embedded the reference.
        k
            Neighbours per cell.

        Returns
        -------
        ``(indices, distances)``: ``(n_query, k)`` reference row numbers (int64) and distances (float32; ``1 - cos``
        for the cosine metric), nearest first.
        """
        queries = self._check_queries(embedding)
        k = self._check_k(k)
        if queries.shape[0] == 0:
            return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
        if self.metric == "cosine":
            queries = unit_rows(queries)
        return self._search(queries, k)

    def _check_queries(self, embedding, what: str = "query embedding") -> np.ndarray:
        queries = as_embedding(embedding, what)
        if queries.shape[1] != self.n_latent:
            raise ValueError(
                f"The {what} has {queries.shape[1]} dimensions but the reference has {self.n_latent}; "
                "embed those cells with the model that embedded the reference."
            )
        if self.metric == "cosine" and not (np.linalg.norm(queries, axis=1) > 0).all():
            raise ValueError(f"The {what} has all-zero rows, which have no direction for the cosine metric.")
        return queries

    def _check_k(self, k: int) -> int:
        if not 1 <= int(k) <= self.n_cells:
            raise ValueError(f"k must lie between 1 and the number of reference cells ({self.n_cells}), got {k}.")
        return int(k)

    # --------------------------------------------------------- label transfer
    def transfer_labels(
        self,
        embedding: np.ndarray,
        *,
        k: int = 15,
        levels: Sequence[str] | None = None,
        weighting: str = "distance",
        temperature: float | None = None,
        min_probability: float = 0.5,
        unknown_label: str = "Unknown",
        exclude_rows: np.ndarray | None = None,
        vote_temperatures: dict[str, float] | None = None,
        evidence: Mapping[str, ClassEvidence] | None = None,
        distance_calibration: np.ndarray | None = None,
    ) -> LabelTransfer:
        """Transfer reference labels to query cells by a distance-weighted vote of their ``k`` neighbours.

        Parameters
        ----------
        embedding
            ``(n_query, n_latent)`` query embedding.
        k
            Neighbours that vote.
        levels
            Label levels to transfer; all when ``None``.
        weighting
            ``"distance"`` (weights ``exp(-distance / temperature)``) or ``"uniform"``.
        temperature
            Kernel width; the index's ``temperature`` when ``None``.
        min_probability
            Cells whose largest vote share is below this value get ``unknown_label``.
        unknown_label
            Label of unassigned cells; must not be a reference class.
        exclude_rows
            For query cells that are themselves reference cells (e.g. held-out cells for calibration): each cell's
            reference row, left out of its own neighbours.
        vote_temperatures
            Per level, a temperature that turns the vote shares into calibrated probabilities
            (:func:`~cellular.index.calibrate_votes`); the shares are used as they are for other levels.
        evidence
            Per level, probabilities from a second source averaged with the (calibrated) vote shares before labels
            are assigned (:class:`~cellular.index.ClassEvidence`); :func:`cellular.tl.cellular_map` passes the
            model's gene classifier here.
        distance_calibration
            Mean distances to their ``k`` nearest reference cells of held-out cells of known types, read the way
            these query cells were (e.g. under the query's gene panel): the distance p-values' calibration; the
            index's own (:meth:`reference_mean_distances`) when ``None``.

        Returns
        -------
        The neighbours, per-level labels, vote shares (or calibrated probabilities) and uncertainty, and the
        distance summary.
        """
        levels = self.label_levels if levels is None else list(levels)
        unknown = [level for level in [*levels, *(evidence or {})] if level not in self.labels]
        if unknown:
            raise KeyError(f"Label level(s) {unknown} are not in the index (levels: {self.label_levels}).")
        if not 0.0 <= min_probability <= 1.0:
            raise ValueError(f"min_probability must lie in [0, 1], got {min_probability}.")
        for level in levels:
            if unknown_label in self.labels[level].categories:
                raise ValueError(
                    f"unknown_label={unknown_label!r} is a class of label level {level!r}; pass another unknown_label."
                )
        if exclude_rows is None:
            indices, distances = self.query(embedding, k)
        else:
            indices, distances = self.query(embedding, self._check_k(k + 1) if k < self.n_cells else k)
            indices, distances = drop_rows(indices, distances, np.asarray(exclude_rows), k)
        weights = neighbor_weights(
            distances, weighting=weighting, temperature=self.temperature if temperature is None else temperature
        )
        mean_distance = distances.mean(axis=1)
        if distance_calibration is None:
            calibration = self.reference_mean_distances(indices.shape[1])
        else:
            calibration = np.asarray(distance_calibration, dtype=np.float64)
            if calibration.ndim != 1 or calibration.size == 0 or not np.isfinite(calibration).all():
                raise ValueError(
                    f"distance_calibration must be a non-empty 1-d array of finite mean distances (one per held-out "
                    f"cell), got shape {calibration.shape}{'' if np.isfinite(calibration).all() else ' with NaN'}."
                )
        result = LabelTransfer(
            indices=indices,
            distances=distances,
            mean_distance=mean_distance,
            distance_pvalue=conformal_pvalues(calibration, mean_distance),
        )
        for level in levels:
            values = self.labels[level]
            classes = [str(c) for c in values.categories]
            codes = np.asarray(values.codes, dtype=np.int64)
            probabilities = vote(codes[indices], weights, len(classes))
            if vote_temperatures and level in vote_temperatures:
                probabilities = calibrate_votes(probabilities, indices.shape[1], vote_temperatures[level])
            if evidence and level in evidence:
                probabilities = evidence[level].blended(probabilities, classes)
            best = probabilities.max(axis=1, initial=0.0)
            assigned = np.where(best >= min_probability, probabilities.argmax(axis=1), len(classes))
            assigned[best == 0] = len(classes)
            result.labels[level] = pd.Categorical.from_codes(assigned, categories=[*classes, unknown_label])
            result.probabilities[level] = probabilities.astype(np.float32)
            result.classes[level] = classes
            result.uncertainty[level] = (1.0 - best).astype(np.float32)
        return result
