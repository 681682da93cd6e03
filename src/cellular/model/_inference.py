"""Reading cells into a trained CELLULAR model: embedding, per-batch moment matching and the encoder pass."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from cellular.data import read_expression, sequential_minibatches
from cellular.data._expression import GeneAlignment, check_expression_values, get_matrix, matrix_name
from cellular.index import ReferenceIndex

from ._common import SAME_AS_TRAINING, NotTrainedError
from ._device import resolve_device
from ._moments import batch_names_of

logger = logging.getLogger(__name__)

# Query cells with a novelty p-value at most this are left out of their batch's moments and composition.
MOMENT_NOVELTY_ALPHA = 0.05


@dataclass
class QueryEmbedding:
    """What :meth:`CELLULAR.embed_query` returns."""

    z: np.ndarray
    hidden: np.ndarray | None
    alignment: GeneAlignment
    gene_logits: np.ndarray | None = None


class InferenceMixin:
    """Embedding of query cells (:meth:`get_latent_representation`, :meth:`embed_query`) for :class:`CELLULAR`."""

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        *,
        batch_size: int = 4096,
        layer: str | None = SAME_AS_TRAINING,
        log_normalized: bool | None = None,
        gene_id_key: str | None = None,
        min_gene_overlap: float = 0.5,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        progress_bar: bool = False,
    ) -> np.ndarray:
        """Embed cells with the trained encoder.

        ``adata`` needs no labels or batches and is not modified. Genes are matched by name in any order; extra
        genes are ignored; missing model genes are masked as not measured by a panel-robust model (trained with
        ``panel_masking > 0``), set to zero after normalisation otherwise, with a warning.

        Parameters
        ----------
        adata
            Cells to embed; the training data when ``None``.
        batch_size
            Cells per inference minibatch.
        layer
            Layer holding the expression; by default the layer used in training (``None`` reads ``adata.X``).
        log_normalized
            Whether the matrix holds log1p-normalised values; as in training when ``None``. Log-normalised data
            must have been scaled to the model's ``target_sum`` (see :func:`cellular.pp.normalize_log1p`).
        gene_id_key
            Match genes on this column of ``adata.var`` instead of ``var_names``: against the model's gene ids when
            it recorded them (``setup_anndata(..., gene_id_key=...)``), else against its gene names.
        min_gene_overlap
            Smallest fraction of the model's genes that must be present.
        accelerator, devices
            Where to run the encoder.
        progress_bar
            Show a progress bar over the cells embedded (on stderr).

        Returns
        -------
        ``(n_cells, n_latent)`` float32 array.
        """
        expression, alignment = self._read(adata, layer, log_normalized, gene_id_key, min_gene_overlap)
        if alignment.missing:
            logger.warning(
                "%d of %d model genes are missing from the data (first missing: %s); they are %s.",
                len(alignment.missing),
                alignment.n_genes,
                alignment.missing[:5],
                "masked as not measured" if self.module.mask_aware else "set to zero after normalisation",
            )
        device = resolve_device(accelerator, devices)
        return self._encode(expression, batch_size, device, progress_bar=progress_bar, gene_mask=alignment.present)

    def embed_query(
        self,
        adata: AnnData | None = None,
        *,
        batch_size: int = 4096,
        layer: str | None = SAME_AS_TRAINING,
        log_normalized: bool | None = None,
        gene_id_key: str | None = None,
        min_gene_overlap: float = 0.0,
        progress_bar: bool = False,
        with_hidden: bool = True,
        with_gene_logits: bool = False,
    ) -> QueryEmbedding:
        """Embed cells and keep what annotation, novelty and panel handling need besides the embedding.

        Parameters
        ----------
        adata, batch_size, layer, log_normalized, gene_id_key, min_gene_overlap, progress_bar
            As in :meth:`get_latent_representation` (``min_gene_overlap`` defaults to 0 here).
        with_hidden
            Also project the cells into the novelty score's hidden-layer and gene spaces (when the model has them).
        with_gene_logits
            Also compute the gene classifier's logits (when the model has one), from the same minibatches.

        Returns
        -------
        The embedding ``z``, the cells' projections into the novelty score's spaces (``hidden``; ``None``
        for a model without a classifier head or saved before that space existed), the gene ``alignment`` and the
        gene classifier's uncalibrated ``gene_logits`` (or ``None``).
        """
        expression, alignment = self._read(adata, layer, log_normalized, gene_id_key, min_gene_overlap)
        space = self.novelty_reference_.spaces if self.has_classifier and with_hidden else None
        device = torch.device(self.device)
        gene_logits, on_inputs = None, None
        if with_gene_logits and self.has_gene_classifier:
            gene_classifier = self.gene_classifier_.to(device)
            present = alignment.present
            mask = None if present.all() else torch.as_tensor(present, device=device)
            gene_logits = np.empty((expression.n_cells, len(self.cell_types)), dtype=np.float32)

            def on_inputs(rows, x):
                gene_logits[rows] = gene_classifier(x, mask).cpu().numpy()

        encoded = self._encode(
            expression,
            batch_size,
            device,
            progress_bar=progress_bar,
            gene_mask=alignment.present,
            hidden=space,
            on_inputs=on_inputs,
        )
        z, hidden = encoded if space is not None else (encoded, None)
        return QueryEmbedding(z, hidden, alignment, gene_logits)

    def _read(self, adata, layer, log_normalized, gene_id_key, min_gene_overlap, batch_names=None):
        self.require_trained()
        if adata is None:
            if self.adata is None:
                raise ValueError("The model has no attached AnnData; pass the cells to embed as `adata`.")
            adata = self.adata
        layer, log_normalized = self._reading_options(layer, log_normalized)
        expression, alignment = read_expression(
            adata,
            self.gene_names_for(gene_id_key),
            layer=layer,
            log_normalized=log_normalized,
            target_sum=self.target_sum,
            gene_id_key=gene_id_key,
            min_gene_overlap=min_gene_overlap,
            gene_count_fractions=self.gene_count_fractions,
        )
        self._standardize(expression, adata, alignment.present, batch_names)
        return expression, alignment

    def _reading_options(self, layer, log_normalized) -> tuple[str | None, bool]:
        """The layer and kind of values a query is read from (``SAME_AS_TRAINING`` / ``None``: as in training)."""
        setup = self.setup_args
        if layer == SAME_AS_TRAINING:
            layer = setup["layer"]
        if log_normalized is None:
            log_normalized = setup["log_normalized"]
        if not log_normalized and self.target_sum is None:
            raise ValueError(
                "The model was trained on log-normalised values, so raw counts cannot be normalised the same way. "
                "Normalise the counts as the training data was and pass log_normalized=True."
            )
        return layer, log_normalized

    def check_query_values(
        self, adata: AnnData, *, layer: str | None = SAME_AS_TRAINING, log_normalized: bool | None = None
    ) -> None:
        """Raise the error reading ``adata`` would raise for its values (negative, NaN, fractional counts).

        One pass over the values, without embedding; ``layer`` and ``log_normalized`` as in
        :meth:`get_latent_representation`. The ``tl`` functions call it before a refit on the query's genes trains.
        """
        layer, log_normalized = self._reading_options(layer, log_normalized)
        check_expression_values(get_matrix(adata, layer), counts=not log_normalized, where=matrix_name(layer))

    def _standardize(self, expression, adata, present, batch_names=None) -> None:
        """Attach the per-batch moment matching (``match_batch_moments``) of ``adata``'s cells to their expression.

        Nothing for a model trained without it.
        """
        moments = self.batch_moments_
        if moments is None:
            return
        classify = None
        if self.has_classifier:
            device = torch.device(self.device)
            mask = None if present is None or present.all() else present

            novelty = getattr(self, "novelty_reference_", None)
            space = None if novelty is None else novelty.spaces

            def classify(cells):
                encoded = self._encode(cells, 4096, device, gene_mask=mask, hidden=space)
                z, hidden = encoded if space is not None else (encoded, None)
                probabilities = self.probabilities_from_embedding(z)
                if novelty is None:
                    return probabilities, np.ones(len(z), dtype=bool)
                scores = novelty.matching_scores(z, probabilities, hidden)
                known = novelty.matching_pvalues(scores) > MOMENT_NOVELTY_ALPHA
                return probabilities, known

        names = batch_names_of(self, adata, batch_names)
        expression.standardization = moments.standardization_for(expression, names, present, classify)

    def embed_calibration_cells(self) -> tuple[list[str], np.ndarray] | None:
        """The held-out reference cells kept with the model, embedded the way a query is: as one new batch.

        Returns their names and ``(n_cells, n_latent)`` embedding, or ``None`` for a model without them (trained
        without the classifier stage, saved by an older version, or calibrated on training cells because too few
        were held out of encoder training). :meth:`build_reference_index` calibrates the index's distance p-values
        on them.
        """
        cells = getattr(self, "calibration_cells_", None)
        summary = getattr(self, "classifier_summary_", None) or {}
        if cells is None or not cells.cell_names or summary.get("calibration_source") != "validation":
            return None
        read = self._read_calibration_cells(np.ones(len(self.genes), dtype=bool))
        if read is None:
            return None
        cells, expression, _ = read
        return list(cells.cell_names), self._encode(expression, 4096, torch.device(self.device))

    def gene_names_for(self, gene_id_key: str | None) -> list[str]:
        """The names a query's genes are matched against: the model's gene ids with ``gene_id_key``, else its genes."""
        return self.gene_ids if gene_id_key is not None and self.gene_ids is not None else self.genes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model's genes, normalisation and encoder weights: equal fingerprints embed identically."""
        digest = hashlib.sha256()
        fractions = None if self.gene_count_fractions is None else self.gene_count_fractions.tolist()
        normalisation = {"genes": self.genes, "target_sum": self.target_sum, "fractions": fractions}
        digest.update(json.dumps(normalisation).encode())
        moments = self.batch_moments_
        if moments is not None:
            digest.update(json.dumps(moments.batches).encode())
            for name, values in sorted(moments.to_tensors().items()):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
        for name, tensor in sorted(self.module.encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def build_reference_index(
        self, adata_ref: AnnData, label_keys: list[str] | str | None = None, **kwargs
    ) -> ReferenceIndex:
        """Embed and index a reference atlas with this model.

        The index is kept as ``reference_index_`` and saved with the model.

        Parameters
        ----------
        adata_ref
            Reference cells (not modified), e.g. the training data.
        label_keys
            Columns of ``adata_ref.obs`` to transfer; the model's ``labels_key`` when ``None``.
        **kwargs
            Options of :meth:`cellular.ReferenceIndex.build` (``backend``, ``metric``, ``device``, ``use_rep``, ...).

        Returns
        -------
        The index (also stored as ``model.reference_index_``).
        """
        self.reference_index_ = ReferenceIndex.build(self, adata_ref, label_keys, **kwargs)
        return self.reference_index_

    def require_trained(self) -> None:
        """Raise :class:`~cellular.NotTrainedError` (saying how to fix it) unless the model is trained."""
        if not self.is_trained_:
            raise NotTrainedError("This CELLULAR model has not been trained yet; call model.train() first.")

    def _encode(
        self,
        expression,
        batch_size: int,
        device: torch.device,
        progress_bar: bool = False,
        gene_mask: np.ndarray | None = None,
        hidden=None,
        on_inputs=None,
    ):
        """Embedding of normalised expression; with ``hidden`` also the first hidden layer of each cell.

        ``hidden="raw"`` returns ``(z, activations)``; :class:`~cellular.model._novelty_spaces.NoveltySpaces` return
        ``(z, projections)`` into them (genes absent from the query, ``gene_mask``, read at the training mean),
        computed minibatch by minibatch. ``on_inputs(rows, x)`` is called with every minibatch's inputs on the device.
        """
        module = self.module.to(device)
        module.eval()
        use_mask = module.mask_aware and gene_mask is not None and not gene_mask.all()
        mask = torch.as_tensor(gene_mask, device=device) if use_mask else None
        out = np.empty((expression.n_cells, module.n_latent), dtype=np.float32)
        hidden_out = None
        with (
            torch.no_grad(),
            tqdm(
                total=expression.n_cells, desc="Embedding cells", unit="cell", unit_scale=True, disable=not progress_bar
            ) as progress,
        ):
            for index in sequential_minibatches(expression.n_cells, batch_size):
                x = torch.from_numpy(expression.rows(index)).to(device)
                if on_inputs is not None:
                    on_inputs(index, x)
                activations = module.encoder.hidden(x, mask)
                out[index] = module.encoder.from_hidden(activations).cpu().numpy()
                if hidden is not None:
                    activations = activations.cpu().numpy()
                    if isinstance(hidden, str):
                        values = activations
                    else:  # the inputs leave the device only when a gene space needs them
                        inputs = x.cpu().numpy() if hidden.reads_inputs else None
                        values = hidden.project(inputs, activations, gene_mask)
                    if hidden_out is None:
                        hidden_out = np.empty((expression.n_cells, values.shape[1]), dtype=np.float32)
                    hidden_out[index] = values
                progress.update(index.size)
        if not np.isfinite(out).all():
            self._raise_not_finite(out)
        if hidden is None:
            return out
        if hidden_out is None:
            hidden_out = np.empty((0, 0), dtype=np.float32)
        return out, hidden_out

    def non_finite_weights(self) -> list[str]:
        """Names of the module's parameters and buffers that hold NaN or infinite values (empty when all finite)."""
        tensors = {f"module.{name}": tensor for name, tensor in self.module.state_dict().items()}
        if getattr(self, "classifier_", None) is not None:
            tensors.update({f"classifier.{name}": tensor for name, tensor in self.classifier_.state_dict().items()})
        if getattr(self, "gene_classifier_", None) is not None:
            tensors.update(
                {f"gene_classifier.{name}": tensor for name, tensor in self.gene_classifier_.state_dict().items()}
            )
        return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]

    def _raise_not_finite(self, z: np.ndarray) -> None:
        n_bad = int((~np.isfinite(z).all(axis=1)).sum())
        raise ValueError(
            f"The encoder's embedding of {n_bad} of {z.shape[0]} cells holds NaN or infinite values (weights that "
            f"are not finite: {self.non_finite_weights() or 'none'}). Damaged or diverged weights: retrain the model "
            "(a lower learning rate, lr=..., helps a diverging run) or load an intact copy; with finite weights, "
            "check that the input is raw counts, or log1p-normalised values with log_normalized=True."
        )
