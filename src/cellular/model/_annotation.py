"""The classifier stage on the trained CELLULAR encoder: fitting the head, its calibration and the novelty score."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from cellular.data import stratified_split
from cellular.data._moments import MIN_BATCH_CELLS
from cellular.metrics import expected_calibration_error
from cellular.nn import CellTypeClassifier, fit_temperature

from ._classifier_training import classifier_logits, fit_classifier
from ._common import SAME_AS_TRAINING
from ._device import resolve_device
from ._gene_classifier import GENE_CLASSIFIER_C, check_gene_uncertainty_weight
from ._novelty import NoveltyReference
from ._novelty_spaces import MAX_HIDDEN_REFERENCE_CELLS, NoveltySpaces, PCASpace
from ._panels import CalibrationCells

logger = logging.getLogger(__name__)

MIN_CALIBRATION_CELLS = 20
# train_classifier arguments that fit_classifier takes as they are (the searched ones excepted)
NOVELTY_WEIGHTS = ("novelty_uncertainty_weight", "novelty_hidden_weight", "novelty_gene_weight")
NOVELTY_GENE_WEIGHT = 3.0
# the gene distance's largest weight in the score batch moment matching leaves likely novel cells out by
MATCHING_GENE_WEIGHT = 2.0
_FIT_SETTINGS = ("weight_decay", "max_epochs", "batch_size", "class_weighted", "early_stopping_patience")


class AnnotationMixin:
    """Fitting the classifier head, its calibration and the novelty reference (predictions: ``PredictionMixin``).

    Mixed into :class:`~cellular.CELLULAR`; relies on its encoder, registry and training split.
    """

    classifier_: CellTypeClassifier | None = None
    classifier_params_: dict | None = None
    classifier_summary_: dict | None = None
    calibration_temperature_: float | None = None
    novelty_reference_: NoveltyReference | None = None
    classifier_history_: pd.DataFrame | None = None

    @property
    def has_classifier(self) -> bool:
        """Whether the classifier head is trained (needed by :meth:`predict` and novelty scores)."""
        return self.classifier_ is not None

    # ------------------------------------------------------------- training
    def train_classifier(
        self,
        *,
        hidden_sizes: tuple[int, int] = (256, 128),
        dropout_rate: float = 0.2,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        max_epochs: int | None = None,
        batch_size: int = 256,
        class_weighted: bool = True,
        early_stopping_patience: int = 10,
        novelty_uncertainty_weight: float = 0.1,
        novelty_hidden_weight: float = 1.0,
        novelty_gene_weight: float | None = None,
        novelty_gene_uncertainty_weight: float | None = None,
        gene_classifier: bool = True,
        gene_classifier_c: float = GENE_CLASSIFIER_C,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        seed: int | None = None,
        progress_bar: bool = False,
    ) -> None:
        """Train the cell-type classifier on the frozen embedding and calibrate it.

        The head (the paper's two-hidden-layer MLP) is fitted with class-weighted cross-entropy on the embedding of
        the encoder's training cells. The cells held out of encoder training (``train_size < 1`` in :meth:`train`)
        then calibrate it: a softmax temperature fitted by likelihood, and the novelty scores that turn into
        conformal p-values (see :meth:`get_novelty_scores`). With fewer than 20 held-out labelled cells a fifth of
        the training cells is used instead, with a warning: the encoder has seen them, so confidences and p-values
        come out optimistic.

        Parameters
        ----------
        hidden_sizes
            Widths of the two hidden layers.
        dropout_rate
            Dropout after each hidden layer.
        lr, weight_decay
            Adam settings. The head is small and its input fixed: ``lr=1e-2`` reaches the quality of ``1e-3`` in about a
            quarter of the epochs on the field benchmark's references (benchmarks page, "Time to a trained model").
        max_epochs
            Epoch limit (early stopping on a held-back tenth of the training cells usually ends sooner); enough
            for about 1,500 steps when ``None``.
        batch_size
            Cells per minibatch.
        class_weighted
            Weight the loss by inverse type frequency so rare types are not ignored.
        early_stopping_patience
            Epochs without improvement before stopping.
        novelty_uncertainty_weight
            Weight of the classifier uncertainty relative to the prototype distance in the novelty score. Small by
            default: on held-out cell types the distance separates novel cells far better (see the benchmarks
            page), while uncertainty mostly marks cells between two known types.
        novelty_hidden_weight
            Weight of the distance to the nearest training cells in the encoder's first hidden layer, relative to
            those cells' own neighbour distances, which keeps differences the contrastive embedding collapses (an
            unseen type resembling a trained one); ``0`` leaves it out.
        novelty_gene_weight
            Weight of the distance to the nearest training cells in the encoder's input (the log-normalised,
            batch-matched genes, standardised and clipped at 10 as ``sc.pp.scale`` does, PCA to 50 dimensions), which
            keeps differences the encoder's weights discard: on the field benchmark's held-out types it lifts the
            endocrinogenesis and Symphony AUROC (benchmarks page, "Novelty score parts"). ``None``: 3.0 for a model
            that matches batch moments, else 0, because unmatched inputs carry a new batch's shift and the distance
            would flag its known cells. ``0`` leaves it out and stores no gene space with the model. Batch moment
            matching, which leaves a query batch's likely novel cells out of its moments, reads the part at a weight
            of at most 2.
        novelty_gene_uncertainty_weight
            Weight of the gene classifier's uncertainty (the entropy of its probabilities at temperature 1), which marks
            cells a linear model on the genes cannot place among the known types. ``None``: decided by the reference
            itself. Each type in turn is left out of a gene classifier and found among the held-out cells by that
            classifier's uncertainty; when the mean AUROC (``classifier_summary_["gene_uncertainty_auroc"]``) is at
            least 0.9, as on discrete types such as cell lines, the part joins at weight 1, else it is left out
            (along a differentiation continuum known cells between two types are uncertain too). When every type is
            found without a miss (each AUROC at least 0.999, ``classifier_summary_["gene_uncertainty_worst_auroc"]``)
            the part leads the score at weight 16. The assessment runs
            for every model that matches batch moments and has the gene classifier; without moment matching the part
            is left out unless a weight is given. Needs ``gene_classifier=True`` when positive.
        gene_classifier
            Also fit the gene classifier: a multinomial logistic regression on the encoder's inputs of the same
            training cells (up to 50,000), calibrated by a temperature on the same held-out cells. The reference index's
            label transfer averages its probabilities with the kNN vote (:func:`cellular.tl.cellular_map`), which
            maps queries from other labs better than the vote alone (benchmarks page, "Label transfer: kNN vote and
            gene classifier").
        gene_classifier_c
            Its inverse L2 penalty (scikit-learn's ``C``).
        accelerator, devices
            Where to embed and train.
        seed
            Seed of splits, initialisation and minibatches; the model's ``seed`` when ``None``.
        progress_bar
            Show a progress bar over epochs.
        """
        params = {
            "hidden_sizes": [int(size) for size in hidden_sizes],
            "dropout_rate": float(dropout_rate),
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "max_epochs": max_epochs,
            "batch_size": int(batch_size),
            "class_weighted": bool(class_weighted),
            "early_stopping_patience": int(early_stopping_patience),
            "novelty_uncertainty_weight": float(novelty_uncertainty_weight),
            "novelty_hidden_weight": float(novelty_hidden_weight),
            "novelty_gene_weight": float(
                self._default_gene_weight() if novelty_gene_weight is None else novelty_gene_weight
            ),
            "novelty_gene_uncertainty_weight": (
                None if novelty_gene_uncertainty_weight is None else float(novelty_gene_uncertainty_weight)
            ),
            "gene_classifier": bool(gene_classifier),
            "gene_classifier_c": float(gene_classifier_c),
        }
        if not (math.isfinite(params["gene_classifier_c"]) and params["gene_classifier_c"] > 0):
            raise ValueError(f"gene_classifier_c must be a positive number, got {gene_classifier_c}.")
        for name in NOVELTY_WEIGHTS:
            if params[name] < 0:
                raise ValueError(f"{name} must be non-negative, got {params[name]}.")
        check_gene_uncertainty_weight(params)
        split = self._classifier_data(accelerator, devices, seed)
        self._fit_and_calibrate(split, params, resolve_device(accelerator, devices), progress_bar)

    def tune_classifier(
        self,
        n_trials: int = 20,
        *,
        timeout: float | None = None,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        seed: int | None = None,
        progress_bar: bool = True,
        **fixed,
    ) -> dict:
        """Search the classifier's layer sizes, learning rate and dropout with optuna, then train the best.

        Each trial trains a head on the training cells and is scored by its class-weighted loss on a held-back tenth
        of them; the calibration cells are not looked at. Needs the ``tune`` extra
        (``pip install "cellular-sc[tune]"``).

        Parameters
        ----------
        n_trials
            Number of settings tried.
        timeout
            Stop the search after this many seconds.
        accelerator, devices
            Where to embed and train.
        seed
            Seed of the sampler and of every trial.
        progress_bar
            Show optuna's progress bar over the trials (on stderr); each trial trains a head, so a search of 20
            trials takes minutes on a CPU.
        **fixed
            Other :meth:`train_classifier` arguments, held fixed during the search.

        Returns
        -------
        The best settings (``hidden_sizes``, ``dropout_rate``, ``lr``), also recorded in
        ``classifier_summary_["tuning"]``.
        """
        try:
            import optuna
        except ImportError as error:
            raise ImportError(
                'tune_classifier needs optuna; install it with pip install "cellular-sc[tune]".'
            ) from error
        if n_trials < 1:
            raise ValueError(f"n_trials must be at least 1, got {n_trials}.")
        searched = {"hidden_sizes", "dropout_rate", "lr"} & set(fixed)
        if searched:
            raise ValueError(f"{sorted(searched)} are searched by tune_classifier; do not pass them.")
        split = self._classifier_data(accelerator, devices, seed)
        z, labels, train_idx, _, _, seed = split
        device = resolve_device(accelerator, devices)
        defaults = inspect.signature(self.train_classifier).parameters
        base = {name: defaults[name].default for name in _FIT_SETTINGS}
        for name in (*NOVELTY_WEIGHTS, "novelty_gene_uncertainty_weight", "gene_classifier", "gene_classifier_c"):
            base[name] = defaults[name].default
        base.update(fixed)
        if base["novelty_gene_weight"] is None:
            base["novelty_gene_weight"] = self._default_gene_weight()
        check_gene_uncertainty_weight(base)
        fit_settings = {name: base[name] for name in _FIT_SETTINGS}

        def objective(trial) -> float:
            params = {
                "hidden_sizes": (
                    trial.suggest_categorical("hidden_1", [64, 128, 256, 512]),
                    trial.suggest_categorical("hidden_2", [32, 64, 128, 256]),
                ),
                "dropout_rate": trial.suggest_float("dropout_rate", 0.0, 0.5),
                "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
            }
            n_types = len(self.cell_types)
            fit = fit_classifier(
                z[train_idx],
                labels[train_idx],
                n_types,
                seed=seed,
                device=device,
                ancestry=self._ancestry(),
                **params,
                **fit_settings,
            )
            return fit.stopping_loss

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would bury the progress bar
        try:
            study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
            study.optimize(objective, n_trials=n_trials, timeout=timeout, show_progress_bar=progress_bar)
        finally:
            optuna.logging.set_verbosity(verbosity)
        best = {
            "hidden_sizes": [int(study.best_params["hidden_1"]), int(study.best_params["hidden_2"])],
            "dropout_rate": float(study.best_params["dropout_rate"]),
            "lr": float(study.best_params["lr"]),
        }
        self._fit_and_calibrate(split, {**base, **best}, device, progress_bar=False)
        self.classifier_summary_["tuning"] = {
            "n_trials": len(study.trials),
            "best_stopping_loss": float(study.best_value),
            "best_params": best,
        }
        return best

    def _classifier_data(self, accelerator, devices, seed):
        self.require_trained()
        if self.adata is None:
            raise ValueError(
                "Training the classifier needs the model's training data; load the model with "
                "CELLULAR.load(path, adata=training_adata)."
            )
        seed = self.seed if seed is None else seed
        z = self.get_latent_representation(accelerator=accelerator, devices=devices)
        labels = self.registered_labels()
        labelled = labels >= 0
        train_idx = np.arange(labels.size) if self.train_indices_ is None else np.asarray(self.train_indices_)
        held_out = np.zeros(0, int) if self.validation_indices_ is None else np.asarray(self.validation_indices_)
        train_idx, held_out = train_idx[labelled[train_idx]], held_out[labelled[held_out]]
        source = "validation"
        if held_out.size < MIN_CALIBRATION_CELLS:
            logger.warning(
                "Only %d labelled cells were held out of encoder training; calibrating on a fifth of the training "
                "cells instead. The encoder has seen them, so confidences and novelty p-values will be optimistic; "
                "train the model with train_size < 1 to avoid this.",
                held_out.size,
            )
            fit_part, calibration_part = stratified_split(labels[train_idx], 0.8, np.random.default_rng(seed))
            train_idx, held_out = train_idx[fit_part], train_idx[calibration_part]
            source = "training"
        return z, labels, train_idx, held_out, source, seed

    def _fit_and_calibrate(self, split, params: dict, device: torch.device, progress_bar: bool) -> None:
        z, labels, train_idx, calibration_idx, source, seed = split
        n_types = len(self.cell_types)
        fit = fit_classifier(
            z[train_idx],
            labels[train_idx],
            n_types,
            hidden_sizes=tuple(params["hidden_sizes"]),
            dropout_rate=params["dropout_rate"],
            lr=params["lr"],
            weight_decay=params["weight_decay"],
            max_epochs=params["max_epochs"],
            batch_size=params["batch_size"],
            class_weighted=params["class_weighted"],
            early_stopping_patience=params["early_stopping_patience"],
            seed=seed,
            device=device,
            progress_bar=progress_bar,
            ancestry=self._ancestry(),
        )
        logits = classifier_logits(fit.classifier, z[calibration_idx])
        calibration_labels = torch.as_tensor(labels[calibration_idx])
        temperature = fit_temperature(logits, calibration_labels)
        raw = torch.softmax(logits, dim=1).numpy()
        calibrated = torch.softmax(logits / temperature, dim=1).numpy()

        self.classifier_ = fit.classifier
        self.classifier_params_ = params
        setup = self.setup_args
        self.calibration_cells_ = CalibrationCells.from_training_data(
            self.adata, self.genes, setup["layer"], calibration_idx, labels, seed
        )
        self.calibration_temperature_ = temperature
        self.gene_classifier_, self.gene_classifier_temperature_, self.gene_classifier_summary_ = None, None, None
        requested = params.get("novelty_gene_uncertainty_weight")
        if params.get("gene_classifier", False):
            self._fit_gene_classifier(
                train_idx,
                calibration_idx,
                labels,
                device,
                seed,
                params.get("gene_classifier_c", GENE_CLASSIFIER_C),
                assess=getattr(self, "batch_moments_", None) is not None,
            )
        gene_weight = params.get("novelty_gene_weight", 0.0)
        uncertainty_weight = self._gene_uncertainty_weight(requested)
        spaces, projections = self._novelty_spaces(
            train_idx,
            calibration_idx,
            labels,
            device,
            seed,
            genes=gene_weight > 0,
            gene_uncertainty=uncertainty_weight > 0,
        )
        self.novelty_reference_ = NoveltyReference.fit(
            z[train_idx],
            labels[train_idx],
            n_types,
            z[calibration_idx],
            calibrated,
            source,
            params["novelty_uncertainty_weight"],
            spaces=spaces,
            projections_calibration=projections,
            hidden_weight=params.get("novelty_hidden_weight", 1.0),
            gene_weight=gene_weight,
            gene_uncertainty_weight=uncertainty_weight,
            matching_gene_weight=min(gene_weight, MATCHING_GENE_WEIGHT),
        )
        self.novelty_reference_, novelty_calibration = self._calibrated_as_new_batches(
            self.novelty_reference_, calibration_idx, device
        )
        self.classifier_history_ = pd.DataFrame.from_records(fit.history).set_index("epoch")
        self.classifier_summary_ = {
            "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch,
            "stopping_loss": fit.stopping_loss,
            "n_training_cells": int(train_idx.size),
            "n_calibration_cells": int(calibration_idx.size),
            "calibration_source": source,
            "novelty_calibration": novelty_calibration,
            "gene_uncertainty_auroc": (self.gene_classifier_summary_ or {}).get("held_out_type_auroc"),
            "gene_uncertainty_worst_auroc": (self.gene_classifier_summary_ or {}).get("held_out_type_worst_auroc"),
            "novelty_gene_uncertainty_weight": uncertainty_weight,
            "temperature": temperature,
            "calibration_accuracy": float((calibrated.argmax(1) == labels[calibration_idx]).mean()),
            "calibration_ece_raw": expected_calibration_error(raw, labels[calibration_idx]),
            "calibration_ece": expected_calibration_error(calibrated, labels[calibration_idx]),
            "seed": seed,
        }

    def _calibrated_as_new_batches(self, reference: NoveltyReference, calibration_idx, device):
        """The novelty reference with conformal scores of its calibration cells read the way a query is read.

        A query batch is matched to the reference by gene moments estimated from its own cells. Calibration cells
        read with their training batch's stored moments are spared that estimation, so their scores understate a
        query's and too many of a new batch's known cells get flagged (CellBench: 11 % at alpha = 0.05). Each
        training batch's calibration cells are therefore also read as a new batch (batches with too few of them
        together, or with the largest), and query p-values use those scores; the score scales, and the stricter
        p-values moment matching uses to leave likely novel cells out, stay. Unchanged for a model that does not
        match batch moments or has too few calibration cells to estimate moments from. Returns the reference and
        which calibration ran (``"as new batches"`` or ``"stored moments"``).
        """
        rows = np.asarray(calibration_idx)
        if getattr(self, "batch_moments_", None) is None or rows.size < MIN_BATCH_CELLS:
            return reference, "stored moments"
        codes = self.registered_batches()[rows]
        counts = np.bincount(codes, minlength=self.n_batches)
        groups = np.where(counts >= MIN_BATCH_CELLS, np.arange(self.n_batches), self.n_batches)
        if counts[counts < MIN_BATCH_CELLS].sum() < MIN_BATCH_CELLS:
            groups[counts < MIN_BATCH_CELLS] = int(counts.argmax())
        names = np.asarray([f"\x00calibration:{group}" for group in range(self.n_batches + 1)], dtype=object)
        self.novelty_reference_ = reference  # the cells' known-type flags in moment matching use this reference
        expression, _ = self._read(
            self.adata[rows], SAME_AS_TRAINING, None, None, 1.0, batch_names=names[groups[codes]]
        )
        z, projections = self._encode(expression, 4096, device, hidden=reference.spaces)
        scores = reference.scores(z, self.probabilities_from_embedding(z), projections)
        return replace(reference, query_calibration_scores=np.sort(scores)), "as new batches"

    def _default_gene_weight(self) -> float:
        """The novelty score's gene weight when none is given: only inputs matched across batches are compared."""
        return NOVELTY_GENE_WEIGHT if getattr(self, "batch_moments_", None) is not None else 0.0

    def _ancestry(self) -> np.ndarray | None:
        hierarchy = self.label_hierarchy
        return None if hierarchy is None else hierarchy.ancestry

    def _novelty_spaces(
        self, train_idx, calibration_idx, labels, device, seed, genes: bool, gene_uncertainty: bool = False
    ):
        """Novelty spaces fitted on (a sample of) the training cells, and the calibration cells' projections.

        The encoder's first hidden layer, with ``genes`` also its input (with its distances scaled for types of few
        cells: :attr:`~cellular.model._novelty_spaces.PCASpace.type_scale`), and with ``gene_uncertainty`` the gene
        classifier's uncertainty.
        """
        rng = np.random.default_rng(seed)
        sample = np.asarray(train_idx)
        if sample.size > MAX_HIDDEN_REFERENCE_CELLS:
            sample = np.sort(rng.choice(sample, MAX_HIDDEN_REFERENCE_CELLS, replace=False))
        read = self._read_training_rows
        expression = read(sample)
        _, activations = self._encode(expression, 4096, device, hidden="raw")
        spaces = NoveltySpaces(PCASpace.fit(activations, seed, unit_length=True, relative=True))
        if genes:
            inputs = expression.rows(np.arange(expression.n_cells))
            spaces.genes = PCASpace.fit(inputs, seed, unit_length=False, standardize=True, labels=labels[sample])
        if gene_uncertainty:
            spaces.gene_uncertainty = self.gene_classifier_probe()
        return spaces, self._encode(read(np.asarray(calibration_idx)), 4096, device, hidden=spaces)[1]

    # ------------------------------------------------------------ save/load
    def _classifier_payload(self) -> tuple[dict | None, dict[str, torch.Tensor]]:
        if not self.has_classifier:
            return None, {}
        metadata = {
            "params": self.classifier_params_,
            "n_latent": self.n_latent,
            "temperature": self.calibration_temperature_,
            "summary": self.classifier_summary_,
            "history": {k: v.tolist() for k, v in self.classifier_history_.reset_index().items()},
            "novelty": self.novelty_reference_.to_metadata(),
        }
        tensors = {f"classifier.{k}": v.detach().cpu() for k, v in self.classifier_.state_dict().items()}
        tensors.update(
            {f"novelty.{k}": torch.as_tensor(np.asarray(v)) for k, v in self.novelty_reference_.to_arrays().items()}
        )
        return metadata, tensors

    def _restore_classifier(self, metadata: dict | None, tensors: dict[str, torch.Tensor], device) -> None:
        if metadata is None:
            return
        params = metadata["params"]
        classifier = CellTypeClassifier(
            metadata["n_latent"], len(self.cell_types), tuple(params["hidden_sizes"]), params["dropout_rate"]
        )
        prefix = "classifier."
        classifier.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.classifier_ = classifier.to(device).eval()
        self.classifier_params_ = params
        self.calibration_temperature_ = float(metadata["temperature"])
        self.classifier_summary_ = metadata["summary"]
        self.classifier_history_ = pd.DataFrame(metadata["history"]).set_index("epoch")
        arrays = {k[len("novelty.") :]: v.numpy() for k, v in tensors.items() if k.startswith("novelty.")}
        self.novelty_reference_ = NoveltyReference.from_saved(arrays, metadata["novelty"], len(self.genes))
