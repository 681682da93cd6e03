"""``pl.confusion_matrix`` and ``pl.f1_per_type``: predicted labels against known ones."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.patches import Patch
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import f1_score

from ._utils import label_order, obs_column, save_or_show

_NORMALIZE = ("true", "pred", "all", None)


def confusion_matrix(
    adata: AnnData,
    *,
    true_key: str,
    pred_key: str = "cellular_label",
    normalize: str | None = "true",
    ax: Axes | None = None,
    annotate: bool = True,
    cmap: str = "Blues",
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Plot the confusion matrix of predicted against known cell-type labels.

    Rows are the known labels present in ``adata.obs[true_key]``; columns are the same labels in the same order
    (so that agreement lies on the diagonal, including known types the model cannot predict, such as novel ones),
    followed by the other predicted labels (e.g. ``'Unknown'`` and reference types absent from the known labels).
    Cells with a missing known or predicted label are left out.

    Parameters
    ----------
    adata
        Cells annotated by :func:`cellular.tl.cellular_annotate` (or any predicted-label column).
    true_key
        ``obs`` column holding the known labels.
    pred_key
        ``obs`` column holding the predicted labels.
    normalize
        ``'true'``: each row sums to 1 (the fraction of each known type given each label, i.e. recall on the
        diagonal); ``'pred'``: each non-empty column sums to 1 (precision on the diagonal); ``'all'``: the matrix
        sums to 1; ``None``: cell counts.
    ax
        Axes to draw into; a new figure by default.
    annotate
        Write the value in every matrix entry.
    cmap
        Matplotlib colour map.
    show
        Show the figure; by default when matplotlib is interactive and ``save`` is not given.
    save
        ``True`` saves to ``scanpy.settings.figdir / 'confusion_matrix.{scanpy.settings.file_format_figs}'``; a
        string is a file-name suffix (``'_query.png'`` saves ``confusion_matrix_query.png``).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (its image holds the ``(n_known, n_predicted)`` matrix), or ``None`` when
    the figure is shown.
    """
    function = "cellular.pl.confusion_matrix"
    if normalize not in _NORMALIZE:
        raise ValueError(f"{function}: normalize must be one of {_NORMALIZE}, got {normalize!r}.")
    y_true, y_pred, rows, predicted = _paired_labels(adata, true_key, pred_key, function)
    columns = rows + [label for label in predicted if label not in set(rows)]
    # The known labels come first among the columns, so the first rows of the square matrix are the known ones.
    matrix = sklearn_confusion_matrix(y_true, y_pred, labels=columns)[: len(rows)].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "true":
            matrix = matrix / matrix.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            matrix = np.nan_to_num(matrix / matrix.sum(axis=0, keepdims=True))
        elif normalize == "all":
            matrix = matrix / matrix.sum()

    if ax is None:
        _, ax = plt.subplots(figsize=(2.5 + 0.55 * len(columns), 1.5 + 0.5 * len(rows)), constrained_layout=True)
    image = ax.imshow(matrix, cmap=cmap, aspect="auto", vmin=0.0, vmax=1.0 if normalize else None)
    ax.figure.colorbar(image, ax=ax, label="cells" if normalize is None else f"fraction ({normalize})")
    ax.set_xticks(np.arange(len(columns)), labels=columns, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(len(rows)), labels=rows)
    ax.set_xlabel(f"predicted ({pred_key})")
    ax.set_ylabel(f"known ({true_key})")
    accuracy = float(np.mean(y_true == y_pred))
    ax.set_title(f"{y_true.size} cells, {accuracy:.1%} agree")
    if annotate:
        _write_values(ax, matrix, integer=normalize is None)
    shown = save_or_show(ax.figure, "confusion_matrix", show=show, save=save)
    return None if shown else ax


def f1_per_type(
    adata: AnnData,
    *,
    true_key: str,
    pred_key: str = "cellular_label",
    ax: Axes | None = None,
    sort: bool = True,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Plot the F1 score of the predicted labels for every known cell type.

    For each label in ``adata.obs[true_key]``, F1 is :func:`sklearn.metrics.f1_score` of that label (a cell predicted
    ``'Unknown'`` counts as a miss); the title gives the macro-F1, their mean. Types the predictions cannot take
    (not among the categories of a categorical ``pred_key``, e.g. types absent from the reference, whose F1 is
    therefore 0) are drawn in grey. Each bar is annotated with the type's number of cells ``n``. Cells with a
    missing known or predicted label are left out.

    Parameters
    ----------
    adata
        Cells annotated by :func:`cellular.tl.cellular_annotate` (or any predicted-label column).
    true_key
        ``obs`` column holding the known labels.
    pred_key
        ``obs`` column holding the predicted labels.
    ax
        Axes to draw into; a new figure by default.
    sort
        Order the bars by F1, best on top; otherwise in the order of the known labels (top to bottom).
    show
        Show the figure; by default when matplotlib is interactive and ``save`` is not given.
    save
        ``True`` saves to ``scanpy.settings.figdir / 'f1_per_type.{scanpy.settings.file_format_figs}'``; a string
        is a file-name suffix (``'_query.png'`` saves ``f1_per_type_query.png``).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (one horizontal bar per known type, width = F1), or ``None`` when the figure
    is shown.
    """
    function = "cellular.pl.f1_per_type"
    y_true, y_pred, types, predicted = _paired_labels(adata, true_key, pred_key, function)
    scores = f1_score(y_true, y_pred, labels=types, average=None, zero_division=0.0)
    support = pd.Series(y_true).value_counts().reindex(types).to_numpy()
    order = np.argsort(-scores, kind="stable") if sort else np.arange(len(types))
    names = [types[i] for i in order]
    scores, support = scores[order], support[order]
    predictable = np.isin(names, predicted)

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 1.0 + 0.35 * len(names)), constrained_layout=True)
    positions = np.arange(len(names))[::-1]  # first type on top
    colors = np.where(predictable, "tab:blue", "lightgrey")
    bars = ax.barh(positions, scores, color=colors)
    ax.bar_label(bars, labels=[f"n={n}" for n in support], padding=3, fontsize="small")
    ax.set_yticks(positions, labels=names)
    ax.set_xlim(0.0, 1.15)
    ax.set_xticks(np.linspace(0.0, 1.0, 6))
    ax.set_xlabel("F1")
    ax.set_title(f"macro-F1 {scores.mean():.3f} over {len(names)} types ({pred_key} vs {true_key})")
    if not predictable.all():
        grey = Patch(color="lightgrey", label="not a predicted label")
        ax.legend(handles=[grey], loc="lower right", frameon=False, fontsize="small")
    shown = save_or_show(ax.figure, "f1_per_type", show=show, save=save)
    return None if shown else ax


def _paired_labels(
    adata: AnnData, true_key: str, pred_key: str, function: str
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Known and predicted labels (as strings) of the cells having both, the known labels and the predicted labels.

    The predicted labels are all categories of a categorical ``pred_key`` (so labels the model can give but did not
    are included), else the labels that occur.
    """
    truth = obs_column(adata, true_key, function=function)
    prediction = obs_column(adata, pred_key, function=function, writer="cellular.tl.cellular_annotate")
    keep = (truth.notna() & prediction.notna()).to_numpy()
    if not keep.any():
        raise ValueError(f"{function}: no cell has both a known ({true_key!r}) and a predicted ({pred_key!r}) label.")
    y_true = truth[keep].astype(str).to_numpy()
    y_pred = prediction[keep].astype(str).to_numpy()
    rows = label_order(truth, y_true)
    if hasattr(prediction, "cat"):
        predicted = [str(label) for label in prediction.cat.categories]
    else:
        predicted = label_order(prediction, y_pred)
    return y_true, y_pred, rows, predicted


def _write_values(ax: Axes, matrix: np.ndarray, *, integer: bool) -> None:
    """Write each entry of ``matrix`` (drawn by ``imshow`` on ``ax``) in its square, light on dark squares."""
    finite = matrix[np.isfinite(matrix)]
    middle = (finite.max() if finite.size else 1.0) / 2.0
    size = "x-small" if max(matrix.shape) > 12 else "small"
    for (row, column), value in np.ndenumerate(matrix):
        text = f"{int(value)}" if integer else f"{value:.2f}"
        color = "white" if value > middle else "black"
        ax.text(column, row, text, ha="center", va="center", color=color, fontsize=size)
