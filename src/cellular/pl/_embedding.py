"""``pl.embedding``: the cells in 2-D, coloured by CELLULAR labels, confidence and novelty."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes

from ._utils import obs_column, save_or_show

_PLOT_NAME = "embedding"


def embedding(
    adata: AnnData,
    *,
    color: str | Sequence[str] | None = None,
    basis: str = "umap",
    use_rep: str = "X_cellular",
    label_key: str = "cellular_label",
    novelty_key: str = "cellular_novel",
    ncols: int = 3,
    show: bool | None = None,
    save: bool | str | None = None,
    **kwargs,
) -> list[Axes] | None:
    """Plot an embedding of the cells coloured by CELLULAR labels, confidence and novelty.

    The coordinates are ``adata.obsm['X_' + basis]`` when present. Otherwise, for ``basis='umap'``, a UMAP of
    ``adata.obsm[use_rep]`` is computed (cosine neighbours, :func:`scanpy.pp.neighbors` and
    :func:`scanpy.tl.umap`) on a temporary AnnData, so ``adata`` is not modified; store one in ``adata`` yourself
    (``sc.pp.neighbors(adata, use_rep='X_cellular', metric='cosine'); sc.tl.umap(adata)``) to reuse it across calls.
    Drawing is done by :func:`scanpy.pl.embedding`; boolean columns (such as the novelty flag) are drawn as the
    categories ``'False'`` and ``'True'``.

    Parameters
    ----------
    adata
        Annotated cells, e.g. after :func:`cellular.tl.cellular_embed`, :func:`cellular.tl.cellular_annotate` and
        :func:`cellular.tl.novel_types`.
    color
        ``obs`` column(s) or gene name(s) to colour by. By default those of ``label_key``,
        ``label_key + '_confidence'``, ``novelty_key + '_score'`` and ``novelty_key`` that are in ``adata.obs``.
    basis
        Coordinates ``adata.obsm['X_' + basis]`` (a leading ``'X_'`` may be given).
    use_rep
        Key of ``adata.obsm`` holding the CELLULAR embedding, used when ``basis='umap'`` and ``adata`` holds no
        UMAP.
    label_key
        ``key_added`` of :func:`cellular.tl.cellular_annotate`, for the default ``color``.
    novelty_key
        ``key_added`` of :func:`cellular.tl.novel_types`, for the default ``color``.
    ncols
        Panels per row.
    show
        Show the figure; by default when matplotlib is interactive and ``save`` is not given.
    save
        ``True`` saves to ``scanpy.settings.figdir / 'embedding.{scanpy.settings.file_format_figs}'``; a string is a
        file-name suffix (``'_query.png'`` saves ``embedding_query.png``).
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (e.g. ``palette``, ``legend_loc``, ``size``, ``wspace``, ``ax`` for a
        single colour, ``layer`` to read genes from).

    Returns
    -------
    One :class:`~matplotlib.axes.Axes` per colour, or ``None`` when the figure is shown.
    """
    import scanpy as sc

    function = "cellular.pl.embedding"
    if not isinstance(adata, AnnData):
        raise TypeError(f"{function} expects an AnnData, got {type(adata).__name__}.")
    if "return_fig" in kwargs:
        raise TypeError(f"{function} does not accept 'return_fig'; it returns the axes (use axes[0].figure).")
    colors = _colors(adata, color, label_key, novelty_key, function)
    key = basis if basis.startswith("X_") else f"X_{basis}"
    basis = key[2:]

    obs = pd.DataFrame(index=adata.obs_names.copy())
    layer = kwargs.pop("layer", None)
    for name in colors:
        if name in adata.obs.columns:
            values = adata.obs[name]
            if pd.api.types.is_bool_dtype(values.dtype):
                values = pd.Categorical(values.map({False: "False", True: "True"}), categories=["False", "True"])
            obs[name] = values
        else:
            obs[name] = adata.obs_vector(name, layer=layer)
    plot_data = AnnData(obs=obs)
    for name in colors:
        if f"{name}_colors" in adata.uns and name in adata.obs.columns:
            plot_data.uns[f"{name}_colors"] = list(adata.uns[f"{name}_colors"])

    if key in adata.obsm:
        plot_data.obsm[key] = np.asarray(adata.obsm[key])
    elif basis == "umap":
        plot_data.obsm[key] = _temporary_umap(adata, use_rep, function)
    else:
        raise KeyError(
            f"{function}: adata.obsm has no {key!r} (basis={basis!r}; keys: {list(adata.obsm.keys())}); compute it "
            "first (e.g. sc.tl.tsne) or use basis='umap', which is computed from use_rep when missing."
        )

    kwargs.setdefault("wspace", 0.45)  # room for category legends between panels
    axes = sc.pl.embedding(plot_data, basis=basis, color=colors, ncols=ncols, show=False, **kwargs)
    axes = list(axes) if isinstance(axes, list | tuple | np.ndarray) else [axes]
    shown = save_or_show(axes[0].figure, _PLOT_NAME, show=show, save=save)
    return None if shown else axes


def _colors(adata: AnnData, color, label_key: str, novelty_key: str, function: str) -> list[str]:
    """The colour keys to draw: the given ones (checked) or the default CELLULAR columns present in ``obs``."""
    writers = {
        label_key: "cellular.tl.cellular_annotate",
        f"{label_key}_confidence": "cellular.tl.cellular_annotate",
        f"{novelty_key}_score": "cellular.tl.novel_types",
        novelty_key: "cellular.tl.novel_types",
    }
    if color is None:
        colors = [name for name in writers if name in adata.obs.columns]
        if not colors:
            raise KeyError(
                f"{function}: adata.obs holds none of the default colour columns {list(writers)}; run "
                "cellular.tl.cellular_annotate and/or cellular.tl.novel_types first, or pass color=."
            )
        return colors
    colors = [color] if isinstance(color, str) else list(color)
    if not colors:
        raise ValueError(f"{function}: color is empty; pass obs column(s) or gene name(s), or None for the defaults.")
    for name in colors:
        if name in writers:
            obs_column(adata, name, function=function, writer=writers[name])
        elif name not in adata.obs.columns and name not in adata.var_names:
            raise KeyError(
                f"{function}: color {name!r} is neither a column of adata.obs nor a gene in adata.var_names; pass an "
                "existing key."
            )
    return colors


def _temporary_umap(adata: AnnData, use_rep: str, function: str) -> np.ndarray:
    """UMAP coordinates of ``adata.obsm[use_rep]``, computed on a temporary AnnData holding only that embedding."""
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise KeyError(
            f"{function}: adata.obsm has neither 'X_umap' nor use_rep={use_rep!r} (keys: {list(adata.obsm.keys())}); "
            "run cellular.tl.cellular_embed first, or pass the key of the embedding as use_rep."
        )
    if adata.n_obs < 3:
        raise ValueError(f"{function}: a UMAP needs at least 3 cells, adata has {adata.n_obs}.")
    cells = AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    cells.obsm[use_rep] = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    sc.pp.neighbors(cells, n_neighbors=min(15, adata.n_obs - 1), use_rep=use_rep, metric="cosine", random_state=0)
    sc.tl.umap(cells, random_state=0)
    return cells.obsm["X_umap"]
