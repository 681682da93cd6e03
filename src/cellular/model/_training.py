"""Training the CELLULAR encoder (and then its classifier head) with scvi-tools' runner."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
from scvi.train import TrainRunner

from cellular.data import n_epoch_minibatches, read_expression
from cellular.dataloaders import CellularDataModule
from cellular.train import CellularTrainingPlan, EpochProgressBar, RestoreBestWeights, quiet_lightning

from ._moments import REGISTERED_BATCHES

logger = logging.getLogger(__name__)

# Smallest validation-loss decrease early stopping counts for a model that matches batch moments (0 for one that
# does not): measured on the field benchmark's small references, same quality in about 60 % of the time.
DEFAULT_MIN_DELTA = 0.005
# Default length of encoder training: about this many optimiser steps, within the epoch bounds below.
DEFAULT_TRAINING_STEPS = 2000
MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS = 30, 400


def default_max_epochs(n_train_cells: int, batch_size: int, steps: int = DEFAULT_TRAINING_STEPS) -> int:
    """Epochs that give about ``steps`` optimiser steps over ``n_train_cells`` cells, within the default bounds."""
    steps_per_epoch = max(1, n_epoch_minibatches(n_train_cells, batch_size))
    return int(np.clip(math.ceil(steps / steps_per_epoch), MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS))


class TrainingMixin:
    """Encoder training (:meth:`train`) for :class:`CELLULAR`."""

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        train_size: float = 0.9,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        early_stopping_min_delta: float | None = None,
        warmup_epochs: int = 4,
        balanced_sampling: bool = True,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        seed: int | None = None,
        progress_bar: bool = True,
        classifier: bool = True,
        classifier_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the encoder with the CELLULAR loss, then the classifier head.

        Runs on scvi-tools' training machinery (:class:`scvi.train.TrainRunner`, a Lightning ``Trainer``) with
        :class:`cellular.train.CellularTrainingPlan` and :class:`cellular.dataloaders.CellularDataModule`: Adam
        with a linear warm-up and cosine decay of the learning rate, a stratified validation split, early stopping
        on the validation loss with the weights of the best epoch restored, scvi-tools' ``history`` and progress
        bar. ``devices=N`` with ``strategy="ddp"`` trains on ``N`` devices; the contrastive terms then see the
        global minibatch gathered from every device (see the training page of the documentation).

        Parameters
        ----------
        max_epochs
            Number of passes over the training cells; by default enough for about 2,000 optimiser steps, between
            30 and 400 epochs.
        batch_size
            Cells per minibatch.
        lr
            Peak learning rate.
        weight_decay
            Adam weight decay (the paper used 5e-5; 1e-3 generalised better to held-out technologies in our
            leave-one-batch-out runs, see the benchmarks page).
        train_size
            Fraction of cells used for training; the rest (stratified by label) gives the validation loss.
        early_stopping
            Stop when the validation loss has not improved for ``early_stopping_patience`` epochs.
        early_stopping_patience
            Epochs without improvement before stopping.
        early_stopping_min_delta
            Smallest decrease of the validation loss that counts as an improvement. By default 0.005 for a model
            that matches batch moments: on small references the loss keeps creeping down long after the labels
            have stopped changing, and ignoring such decreases stops those runs sooner at the same quality
            (benchmarks page, "Time to a trained model"). 0 for a model that does not (``match_batch_moments=False``):
            it needs that long tail of training to read a new batch's known cells as known.
        warmup_epochs
            Epochs of linear learning-rate warm-up.
        balanced_sampling
            Draw minibatch cells (with replacement) with probability inversely proportional to their type's
            frequency, so rare types appear in every minibatch; ``False`` gives plain shuffled epochs as in the
            paper.
        accelerator, devices
            Where to train (scvi-tools convention): ``accelerator="auto"`` uses a GPU when one is available;
            ``devices`` may name several devices for distributed training (with ``strategy``).
        seed
            Seed of the split, minibatch order and dropout; the model's ``seed`` when ``None``. The same seed gives
            the same model on CPU.
        progress_bar
            Show a progress bar over epochs.
        classifier
            Also train and calibrate the cell-type classifier head and the gene classifier (:meth:`train_classifier`),
            needed by :meth:`predict`, :func:`cellular.tl.cellular_annotate` and :func:`cellular.tl.novel_types`;
            :func:`cellular.tl.cellular_map` averages the gene classifier with its kNN vote.
        classifier_kwargs
            Arguments of :meth:`train_classifier`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (and on to Lightning's ``Trainer``): e.g. ``strategy="ddp"``,
            ``callbacks=[...]``, ``logger=...``, ``precision=...``. Under a distributed strategy scvi-tools turns
            early stopping off; the best epoch's weights are still restored when a validation split exists.
        """
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 for contrastive training, got {batch_size}.")
        if early_stopping_min_delta is None:
            early_stopping_min_delta = 0.0 if self.batch_moments_ is None else DEFAULT_MIN_DELTA
        elif not (math.isfinite(early_stopping_min_delta) and early_stopping_min_delta >= 0):
            raise ValueError(
                f"early_stopping_min_delta must be a finite number of at least 0, got {early_stopping_min_delta}; "
                "leave it unset for the default."
            )
        train_params = {
            key: value
            for key, value in locals().items()
            if key not in ("self", "progress_bar", "classifier", "classifier_kwargs", "trainer_kwargs")
        }
        if self.adata is None:
            raise ValueError("This model has no training data attached; load it with CELLULAR.load(path, adata=...).")
        seed = self.seed if seed is None else seed

        setup = self.setup_args
        expression, _ = read_expression(
            self.adata,
            self.genes,
            layer=setup["layer"],
            log_normalized=setup["log_normalized"],
            target_sum=self.target_sum,
            gene_count_fractions=self.gene_count_fractions,
        )
        self._standardize(expression, self.adata, None, REGISTERED_BATCHES)
        data_module = CellularDataModule(
            expression,
            self.registered_labels(),
            self.registered_batches(),
            train_size=train_size,
            batch_size=batch_size,
            seed=seed,
            balanced_sampling=balanced_sampling,
            thinning_probability=self.depth_thinning["probability"],
            thinning_min_fraction=self.depth_thinning["min_fraction"],
        )
        if not data_module.has_validation and early_stopping:
            logger.warning("No validation cells (train_size=%s): early stopping is off.", train_size)
            early_stopping = False

        # As many steps as the sampler gives (it drops a last minibatch of fewer than half a batch).
        steps_per_epoch = max(1, n_epoch_minibatches(data_module.n_train, batch_size))
        if max_epochs is None:
            max_epochs = default_max_epochs(data_module.n_train, batch_size)
        total_steps = max_epochs * steps_per_epoch
        training_plan = CellularTrainingPlan(
            self.module,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=min(warmup_epochs * steps_per_epoch, total_steps // 2),
            total_steps=total_steps,
        )
        best_weights = RestoreBestWeights("validation_loss", early_stopping_min_delta)
        trainer_kwargs = {
            "early_stopping": early_stopping,
            "early_stopping_monitor": "validation_loss",
            "early_stopping_patience": early_stopping_patience,
            "early_stopping_min_delta": early_stopping_min_delta,
            "check_val_every_n_epoch": 1 if data_module.has_validation else None,
            "limit_val_batches": None if data_module.has_validation else 0,
            "enable_progress_bar": progress_bar,
            "simple_progress_bar": False,
            "use_distributed_sampler": False,
            "callbacks": [
                *trainer_kwargs.pop("callbacks", []),
                *([best_weights] if early_stopping else []),
                *([EpochProgressBar("Training CELLULAR")] if progress_bar else []),
            ],
            **trainer_kwargs,
        }
        trainer_kwargs = {key: value for key, value in trainer_kwargs.items() if value is not None}
        # A new training run starts a new history (scvi-tools would append to it) and makes refitted models stale.
        self.history_, self.is_trained_ = None, False
        self._restricted_models = {}
        with quiet_lightning(quiet_stdout=not progress_bar), torch.random.fork_rng(devices=[]):
            runner = TrainRunner(
                self,
                training_plan=training_plan,
                data_splitter=data_module,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                **trainer_kwargs,
            )
            torch.manual_seed(seed)
            runner()
        self.module.eval()
        self.history_ = _history_frames({**(self.history_ or {}), **_epoch_frames(training_plan.epoch_history)})
        broken = self.non_finite_weights()
        losses = [self.history_[key].to_numpy() for key in ("train_loss", "validation_loss") if key in self.history_]
        # Diverged: the weights are not finite, or no epoch ended with a finite loss (early stopping restores the
        # best epoch's weights, so NaN in later epochs alone leaves a usable model).
        if broken or any(values.size and not np.isfinite(values).any() for values in losses):
            raise ValueError(
                f"Training diverged: the loss became NaN or infinite (weights not finite: {broken or 'none'}). "
                "Train again with a lower learning rate (lr=...) or stronger weight decay; check the input for extreme "
                "values."
            )

        self.train_indices_, self.validation_indices_ = data_module.train_idx, data_module.val_idx
        self.test_indices_ = data_module.test_idx
        history = self.history_
        epochs_run = len(history["train_loss"]) if "train_loss" in history else 0
        validation = history["validation_loss"]["validation_loss"] if "validation_loss" in history else None
        has_validation = validation is not None and len(validation) > 0
        # The epoch whose weights the model keeps: the one restored by early stopping, else the last one.
        if best_weights.best_epoch >= 0:
            best_epoch, best_loss = best_weights.best_epoch, best_weights.best_value
        else:
            best_epoch = epochs_run - 1
            best_loss = float(validation.iloc[-1]) if has_validation else None
        self.training_summary_ = {
            "epochs_run": epochs_run,
            "max_epochs": max_epochs,
            "best_epoch": int(best_epoch),
            "best_validation_loss": best_loss,
            "batch_size": batch_size,
            "device": str(runner.device),
            "devices": runner.lightning_devices
            if isinstance(runner.lightning_devices, int | str)
            else list(runner.lightning_devices),
            "strategy": str(trainer_kwargs.get("strategy", "auto")),
            "seed": seed,
        }
        self.is_trained_ = True
        self.train_params_ = train_params
        if self.reference_index_ is not None:
            logger.info("Retraining invalidates the model's reference index; build it again.")
        self.reference_index_ = None
        self.classifier_ = None
        self.calibration_cells_ = None
        self.gene_classifier_ = None
        if classifier:
            self.train_classifier(
                **{"accelerator": accelerator, "devices": devices, "seed": seed, **(classifier_kwargs or {})}
            )
        self._model_summary_string = self._summary()


def _epoch_frames(history: dict[str, list[float]]) -> dict[str, pd.DataFrame]:
    """Per-epoch values as one-column frames indexed by epoch, like scvi-tools' ``history``."""
    return {name: pd.DataFrame({name: values}, index=pd.RangeIndex(len(values))) for name, values in history.items()}


def _history_frames(history: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """scvi-tools' logger history as float frames indexed by integer epoch."""
    frames = {}
    for key, frame in history.items():
        frame = frame.astype(float)
        frame.index = frame.index.astype(int)
        frame.index.name = "epoch"
        frames[key] = frame
    return frames
