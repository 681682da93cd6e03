"""``tl.cellular_embed``: write a CELLULAR embedding into an AnnData."""

from __future__ import annotations

from importlib.metadata import version

import anndata as ad
from anndata import AnnData

from cellular.data._expression import get_matrix
from cellular.model import CELLULAR

from ._common import check_positive_int


def cellular_embed(
    adata: AnnData,
    model: CELLULAR | None = None,
    *,
    key_added: str = "X_cellular",
    batch_size: int = 4096,
    layer: str | None = None,
    log_normalized: bool | None = None,
    gene_id_key: str | None = None,
    min_gene_overlap: float = 0.5,
    labels_key: str | None = None,
    batch_key: str | None = None,
    max_epochs: int | None = None,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    progress_bar: bool = False,
    copy: bool = False,
) -> AnnData | CELLULAR | tuple[AnnData, CELLULAR] | None:
    """Embed cells with a CELLULAR model, training one first when none is given.

    With ``model=None`` a model is set up on a light view of ``adata`` (``X`` or ``layer`` shared, not copied;
    ``adata.obs`` untouched), trained with ``labels_key``/``batch_key``, and returned.

    Parameters
    ----------
    adata
        Cells to embed. Needs no labels or batches when ``model`` is given; genes are matched by name.
    model
        A trained :class:`~cellular.CELLULAR`.
    key_added
        Key of ``adata.obsm`` for the embedding.
    batch_size
        Cells per inference minibatch.
    layer
        Layer holding the expression (``adata.X`` when ``None``).
    log_normalized
        Whether the matrix holds log1p-normalised values. For a given model, ``None`` means as in its training;
        for a new model, ``None`` means raw counts.
    gene_id_key
        Match genes on this column of ``adata.var`` instead of ``var_names``.
    min_gene_overlap
        Smallest fraction of the model's genes that must be present.
    labels_key, batch_key
        Columns of ``adata.obs`` used to train a new model (``model=None`` only).
    max_epochs
        Epochs for a new model; the model's default when ``None``.
    model_kwargs, train_kwargs
        Extra arguments of :class:`~cellular.CELLULAR` and :meth:`~cellular.CELLULAR.train` for a new model.
    progress_bar
        Show a progress bar while embedding the cells (on stderr).
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, the copy when ``copy=True``, the trained model when ``model=None``, or ``(copy, model)`` for both.
    Writes:

    ``adata.obsm[key_added]``
        ``(n_cells, n_latent)`` embedding.
    ``adata.uns['cellular']['params']``
        ``key_added``, the model summary (latent size, genes, cell types, batches, setup, training), the genes
        used and how many of them were found in ``adata``.
    """
    batch_size = check_positive_int("batch_size", batch_size)  # before a model is trained here
    if copy:
        adata = adata.copy()
    trained_here = model is None
    if trained_here:
        if labels_key is None:
            raise ValueError("Pass a trained `model`, or `labels_key` (and optionally `batch_key`) to train one.")
        log_normalized = bool(log_normalized)
        model = _train_model(
            adata, labels_key, batch_key, layer, log_normalized, gene_id_key, max_epochs, model_kwargs, train_kwargs
        )
    elif labels_key is not None or batch_key is not None or max_epochs is not None:
        raise ValueError("labels_key, batch_key and max_epochs only apply when training a new model (model=None).")

    # A model trained here was set up on a view holding `layer` as its X: the cells are read from that same layer.
    embedded = model.embed_query(
        adata,
        batch_size=batch_size,
        layer=layer,
        log_normalized=log_normalized,
        gene_id_key=gene_id_key,
        min_gene_overlap=min_gene_overlap,
        progress_bar=progress_bar,
        with_hidden=False,
    )
    adata.obsm[key_added], alignment = embedded.z, embedded.alignment

    uns = adata.uns.setdefault("cellular", {})
    uns["params"] = {
        "key_added": key_added,
        "package_version": version("cellular-sc"),
        "model": {
            "n_latent": model.n_latent,
            "n_genes": len(model.genes),
            "cell_types": list(model.cell_types),
            "batches": list(model.batches),
            "labels_key": model.setup_args["labels_key"],
            "batch_key": model.setup_args["batch_key"],
            "log_normalized_training_input": bool(model.setup_args["log_normalized"]),
            "target_sum": model.target_sum,
            "training": dict(model.training_summary_ or {}),
        },
        "genes": list(model.genes),
        "n_genes_matched": int(alignment.n_matched),
        "missing_genes": list(alignment.missing),
        "layer": layer,
        "trained_here": trained_here,
    }
    if trained_here:
        return (adata, model) if copy else model
    return adata if copy else None


def _train_model(
    adata, labels_key, batch_key, layer, log_normalized, gene_id_key, max_epochs, model_kwargs, train_kwargs
):
    columns = [key for key in (labels_key, batch_key) if key is not None]
    missing = [key for key in columns if key not in adata.obs]
    if missing:
        raise KeyError(f"{missing} not found in adata.obs (columns: {list(adata.obs.columns)}).")
    matrix = get_matrix(adata, layer)
    if gene_id_key is not None and gene_id_key not in adata.var:
        columns = list(adata.var.columns)
        raise KeyError(f"gene_id_key={gene_id_key!r} is not a column of adata.var (columns: {columns}).")
    # The model records the genes' ids when the cells are to be matched on them.
    var = adata.var[[] if gene_id_key is None else [gene_id_key]].copy()
    view = ad.AnnData(X=matrix, obs=adata.obs[columns].copy(), var=var)
    CELLULAR.setup_anndata(
        view, labels_key=labels_key, batch_key=batch_key, log_normalized=log_normalized, gene_id_key=gene_id_key
    )
    model = CELLULAR(view, **(model_kwargs or {}))
    model.train(max_epochs=max_epochs, **(train_kwargs or {}))
    return model
