"""Training loop of the cell-type classifier head on a fixed embedding."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cellular.data import epoch_minibatches, stratified_split
from cellular.nn import CellTypeClassifier, inverse_frequency_weights


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
    """
    rng = np.random.default_rng(seed)
    fit_idx, stop_idx = stratified_split(labels, 0.9, rng)
    if stop_idx.size == 0:
        stop_idx = fit_idx
    steps_per_epoch = max(1, math.ceil(fit_idx.size / batch_size))
    if max_epochs is None:
        max_epochs = int(np.clip(math.ceil(1500 / steps_per_epoch), 20, 200))

    z_t = torch.as_tensor(z, dtype=torch.float32, device=device)
    y_t = torch.as_tensor(labels, dtype=torch.long, device=device)
    weights = None
    if class_weighted:
        weights = inverse_frequency_weights(torch.as_tensor(labels[fit_idx]), n_types)
        weights = (weights * int((weights > 0).sum())).to(device)

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        classifier = CellTypeClassifier(z.shape[1], n_types, hidden_sizes, dropout_rate).to(device)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
        stop_t = torch.as_tensor(stop_idx, device=device)
        best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
        history: list[dict[str, float]] = []
        progress = tqdm(range(max_epochs), desc="Training classifier", disable=not progress_bar, unit="epoch")
        for epoch in progress:
            classifier.train()
            total, seen = 0.0, 0
            for index in epoch_minibatches(fit_idx, batch_size, rng):
                index_t = torch.as_tensor(index, device=device)
                loss = F.cross_entropy(classifier(z_t[index_t]), y_t[index_t], weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * index.size
                seen += index.size
            classifier.eval()
            with torch.no_grad():
                stop_loss = float(F.cross_entropy(classifier(z_t[stop_t]), y_t[stop_t], weight=weights))
            history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "stopping_loss": stop_loss})
            progress.set_postfix(loss=f"{stop_loss:.3f}")
            if stop_loss < best_loss - 1e-6:
                best_loss, best_epoch, stale = stop_loss, epoch, 0
                best_state = copy.deepcopy(classifier.state_dict())
            else:
                stale += 1
                if stale >= early_stopping_patience:
                    break
        progress.close()
    classifier.load_state_dict(best_state)
    classifier.eval()
    return ClassifierFit(classifier, best_loss, best_epoch, len(history), history)


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
