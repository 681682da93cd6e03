"""Saving and loading CELLULAR models: JSON metadata and tensors only, validated on load (no pickle)."""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.model.base import BaseModelClass

from cellular.index import ReferenceIndex
from cellular.module import CellularModule

from . import _serialization
from ._device import resolve_device
from ._panels import CalibrationCells

_FORMAT = "cellular-sc-model"
# Version 3 adds panel masking (module settings), depth thinning, training settings and calibration cells; version 2
# files load as models trained without them.
_FORMAT_VERSION = 3
_READABLE_VERSIONS = (2, 3)
_METADATA_FILE = "model.json"
_WEIGHTS_FILE = "model.pt"
_INDEX_FOLDER = "reference_index"


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
            "history": None if self.history_ is None else {k: v.iloc[:, 0].tolist() for k, v in self.history_.items()},
            "registry": self.registry_,
        }
        classifier_metadata, classifier_tensors = self._classifier_payload()
        metadata["classifier"] = classifier_metadata
        tensors = {f"module.{k}": v.detach().cpu() for k, v in self.module.state_dict().items()}
        tensors.update(classifier_tensors)
        if self.calibration_cells_ is not None:
            tensors.update(self.calibration_cells_.to_tensors())
        for name in ("train_indices_", "validation_indices_"):
            value = getattr(self, name)
            if value is not None:
                tensors[f"indices.{name}"] = torch.as_tensor(np.asarray(value, dtype=np.int64))
        (dir_path / _METADATA_FILE).write_text(_serialization.dumps(metadata))
        torch.save(tensors, dir_path / _WEIGHTS_FILE)
        index_path = dir_path / _INDEX_FOLDER
        if self.reference_index_ is not None:
            self.reference_index_.save(index_path, overwrite=True)
        elif (index_path / "index.json").exists():
            # The index of the model saved here before would be loaded with this one and refused as foreign.
            shutil.rmtree(index_path)
        if save_anndata:
            if self.adata is None:
                raise ValueError("save_anndata=True but the model has no attached AnnData.")
            self.adata.write_h5ad(dir_path / "adata.h5ad")

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
        metadata = _serialization.loads(metadata_path.read_text())
        if metadata.get("format") != _FORMAT or metadata.get("format_version") not in _READABLE_VERSIONS:
            raise ValueError(
                f"{dir_path} holds a model file of format {metadata.get('format')!r} version "
                f"{metadata.get('format_version')!r}, which this cellular-sc ({version('cellular-sc')}) cannot read "
                f"(it reads {_FORMAT!r} versions {list(_READABLE_VERSIONS)}). Install the cellular-sc version that "
                f"wrote it ({metadata.get('package_version')!r}) or retrain the model."
            )
        tensors = torch.load(dir_path / _WEIGHTS_FILE, map_location="cpu", weights_only=True)
        registry = metadata["registry"]

        if adata is None and (dir_path / "adata.h5ad").exists():
            import anndata

            adata = anndata.read_h5ad(dir_path / "adata.h5ad")
        model = cls.__new__(cls)
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
        model.init_params_ = {"kwargs": {}, "non_kwargs": metadata["init_params"]}
        model.module = CellularModule(**model._module_kwargs)
        model.module.load_state_dict({k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")})
        device = resolve_device(accelerator, devices)
        model.module.to(device).eval()
        model._restore_classifier(metadata.get("classifier"), tensors, device)
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
        model.train_indices_ = _numpy_or_none(tensors.get("indices.train_indices_"))
        model.validation_indices_ = _numpy_or_none(tensors.get("indices.validation_indices_"))
        model.reference_index_ = None
        if (dir_path / _INDEX_FOLDER).exists():
            model.reference_index_ = ReferenceIndex.load(dir_path / _INDEX_FOLDER, device=device)
        model._model_summary_string = model._summary()
        return model


def _numpy_or_none(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()
