"""Training curves of a CELLULAR model."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from cellular.model import CELLULAR, NotTrainedError

_TERMS = ("loss", "snn_loss", "batch_loss", "centroid_loss")


def training_history(
    model: CELLULAR,
    *,
    show: bool | None = None,
    save: str | None = None,
) -> list[Axes] | None:
    """Plot the loss terms (train and validation) and the learnt temperature over epochs.

    Parameters
    ----------
    model
        A trained model.
    show
        Show the figure; by default when ``save`` is not given and matplotlib is interactive.
    save
        File to save the figure to.

    Returns
    -------
    The axes (one per loss term, then the temperature) when ``show`` is false, else ``None``.
    """
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
    if save is not None:
        fig.savefig(save, bbox_inches="tight")
    if show is None:
        show = save is None and plt.isinteractive()
    if show:
        plt.show()
        return None
    return list(axes)
