"""``TreeAnnotator``: calibrated RandomForest / gradient-boosted trees on log-normalised expression (CellClassifier)."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from cellular._files import (
    FILE_RECORD,
    METADATA_CHECKSUM,
    SHA256,
    STRINGS,
    damaged,
    file_record,
    read_metadata,
    seal,
    verify_metadata,
)
from cellular.data import GeneFeatures

METHODS = ("random_forest", "hist_gradient_boosting")
CALIBRATIONS = ("temperature", "sigmoid", "isotonic", None)
_FORMAT = "cellular-sc-tree-annotator"
# Version 2 records the SHA-256 of the trees' file and of the manifest itself; version 1 loads with a warning.
_FORMAT_VERSION = 2
_UNCHECKED_VERSIONS = (1,)
_FIX = "Save the annotator again from an intact copy, or fit it again."
_MANIFEST = "tree_annotator.json"
_ESTIMATOR = "estimator.skops"
# Types a saved annotator may hold beyond those skops trusts by default; anything else is refused on load.
_TRUSTED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._TemperatureScaling",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.isotonic.IsotonicRegression",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.model_selection._split.StratifiedKFold",
)

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_SCHEMA = {
    "type": "object",
    "required": ["format", "format_version", "settings", "features", "classes", "files", METADATA_CHECKSUM],
    "properties": {
        "settings": {
            "type": "object",
            "required": ["method", "n_top_genes", "calibration", "n_estimators", "seed"],
            "properties": {
                "method": {"enum": list(METHODS)},
                "n_top_genes": {"type": ["integer", "null"], "minimum": 1},
                "calibration": {"enum": list(CALIBRATIONS)},
                "n_estimators": {"type": "integer", "minimum": 1},
                "seed": {"type": "integer"},
            },
            "additionalProperties": False,
        },
        "features": {
            "type": "object",
            "required": ["genes", "target_sum", "layer", "gene_count_fractions"],
            "properties": {
                "genes": {**STRINGS, "minItems": 1},
                "target_sum": _NUMBER_OR_NULL,
                "layer": {"type": ["string", "null"]},
                "gene_count_fractions": {"type": ["array", "null"], "items": {"type": "number"}},
            },
        },
        "classes": {**STRINGS, "minItems": 1},
        "labels_key": {"type": ["string", "null"]},
        "files": {
            "type": "object",
            "required": [_ESTIMATOR],
            "properties": {_ESTIMATOR: FILE_RECORD},
            "additionalProperties": False,
        },
        METADATA_CHECKSUM: SHA256,
    },
}


class TreeAnnotator:
    """Cell-type annotation with tree ensembles from scikit-learn on the annotator's own log-normalisation.

    The annotator owns its genes and normalisation (:class:`cellular.data.GeneFeatures`: the ``n_top_genes`` most
    variable genes of the training data, counts scaled to their median library size, ``log1p``), so a query is read
    exactly as the training cells were, genes matched by name. Probabilities are calibrated by cross-validation
    (``CalibratedClassifierCV``; temperature scaling by default). Saved with skops and JSON, loaded without pickle
    and only with the tree types listed in the package.

    Parameters
    ----------
    method
        ``"random_forest"`` (``RandomForestClassifier``, balanced class weights) or ``"hist_gradient_boosting"``
        (``HistGradientBoostingClassifier``, balanced class weights).
    n_top_genes
        Genes the trees read; all genes when ``None``.
    calibration
        ``CalibratedClassifierCV`` method (``"temperature"``, ``"sigmoid"``, ``"isotonic"``) over three stratified
        folds (two when a type has only two cells), or ``None`` for the ensemble's own probabilities.
    n_estimators
        Trees (random forest) or boosting iterations (gradient boosting).
    seed
        Random state of the trees and the calibration folds.
    n_jobs
        Threads of the random forest (scikit-learn's default, one, when ``None``).
    """

    def __init__(
        self,
        method: str = "random_forest",
        *,
        n_top_genes: int | None = 2000,
        calibration: str | None = "temperature",
        n_estimators: int = 200,
        seed: int = 0,
        n_jobs: int | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}.")
        if n_estimators < 1:
            raise ValueError(f"n_estimators must be at least 1, got {n_estimators}.")
        self.method = method
        self.n_top_genes = n_top_genes
        self.calibration = calibration
        self.n_estimators = int(n_estimators)
        self.seed = int(seed)
        self.n_jobs = n_jobs
        self.features_: GeneFeatures | None = None
        self.classes_: list[str] | None = None
        self.estimator_ = None
        self.labels_key_: str | None = None

    def __repr__(self) -> str:
        state = (
            "not fitted"
            if self.estimator_ is None
            else f"{len(self.classes_)} types, {len(self.features_.genes)} genes"
        )
        return f"TreeAnnotator({self.method}, calibration={self.calibration}): {state}."

    # ------------------------------------------------------------------ fitting
    def _estimator(self, n_folds: int):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

        if self.method == "random_forest":
            trees = RandomForestClassifier(
                n_estimators=self.n_estimators, class_weight="balanced", n_jobs=self.n_jobs, random_state=self.seed
            )
        else:
            trees = HistGradientBoostingClassifier(
                max_iter=self.n_estimators, class_weight="balanced", early_stopping=False, random_state=self.seed
            )
        if self.calibration is None:
            return trees
        from sklearn.model_selection import StratifiedKFold

        folds = StratifiedKFold(n_folds, shuffle=True, random_state=self.seed)
        return CalibratedClassifierCV(trees, method=self.calibration, cv=folds)

    def fit(
        self,
        adata: AnnData,
        labels_key: str,
        *,
        layer: str | None = None,
        log_normalized: bool = False,
        unlabeled_category: str = "Unknown",
    ) -> TreeAnnotator:
        """Choose the genes and normalisation on ``adata`` and fit the trees on its labelled cells.

        Parameters
        ----------
        adata
            Training cells (not modified); raw counts unless ``log_normalized``.
        labels_key
            ``obs`` column of cell types; cells with a missing label or ``unlabeled_category`` are left out.
        layer
            Layer holding the expression; ``adata.X`` when ``None``.
        log_normalized
            Whether the values are already log1p-normalised.
        unlabeled_category
            Label value of unlabelled cells.
        """
        if labels_key not in adata.obs:
            raise KeyError(
                f"labels_key={labels_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
            )
        labels = adata.obs[labels_key]
        labelled = (labels.notna() & (labels.astype(str) != unlabeled_category)).to_numpy()
        y = labels.astype(str).to_numpy()[labelled]
        classes, counts = np.unique(y, return_counts=True)
        if classes.size < 2:
            raise ValueError(
                f"adata.obs[{labels_key!r}] has {classes.size} labelled cell type(s); trees need two or more."
            )
        if self.calibration is not None and counts.min() < 2:
            rare = classes[counts < 2].tolist()
            raise ValueError(
                f"Cell types {rare} have a single labelled cell, too few for calibrated trees (calibration is "
                "cross-validated); remove them (or set their label to unlabeled_category), or pass calibration=None."
            )
        # Three calibration folds, or two when a type has only two cells (each fold must see every type).
        n_folds = int(min(3, counts.min()))
        features = GeneFeatures.fit(adata, n_top_genes=self.n_top_genes, layer=layer, log_normalized=log_normalized)
        expression = features.transform(adata[labelled] if not labelled.all() else adata, min_gene_overlap=1.0)
        estimator = self._estimator(n_folds)
        estimator.fit(self._matrix(expression), y)
        self.features_ = features
        self.classes_ = [str(c) for c in estimator.classes_]
        self.estimator_ = estimator
        self.labels_key_ = labels_key
        return self

    def _matrix(self, expression):
        # Gradient boosting reads dense input only; the forest keeps the sparse matrix.
        return expression.toarray() if self.method == "hist_gradient_boosting" else expression

    # --------------------------------------------------------------- prediction
    def _require_fitted(self) -> None:
        if self.estimator_ is None:
            raise RuntimeError("The TreeAnnotator is not fitted yet; call annotator.fit(adata, labels_key) first.")

    def predict_proba(self, adata: AnnData, *, min_gene_overlap: float = 0.5) -> np.ndarray:
        """``(n_cells, n_types)`` calibrated probabilities over :attr:`classes_` (genes matched by name)."""
        self._require_fitted()
        expression = self.features_.transform(adata, min_gene_overlap=min_gene_overlap)
        return np.asarray(self.estimator_.predict_proba(self._matrix(expression)), dtype=np.float64)

    def predict(self, adata: AnnData, *, min_gene_overlap: float = 0.5) -> np.ndarray:
        """The most probable type of each cell."""
        return np.asarray(self.classes_, dtype=object)[
            self.predict_proba(adata, min_gene_overlap=min_gene_overlap).argmax(1)
        ]

    def feature_importances(self) -> pd.Series:
        """Impurity-based importance of each gene, averaged over the calibration folds' ensembles; sorted."""
        self._require_fitted()
        if self.calibration is None:
            ensembles = [self.estimator_]
        else:
            ensembles = [fold.estimator for fold in self.estimator_.calibrated_classifiers_]
        if self.method == "hist_gradient_boosting":
            raise ValueError(
                "Gradient-boosted trees have no impurity importances in scikit-learn; use method='random_forest' or "
                "cellular.tl.marker_importances for per-type markers."
            )
        values = np.mean([ensemble.feature_importances_ for ensemble in ensembles], axis=0)
        return pd.Series(values, index=pd.Index(self.features_.genes, name="gene")).sort_values(ascending=False)

    # --------------------------------------------------------------------- I/O
    def save(self, dir_path: str | Path, overwrite: bool = False) -> None:
        """Write ``tree_annotator.json`` (settings, genes, classes) and ``estimator.skops`` (the trees, no pickle).

        The manifest records the SHA-256 and size of ``estimator.skops`` and a SHA-256 of its own content, which
        :meth:`load` verifies.
        """
        import skops.io

        self._require_fitted()
        dir_path = Path(dir_path)
        if (dir_path / _MANIFEST).exists() and not overwrite:
            raise FileExistsError(f"{dir_path} already holds a saved TreeAnnotator; pass overwrite=True to replace it.")
        dir_path.mkdir(parents=True, exist_ok=True)
        skops.io.dump(self.estimator_, dir_path / _ESTIMATOR)
        manifest = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "package_version": version("cellular-sc"),
            "settings": {
                "method": self.method,
                "n_top_genes": self.n_top_genes,
                "calibration": self.calibration,
                "n_estimators": self.n_estimators,
                "seed": self.seed,
            },
            "features": self.features_.to_dict(),
            "classes": self.classes_,
            "labels_key": self.labels_key_,
            "files": {_ESTIMATOR: file_record(dir_path / _ESTIMATOR)},
        }
        (dir_path / _MANIFEST).write_text(json.dumps(seal(manifest), indent=1))

    @classmethod
    def load(cls, dir_path: str | Path) -> TreeAnnotator:
        """Load a saved annotator, validated, without pickle.

        The manifest is checked against its schema and its own SHA-256, the trees' file against the SHA-256 recorded
        when it was saved, and the trees are read by skops, trusting only the scikit-learn tree and calibration types
        this package writes. Files of format version 1 (saved without checksums) load with a warning.
        """
        import skops.io

        dir_path = Path(dir_path)
        manifest_path = dir_path / _MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{dir_path} holds no saved TreeAnnotator ({_MANIFEST} is missing).")
        manifest = read_metadata(manifest_path, _FIX)
        readable = (*_UNCHECKED_VERSIONS, _FORMAT_VERSION)
        if manifest.get("format") != _FORMAT or manifest.get("format_version") not in readable:
            raise ValueError(f"{manifest_path} is not a TreeAnnotator file of format versions {list(readable)}.")
        checked = verify_metadata(
            manifest,
            schema=_SCHEMA,
            path=manifest_path,
            folder=dir_path,
            fix=_FIX,
            unchecked_versions=_UNCHECKED_VERSIONS,
        )
        if not checked:
            missing = [key for key in ("settings", "features", "classes") if key not in manifest]
            if missing:
                raise damaged(manifest_path, f"lacks the field(s) {missing}", _FIX)
        estimator_path = dir_path / _ESTIMATOR
        untrusted = skops.io.get_untrusted_types(file=estimator_path)
        refused = sorted(set(untrusted) - set(_TRUSTED_TYPES))
        if refused:
            raise ValueError(
                f"{estimator_path} holds types {refused} that a TreeAnnotator never writes; it is not loaded."
            )
        estimator = skops.io.load(estimator_path, trusted=list(untrusted))
        annotator = cls(**manifest["settings"])
        annotator.features_ = GeneFeatures.from_dict(manifest["features"])
        annotator.classes_ = [str(c) for c in manifest["classes"]]
        if [str(c) for c in estimator.classes_] != annotator.classes_:
            raise ValueError(
                f"{dir_path}: the stored classes do not match the trees' classes; the files do not belong together."
            )
        n_features = getattr(estimator, "n_features_in_", len(annotator.features_.genes))
        if n_features != len(annotator.features_.genes):
            raise ValueError(
                f"{dir_path}: the trees read {n_features} genes but the manifest lists "
                f"{len(annotator.features_.genes)}."
            )
        annotator.estimator_ = estimator
        annotator.labels_key_ = manifest.get("labels_key")
        return annotator
