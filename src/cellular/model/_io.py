"""Saving and loading CELLULAR models: JSON metadata and tensors only, validated on load (no pickle)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.model.base import BaseModelClass

from cellular._files import (
    FILE_RECORD,
    METADATA_CHECKSUM,
    NUMBERS,
    SHA256,
    SHAPE,
    STRINGS,
    check_shapes,
    damaged,
    read_metadata,
    verify_metadata,
    write_metadata,
)
from cellular.data._moments import BatchMoments
from cellular.index import ReferenceIndex
from cellular.module import CellularModule
from cellular.nn import ENCODERS, check_grid_positions

from . import _serialization
from ._device import resolve_device
from ._panels import CalibrationCells

logger = logging.getLogger(__name__)

_FORMAT = "cellular-sc-model"
# Version 4 records the SHA-256 of model.pt and of the metadata itself, and every tensor's shape. Version 3 added
# panel masking (module settings), depth thinning, training settings and calibration cells; version 2 files load as
# models trained without them. Versions 2 and 3 carry no checksums and load with a warning.
_FORMAT_VERSION = 4
_UNCHECKED_VERSIONS = (2, 3)
_READABLE_VERSIONS = (*_UNCHECKED_VERSIONS, _FORMAT_VERSION)
_METADATA_FILE = "model.json"
_WEIGHTS_FILE = "model.pt"
_INDEX_FOLDER = "reference_index"
_ANNDATA_FILE = "adata.h5ad"
_FIX = "Save the model again from an intact copy, or retrain it."

# Fields every model file holds, versions without checksums (not validated by the schema) included.
_LEGACY_REQUIRED = (
    "genes",
    "target_sum",
    "gene_count_fractions",
    "seed",
    "module_kwargs",
    "init_params",
    "is_trained",
    "training_summary",
    "history",
    "registry",
)

_OBJECT = {"type": "object"}
_NULLABLE_OBJECT = {"type": ["object", "null"]}
# A numpy array as model/_serialization.py writes it.
_STORED_NUMBERS = {
    "type": "object",
    "required": ["__ndarray__", "dtype", "shape"],
    "properties": {"__ndarray__": NUMBERS, "dtype": {"type": "string"}, "shape": SHAPE},
}
_SCHEMA = {
    "type": "object",
    "required": [
        "format",
        "format_version",
        "package_version",
        "model_class",
        "init_params",
        "module_kwargs",
        "genes",
        "gene_ids",
        "target_sum",
        "gene_count_fractions",
        "depth_thinning",
        "seed",
        "is_trained",
        "training_summary",
        "train_params",
        "calibration_cell_names",
        "history",
        "registry",
        "classifier",
        "files",
        "tensors",
        METADATA_CHECKSUM,
    ],
    "properties": {
        "format": {"const": _FORMAT},
        "format_version": {"const": _FORMAT_VERSION},
        "package_version": {"type": "string"},
        "model_class": {"const": "CELLULAR"},
        "init_params": _OBJECT,
        "module_kwargs": {
            "type": "object",
            "required": ["n_input", "n_labels", "n_batch", "n_latent"],
            "properties": {
                **{key: {"type": "integer", "minimum": 1} for key in ("n_input", "n_labels", "n_batch", "n_latent")},
                "encoder": {"enum": sorted(ENCODERS)},
                "input_norm_affine": {"type": "boolean"},
                "hidden_sizes": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1},
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
        },
        "genes": {**STRINGS, "minItems": 2},
        "gene_ids": {"anyOf": [STRINGS, {"type": "null"}]},
        "target_sum": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]},
        "gene_count_fractions": {"anyOf": [NUMBERS, _STORED_NUMBERS, {"type": "null"}]},
        "depth_thinning": {
            "type": "object",
            "required": ["probability", "min_fraction"],
            "properties": {
                "probability": {"type": "number", "minimum": 0, "maximum": 1},
                "min_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            },
        },
        "seed": {"type": "integer"},
        "is_trained": {"type": "boolean"},
        "training_summary": _NULLABLE_OBJECT,
        "train_params": _NULLABLE_OBJECT,
        "calibration_cell_names": {"anyOf": [STRINGS, {"type": "null"}]},
        "training_cells": {
            "anyOf": [
                {
                    "type": "object",
                    "required": ["n_obs", "obs_names_sha256"],
                    "properties": {"n_obs": {"type": "integer", "minimum": 1}, "obs_names_sha256": SHA256},
                },
                {"type": "null"},
            ]
        },
        "history": {"anyOf": [{"type": "object", "additionalProperties": NUMBERS}, {"type": "null"}]},
        "registry": {"type": "object", "required": ["setup_args", "field_registries"]},
        "classifier": {
            "anyOf": [
                {
                    "type": "object",
                    "required": ["params", "n_latent", "temperature", "summary", "history", "novelty"],
                    "properties": {
                        "n_latent": {"type": "integer", "minimum": 1},
                        "temperature": {"type": "number", "exclusiveMinimum": 0},
                        "params": {"type": "object", "required": ["hidden_sizes", "dropout_rate"]},
                        "novelty": _OBJECT,
                    },
                },
                {"type": "null"},
            ]
        },
        "gene_classifier": {
            "anyOf": [
                {
                    "type": "object",
                    "required": ["temperature", "summary"],
                    "properties": {"temperature": {"type": "number", "exclusiveMinimum": 0}, "summary": _OBJECT},
                },
                {"type": "null"},
            ]
        },
        "files": {
            "type": "object",
            "required": [_WEIGHTS_FILE],
            "additionalProperties": False,
            "properties": {_WEIGHTS_FILE: FILE_RECORD},
        },
        "tensors": {"type": "object", "additionalProperties": SHAPE},
        METADATA_CHECKSUM: SHA256,
    },
}


class SaveLoadMixin:
    """``save`` and ``load`` of :class:`~cellular.CELLULAR`."""

    def save(self, dir_path: str | Path, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Save the model to a folder: ``model.json`` (metadata) and ``model.pt`` (tensors only).

        A reference index built with :meth:`build_reference_index` is saved in ``reference_index/`` and loaded
        with the model; saving a model without one over an earlier model removes that model's index.

        Loading never unpickles Python objects: the metadata is JSON and the weights are read with
        ``torch.load(weights_only=True)``.

        Parameters
        ----------
        dir_path
            Folder to write; created if missing.
        overwrite
            Replace an existing saved model in ``dir_path``.
        save_anndata
            Also write the training AnnData as ``adata.h5ad``.
        """
        dir_path = Path(dir_path)
        if (dir_path / _METADATA_FILE).exists() and not overwrite:
            raise FileExistsError(f"{dir_path} already holds a saved model; pass overwrite=True to replace it.")
        dir_path.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "package_version": version("cellular-sc"),
            "model_class": type(self).__name__,
            "init_params": self.init_params_["non_kwargs"],
            "module_kwargs": self._module_kwargs,
            "genes": self.genes,
            "gene_ids": self.gene_ids,
            "target_sum": self.target_sum,
            "gene_count_fractions": self.gene_count_fractions,
            "depth_thinning": self.depth_thinning,
            "seed": self.seed,
            "is_trained": self.is_trained_,
            "training_summary": getattr(self, "training_summary_", None),
            "train_params": self.train_params_,
            "calibration_cell_names": None if self.calibration_cells_ is None else self.calibration_cells_.cell_names,
            "training_cells": self.training_cells_record(),
            "history": None if self.history_ is None else {k: v.iloc[:, 0].tolist() for k, v in self.history_.items()},
            "registry": self.registry_,
        }
        classifier_metadata, classifier_tensors = self._classifier_payload()
        metadata["classifier"] = classifier_metadata
        gene_classifier_metadata, gene_classifier_tensors = self._gene_classifier_payload()
        metadata["gene_classifier"] = gene_classifier_metadata
        tensors = {f"module.{k}": v.detach().cpu() for k, v in self.module.state_dict().items()}
        tensors.update(classifier_tensors)
        tensors.update(gene_classifier_tensors)
        if self.calibration_cells_ is not None:
            tensors.update(self.calibration_cells_.to_tensors())
        if self.batch_moments_ is not None:
            tensors.update({name: torch.as_tensor(values) for name, values in self.batch_moments_.to_tensors().items()})
        for name in ("train_indices_", "validation_indices_"):
            value = getattr(self, name)
            if value is not None:
                tensors[f"indices.{name}"] = torch.as_tensor(np.asarray(value, dtype=np.int64))
        torch.save(tensors, dir_path / _WEIGHTS_FILE)
        shapes = {name: list(tensor.shape) for name, tensor in tensors.items()}
        write_metadata(
            dir_path / _METADATA_FILE, _serialization.encode(metadata), dir_path / _WEIGHTS_FILE, "tensors", shapes
        )
        index_path = dir_path / _INDEX_FOLDER
        if self.reference_index_ is not None:
            self.reference_index_.save(index_path, overwrite=True)
        elif (index_path / "index.json").exists():
            # The index of the model saved here before would be loaded with this one and refused as foreign.
            shutil.rmtree(index_path)
        anndata_path = dir_path / _ANNDATA_FILE
        if save_anndata:
            if self.adata is None:
                raise ValueError("save_anndata=True but the model has no attached AnnData.")
            self.adata.write_h5ad(anndata_path)
        elif anndata_path.exists():
            # The training data of the model saved here before would be attached to this one on load.
            anndata_path.unlink()

    def training_cells_record(self) -> dict | None:
        """The number and order of the cells the model was trained on (their names' SHA-256), or ``None``.

        Saved with the model; :meth:`load` checks the AnnData it attaches against it, so that the stored training
        and held-out cell indices select the cells they selected in training.
        """
        if self.adata is not None:
            return _cells_record(self.adata)
        return getattr(self, "training_cells_", None)

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
    ):
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            Training data to attach (registered with the saved setup); ``adata.h5ad`` from the folder when present,
            else none: the model can still embed any AnnData passed to :meth:`get_latent_representation`.
        accelerator, devices
            Where to put the weights.
        """
        dir_path = Path(dir_path)
        metadata_path = dir_path / _METADATA_FILE
        if not metadata_path.exists():
            raise FileNotFoundError(f"No saved CELLULAR model in {dir_path} ({_METADATA_FILE} is missing).")
        metadata = read_metadata(metadata_path, _FIX)
        if metadata.get("format") != _FORMAT or metadata.get("format_version") not in _READABLE_VERSIONS:
            raise ValueError(
                f"{dir_path} holds a model file of format {metadata.get('format')!r} version "
                f"{metadata.get('format_version')!r}, which this cellular-sc ({version('cellular-sc')}) cannot read "
                f"(it reads {_FORMAT!r} versions {list(_READABLE_VERSIONS)}). Install the cellular-sc version that "
                f"wrote it ({metadata.get('package_version')!r}) or retrain the model."
            )
        checked = verify_metadata(
            metadata,
            schema=_SCHEMA,
            path=metadata_path,
            folder=dir_path,
            fix=_FIX,
            unchecked_versions=_UNCHECKED_VERSIONS,
        )
        if not checked:
            missing = [field for field in _LEGACY_REQUIRED if field not in metadata]
            if missing:
                raise damaged(metadata_path, f"lacks the field(s) {missing}", _FIX)
        metadata = _serialization.decode(metadata)
        tensors = _read_tensors(dir_path / _WEIGHTS_FILE, metadata.get("tensors") if checked else None)
        _check_consistency(metadata, tensors, metadata_path)
        registry = metadata["registry"]

        training_cells = metadata.get("training_cells")
        if adata is None and (dir_path / _ANNDATA_FILE).exists():
            import anndata

            adata = anndata.read_h5ad(dir_path / _ANNDATA_FILE)
            if training_cells is not None and _cells_record(adata) != training_cells:
                raise damaged(
                    dir_path / _ANNDATA_FILE,
                    f"holds other cells than the {training_cells['n_obs']} the model was trained on ({adata.n_obs} "
                    "cells; other names or another order)",
                    "Delete it and pass the training data with CELLULAR.load(path, adata=reference), or save the "
                    "model again with save_anndata=True.",
                )
        elif adata is not None and training_cells is not None and _cells_record(adata) != training_cells:
            raise ValueError(
                f"The AnnData passed to CELLULAR.load is not the model's training data: it holds {adata.n_obs} cells, "
                f"the model was trained on {training_cells['n_obs']} (names and order must match), and its stored "
                "training and held-out cell indices would select other cells. Pass the training data as it was, or "
                "load without adata to embed and annotate queries."
            )
        model = cls.__new__(cls)
        model.training_cells_ = training_cells
        if adata is not None:
            cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
            BaseModelClass.__init__(model, adata)
        else:
            BaseModelClass.__init__(model, registry=registry)
        model.genes = list(metadata["genes"])
        model.gene_ids = None if metadata.get("gene_ids") is None else list(metadata["gene_ids"])
        model.target_sum = metadata["target_sum"]
        fractions = metadata["gene_count_fractions"]
        model.gene_count_fractions = None if fractions is None else np.asarray(fractions, dtype=np.float64)
        model.depth_thinning = dict(metadata.get("depth_thinning") or {"probability": 0.0, "min_fraction": 1.0})
        model.seed = metadata["seed"]
        model._module_kwargs = dict(metadata["module_kwargs"])
        if model._module_kwargs.get("encoder", "mlp") == "mlp":
            model._module_kwargs.setdefault("input_norm_affine", True)
        model.init_params_ = {"kwargs": {}, "non_kwargs": metadata["init_params"]}
        model.module = CellularModule(**model._module_kwargs)
        device = resolve_device(accelerator, devices)
        try:
            model.module.load_state_dict(
                {k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")}
            )
            model._restore_classifier(metadata.get("classifier"), tensors, device)
            model._restore_gene_classifier(metadata.get("gene_classifier"), tensors)
        except (RuntimeError, KeyError, ValueError) as error:
            problem = (
                f"its tensors do not fit the model described in {_METADATA_FILE} ({' '.join(str(error).split())[:300]})"
            )
            raise damaged(dir_path / _WEIGHTS_FILE, problem, _FIX) from None
        model.module.to(device).eval()
        model.is_trained_ = bool(metadata["is_trained"])
        model.training_summary_ = metadata["training_summary"]
        model.train_params_ = metadata.get("train_params")
        names = metadata.get("calibration_cell_names")
        model.calibration_cells_ = (
            None if names is None else CalibrationCells.from_tensors(tensors, names, len(model.genes))
        )
        history = metadata["history"]
        model.history_ = (
            None
            if history is None
            else {k: pd.DataFrame({k: v}, index=pd.RangeIndex(len(v), name="epoch")) for k, v in history.items()}
        )
        model.batch_moments_ = None
        if "moments.mean" in tensors:
            try:
                model.batch_moments_ = BatchMoments.from_tensors(
                    tensors, model.batches, len(model.genes), len(model.cell_types)
                )
            except (KeyError, ValueError):
                raise damaged(
                    dir_path / _WEIGHTS_FILE, "holds batch moments that do not fit the model's genes and batches", _FIX
                ) from None
        model.train_indices_ = _numpy_or_none(tensors.get("indices.train_indices_"))
        model.validation_indices_ = _numpy_or_none(tensors.get("indices.validation_indices_"))
        model.reference_index_ = None
        if (dir_path / _INDEX_FOLDER).exists():
            if checked and ReferenceIndex.saved_without_checksums(dir_path / _INDEX_FOLDER):
                raise damaged(
                    dir_path / _INDEX_FOLDER,
                    "is an index without checksums (format version 1) in the folder of a model saved with them; "
                    "model.save never writes that pair, so the index was replaced or edited",
                    "Rebuild it with model.build_reference_index(adata_ref) and save the model again.",
                )
            index = ReferenceIndex.load(dir_path / _INDEX_FOLDER, device=device)
            if index.model_fingerprint != model.fingerprint:
                raise damaged(
                    dir_path / _INDEX_FOLDER,
                    "the reference index saved with the model was built by another model (its model fingerprint "
                    f"{str(index.model_fingerprint)[:12]!r} is not this model's {model.fingerprint[:12]!r})",
                    "Rebuild it with model.build_reference_index(adata_ref) and save the model again.",
                )
            model.reference_index_ = index
        model._model_summary_string = model._summary()
        return model


def _read_tensors(path: Path, recorded: dict | None) -> dict[str, torch.Tensor]:
    """The tensors in ``path`` (never unpickling objects), checked against the recorded names and shapes."""
    if not path.is_file():
        raise damaged(path, "is missing", _FIX)
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise damaged(
            path, f"cannot be read as a tensor file ({type(error).__name__}): truncated or damaged", _FIX
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in tensors.items()
    ):
        raise damaged(path, "does not hold a mapping of names to tensors", _FIX)
    if recorded is not None:
        check_shapes(tensors, recorded, path, _FIX)
    broken = [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise damaged(path, f"tensor(s) {broken[:3]} hold NaN or infinite values", _FIX)
    return tensors


def _check_consistency(metadata: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Lengths and ranges that tie the metadata to the tensors (any format version)."""
    genes, module_kwargs = metadata["genes"], metadata["module_kwargs"]
    if module_kwargs.get("n_input") != len(genes):
        raise damaged(path, f"lists {len(genes)} genes but the encoder reads {module_kwargs.get('n_input')}", _FIX)
    for field in ("gene_ids", "gene_count_fractions"):
        values = metadata.get(field)
        if values is not None and len(values) != len(genes):
            raise damaged(path, f"field {field!r} has {len(values)} entries for {len(genes)} genes", _FIX)
    labels = metadata["registry"]["field_registries"].get("labels", {}).get("state_registry", {})
    n_types = len(labels.get("categorical_mapping", [])) - 1
    if module_kwargs.get("n_labels") != n_types:
        raise damaged(path, f"registers {n_types} cell types but the module has {module_kwargs.get('n_labels')}", _FIX)
    for name, value in tensors.items():
        if name.startswith("indices.") and value.numel() and int(value.min()) < 0:
            raise damaged(path, f"tensor {name!r} holds negative cell indices", _FIX)
    positions = tensors.get("module.encoder.grid_positions")
    if (positions is None) != (module_kwargs.get("encoder", "mlp") != "gene_grid"):
        raise damaged(path, f"describes a {module_kwargs.get('encoder', 'mlp')} encoder the tensors do not hold", _FIX)
    if positions is not None:
        try:
            check_grid_positions(positions, len(genes))
        except ValueError:
            raise damaged(
                path, "holds a gene-grid layout that does not place each gene on its own grid cell", _FIX
            ) from None
    calibration_labels = tensors.get("calibration.labels")
    if calibration_labels is not None and calibration_labels.numel():
        if int(calibration_labels.min()) < 0 or int(calibration_labels.max()) >= n_types:
            raise damaged(path, f"calibration labels lie outside the {n_types} cell types", _FIX)


def _cells_record(adata: AnnData) -> dict:
    """``n_obs`` and the SHA-256 of ``adata``'s cell names in order (one name per line)."""
    digest = hashlib.sha256()
    for start in range(0, adata.n_obs, 100_000):
        digest.update(("\n".join(map(str, adata.obs_names[start : start + 100_000])) + "\n").encode())
    return {"n_obs": int(adata.n_obs), "obs_names_sha256": digest.hexdigest()}


def _numpy_or_none(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()
