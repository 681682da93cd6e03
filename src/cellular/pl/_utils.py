"""Shared helpers of the plotting functions: scanpy's save/show convention and key checks."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.figure import Figure

_SAVE_HELP = "pass save=True or a file-name suffix such as '_query.png' (the file goes to scanpy.settings.figdir)"


def figure_path(plot_name: str, save: bool | str, fig: Figure) -> Path:
    """Where ``save`` sends the figure of ``plot_name``, following :func:`scanpy.pl` conventions.

    ``True`` gives ``figdir / f"{plot_name}.{file_format_figs}"``; a string is appended to ``plot_name``, with the
    file format taken from its extension when it has a known one (``"_query.png"`` gives
    ``figdir / "{plot_name}_query.png"``) and ``scanpy.settings.file_format_figs`` otherwise.
    """
    import scanpy as sc

    figdir = Path(sc.settings.figdir)
    default_format = str(sc.settings.file_format_figs).lstrip(".")
    if save is True:
        return figdir / f"{plot_name}.{default_format}"
    if not isinstance(save, str):
        raise TypeError(f"save must be None, True or a string, got {type(save).__name__}; {_SAVE_HELP}.")
    if "/" in save or "\\" in save:
        raise ValueError(
            f"save={save!r} contains a path separator, but it is a suffix of the file name (as in scanpy); "
            "set scanpy.settings.figdir to choose the folder."
        )
    suffix = Path(save).suffix.lower().lstrip(".")
    if suffix and suffix in fig.canvas.get_supported_filetypes():
        return figdir / f"{plot_name}{save}"
    return figdir / f"{plot_name}{save}.{default_format}"


def save_or_show(fig: Figure, plot_name: str, *, show: bool | None, save: bool | str | None) -> bool:
    """Save and/or show ``fig`` as scanpy does; return whether it was shown.

    ``save`` is ``None``/``False`` (do not save), ``True`` or a file-name suffix (see :func:`figure_path`). With
    ``show=None`` the figure is shown when matplotlib is interactive and it was not saved. A saved figure that is not
    shown is closed, so scripts that only save do not accumulate open figures.
    """
    saved = save is not None and save is not False
    if saved:
        path = figure_path(plot_name, save, fig)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    if show is None:
        show = not saved and matplotlib.is_interactive()
    if show:
        plt.show()
    elif saved:
        plt.close(fig)
    return bool(show)


def obs_column(adata: AnnData, key: str, *, function: str, writer: str | None = None) -> pd.Series:
    """``adata.obs[key]``, or a :class:`KeyError` naming the key, the plotting function and what writes the key."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"{function} expects an AnnData, got {type(adata).__name__}.")
    if key not in adata.obs.columns:
        fix = f"run {writer} first" if writer else "pass the name of an existing obs column"
        raise KeyError(
            f"{function}: adata.obs has no column {key!r}; {fix} (available columns: {list(adata.obs.columns)})."
        )
    return adata.obs[key]


def label_order(values: pd.Series, present: np.ndarray) -> list[str]:
    """Labels of ``values`` that occur in ``present``: in category order when categorical, sorted otherwise."""
    seen = set(present.tolist())
    if isinstance(values.dtype, pd.CategoricalDtype):
        return [label for label in map(str, values.cat.categories) if label in seen]
    return sorted(seen)
