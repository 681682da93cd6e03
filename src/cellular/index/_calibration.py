"""Distance calibration of a reference index: the distances its p-values and default temperature are read against."""

from __future__ import annotations

import numpy as np

from ._options import HELD_OUT_CELLS, REFERENCE_CELLS

_N_CALIBRATION_CELLS = 5_000
_CALIBRATION_NEIGHBORS = 50
MIN_HELD_OUT_CALIBRATION_CELLS = 20


class ReferenceCalibrationMixin:
    """How far known cells lie from their nearest reference cells, for :class:`~cellular.ReferenceIndex`.

    Relies on the index's search (``_search``, ``query``) and checks (``_check_queries``, ``_check_k``).
    """

    def _calibration_distances(self, n_neighbors: int = _CALIBRATION_NEIGHBORS) -> np.ndarray:
        """Sorted distances of a sample of reference cells to their nearest *other* reference cells."""
        rng = np.random.default_rng(self.seed)
        n_sample = min(self.n_cells, _N_CALIBRATION_CELLS)
        sample = np.sort(rng.choice(self.n_cells, n_sample, replace=False))
        n_neighbors = min(n_neighbors, self.n_cells - 1)
        queries = self.embedding[sample]
        if self.metric == "cosine":
            queries = unit_rows(queries)
        indices, distances = self._search(queries, n_neighbors + 1)
        return drop_rows(indices, distances, sample, n_neighbors)[1]

    def _set_calibration_cells(self, embedding, cell_names) -> None:
        queries = self._check_queries(embedding, "calibration embedding")
        if queries.shape[0] < MIN_HELD_OUT_CALIBRATION_CELLS:
            raise ValueError(
                f"calibration_embedding holds {queries.shape[0]} cells; the distance p-values need at least "
                f"{MIN_HELD_OUT_CALIBRATION_CELLS} held-out cells. Pass more cells, or calibration_embedding=None to "
                "calibrate on the reference cells themselves."
            )
        names = np.full(queries.shape[0], "", dtype=str) if cell_names is None else np.asarray(cell_names, dtype=str)
        if names.shape != (queries.shape[0],):
            raise ValueError(f"calibration_cell_names has {names.size} names for {queries.shape[0]} calibration cells.")
        self._calibration_embedding, self._calibration_cell_names = queries, names
        self.calibration_source = HELD_OUT_CELLS

    def _calibration_for(self, n_neighbors: int) -> np.ndarray:
        """Sorted distances to their ``n_neighbors`` nearest reference cells of the cells that calibrate."""
        if self._calibration_embedding is None:
            return self._calibration_distances(n_neighbors)
        n_neighbors = min(n_neighbors, self.n_cells - 1)
        indices, distances = self.query(self._calibration_embedding, n_neighbors + 1)
        # A held-out cell that is also in the reference skips its own copy: the nearest neighbour of its name.
        is_self = np.asarray(self.cell_names, dtype=str)[indices] == self._calibration_cell_names[:, None]
        return drop_first(indices, distances, is_self, n_neighbors)[1]

    def reference_mean_distances(self, k: int) -> np.ndarray:
        """The mean distances to ``k`` reference neighbours the distance p-values are calibrated on.

        From the index's held-out cells when it has them (:attr:`calibration_source`), else from a sample of up to
        5,000 reference cells to their ``k`` nearest other reference cells. The yardstick for query distances: a
        query cell of a known type falls inside this distribution.
        """
        k = self._check_k(k)
        if k > self._calibration.shape[1]:
            self._calibration = self._calibration_for(k)
        return self._calibration[:, :k].mean(axis=1)

    def _default_temperature(self) -> float:
        distances = self._calibration if self.calibration_source == REFERENCE_CELLS else self._calibration_distances()
        column = min(15, distances.shape[1]) - 1
        scale = float(np.median(distances[:, column]))
        return scale if scale > 0 else 1.0


def drop_rows(indices: np.ndarray, distances: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's neighbours without its own reference row (its farthest neighbour when the row was not found)."""
    return drop_first(indices, distances, indices == rows[:, None], k)


def drop_first(indices: np.ndarray, distances: np.ndarray, is_self: np.ndarray, k: int):
    """Each row's ``k`` neighbours left after dropping its first ``is_self`` one (its farthest when there is none)."""
    is_self = is_self.copy()
    is_self[~is_self.any(axis=1), -1] = True
    keep = np.ones_like(is_self)
    keep[np.arange(indices.shape[0]), is_self.argmax(axis=1)] = False
    n = indices.shape[0]
    return indices[keep].reshape(n, -1)[:, :k], distances[keep].reshape(n, -1)[:, :k]


def unit_rows(values: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine search on a Euclidean index)."""
    return values / np.linalg.norm(values, axis=1, keepdims=True)
