"""Several h5ad files used as one AnnData whose expression stays in the files.

:func:`read_collection` returns an ordinary in-memory AnnData holding the files' ``obs`` and ``var`` but no ``X``;
it records the files in ``uns`` and each cell's row in ``obs``. Every entry point reads the expression through
:func:`cellular.data.read_expression`, which opens the files read-only (:class:`CollectionMatrix`) and reads the
rows it needs, a chunk or a minibatch at a time, exactly as from one backed file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from anndata.experimental import AnnCollection
from anndata.io import read_elem, sparse_dataset

from ._backed import check_row_readable, read_rows

COLLECTION_KEY = "cellular_collection"
"""``adata.uns`` key of the files a :func:`read_collection` AnnData reads its expression from."""

ROW_COLUMN = "cellular_collection_row"
"""``adata.obs`` column: each cell's row in the files read one after the other (survives subsetting)."""


@dataclass
class _Member:
    path: Path
    obs: pd.DataFrame
    var: pd.DataFrame
    n_obs: int


def read_collection(
    files: Sequence[str | Path] | AnnCollection,
    *,
    label: str | None = None,
    keys: Sequence[str] | None = None,
    index_unique: str | None = None,
) -> AnnData:
    """Several h5ad files as one AnnData, the expression left on disk.

    The cells of every file, in order, with the ``obs`` columns all files share and the genes all files measure
    (in the first file's order, with its ``var`` columns). The result holds no ``X``: every entry point of the
    package (setup, training, embedding, annotation, novelty, index build, mapping) reads the files' ``X`` (or the
    ``layer`` asked for) a chunk of cells at a time, read-only, as for one file opened with
    ``read_h5ad(..., backed="r")``. Results land in the returned object's ``obs``/``obsm``/``uns``; subsetting it
    (cells or genes) keeps reading the right rows and columns.

    Parameters
    ----------
    files
        Paths of h5ad files storing the expression as CSR (cells as rows) or dense; or an
        :class:`anndata.experimental.AnnCollection` of AnnData objects opened backed (``backed="r"``), whose
        in-memory ``obs`` are used.
    label
        Add an ``obs`` column of this name saying which file each cell comes from (the ``keys``).
    keys
        Names of the files in ``label`` and ``index_unique`` (default: the file names without ``.h5ad``).
    index_unique
        Make cell names unique by appending this separator and the file's key (as :func:`anndata.concat`); cell
        names repeated across files are an error without it.

    Returns
    -------
    AnnData without ``X``; ``uns['cellular_collection']`` lists the files and their cell counts, and
    ``obs['cellular_collection_row']`` gives each cell's row in them.
    """
    members = _members(files)
    keys = [member.path.name.removesuffix(".h5ad") for member in members] if keys is None else [str(k) for k in keys]
    if len(keys) != len(members) or len(set(keys)) != len(keys):
        raise ValueError(f"keys must name each of the {len(members)} files once (got {len(keys)} keys: {keys[:5]}).")
    genes = pd.Index(members[0].var.index)
    for member in members[1:]:
        genes = genes[genes.isin(member.var.index)]
    if genes.empty:
        raise ValueError(
            "The files of the collection share no gene names; check that they use the same naming convention "
            "(symbols vs Ensembl ids) before reading them together."
        )
    shells = [AnnData(obs=member.obs) for member in members]
    joined = anndata.concat(shells, join="inner", label=label, keys=keys, index_unique=index_unique)
    if joined.obs_names.has_duplicates:
        duplicated = joined.obs_names[joined.obs_names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"Cell names repeat across the files (e.g. {duplicated}); pass index_unique='-' to append each file's "
            "key to its cell names."
        )
    obs = joined.obs
    obs[ROW_COLUMN] = np.arange(obs.shape[0], dtype=np.int64)
    adata = AnnData(obs=obs, var=members[0].var.loc[genes].copy())
    adata.uns[COLLECTION_KEY] = {
        "files": [str(member.path) for member in members],
        "n_obs": [member.n_obs for member in members],
    }
    return adata


def _members(files) -> list[_Member]:
    if isinstance(files, AnnCollection):
        members = []
        for position, member in enumerate(files.adatas):
            if not member.isbacked or member.is_view:
                raise ValueError(
                    f"Member {position} of the AnnCollection is not a whole AnnData opened from disk (backed); "
                    "open every file with anndata.read_h5ad(path, backed='r'), or pass the file paths."
                )
            members.append(_Member(Path(member.filename).resolve(), member.obs.copy(), member.var.copy(), member.n_obs))
        return members
    if isinstance(files, str | Path):
        raise TypeError("files must be a list of h5ad paths (or an AnnCollection), not a single path.")
    members = []
    for file in files:
        path = Path(file).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"h5ad file {str(file)!r} of the collection was not found.")
        with h5py.File(path, "r") as handle:
            obs, var = read_elem(handle["obs"]), read_elem(handle["var"])
        members.append(_Member(path, obs, var, obs.shape[0]))
    if not members:
        raise ValueError("read_collection needs at least one h5ad file.")
    for member in members:
        if member.var.index.has_duplicates:
            duplicated = member.var.index[member.var.index.duplicated()].unique()[:5].tolist()
            raise ValueError(
                f"File {str(member.path)!r} of the collection has duplicated gene names (e.g. {duplicated}); make them "
                "unique in that file (anndata.AnnData.var_names_make_unique, then write it again) before reading the "
                "files together."
            )
    return members


def is_collection(adata: AnnData) -> bool:
    """Whether ``adata`` reads its expression from the files of :func:`read_collection`."""
    return adata.X is None and COLLECTION_KEY in adata.uns


class CollectionMatrix:
    """Cells x genes of a :func:`read_collection` AnnData, rows read from the files on demand.

    Parameters
    ----------
    parts
        Each file's backed matrix (``X`` or the layer).
    offsets
        First row of each file in the files read one after the other (one more entry: the total).
    columns
        For each file, the column of each of the AnnData's genes.
    rows
        For each cell of the AnnData, its row in the files read one after the other.
    """

    def __init__(self, parts: list, offsets: np.ndarray, columns: list[np.ndarray], rows: np.ndarray, handles=()):
        self.parts = parts
        self.offsets = offsets
        self.columns = columns
        self.rows = rows
        self._handles = list(handles)  # the open files, kept open as long as the matrix is used

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_cells, n_genes)``."""
        return self.rows.shape[0], self.columns[0].shape[0]

    def __getitem__(self, index) -> sp.csr_matrix:
        if isinstance(index, slice):
            index = np.arange(*index.indices(self.shape[0]))
        rows = self.rows[np.asarray(index, dtype=np.int64)]
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        order = np.argsort(part, kind="stable")
        blocks = []
        for which in np.unique(part):  # one read per file, in the order the rows were asked for within it
            local = rows[order[part[order] == which]] - self.offsets[which]
            block = read_rows(self.parts[which], local)
            columns = self.columns[which]
            if not (columns.size == block.shape[1] and np.array_equal(columns, np.arange(columns.size))):
                block = block[:, columns]
            blocks.append(sp.csr_matrix(block))
        if not blocks:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        stacked = sp.vstack(blocks, format="csr")
        return stacked if np.array_equal(order, np.arange(order.size)) else stacked[np.argsort(order)]


def open_collection(adata: AnnData, layer: str | None) -> CollectionMatrix:
    """The expression of a :func:`read_collection` AnnData, checked against the files it was read from."""
    record = adata.uns[COLLECTION_KEY]
    fix = "read the files again with cellular.data.read_collection"
    damaged = ValueError(
        f"adata.uns[{COLLECTION_KEY!r}] or adata.obs[{ROW_COLUMN!r}] (the collection's files and each cell's row in "
        f"them) is missing or damaged; {fix}."
    )
    try:
        files = [str(f) for f in np.asarray(record["files"]).reshape(-1)]
        counts = np.asarray(record["n_obs"], dtype=np.int64).reshape(-1)
    except (KeyError, TypeError, ValueError):
        raise damaged from None
    if len(files) != counts.size or not files or ROW_COLUMN not in adata.obs:
        raise damaged
    offsets = np.concatenate([[0], np.cumsum(counts)])
    rows = adata.obs[ROW_COLUMN].to_numpy()
    if not np.issubdtype(rows.dtype, np.integer) or (rows.size and (rows.min() < 0 or rows.max() >= offsets[-1])):
        raise damaged
    rows = rows.astype(np.int64)
    element = "X" if layer is None else f"layers/{layer}"
    parts, columns, handles = [], [], []
    try:
        for path, n_obs in zip(files, counts, strict=True):
            matrix, position = _open_part(path, int(n_obs), element, adata.var_names, handles, fix)
            parts.append(matrix)
            columns.append(position)
    except Exception:
        for handle in handles:
            handle.close()
        raise
    return CollectionMatrix(parts, offsets, columns, rows, handles)


def _open_part(path: str, n_obs: int, element: str, var_names: pd.Index, handles: list, fix: str):
    """One file's backed matrix and the column of each of ``var_names`` in it (the open file joins ``handles``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"File {path!r} of the collection was not found (moved or deleted?); {fix}.")
    handle = h5py.File(path, "r")
    handles.append(handle)
    if element not in handle:
        raise KeyError(f"File {path!r} of the collection has no {element}; name a layer every file holds.")
    node = handle[element]
    matrix = node if isinstance(node, h5py.Dataset) else sparse_dataset(node)
    check_row_readable(matrix, f"{element} of {path!r}")
    position = pd.Index(read_elem(handle["var"]).index).get_indexer(var_names)
    if matrix.shape[0] != n_obs or (position < 0).any():
        raise ValueError(f"File {path!r} changed since the collection was read (cells or genes differ); {fix}.")
    return matrix, position.astype(np.int64)
