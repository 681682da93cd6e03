"""Bundled and shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import scanpy as sc
from anndata import AnnData

DATA_DIR_VARIABLE = "CELLULAR_DATA_DIR"


def data_dir() -> Path:
    """Folder of the shared real datasets: ``$CELLULAR_DATA_DIR``, else ``../shared/data`` from the working dir."""
    return Path(os.environ.get(DATA_DIR_VARIABLE, Path("..") / "shared" / "data"))


def read_shared_dataset(name: str) -> AnnData:
    """Read ``<data_dir()>/<name>.h5ad`` with a clear error when it is absent."""
    path = data_dir() / f"{name}.h5ad"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; set {DATA_DIR_VARIABLE} to the folder holding the shared h5ad files."
        )
    return ad.read_h5ad(path)


def pbmc68k_reduced_lognorm() -> AnnData:
    """Scanpy's bundled 700 PBMCs as log-normalised expression (``.raw``) with ``obs['bulk_labels']``.

    The file ships inside the scanpy wheel, so nothing is downloaded.
    """
    bundled = sc.datasets.pbmc68k_reduced()
    adata = bundled.raw.to_adata()
    adata.obs = bundled.obs[["bulk_labels", "phase", "n_counts"]].copy()
    adata.obsm["X_umap"] = bundled.obsm["X_umap"]
    return adata
