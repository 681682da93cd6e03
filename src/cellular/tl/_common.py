"""Helpers shared by the ``tl`` functions."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import torch
from anndata import AnnData

from cellular.model import CELLULAR


def query_embedding(
    adata: AnnData,
    model: CELLULAR,
    use_rep: str | None,
    batch_size: int,
    layer,
    log_normalized: bool | None,
    gene_id_key: str | None,
    min_gene_overlap: float,
    progress_bar: bool = False,
) -> tuple[np.ndarray, dict]:
    """Embedding of ``adata`` by ``model`` (or the stored ``adata.obsm[use_rep]``) and a record of how it was read."""
    if use_rep is not None:
        if use_rep not in adata.obsm:
            raise KeyError(
                f"use_rep={use_rep!r} is not in adata.obsm (keys: {list(adata.obsm.keys())}); run "
                "cellular.tl.cellular_embed first or pass use_rep=None to embed the cells now."
            )
        z = np.asarray(adata.obsm[use_rep], dtype=np.float32)
        if z.shape != (adata.n_obs, model.n_latent):
            raise ValueError(
                f"adata.obsm[{use_rep!r}] has shape {z.shape}, but the model embeds into {model.n_latent} dimensions; "
                "it was not made by this model. Pass use_rep=None to embed the cells now."
            )
        return z, {"use_rep": use_rep}
    expression, alignment = model._read(adata, layer, log_normalized, gene_id_key, min_gene_overlap)
    z = model._encode(expression, batch_size, torch.device(model.device), progress_bar=progress_bar)
    return z, {"use_rep": None, "n_genes_matched": int(alignment.n_matched), "n_model_genes": len(model.genes)}


def check_model(model: CELLULAR, *, classifier: bool) -> None:
    """A clear error unless ``model`` is a trained CELLULAR model (with its classifier head when needed)."""
    if not isinstance(model, CELLULAR):
        raise TypeError(f"model must be a trained cellular.CELLULAR, got {type(model).__name__}.")
    if classifier:
        model._require_classifier()
    else:
        model._require_trained()


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or a clear error when it is not a level in ``(0, 1)``."""
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1 (e.g. 0.05), got {alpha}.")
    return alpha


def package_uns(adata: AnnData) -> dict:
    """The package's ``adata.uns['cellular']`` dictionary, created when missing."""
    uns = adata.uns.get("cellular")
    if uns is None:
        uns = adata.uns["cellular"] = {}
    return uns


def model_record(model: CELLULAR) -> dict:
    """What identifies the model that produced a result."""
    return {
        "package_version": version("cellular-sc"),
        "n_latent": model.n_latent,
        "n_genes": len(model.genes),
        "cell_types": list(model.cell_types),
        "labels_key": model.setup_args["labels_key"],
        "batch_key": model.setup_args["batch_key"],
    }
