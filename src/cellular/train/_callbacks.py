"""Lightning callbacks of CELLULAR training."""

from __future__ import annotations

import math
import sys

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm


class RestoreBestWeights(Callback):
    """Keep the weights of the epoch with the lowest monitored validation metric and restore them after training.

    An epoch counts as the new best only when it improves on the best by more than ``min_delta`` (the rule early
    stopping counts improvements by), so a later epoch lower by less than that does not replace it.

    Pairs with early stopping (which decides when to stop; this callback decides which weights to keep). Under
    distributed training the monitored metric is synchronised, so every rank restores the same epoch.

    Parameters
    ----------
    monitor
        Logged metric to minimise.
    min_delta
        Smallest decrease that counts as an improvement.
    """

    def __init__(self, monitor: str = "validation_loss", min_delta: float = 0.0):
        super().__init__()
        self.monitor = monitor
        self.min_delta = min_delta
        self.best_value = math.inf
        self.best_epoch = -1
        self._best_state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if value < self.best_value - self.min_delta:
            self.best_value, self.best_epoch = value, trainer.current_epoch
            self._best_state = {name: tensor.detach().clone() for name, tensor in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._best_state is not None:
            pl_module.load_state_dict(self._best_state)


class EpochProgressBar(ProgressBar):
    """One tqdm bar over epochs (on stderr), with the epoch's logged losses as its postfix.

    Parameters
    ----------
    description
        Text before the bar, e.g. ``"Training CELLULAR"``.
    """

    def __init__(self, description: str):
        super().__init__()
        self.description = description
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bar = tqdm(
            total=trainer.max_epochs, desc=self.description, unit="epoch", disable=not self._enabled, file=sys.stderr
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is None:
            return
        self._bar.update()
        metrics = {
            key: f"{float(value):.3f}"
            for key, value in trainer.callback_metrics.items()
            if key in ("train_loss", "validation_loss", "stopping_loss")
        }
        self._bar.set_postfix(metrics, refresh=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __getstate__(self) -> dict:
        # A tqdm bar cannot be pickled (spawned distributed processes pickle the callbacks).
        return {**self.__dict__, "_bar": None}
