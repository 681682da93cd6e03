"""Queries that measure only part of the model's genes: calibration under a gene panel, refitting on shared genes."""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from cellular.data import align_genes
from cellular.data._backed import read_rows, write_rows_backed
from cellular.data._expression import get_matrix, library_sizes, select_columns
from cellular.index import smoothed_vote_logits
from cellular.metrics import expected_calibration_error
from cellular.nn import fit_temperature

from ._classifier_training import classifier_logits
from ._novelty import NoveltyReference

logger = logging.getLogger(__name__)

# Held-out reference cells kept with a model to calibrate it under a query's gene panel.
MAX_CALIBRATION_CELLS = 5000


@dataclass
class CalibrationCells:
    """Held-out reference cells kept with a model, as stored expression over the model's genes.

    Attributes
    ----------
    matrix
        CSR ``cells x model genes``, as stored in the training data (raw counts, or log-normalised values).
    labels
        Type code of each cell.
    cell_names
        The cells' ``obs_names`` in the training data (to find them in a reference index).
    """

    matrix: sp.csr_matrix
    labels: np.ndarray
    cell_names: list[str]

    @classmethod
    def from_training_data(cls, adata: AnnData, genes: list[str], layer, rows: np.ndarray, labels: np.ndarray, seed):
        """Up to :data:`MAX_CALIBRATION_CELLS` of the cells ``rows`` (a uniform sample when there are more)."""
        rows = np.asarray(rows)
        if rows.size > MAX_CALIBRATION_CELLS:
            rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_CALIBRATION_CELLS, replace=False))
        alignment = align_genes(adata, genes)
        matrix = get_matrix(adata, layer)
        selected = select_columns(read_rows(matrix, rows), alignment)
        return cls(
            sp.csr_matrix(selected, dtype=np.float32), labels[rows].astype(np.int64), list(adata.obs_names[rows])
        )

    def as_query(self, genes: list[str], present: np.ndarray) -> AnnData:
        """The cells as a query that measures only the ``present`` genes."""
        columns = np.flatnonzero(present)
        return AnnData(
            X=self.matrix[:, columns],
            obs=pd.DataFrame(index=pd.Index(self.cell_names)),
            var=pd.DataFrame(index=pd.Index([genes[i] for i in columns])),
        )

    def measured_over(self, present: np.ndarray) -> CalibrationCells:
        """The cells with a count over the ``present`` genes: the others cannot be read as a query of them."""
        measured = np.asarray(self.matrix[:, np.flatnonzero(present)].sum(axis=1)).ravel() > 0
        if measured.all():
            return self
        rows = np.flatnonzero(measured)
        return CalibrationCells(self.matrix[rows], self.labels[rows], [self.cell_names[i] for i in rows])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "calibration.indptr": torch.as_tensor(self.matrix.indptr.astype(np.int64)),
            "calibration.indices": torch.as_tensor(self.matrix.indices.astype(np.int64)),
            "calibration.data": torch.as_tensor(self.matrix.data.astype(np.float32)),
            "calibration.labels": torch.as_tensor(self.labels),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], cell_names: list[str], n_genes: int) -> CalibrationCells:
        indptr = tensors["calibration.indptr"].numpy()
        indices = tensors["calibration.indices"].numpy()
        data = tensors["calibration.data"].numpy()
        n_cells = len(cell_names)
        if indptr.shape != (n_cells + 1,) or indices.shape != data.shape or (indices.size and indices.max() >= n_genes):
            raise ValueError("The saved calibration cells are inconsistent with the model; the model file is damaged.")
        matrix = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
        return cls(matrix, tensors["calibration.labels"].numpy().astype(np.int64), list(cell_names))


@dataclass
class PanelCalibration:
    """How a model's outputs are calibrated for a query that measures a given subset of its genes.

    Attributes
    ----------
    n_genes_present
        Model genes the query measures.
    expression_share
        Share of the reference's expression those genes carry (mean share of a reference cell's counts, or the
        share of genes for a model of log-normalised input).
    classifier_temperature
        Softmax temperature of the classifier head under the panel (``None`` without a head).
    novelty_reference
        The novelty scorer with its scales and conformal calibration scores recomputed under the panel.
    vote_temperatures
        Per label level of the reference index, the temperature that calibrates kNN vote shares under the panel.
    gene_classifier_temperature
        Softmax temperature of the gene classifier under the panel (``None`` without one).
    neighbor_distances
        Mean distance of the held-out cells, read under the panel, to their ``k`` nearest other cells of the
        reference index: the index's distance p-values under the panel (``None`` without the index's held-out cells).
    summary
        Accuracy and expected calibration error of the held-out cells under the panel.
    """

    n_genes_present: int
    expression_share: float
    classifier_temperature: float | None = None
    novelty_reference: NoveltyReference | None = None
    vote_temperatures: dict[str, float] = field(default_factory=dict)
    gene_classifier_temperature: float | None = None
    neighbor_distances: np.ndarray | None = None
    summary: dict[str, float] = field(default_factory=dict)


class PanelMixin:
    """Query gene panels: calibration under a panel and refitting on shared genes. Mixed into the model."""

    calibration_cells_: CalibrationCells | None = None
    train_params_: dict | None = None

    def expression_share(self, present: np.ndarray) -> float:
        """Share of the reference's expression carried by the genes marked ``present`` (boolean over ``genes``)."""
        present = self._gene_mask(present)
        if self.gene_count_fractions is None:
            return float(present.mean())
        return float(np.asarray(self.gene_count_fractions)[present].sum() / self.gene_count_fractions.sum())

    def _gene_mask(self, present) -> np.ndarray:
        present = np.asarray(present)
        if present.dtype != bool or present.shape != (len(self.genes),):
            raise ValueError(
                f"present must be a boolean array over the model's {len(self.genes)} genes (model.genes order), got "
                f"dtype {present.dtype} and shape {present.shape}; e.g. np.isin(model.genes, query.var_names)."
            )
        return present

    def calibrate_for_panel(
        self,
        present: np.ndarray,
        *,
        index=None,
        k: int = 15,
        weighting: str = "distance",
        temperature: float | None = None,
    ) -> PanelCalibration | None:
        """Calibrate the classifier, novelty scores and (with ``index``) kNN votes for a query gene panel.

        The model's held-out reference cells are read as a query that measures only the ``present`` genes and
        embedded so; the classifier temperature, the novelty score scales and conformal scores, a temperature per
        label level of the index's vote shares and the index's distance p-values are fitted on them. Cells whose
        informative genes are missing then come out uncertain, as they should.

        Parameters
        ----------
        present
            Boolean over the model's genes: which ones the query measures.
        index
            The reference index the query is mapped onto; its vote shares are calibrated when it holds the
            held-out cells (an index of the training data).
        k, weighting, temperature
            The label-transfer settings to calibrate, as in :meth:`cellular.ReferenceIndex.transfer_labels`.

        Returns
        -------
        The calibration, or ``None`` when the model keeps no held-out cells (a model saved by an older version).
        """
        cells = self.calibration_cells_
        present = self._gene_mask(present)
        if cells is None:
            return None
        calibration = PanelCalibration(int(present.sum()), self.expression_share(present))
        read = self._read_calibration_cells(present)
        if read is None:
            logger.warning("No held-out reference cell has counts over the query's genes; nothing is calibrated.")
            return calibration
        cells, expression, alignment = read
        space = self.novelty_reference_.spaces if self.has_classifier else None
        encoded = self._encode(expression, 4096, torch.device(self.device), gene_mask=alignment.present, hidden=space)
        z, hidden = encoded if space is not None else (encoded, None)
        labels = cells.labels
        labelled = labels >= 0
        if self.has_classifier and labelled.any():
            logits = classifier_logits(self.classifier_, z)
            temperature_ = fit_temperature(logits[labelled], torch.as_tensor(labels[labelled]))
            probabilities = torch.softmax(logits / temperature_, dim=1).numpy()
            calibration.classifier_temperature = temperature_
            calibration.novelty_reference = self.novelty_reference_.recalibrated(
                z[labelled], probabilities[labelled], None if hidden is None else hidden[labelled]
            )
            calibration.summary["classifier_accuracy"] = float(
                (probabilities[labelled].argmax(1) == labels[labelled]).mean()
            )
            calibration.summary["classifier_ece"] = expected_calibration_error(
                probabilities[labelled], labels[labelled]
            )
        if self.has_gene_classifier and labelled.any():
            logits = self._gene_logits(self.gene_classifier_, expression, torch.device(self.device), alignment.present)
            truth = torch.as_tensor(labels[labelled])
            calibration.gene_classifier_temperature = fit_temperature(logits[labelled], truth)
            gene_probabilities = torch.softmax(logits[labelled] / calibration.gene_classifier_temperature, 1).numpy()
            calibration.summary["gene_classifier_accuracy"] = float(
                (gene_probabilities.argmax(1) == labels[labelled]).mean()
            )
            calibration.summary["gene_classifier_ece"] = expected_calibration_error(
                gene_probabilities, labels[labelled]
            )
        if index is not None:
            rows = pd.Index(index.cell_names).get_indexer(pd.Index(cells.cell_names))
            if (rows >= 0).all():
                transfer = index.transfer_labels(
                    z, k=k, weighting=weighting, temperature=temperature, min_probability=0.0, exclude_rows=rows
                )
                calibration.neighbor_distances = transfer.mean_distance
                for level, shares in transfer.probabilities.items():
                    truth = np.asarray(index.labels[level].codes, dtype=np.int64)[rows]
                    usable = (truth >= 0) & (shares.sum(axis=1) > 0)
                    if not usable.any():
                        continue
                    logits = torch.as_tensor(smoothed_vote_logits(shares[usable].astype(np.float64), k))
                    calibration.vote_temperatures[level] = fit_temperature(logits, torch.as_tensor(truth[usable]))
                    calibration.summary[f"map_{level}_accuracy"] = float(
                        (shares[usable].argmax(1) == truth[usable]).mean()
                    )
            else:
                logger.info(
                    "The reference index does not hold the model's held-out cells; vote shares are not calibrated."
                )
        return calibration

    def _read_calibration_cells(self, present: np.ndarray):
        """The held-out cells with counts over the ``present`` genes, read as one query batch of only those genes.

        Returns ``(cells, expression, alignment)``, or ``None`` when no held-out cell has such counts.
        """
        cells = self.calibration_cells_.measured_over(present)
        if not cells.cell_names:
            return None
        expression, alignment = self._read(cells.as_query(self.genes, present), None, None, None, 0.0)
        return cells, expression, alignment

    def restrict_to_genes(self, genes, *, gene_id_key: str | None = None, progress_bar: bool = False):
        """A new model of the same settings trained on the reference's genes that ``genes`` also holds.

        The quick way to serve a query that measures too few of the model's genes for the model itself: the new
        model is trained on the same training data, labels, batches, model settings and training settings
        (including the classifier head and its calibration), but reads only the shared genes, so a query measuring
        them is complete for it (it is trained without panel masking or depth thinning, which only cost quality
        on a complete panel). Needs the training data (``CELLULAR.load(path, adata=reference)``).

        Parameters
        ----------
        genes
            Gene names, or an AnnData whose ``var_names`` (or ``var[gene_id_key]``) are the query's genes.
        gene_id_key
            With an AnnData: match genes on this ``var`` column, as in :meth:`get_latent_representation`.
        progress_bar
            Show training progress bars.

        Returns
        -------
        The trained model on the shared genes (the model itself is not changed). It is kept with the model, so
        asking again for the same shared genes returns it without training (until the model is trained again).
        """
        self.require_trained()
        if self.adata is None:
            raise ValueError(
                "restrict_to_genes retrains on the model's training data, which is not attached; load the model "
                "with CELLULAR.load(path, adata=reference_adata)."
            )
        # Every reference gene the query measures, not only those the model read: a model of half a small
        # reference's genes would otherwise refit on half of a narrow panel.
        reference_genes = [str(g) for g in self.adata.var_names]
        if isinstance(genes, AnnData):
            registered_ids = self.adata_manager.registry["setup_args"].get("gene_id_key")
            names = reference_genes
            if gene_id_key is not None and registered_ids is not None:
                names = [str(g) for g in self.adata.var[registered_ids]]
            present = align_genes(genes, names, gene_id_key=gene_id_key, min_gene_overlap=0.0).present
        else:
            present = np.isin(np.asarray(reference_genes), np.asarray([str(g) for g in genes]))
        shared = [gene for gene, here in zip(reference_genes, present, strict=True) if here]
        if len(shared) < MIN_REFIT_GENES:
            raise ValueError(
                f"Only {len(shared)} of the reference's {len(reference_genes)} genes are shared with the query; a "
                f"model needs at least {MIN_REFIT_GENES}. Check the gene naming convention (symbols vs Ensembl ids: "
                "see gene_id_key) or use a reference measured on the query's genes."
            )
        cache = self.__dict__.setdefault("_restricted_models", {})
        if tuple(shared) in cache:
            return cache[tuple(shared)]
        settings = dict(self.init_params_["non_kwargs"])
        # The refitted model reads every gene of the query it serves; panel augmentation only costs it quality there
        # (benchmarks/panel_robustness.py).
        settings.update(genes=shared, target_sum=None, panel_masking=0.0, depth_thinning=0.0)
        if settings.get("encoder", "mlp") == "mlp":
            # The widths the module was built with: models saved before (256, 128) became the default record the
            # paper's widths as absent, with hidden_sizes=None among their settings.
            settings["hidden_sizes"] = self._module_kwargs.get("hidden_sizes", "paper")
        restricted = type(self)(self._reference_with_counts(shared), **settings)
        train_settings = dict(self.train_params_ or {})
        train_settings["progress_bar"] = progress_bar
        train_settings["classifier"] = self.has_classifier
        if self.has_classifier:
            train_settings["classifier_kwargs"] = {
                **{k: v for k, v in self.classifier_params_.items() if k != "hidden_sizes"},
                "hidden_sizes": tuple(self.classifier_params_["hidden_sizes"]),
                "progress_bar": progress_bar,
            }
        restricted.train(**train_settings)
        cache[tuple(shared)] = restricted
        return restricted

    def _reference_with_counts(self, genes: list[str]) -> AnnData:
        """The training data, less the cells without counts over ``genes`` (registered like the training data).

        A narrow panel can leave some reference cells without a count; they cannot be normalised over its genes, so
        a model of those genes is trained (and its index built) without them.
        """
        setup = self.adata_manager.registry["setup_args"]
        if setup.get("log_normalized"):
            return self.adata
        matrix = select_columns(get_matrix(self.adata, setup.get("layer")), align_genes(self.adata, genes))
        measured = library_sizes(matrix) > 0
        if measured.all():
            return self.adata
        logger.warning(
            "%d of the reference's %d cells have no counts over the %d genes shared with the query; the model refitted "
            "on those genes is trained and indexed without them.",
            int((~measured).sum()),
            measured.size,
            len(genes),
        )
        if self.adata.isbacked:
            # A backed reference stays on disk: its subset is written to a temporary file, removed with the subset.
            folder = Path(tempfile.mkdtemp(prefix="cellular-refit-"))
            reference = write_rows_backed(self.adata, measured, folder / "reference.h5ad")
            weakref.finalize(reference, shutil.rmtree, folder, ignore_errors=True)
        else:
            reference = self.adata[measured].copy()
        type(self).setup_anndata(reference, **setup)
        return reference


# Fewest shared genes a model is refitted on (measured: see docs/usage.md, "Queries with fewer genes").
MIN_REFIT_GENES = 20
