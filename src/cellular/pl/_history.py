"""``pl.training_history``: training curves of a CELLULAR model."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from cellular.model import CELLULAR, NotTrainedError

from ._utils import save_or_show

_TERMS = ("loss", "snn_loss", "batch_loss", "centroid_loss")


def training_history(
    model: CELLULAR,
    *,
    show: bool | None = None,
    save: bool | str | None = None,
) -> list[Axes] | None:
    """Plot the loss terms (train and validation) and the learnt temperature over epochs.

    Parameters
    ----------
    model
        A trained :class:`~cellular.CELLULAR` model.
    show
        Show the figure; by default when matplotlib is interactive and ``save`` is not given.
    save
        ``True`` saves to ``scanpy.settings.figdir / 'training_history.{scanpy.settings.file_format_figs}'``; a
        string is a file-name suffix (``'_pbmc.png'`` saves ``training_history_pbmc.png``).

    Returns
    -------
    The axes (one per loss term, then the temperature), or ``None`` when the figure is shown.

    Raises
    ------
    cellular.NotTrainedError
        When the model has not been trained.
    """
    if not isinstance(model, CELLULAR):
        raise TypeError(f"cellular.pl.training_history expects a cellular.CELLULAR model, got {type(model).__name__}.")
    if not model.is_trained or model.history is None:
        raise NotTrainedError("The model has no training history; call model.train() first.")
    history = model.history
    fig, axes = plt.subplots(1, len(_TERMS) + 1, figsize=(3.2 * (len(_TERMS) + 1), 3), constrained_layout=True)
    for ax, term in zip(axes, _TERMS, strict=False):
        for split in ("train", "validation"):
            key = f"{split}_{term}"
            if key in history:
                ax.plot(history[key].index, history[key][key], label=split)
        ax.set_title(term.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.legend(frameon=False)
    axes[-1].plot(history["temperature"].index, history["temperature"]["temperature"], color="black")
    axes[-1].set_title("temperature")
    axes[-1].set_xlabel("epoch")
    shown = save_or_show(fig, "training_history", show=show, save=save)
    return None if shown else list(axes)
