"""Which batch each cell is matched as (training batches by name, every other batch on its own cells)."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

REGISTERED_BATCHES = "registered"


def batch_names_of(model, adata: AnnData, batch_names=None) -> np.ndarray | None:
    """The batch of each cell of ``adata`` for moment matching.

    ``batch_names`` when given (``REGISTERED_BATCHES``: the training data's registered batches); the training data
    itself uses its registered batches; any other AnnData uses the column the model was set up with as
    ``batch_key`` when it has one, else all its cells form one batch (``None``).
    """
    if isinstance(batch_names, str) and batch_names == REGISTERED_BATCHES:
        return np.asarray(model.batches, dtype=object)[model.registered_batches()]
    if batch_names is not None:
        names = np.asarray(batch_names).astype(str)
        if names.shape != (adata.n_obs,):
            raise ValueError(
                f"batch_names gives {names.size} values for {adata.n_obs} cells; pass one batch name per cell."
            )
        return names
    if adata is model.adata:
        return np.asarray(model.batches, dtype=object)[model.registered_batches()]
    key = model.setup_args.get("batch_key")
    if key is not None and key in adata.obs:
        column = adata.obs[key]
        if column.isna().any():
            raise ValueError(
                f"adata.obs[{key!r}] has {int(column.isna().sum())} missing values; the model matches each batch "
                f"of a query to the reference's gene moments by this column. Fill them (e.g. with the sample name) or "
                f"drop the column to treat all cells as one batch."
            )
        return column.astype(str).to_numpy()
    return None
