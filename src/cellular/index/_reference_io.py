"""Saving and loading a reference index: JSON metadata and an ``.npz`` of arrays, checksummed, never pickled."""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cellular._files import (
    FILE_RECORD,
    METADATA_CHECKSUM,
    SHA256,
    SHAPE,
    STRINGS,
    check_shapes,
    damaged,
    read_metadata,
    verify_metadata,
    write_metadata,
)

from . import _faiss
from ._options import BACKENDS, CALIBRATION_SOURCES, METRICS, REFERENCE_CELLS, resolve_device

if TYPE_CHECKING:
    from ._reference import ReferenceIndex

logger = logging.getLogger(__name__)

_FORMAT = "cellular-sc-reference-index"
# Version 2 records the SHA-256 of arrays.npz and of the metadata, and every array's shape; version 1 files carry no
# checksums and load with a warning. Version 3 adds the held-out cells that calibrate the distance p-values (an
# earlier release would read such a file as calibrated on reference cells, so it is refused there).
_FORMAT_VERSION = 3
_CHECKED_VERSIONS = (2, 3)
_UNCHECKED_VERSION = 1
_METADATA_FILE = "index.json"
_ARRAYS_FILE = "arrays.npz"
_FIX = "Rebuild the index with ReferenceIndex.build (or model.build_reference_index) and save it again."


_SCHEMA = {
    "type": "object",
    "required": [
        "format",
        "format_version",
        "package_version",
        "metric",
        "backend",
        "n_neighbors",
        "search_epsilon",
        "parallel_search",
        "temperature",
        "unlabeled_category",
        "seed",
        "model_fingerprint",
        "levels",
        "files",
        "arrays",
        METADATA_CHECKSUM,
    ],
    "properties": {
        "format": {"const": _FORMAT},
        "format_version": {"enum": list(_CHECKED_VERSIONS)},
        "package_version": {"type": "string"},
        "metric": {"enum": list(METRICS)},
        "backend": {"enum": list(BACKENDS)},
        "n_neighbors": {"type": "integer", "minimum": 1},
        "search_epsilon": {"type": "number", "minimum": 0},
        "parallel_search": {"type": "boolean"},
        "temperature": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]},
        "unlabeled_category": {"type": "string"},
        "seed": {"type": "integer"},
        "model_fingerprint": {"anyOf": [SHA256, {"type": "null"}]},
        "calibration_source": {"enum": list(CALIBRATION_SOURCES)},
        "levels": {"type": "object", "additionalProperties": {**STRINGS, "minItems": 1}},
        "level_names": STRINGS,
        "files": {
            "type": "object",
            "required": [_ARRAYS_FILE],
            "additionalProperties": False,
            "properties": {_ARRAYS_FILE: FILE_RECORD},
        },
        "arrays": {"type": "object", "additionalProperties": SHAPE},
        METADATA_CHECKSUM: SHA256,
    },
}


def _level_order(metadata: dict, path: Path) -> list[str]:
    """The label levels in the order their codes were saved.

    That is ``level_names`` when recorded; files written before it existed keep the order of ``levels`` as written.
    """
    names = metadata.get("level_names", list(metadata["levels"]))
    if len(set(names)) != len(names) or set(names) != set(metadata["levels"]):
        raise damaged(path, f"level_names {names} does not name each label level {list(metadata['levels'])} once", _FIX)
    return names


class ReferenceIndexIOMixin:
    """:meth:`save` and :meth:`load` for :class:`ReferenceIndex`."""

    def save(self, dir_path: str | Path, overwrite: bool = False) -> None:
        """Write the index to a folder: ``index.json`` (metadata) and ``arrays.npz`` (arrays, no pickled objects).

        The pynndescent graph is stored, so loading does not run NN-descent again.

        Parameters
        ----------
        dir_path
            Folder to write; created if missing.
        overwrite
            Replace an index already saved there.
        """
        dir_path = Path(dir_path)
        if (dir_path / _METADATA_FILE).exists() and not overwrite:
            raise FileExistsError(f"{dir_path} already holds a reference index; pass overwrite=True to replace it.")
        dir_path.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "package_version": version("cellular-sc"),
            "metric": self.metric,
            "backend": self.backend,
            "n_neighbors": self.n_neighbors,
            "search_epsilon": self.search_epsilon,
            "parallel_search": self.parallel_search,
            "temperature": self.temperature,
            "unlabeled_category": self.unlabeled_category,
            "seed": self.seed,
            "model_fingerprint": self.model_fingerprint,
            "calibration_source": self.calibration_source,
            "levels": {name: [str(c) for c in values.categories] for name, values in self.labels.items()},
            # The checksum reads the metadata with sorted keys, so the order of "levels" is not protected by it.
            "level_names": list(self.labels),
        }
        arrays = {
            "embedding": self.embedding,
            "cell_names": np.asarray(self.cell_names, dtype=str),
            "calibration": self._calibration,
        }
        if self._calibration_embedding is not None:
            arrays["calibration_embedding"] = self._calibration_embedding
            arrays["calibration_cell_names"] = self._calibration_cell_names
        for position, values in enumerate(self.labels.values()):
            arrays[f"label_codes_{position}"] = np.asarray(values.codes, dtype=np.int32)
        if self._graph is not None:
            arrays["graph_indices"], arrays["graph_distances"] = self._graph
        if self._faiss_index is not None:
            arrays["faiss_index"] = self._faiss_index
        with open(dir_path / _ARRAYS_FILE, "wb") as handle:
            np.savez(handle, **arrays)
        shapes = {name: list(np.shape(value)) for name, value in arrays.items()}
        write_metadata(dir_path / _METADATA_FILE, metadata, dir_path / _ARRAYS_FILE, "arrays", shapes)

    @staticmethod
    def saved_without_checksums(dir_path: str | Path) -> bool:
        """Whether the index saved in ``dir_path`` claims the format version written before checksums existed."""
        metadata = read_metadata(Path(dir_path) / _METADATA_FILE, _FIX)
        return metadata.get("format_version") == _UNCHECKED_VERSION

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        *,
        backend: str | None = None,
        device: str | torch.device | None = None,
        parallel_search: bool | None = None,
    ) -> ReferenceIndex:
        """Read an index written by :meth:`save` (arrays read with ``allow_pickle=False``).

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        backend
            Search backend; as saved when ``None``. Switching to pynndescent from an index saved without a graph
            builds the graph now.
        device
            Device of the exact search.
        parallel_search
            Parallel pynndescent queries; as saved when ``None``.
        """
        dir_path = Path(dir_path)
        metadata_path = dir_path / _METADATA_FILE
        if not metadata_path.exists():
            raise FileNotFoundError(f"No saved reference index in {dir_path} ({_METADATA_FILE} is missing).")
        metadata = read_metadata(metadata_path, _FIX)
        readable = (_UNCHECKED_VERSION, *_CHECKED_VERSIONS)
        if metadata.get("format") != _FORMAT or metadata.get("format_version") not in readable:
            raise ValueError(
                f"{dir_path} holds a file of format {metadata.get('format')!r} version "
                f"{metadata.get('format_version')!r}; this cellular-sc ({version('cellular-sc')}) reads "
                f"{_FORMAT!r} versions {list(readable)}. Rebuild the index with ReferenceIndex.build."
            )
        checked = verify_metadata(
            metadata,
            schema=_SCHEMA,
            path=metadata_path,
            folder=dir_path,
            fix=_FIX,
            unchecked_versions=(_UNCHECKED_VERSION,),
        )
        arrays = _read_arrays(dir_path / _ARRAYS_FILE, metadata["arrays"] if checked else None)
        levels = _level_order(metadata, metadata_path)
        _check_arrays(arrays, metadata, levels, dir_path / _ARRAYS_FILE)
        labels = {
            name: pd.Categorical.from_codes(arrays[f"label_codes_{position}"], categories=metadata["levels"][name])
            for position, name in enumerate(levels)
        }
        graph = None
        if "graph_indices" in arrays:
            graph = (arrays["graph_indices"], arrays["graph_distances"])
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if backend is None and metadata["backend"] == "faiss" and not _faiss.available():
            logger.warning(
                "%s was built with the FAISS backend, but faiss is not installed: searching exactly instead "
                '(pip install "cellular-sc[faiss]" to use the stored HNSW index).',
                dir_path,
            )
            backend = "exact"
        device = resolve_device(device)  # the caller's errors are raised as they are, not as a damaged folder
        try:
            return cls(
                arrays["embedding"],
                labels,
                arrays["cell_names"],
                metric=metadata["metric"],
                backend=metadata["backend"] if backend is None else backend,
                device=device,
                n_neighbors=metadata["n_neighbors"],
                search_epsilon=metadata["search_epsilon"],
                parallel_search=metadata["parallel_search"] if parallel_search is None else parallel_search,
                temperature=metadata["temperature"],
                unlabeled_category=metadata["unlabeled_category"],
                seed=metadata["seed"],
                model_fingerprint=metadata["model_fingerprint"],
                _graph=graph,
                _faiss_index=arrays.get("faiss_index"),
                calibration_embedding=arrays.get("calibration_embedding"),
                calibration_cell_names=arrays.get("calibration_cell_names"),
                _calibration=arrays["calibration"],
            )
        except (ValueError, RuntimeError) as error:  # settings or arrays refused (RuntimeError: FAISS's reader)
            raise damaged(dir_path, f"does not hold a valid index ({error})", _FIX) from None


def _read_arrays(path: Path, recorded: dict | None) -> dict[str, np.ndarray]:
    """The arrays of ``arrays.npz`` (never unpickled), checked against the recorded names and shapes."""
    if not path.is_file():
        raise damaged(path, "is missing", _FIX)
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except Exception as error:  # zipfile, numpy and OS errors for truncated or foreign files
        raise damaged(
            path, f"cannot be read as an array file ({type(error).__name__}): truncated or damaged", _FIX
        ) from None
    if recorded is not None:
        check_shapes(arrays, recorded, path, _FIX)
    return arrays


def _check_arrays(arrays: dict[str, np.ndarray], metadata: dict, levels: list[str], path: Path) -> None:
    """Shapes, dtypes and ranges that tie the arrays to each other and to the metadata."""
    expected = {"embedding", "cell_names", "calibration"}
    if metadata.get("calibration_source", REFERENCE_CELLS) != REFERENCE_CELLS:
        expected |= {"calibration_embedding", "calibration_cell_names"}
    expected |= {f"label_codes_{position}" for position in range(len(metadata["levels"]))}
    if "graph_indices" in arrays or "graph_distances" in arrays:
        expected |= {"graph_indices", "graph_distances"}
    if "faiss_index" in arrays:
        expected.add("faiss_index")
        if arrays["faiss_index"].ndim != 1 or arrays["faiss_index"].dtype != np.uint8:
            raise damaged(path, "the stored FAISS index is not a byte array", _FIX)
    if set(arrays) != expected:
        raise damaged(path, f"holds arrays {sorted(arrays)}, expected {sorted(expected)}", _FIX)
    embedding = arrays["embedding"]
    if embedding.ndim != 2 or embedding.dtype.kind != "f" or not np.isfinite(embedding).all():
        raise damaged(path, "the embedding is not a finite 2-d float array", _FIX)
    n_cells = embedding.shape[0]
    if arrays["cell_names"].shape != (n_cells,) or arrays["cell_names"].dtype.kind != "U":
        raise damaged(path, f"cell_names is not {n_cells} strings, one per embedded cell", _FIX)
    calibration = arrays["calibration"]
    if calibration.ndim != 2 or calibration.dtype.kind != "f" or not np.isfinite(calibration).all():
        raise damaged(path, "the calibration distances are not a finite 2-d float array", _FIX)
    if "calibration_embedding" in arrays:
        cells, names = arrays["calibration_embedding"], arrays["calibration_cell_names"]
        if (
            cells.ndim != 2
            or cells.shape[1] != embedding.shape[1]
            or cells.dtype.kind != "f"
            or not np.isfinite(cells).all()
            or names.shape != (cells.shape[0],)
            or names.dtype.kind != "U"
            or calibration.shape[0] != cells.shape[0]
        ):
            raise damaged(path, "the held-out calibration cells do not fit the embedding and their distances", _FIX)
    for position, name in enumerate(levels):
        categories = metadata["levels"][name]
        codes = arrays[f"label_codes_{position}"]
        if (
            codes.shape != (n_cells,)
            or codes.dtype.kind != "i"
            or (codes.size and not (codes.min() >= -1 and codes.max() < len(categories)))
        ):
            raise damaged(
                path, f"the label codes of level {name!r} are not {n_cells} codes in [-1, {len(categories)})", _FIX
            )
    if "graph_indices" in arrays:
        indices, distances = arrays["graph_indices"], arrays["graph_distances"]
        if (
            indices.ndim != 2
            or indices.shape[0] != n_cells
            or distances.shape != indices.shape
            or indices.dtype.kind != "i"
            or (indices.size and (indices.min() < 0 or indices.max() >= n_cells))
            or not np.isfinite(distances).all()
        ):
            raise damaged(path, "the stored neighbour graph does not fit the embedding", _FIX)
