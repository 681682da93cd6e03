"""The gene classifier: a logistic regression on the encoder's inputs, the second source of label transfer.

The kNN vote reads the embedding, which the contrastive loss shaped on the reference's batches; a linear model on the
log-normalised, batch-matched genes reads what a query from another lab measures directly. Averaged, they transfer
labels better than either on the field benchmark's map pairs (benchmarks page, "Label transfer: kNN vote and gene
classifier").
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from cellular.data import sequential_minibatches
from cellular.metrics import expected_calibration_error
from cellular.nn import GeneLinearClassifier, fit_gene_classifier, fit_temperature, held_out_type_aurocs

from ._common import SAME_AS_TRAINING
from ._novelty_spaces import LinearProbe

# Labelled training cells the gene classifier is fitted on (a uniform sample of them when there are more).
MAX_GENE_CLASSIFIER_CELLS = 50_000
# Its L2 penalty as scikit-learn's C (inverse strength); 0.1 beat 1 on the field benchmark's map pairs.
GENE_CLASSIFIER_C = 0.1
# Training cells each leave-one-type-out classifier of the self-assessment is fitted on, and held-out cells it scores
# (uniform samples of them when there are more).
MAX_SELF_ASSESSMENT_CELLS = 5_000
# The gene classifier's uncertainty joins the novelty score at this weight when it finds the reference's own types,
# each left out of a classifier in turn, with a mean AUROC of at least GENE_UNCERTAINTY_MIN_AUROC (benchmarks
# page, "The gene classifier's uncertainty, where the reference vouches for it").
NOVELTY_GENE_UNCERTAINTY_WEIGHT = 1.0
GENE_UNCERTAINTY_MIN_AUROC = 0.9
# Where it finds every one of them without a miss (each type's AUROC at least GENE_UNCERTAINTY_FLAWLESS_AUROC), the
# part is the most reliable one the reference has and leads the score at this weight.
FLAWLESS_GENE_UNCERTAINTY_WEIGHT = 16.0
GENE_UNCERTAINTY_FLAWLESS_AUROC = 0.999


class GeneClassifierMixin:
    """Fitting, calibrating, applying and saving the gene classifier. Mixed into :class:`~cellular.CELLULAR`."""

    gene_classifier_: GeneLinearClassifier | None = None
    gene_classifier_temperature_: float | None = None
    gene_classifier_summary_: dict | None = None

    @property
    def has_gene_classifier(self) -> bool:
        """Whether the gene classifier is trained (it is with the classifier head, unless turned off)."""
        return getattr(self, "gene_classifier_", None) is not None

    def _read_training_rows(self, rows: np.ndarray):
        """The encoder's inputs of training cells ``rows``, each read with its own batch's stored moments."""
        names = np.asarray(self.batches, dtype=object)[self.registered_batches()[rows]]
        expression, _ = self._read(self.adata[rows], SAME_AS_TRAINING, None, None, 1.0, batch_names=names)
        return expression

    def _fit_gene_classifier(
        self, train_idx, calibration_idx, labels, device, seed, inverse_regularization, assess: bool = False
    ) -> None:
        """Fit and calibrate the gene classifier; with ``assess`` also score its uncertainty on left-out types.

        The self-assessment (:func:`cellular.nn.held_out_type_aurocs`) goes to
        ``gene_classifier_summary_["held_out_type_auroc"]`` (mean over types) and ``["held_out_type_worst_auroc"]``.
        """
        rng = np.random.default_rng(seed)
        rows = np.asarray(train_idx)
        if rows.size > MAX_GENE_CLASSIFIER_CELLS:
            rows = np.sort(rng.choice(rows, MAX_GENE_CLASSIFIER_CELLS, replace=False))
        expression = self._read_training_rows(rows)
        inputs = expression.rows(np.arange(expression.n_cells))
        classifier = fit_gene_classifier(
            inputs, labels[rows], len(self.cell_types), inverse_regularization=inverse_regularization, device=device
        )
        calibration_rows = np.asarray(calibration_idx)
        calibration_expression = self._read_training_rows(calibration_rows)
        logits = self._gene_logits(classifier, calibration_expression, device)
        truth = labels[calibration_rows]
        temperature = fit_temperature(logits, torch.as_tensor(truth))
        probabilities = torch.softmax(logits / temperature, dim=1).numpy()
        self.gene_classifier_ = classifier.cpu().eval()
        self.gene_classifier_temperature_ = temperature
        self.gene_classifier_summary_ = {
            "n_training_cells": int(rows.size),
            "inverse_regularization": float(inverse_regularization),
            "temperature": temperature,
            "calibration_accuracy": float((probabilities.argmax(1) == truth).mean()),
            "calibration_ece": expected_calibration_error(probabilities, truth),
            "held_out_type_auroc": None,
        }
        if assess:
            sample = np.arange(rows.size)
            if sample.size > MAX_SELF_ASSESSMENT_CELLS:
                sample = np.sort(rng.choice(sample, MAX_SELF_ASSESSMENT_CELLS, replace=False))
            held_out = np.arange(calibration_rows.size)
            if held_out.size > MAX_SELF_ASSESSMENT_CELLS:
                held_out = np.sort(rng.choice(held_out, MAX_SELF_ASSESSMENT_CELLS, replace=False))
            aurocs = held_out_type_aurocs(
                inputs[sample],
                labels[rows[sample]],
                calibration_expression.rows(held_out),
                truth[held_out],
                inverse_regularization=inverse_regularization,
                device=device,
            )
            if len(aurocs) >= 2:
                self.gene_classifier_summary_["held_out_type_auroc"] = float(np.mean(list(aurocs.values())))
                self.gene_classifier_summary_["held_out_type_worst_auroc"] = float(min(aurocs.values()))
            self.gene_classifier_summary_["held_out_type_aurocs"] = {self.cell_types[k]: v for k, v in aurocs.items()}

    def _gene_uncertainty_weight(self, requested: float | None) -> float:
        """The novelty score's weight of the gene classifier's uncertainty (see :meth:`train_classifier`)."""
        if requested is not None:
            return requested
        summary = self.gene_classifier_summary_ or {}
        auroc = summary.get("held_out_type_auroc")
        if auroc is None or auroc < GENE_UNCERTAINTY_MIN_AUROC:
            return 0.0
        if summary["held_out_type_worst_auroc"] >= GENE_UNCERTAINTY_FLAWLESS_AUROC:
            return FLAWLESS_GENE_UNCERTAINTY_WEIGHT
        return NOVELTY_GENE_UNCERTAINTY_WEIGHT

    def gene_classifier_probe(self) -> LinearProbe:
        """The gene classifier as a :class:`~cellular.model._novelty_spaces.LinearProbe`, for the novelty score.

        The probe reads the fit's own probabilities (temperature 1), the uncertainty the self-assessment measured. The
        calibrated temperature is fitted on known-type cells only; where those separate perfectly it sharpens the
        probabilities until nearly every cell, an unseen type's included, reads as certain.
        """
        self.require_gene_classifier()
        state = {name: value.detach().cpu().numpy() for name, value in self.gene_classifier_.state_dict().items()}
        return LinearProbe(
            state["mean"].astype(np.float32),
            state["linear.weight"].astype(np.float32),
            state["linear.bias"].astype(np.float32),
            1.0,
        )

    @staticmethod
    @torch.no_grad()
    def _gene_logits(
        classifier: GeneLinearClassifier, expression, device, present: np.ndarray | None = None, batch_size=4096
    ) -> torch.Tensor:
        classifier = classifier.to(device)
        mask = None if present is None or present.all() else torch.as_tensor(present, device=device)
        chunks = [
            classifier(torch.from_numpy(expression.rows(rows)).to(device), mask).cpu()
            for rows in sequential_minibatches(expression.n_cells, batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros((0, classifier.linear.out_features))

    def require_gene_classifier(self) -> None:
        """Raise a ``ValueError`` saying how to fix it unless the gene classifier is trained."""
        self.require_trained()
        if not self.has_gene_classifier:
            raise ValueError(
                "This CELLULAR model has no gene classifier (trained with classifier=False or gene_classifier=False, "
                "or saved by an older version); retrain the classifier stage with model.train_classifier(), or pass "
                "gene_classifier_weight=0 to label cells by the kNN vote or the classifier head alone."
            )

    def gene_classifier_probabilities_from_logits(self, logits: np.ndarray, temperature: float | None = None):
        """Calibrated probabilities (columns in :attr:`cell_types` order) of gene-classifier logits."""
        temperature = self.gene_classifier_temperature_ if temperature is None else temperature
        return torch.softmax(torch.as_tensor(logits) / temperature, dim=1).numpy()

    def get_gene_classifier_probabilities(
        self,
        adata: AnnData | None = None,
        *,
        layer: str | None = SAME_AS_TRAINING,
        log_normalized: bool | None = None,
        gene_id_key: str | None = None,
        min_gene_overlap: float = 0.5,
    ) -> pd.DataFrame:
        """Cell-type probabilities of the gene classifier, a calibrated logistic regression on the encoder's inputs.

        Genes the cells lack are read at the training mean. :func:`cellular.tl.cellular_map` averages these with
        the kNN vote of the reference index.

        Parameters
        ----------
        adata
            Cells to classify (genes matched by name); the training data when ``None``.
        layer, log_normalized, gene_id_key, min_gene_overlap
            As in :meth:`get_latent_representation`.

        Returns
        -------
        A :class:`~pandas.DataFrame` indexed by ``obs_names``, one column per type in :attr:`cell_types` order.
        """
        self.require_gene_classifier()
        expression, alignment = self._read(adata, layer, log_normalized, gene_id_key, min_gene_overlap)
        logits = self._gene_logits(self.gene_classifier_, expression, torch.device(self.device), alignment.present)
        names = (self.adata if adata is None else adata).obs_names
        probabilities = self.gene_classifier_probabilities_from_logits(logits.numpy())
        return pd.DataFrame(probabilities, index=names, columns=pd.Index(self.cell_types))

    def _gene_classifier_payload(self) -> tuple[dict | None, dict[str, torch.Tensor]]:
        if not self.has_gene_classifier:
            return None, {}
        metadata = {"temperature": self.gene_classifier_temperature_, "summary": self.gene_classifier_summary_}
        tensors = {f"gene_classifier.{k}": v.detach().cpu() for k, v in self.gene_classifier_.state_dict().items()}
        return metadata, tensors

    def _restore_gene_classifier(self, metadata: dict | None, tensors: dict[str, torch.Tensor]) -> None:
        self.gene_classifier_, self.gene_classifier_temperature_, self.gene_classifier_summary_ = None, None, None
        if metadata is None:
            return
        classifier = GeneLinearClassifier(len(self.genes), len(self.cell_types))
        prefix = "gene_classifier."
        classifier.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.gene_classifier_ = classifier.eval()
        self.gene_classifier_temperature_ = float(metadata["temperature"])
        self.gene_classifier_summary_ = metadata["summary"]


def check_gene_uncertainty_weight(params: dict) -> None:
    """Raise a ``ValueError`` for a negative or unservable ``novelty_gene_uncertainty_weight``."""
    weight = params.get("novelty_gene_uncertainty_weight")
    if weight is None:
        return
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"novelty_gene_uncertainty_weight must be a non-negative number, got {weight}.")
    if weight > 0 and not params.get("gene_classifier", False):
        raise ValueError(
            "novelty_gene_uncertainty_weight > 0 needs the gene classifier; pass gene_classifier=True, or "
            "novelty_gene_uncertainty_weight=0 (or None) to leave that part out of the novelty score."
        )
