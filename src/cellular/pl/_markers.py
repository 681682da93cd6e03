"""``pl.marker_importances``: each cell type's defining genes as bars."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.figure import Figure

from ._utils import save_or_show

_IMPORTANCES = ("impurity", "permutation")


def marker_importances(
    adata: AnnData,
    *,
    key: str = "marker_importances",
    cell_types: list[str] | None = None,
    n_genes: int | None = None,
    importance: str = "impurity",
    ncols: int = 4,
    panel_size: tuple[float, float] = (3.0, 2.6),
    show: bool | None = None,
    save: bool | str | None = None,
) -> Figure | None:
    """Plot each cell type's top genes from :func:`cellular.tl.marker_importances`, one panel per type.

    Bars are the importance of each gene (the permutation importance also shows its spread as an error bar); dark
    bars mark genes higher in the type than in its negatives, light bars genes that mark the type by their absence.
    Panel titles give the held-out AUROC of the type's forest.

    Parameters
    ----------
    adata
        Data annotated by :func:`cellular.tl.marker_importances`.
    key
        ``key_added`` of that call.
    cell_types
        Types to show, in this order; all when ``None``.
    n_genes
        Genes per panel; all stored genes when ``None``.
    importance
        ``"impurity"`` or ``"permutation"``.
    ncols
        Panels per row.
    panel_size
        Width and height of one panel, in inches.
    show, save
        As in scanpy: show the figure, and/or save it (``True`` or a file-name suffix) under
        ``scanpy.settings.figdir`` as ``marker_importances{suffix}``.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`, or ``None`` when it is shown.
    """
    function = "cellular.pl.marker_importances"
    if importance not in _IMPORTANCES:
        raise ValueError(f"{function}: importance must be one of {_IMPORTANCES}, got {importance!r}.")
    record = adata.uns.get("cellular", {}).get(key) if isinstance(adata, AnnData) else None
    if record is None or "markers" not in record:
        raise KeyError(
            f"{function}: adata holds no marker importances under {key!r}; run cellular.tl.marker_importances first."
        )
    markers, scores = record["markers"], record["scores"]
    available = list(scores.index)
    cell_types = available if cell_types is None else list(cell_types)
    if not cell_types:
        raise ValueError(f"{function}: cell_types is empty; pass some of {available}, or None for every type.")
    unknown = [cell_type for cell_type in cell_types if cell_type not in available]
    if unknown:
        raise KeyError(f"{function}: no markers for {unknown}; available types: {available}.")
    nrows = math.ceil(len(cell_types) / ncols)
    ncols = min(ncols, len(cell_types))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False, layout="constrained"
    )
    column = f"{importance}_importance"
    for ax, cell_type in zip(axes.ravel(), cell_types, strict=False):
        rows = markers[markers["cell_type"] == cell_type].sort_values("rank")
        if importance == "permutation":
            rows = rows[rows[column].notna()].sort_values(column, ascending=False)
        rows = rows.head(n_genes) if n_genes is not None else rows
        positions = np.arange(len(rows))[::-1]
        colours = np.where(rows["higher_in_type"].to_numpy(dtype=bool), "#1f4e79", "#9dc3e6")
        errors = rows["permutation_std"].to_numpy() if importance == "permutation" else None
        ax.barh(positions, rows[column].to_numpy(), xerr=errors, color=colours)
        ax.set_yticks(positions, rows["gene"].tolist(), fontsize=8)
        ax.set_title(f"{cell_type} (AUROC {scores.loc[cell_type, 'auroc']:.2f})", fontsize=9)
        ax.set_xlabel(f"{importance} importance", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in axes.ravel()[len(cell_types) :]:
        ax.set_visible(False)
    shown = save_or_show(fig, "marker_importances", show=show, save=save)
    return None if shown else fig
