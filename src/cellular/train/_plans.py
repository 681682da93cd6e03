"""Lightning training plans: the CELLULAR encoder and the cell-type classifier head."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput

from cellular.module import CellularModule
from cellular.nn import CellTypeClassifier

from ._distributed import gather_minibatch


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor of step ``s``: linear warm-up over ``warmup_steps``, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class CellularTrainingPlan(LightningModule):
    """Trains a :class:`~cellular.module.CellularModule` with the CELLULAR loss.

    Adam with weight decay, a per-step linear warm-up and cosine decay of the learning rate, and the learnable
    temperature clamped into its range after every optimiser step. Under distributed training the loss is computed
    on the global minibatch (see :func:`gather_minibatch`), so ``N`` devices optimise the one-device objective.

    Logged per epoch (scvi-tools' ``history``): ``train_loss``, ``train_snn_loss``, ``train_batch_loss``,
    ``train_centroid_loss``, the same with ``validation_``, ``temperature`` and ``lr``.

    Parameters
    ----------
    module
        The module to train.
    lr
        Peak learning rate.
    weight_decay
        Adam weight decay.
    warmup_steps, total_steps
        Length of the warm-up and of the whole schedule, in optimiser steps.
    """

    def __init__(self, module: CellularModule, *, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
        super().__init__()
        self.module = module
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The CELLULAR loss of a minibatch, computed on the global minibatch under distributed training."""
        inference_outputs, _ = self.module(batch, compute_loss=False)
        z, labels, batches = gather_minibatch(
            inference_outputs["z"], batch[REGISTRY_KEYS.LABELS_KEY], batch[REGISTRY_KEYS.BATCH_KEY]
        )
        return self.module.loss({REGISTRY_KEYS.LABELS_KEY: labels, REGISTRY_KEYS.BATCH_KEY: batches}, {"z": z})

    def _log_terms(self, output: LossOutput, prefix: str) -> None:
        terms = {"loss": output.loss, **output.extra_metrics}
        terms.pop("temperature")
        for name, value in terms.items():
            # Every rank holds the loss of the same global minibatch: no synchronisation is needed.
            self.log(
                f"{prefix}_{name}", value.detach(), on_step=False, on_epoch=True, batch_size=output.n_obs_minibatch
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        output = self(batch)
        self._log_terms(output, "train")
        return output.loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.module.clamp_temperature_()

    def on_train_epoch_end(self) -> None:
        self.log("temperature", self.module.temperature.detach(), on_step=False, on_epoch=True)
        self.log("lr", float(self.optimizers().param_groups[0]["lr"]), on_step=False, on_epoch=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._log_terms(self(batch), "validation")

    def configure_optimizers(self):
        device_type = next(self.module.parameters()).device.type
        optimizer = torch.optim.Adam(
            self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=device_type in ("cpu", "cuda")
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.warmup_steps, self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ClassifierTrainingPlan(LightningModule):
    """Trains a :class:`~cellular.nn.CellTypeClassifier` on embedded cells with (class-weighted) cross-entropy.

    Logs ``train_loss`` and ``stopping_loss`` (the held-back cells' loss) per epoch.

    Parameters
    ----------
    classifier
        The head to train.
    lr, weight_decay
        Adam settings.
    class_weights
        Cross-entropy weight per type, or ``None``.
    """

    def __init__(
        self,
        classifier: CellTypeClassifier,
        *,
        lr: float,
        weight_decay: float,
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.classifier = classifier
        self.lr = lr
        self.weight_decay = weight_decay
        self.register_buffer("class_weights", class_weights)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.classifier(batch[REGISTRY_KEYS.X_KEY])
        return F.cross_entropy(logits, batch[REGISTRY_KEYS.LABELS_KEY], weight=self.class_weights)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        n = batch[REGISTRY_KEYS.LABELS_KEY].shape[0]
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        n = batch[REGISTRY_KEYS.LABELS_KEY].shape[0]
        self.log("stopping_loss", self._loss(batch), on_step=False, on_epoch=True, batch_size=n)

    def configure_optimizers(self):
        return torch.optim.Adam(self.classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)
