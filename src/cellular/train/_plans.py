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
from cellular.nn import CellTypeClassifier, hierarchical_cross_entropy

from ._distributed import gather_minibatch


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor of step ``s``: linear warm-up over ``warmup_steps``, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class _EpochMeans:
    """Cell-weighted means of per-minibatch values over an epoch, accumulated on the device without synchronising.

    Cheaper than ``LightningModule.log`` at every step, which matters for small networks (the classifier head).
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n_cells = 0

    def add(self, values: dict[str, torch.Tensor], n_cells: int) -> None:
        for name, value in values.items():
            weighted = value.detach() * n_cells
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.n_cells += n_cells

    def pop(self) -> dict[str, float]:
        means = {name: float(total) / self.n_cells for name, total in self.sums.items()} if self.n_cells else {}
        self.sums, self.n_cells = {}, 0
        return means


class CellularTrainingPlan(LightningModule):
    """Trains a :class:`~cellular.module.CellularModule` with the CELLULAR loss.

    Adam with weight decay, a per-step linear warm-up and cosine decay of the learning rate, and the learnable
    temperature clamped into its range after every optimiser step. Under distributed training the loss is computed
    on the global minibatch (see :func:`gather_minibatch`), so ``N`` devices optimise the one-device objective.

    Per epoch, ``train_loss`` and ``validation_loss`` go to Lightning's loggers (early stopping monitors
    ``validation_loss``); :attr:`epoch_history` records those with ``train_snn_loss``, ``train_batch_loss``,
    ``train_centroid_loss``, the same with ``validation_``, ``temperature`` and ``lr`` (the model's ``history``).
    Logging each through Lightning would cost about a millisecond per value and epoch, whatever the network's size:
    on a small reference, a tenth of the training time.

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
        self._epoch_terms = {"train": _EpochMeans(), "validation": _EpochMeans()}
        self.epoch_history: dict[str, list[float]] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The CELLULAR loss of a minibatch, computed on the global minibatch under distributed training."""
        inference_outputs, _ = self.module(batch, compute_loss=False)
        z, labels, batches = gather_minibatch(
            inference_outputs["z"], batch[REGISTRY_KEYS.LABELS_KEY], batch[REGISTRY_KEYS.BATCH_KEY]
        )
        return self.module.loss({REGISTRY_KEYS.LABELS_KEY: labels, REGISTRY_KEYS.BATCH_KEY: batches}, {"z": z})

    def _record(self, output: LossOutput, split: str) -> None:
        terms = {"loss": output.loss, **output.extra_metrics}
        terms.pop("temperature")
        self._epoch_terms[split].add(terms, output.n_obs_minibatch)

    def _log_epoch(self, split: str, extra: dict[str, float] | None = None) -> None:
        # Every rank holds the loss of the same global minibatches: no synchronisation is needed.
        terms = {f"{split}_{name}": value for name, value in self._epoch_terms[split].pop().items()}
        if not terms:
            return
        self.log(f"{split}_loss", terms[f"{split}_loss"], on_step=False, on_epoch=True)
        for name, value in {**terms, **(extra or {})}.items():
            self.epoch_history.setdefault(name, []).append(value)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        output = self(batch)
        self._record(output, "train")
        return output.loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.module.clamp_temperature_()

    def on_train_epoch_end(self) -> None:
        schedule = {
            "temperature": float(self.module.temperature.detach()),
            "lr": float(self.optimizers().param_groups[0]["lr"]),
        }
        self._log_epoch("train", schedule)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._record(self(batch), "validation")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._epoch_terms["validation"].pop()
        else:
            self._log_epoch("validation")

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
    ancestry
        ``(n_types, n_nodes)`` ancestry matrix of a label hierarchy
        (:attr:`cellular.data.LabelHierarchy.ancestry`): the loss is then the hierarchical cross-entropy
        (:func:`cellular.nn.hierarchical_cross_entropy`), else the cross-entropy.
    """

    def __init__(
        self,
        classifier: CellTypeClassifier,
        *,
        lr: float,
        weight_decay: float,
        class_weights: torch.Tensor | None = None,
        ancestry: torch.Tensor | None = None,
    ):
        super().__init__()
        self.classifier = classifier
        self.lr = lr
        self.weight_decay = weight_decay
        self.register_buffer("class_weights", class_weights)
        self.register_buffer("ancestry", ancestry)
        self._epoch_losses = {"train": _EpochMeans(), "stopping": _EpochMeans()}

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.classifier(batch[REGISTRY_KEYS.X_KEY])
        labels = batch[REGISTRY_KEYS.LABELS_KEY]
        if self.ancestry is not None:
            return hierarchical_cross_entropy(logits, labels, self.ancestry, self.class_weights)
        return F.cross_entropy(logits, labels, weight=self.class_weights)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self._epoch_losses["train"].add({"loss": loss}, batch[REGISTRY_KEYS.LABELS_KEY].shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train_loss", self._epoch_losses["train"].pop()["loss"], on_step=False, on_epoch=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._epoch_losses["stopping"].add({"loss": self._loss(batch)}, batch[REGISTRY_KEYS.LABELS_KEY].shape[0])

    def on_validation_epoch_end(self) -> None:
        self.log("stopping_loss", self._epoch_losses["stopping"].pop()["loss"], on_step=False, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)
