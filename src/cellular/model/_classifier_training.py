"""Training of the cell-type classifier head on a fixed embedding, on scvi-tools' Lightning machinery."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scvi.train import Trainer

from cellular.dataloaders import EmbeddingDataModule
from cellular.nn import CellTypeClassifier, inverse_frequency_weights
from cellular.train import ClassifierTrainingPlan, EpochProgressBar, RestoreBestWeights, quiet_lightning


@dataclass
class ClassifierFit:
    """A fitted classifier with its training record."""

    classifier: CellTypeClassifier
    stopping_loss: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def fit_classifier(
    z: np.ndarray,
    labels: np.ndarray,
    n_types: int,
    *,
    hidden_sizes: tuple[int, int],
    dropout_rate: float,
    lr: float,
    weight_decay: float,
    max_epochs: int | None,
    batch_size: int,
    class_weighted: bool,
    early_stopping_patience: int,
    seed: int,
    device: torch.device,
    progress_bar: bool = False,
    ancestry: np.ndarray | None = None,
) -> ClassifierFit:
    """Fit a :class:`~cellular.nn.CellTypeClassifier` on embedded cells with weighted cross-entropy.

    A stratified tenth of the cells is held back to choose the stopping epoch; the weights of the best epoch are
    returned.

    Parameters
    ----------
    z
        ``(n_cells, n_latent)`` embedding of labelled cells.
    labels
        ``(n_cells,)`` type codes in ``0 .. n_types - 1``.
    n_types
        Number of types (output width).
    hidden_sizes, dropout_rate
        Architecture of the head.
    lr, weight_decay
        Adam settings.
    max_epochs
        Epoch limit; enough for about 1,500 steps (20 to 200 epochs) when ``None``.
    batch_size
        Cells per minibatch.
    class_weighted
        Weight the cross-entropy by inverse type frequency, so rare types count as much as common ones.
    early_stopping_patience
        Epochs without improvement of the held-back loss before stopping.
    seed
        Seed of the split, minibatch order, initialisation and dropout.
    device
        Where to train.
    progress_bar
        Show a progress bar over epochs.
    ancestry
        Ancestry matrix of a label hierarchy over the types: train with the hierarchical cross-entropy.
    """
    data = EmbeddingDataModule(z, labels, batch_size=batch_size, seed=seed)
    steps_per_epoch = max(1, math.ceil(data.train_idx.size / batch_size))
    if max_epochs is None:
        max_epochs = int(np.clip(math.ceil(1500 / steps_per_epoch), 20, 200))
    weights = None
    if class_weighted:
        weights = inverse_frequency_weights(torch.as_tensor(labels[data.train_idx]), n_types)
        weights = weights * int((weights > 0).sum())

    best_weights = RestoreBestWeights("stopping_loss", min_delta=1e-6)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        classifier = CellTypeClassifier(z.shape[1], n_types, hidden_sizes, dropout_rate)
        plan = ClassifierTrainingPlan(
            classifier,
            lr=lr,
            weight_decay=weight_decay,
            class_weights=weights,
            ancestry=None if ancestry is None else torch.as_tensor(ancestry, dtype=torch.float32),
        )
        with quiet_lightning(quiet_stdout=not progress_bar):
            trainer = Trainer(
                max_epochs=max_epochs,
                accelerator="gpu" if device.type == "cuda" else device.type,
                devices=[device.index or 0] if device.type == "cuda" else 1,
                early_stopping=True,
                early_stopping_monitor="stopping_loss",
                early_stopping_patience=early_stopping_patience,
                early_stopping_min_delta=1e-6,
                check_val_every_n_epoch=1,
                enable_progress_bar=progress_bar,
                simple_progress_bar=False,
                use_distributed_sampler=False,
                callbacks=[best_weights, *([EpochProgressBar("Training classifier")] if progress_bar else [])],
            )
            trainer.fit(plan, data)
    classifier.eval()
    history = [
        {"epoch": int(epoch), "train_loss": float(train), "stopping_loss": float(stop)}
        for (epoch, train), stop in zip(
            trainer.logger.history["train_loss"]["train_loss"].items(),
            trainer.logger.history["stopping_loss"]["stopping_loss"],
            strict=True,
        )
    ]
    return ClassifierFit(classifier, best_weights.best_value, best_weights.best_epoch, len(history), history)


@torch.no_grad()
def classifier_logits(classifier: CellTypeClassifier, z: np.ndarray, batch_size: int = 65536) -> torch.Tensor:
    """Logits of the classifier on a (possibly large) embedding, computed in chunks on the classifier's device."""
    device = next(classifier.parameters()).device
    classifier.eval()
    chunks = [
        classifier(torch.as_tensor(z[start : start + batch_size], dtype=torch.float32, device=device)).cpu()
        for start in range(0, z.shape[0], batch_size)
    ]
    if not chunks:
        return torch.zeros((0, classifier.layers[-1].out_features))
    return torch.cat(chunks)
