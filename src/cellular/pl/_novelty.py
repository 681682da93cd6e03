"""``pl.novelty_histogram``: the distribution of novelty scores and the flagging threshold."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from ._utils import label_order, obs_column, save_or_show

_WRITER = "cellular.tl.novel_types"


def novelty_histogram(
    adata: AnnData,
    *,
    key: str = "cellular_novel",
    groupby: str | None = None,
    bins: int | str | np.ndarray = 50,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Plot the histogram of novelty scores with the score threshold above which cells are flagged novel.

    The scores are ``adata.obs[key + '_score']`` and the threshold is the ``score_threshold`` that
    :func:`cellular.tl.novel_types` stored in ``adata.uns['cellular'][key]['summary']`` (drawn as a dashed vertical
    line; no line when no score can reach the level). The number of cells flagged in ``adata.obs[key]`` is given in
    the title, and per group in the legend with ``groupby``.

    Parameters
    ----------
    adata
        Cells after :func:`cellular.tl.novel_types`.
    key
        ``key_added`` of :func:`cellular.tl.novel_types`.
    groupby
        ``obs`` column (e.g. the known cell type, or whether the type is in the reference): one overlaid
        histogram per group, on common bins. Cells with a missing group are left out of the groups.
    bins
        Number of bins, bin edges or a :func:`numpy.histogram_bin_edges` rule, over all scores.
    ax
        Axes to draw into; a new figure by default.
    show
        Show the figure; by default when matplotlib is interactive and ``save`` is not given.
    save
        ``True`` saves to ``scanpy.settings.figdir / 'novelty_histogram.{scanpy.settings.file_format_figs}'``; a
        string is a file-name suffix (``'_query.png'`` saves ``novelty_histogram_query.png``).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (one bar per bin, or one filled outline per group with ``groupby``), or
    ``None`` when the figure is shown.
    """
    function = "cellular.pl.novelty_histogram"
    scores = obs_column(adata, f"{key}_score", function=function, writer=_WRITER).to_numpy(dtype=float)
    flags = obs_column(adata, key, function=function, writer=_WRITER).to_numpy(dtype=bool)
    threshold = _threshold(adata, key, function)
    finite = np.isfinite(scores)
    if not finite.any():
        raise ValueError(f"{function}: adata.obs[{key + '_score'!r}] holds no finite score.")
    edges = np.histogram_bin_edges(scores[finite], bins=bins)

    if ax is None:
        _, ax = plt.subplots(figsize=(6 if groupby is None else 9, 3.5), constrained_layout=True)
    if groupby is None:
        ax.hist(scores[finite], bins=edges, color="tab:blue", label=f"cells (n={finite.sum()})")
    else:
        column = obs_column(adata, groupby, function=function)
        keep = finite & column.notna().to_numpy()
        groups = column.astype(str).to_numpy()
        for group in label_order(column, groups[keep]):
            members = keep & (groups == group)
            ax.hist(
                scores[members],
                bins=edges,
                histtype="stepfilled",
                alpha=0.45,
                label=f"{group} (n={members.sum()}, {flags[members].sum()} flagged)",
            )
    if np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(f"novelty score ({key}_score)")
    ax.set_ylabel("cells")
    ax.set_title(f"{flags.sum()} of {flags.size} cells flagged as novel ({key})")
    if groupby is None:
        ax.legend(frameon=False, fontsize="small")
    else:
        ax.legend(frameon=False, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    shown = save_or_show(ax.figure, "novelty_histogram", show=show, save=save)
    return None if shown else ax


def _threshold(adata: AnnData, key: str, function: str) -> float:
    """The score threshold stored by :func:`cellular.tl.novel_types` under ``key``."""
    record = adata.uns.get("cellular", {}).get(key)
    summary = record.get("summary") if isinstance(record, Mapping) else None
    if summary is None or "score_threshold" not in summary:
        raise KeyError(
            f"{function}: adata.uns['cellular'][{key!r}]['summary']['score_threshold'] is missing; run "
            f"{_WRITER}(adata, model, key_added={key!r}) first."
        )
    return float(summary["score_threshold"])
