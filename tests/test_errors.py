"""The error catalogue (docs/errors.md): every documented error is raised, with the documented message."""

import builtins
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from helpers import reseal_tree_annotator

import cellular
from cellular import CELLULAR, NotTrainedError
from cellular.dataloaders import MinibatchSampler

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
_HEADING = re.compile(r"^### `(?P<id>[a-z0-9-]+)`", re.MULTILINE)
_ERROR_LINE = re.compile(r"^- \*\*Error\*\*: `(?P<type>\w+)`: ``(?P<message>.+)``$", re.MULTILINE)


@dataclass(frozen=True)
class Entry:
    id: str
    exception: str
    message: str

    def pattern(self) -> re.Pattern:
        """The documented message with ``...`` standing for any text."""
        return re.compile(".*".join(re.escape(part) for part in self.message.split("...")), re.DOTALL)


def read_catalogue() -> list[Entry]:
    text = CATALOGUE.read_text()
    headings = list(_HEADING.finditer(text))
    entries = []
    for position, heading in enumerate(headings):
        end = headings[position + 1].start() if position + 1 < len(headings) else len(text)
        section = text[heading.end() : end]
        error = _ERROR_LINE.search(section)
        assert error is not None, f"catalogue entry {heading['id']!r} has no '- **Error**: `Type`: ``message``' line"
        entries.append(Entry(heading["id"], error["type"], error["message"]))
    return entries


# ---------------------------------------------------------------------------------------------------- the cases
def _counts(symphony):
    """A small labelled subset with at least two cells per type."""
    adata = symphony[symphony.obs["cell_type"].isin(["CD4 T cell", "B cell", "CD14 Monocyte"])][:240].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.remove_unused_categories()
    return adata


def _query(symphony):
    return symphony[symphony.obs["batch"] == "3pv2"][:50].copy()


def _with_x(adata, transform):
    dense = adata.X.toarray()
    transform(dense)
    adata.X = sp.csr_matrix(dense)
    return adata


def _setup(adata, **kwargs):
    CELLULAR.setup_anndata(adata, **{"labels_key": "cell_type", **kwargs})
    return CELLULAR(adata)


def _untrained(ctx):
    return _setup(_counts(ctx.symphony))


def _quick_model(ctx, **train_kwargs):
    model = _setup(_counts(ctx.symphony), batch_key="batch")
    model.train(max_epochs=1, progress_bar=False, **train_kwargs)
    return model


def _mutated_query(ctx, transform):
    return _with_x(_query(ctx.symphony), transform)


def _set_nan(x):
    x[0, 0] = np.nan


def _set_negative(x):
    x[1, 2] = -1.0


def _set_fraction(x):
    x[2, 3] = 0.5


def _log1p(x):
    x[:] = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


def _saved_model_with_version(ctx, version):
    path = ctx.tmp_path / "model"
    ctx.model.save(path, overwrite=True)
    metadata_path = path / "model.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["format_version"] = version
    metadata_path.write_text(json.dumps(metadata))
    return path


def _model_without_index(ctx):
    path = ctx.tmp_path / "no_index"
    ctx.model.save(path, overwrite=True)
    model = CELLULAR.load(path)
    model.reference_index_ = None
    return model


def _set_first_rows_empty(x):
    x[:2, :] = 0


def case_labels_key(ctx):
    CELLULAR.setup_anndata(_counts(ctx.symphony), labels_key="celltype")


def case_batch_key(ctx):
    CELLULAR.setup_anndata(_counts(ctx.symphony), labels_key="cell_type", batch_key="donor")


def case_gene_id_key(ctx):
    cellular.tl.cellular_embed(_counts(ctx.symphony), labels_key="cell_type", gene_id_key="ids", max_epochs=1)


def case_positive_int(ctx):
    cellular.tl.novel_types(_counts(ctx.symphony), ctx.model, n_markers=-1)


def case_unknown_label_type(ctx):
    cellular.tl.cellular_annotate(_counts(ctx.symphony), ctx.model, unknown_label=None)


def case_ece_labels(ctx):
    cellular.metrics.expected_calibration_error(np.full((4, 4), 0.25), np.array([1, 2, 3, 4]))


def case_conformal_nan(ctx):
    cellular.metrics.conformal_pvalues([1.0, 2.0], [np.nan, 1.0])


def case_missing_labels(ctx):
    adata = _counts(ctx.symphony)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object).where(np.arange(adata.n_obs) > 2)
    CELLULAR.setup_anndata(adata, labels_key="cell_type")


def case_layer(ctx):
    CELLULAR.setup_anndata(_counts(ctx.symphony), labels_key="cell_type", layer="counts")


def case_empty(ctx):
    CELLULAR.setup_anndata(_counts(ctx.symphony)[:0].copy(), labels_key="cell_type")


def case_duplicated_cell_names(ctx):
    adata = _counts(ctx.symphony)[:50].copy()
    adata.obs_names = [*adata.obs_names[:-1], adata.obs_names[0]]
    CELLULAR.setup_anndata(adata, labels_key="cell_type")


def case_nan_values(ctx):
    ctx.model.get_latent_representation(_mutated_query(ctx, _set_nan))


def case_negative_values(ctx):
    ctx.model.get_latent_representation(_mutated_query(ctx, _set_negative))


def case_non_integer_counts(ctx):
    _setup(_with_x(_counts(ctx.symphony), _log1p))


def case_corrected_counts(ctx):
    _setup(_with_x(_counts(ctx.symphony), _set_fraction))


def case_counts_as_log_values(ctx):
    ctx.model.get_latent_representation(_query(ctx.symphony), log_normalized=True)


def case_cells_without_counts(ctx):
    ctx.model.get_latent_representation(_mutated_query(ctx, _set_first_rows_empty))


def case_duplicate_genes(ctx):
    query = _query(ctx.symphony)
    query.var_names = [query.var_names[0], *query.var_names[:-1]]
    ctx.model.get_latent_representation(query)


def case_too_few_shared_genes(ctx):
    query = _query(ctx.symphony)
    query.var_names = [f"gene{i}" if i % 3 else name for i, name in enumerate(query.var_names)]
    ctx.model.get_latent_representation(query)


def case_one_cell_type(ctx):
    adata = _counts(ctx.symphony)
    _setup(adata[adata.obs["cell_type"] == "B cell"].copy()).train(max_epochs=1, progress_bar=False)


def case_singleton_type(ctx):
    adata = _counts(ctx.symphony)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories("HSPC")
    adata.obs.iloc[0, adata.obs.columns.get_loc("cell_type")] = "HSPC"
    _setup(adata).train(max_epochs=1, progress_bar=False)


def case_batch_size(ctx):
    _untrained(ctx).train(max_epochs=1, batch_size=1, progress_bar=False)


def case_early_stopping_min_delta(ctx):
    _untrained(ctx).train(max_epochs=1, early_stopping_min_delta=float("nan"), progress_bar=False)


def case_untrained_model(ctx):
    cellular.tl.cellular_embed(ctx.symphony[:20].copy(), _untrained(ctx))


def case_no_classifier(ctx):
    cellular.tl.cellular_annotate(_query(ctx.symphony), _quick_model(ctx, classifier=False))


def case_not_a_model(ctx):
    cellular.tl.novel_types(_query(ctx.symphony), "my_model/")


def case_alpha(ctx):
    cellular.tl.novel_types(_query(ctx.symphony), ctx.model, alpha=5)


def case_use_rep_missing(ctx):
    cellular.tl.cellular_annotate(_query(ctx.symphony), ctx.model, use_rep="X_scvi")


def case_use_rep_shape(ctx):
    query = _query(ctx.symphony)
    query.obsm["X_pca"] = np.zeros((query.n_obs, 3), dtype=np.float32)
    cellular.tl.cellular_annotate(query, ctx.model, use_rep="X_pca")


def case_no_reference_index(ctx):
    cellular.tl.cellular_map(_query(ctx.symphony), _model_without_index(ctx))


def case_index_from_other_model(ctx):
    reference = _counts(ctx.symphony)
    other = _quick_model(ctx)
    cellular.tl.cellular_map(_query(ctx.symphony), ctx.model, other.build_reference_index(reference))


def _calibrated_index(ctx, n_cells=40, names=None):
    embedding = ctx.model.get_latent_representation()
    return cellular.ReferenceIndex.from_embedding(
        embedding, calibration_embedding=embedding[:n_cells], calibration_cell_names=names, backend="exact"
    )


def case_calibration_cells(ctx):
    _calibrated_index(ctx, n_cells=5)


def case_calibration_cell_names(ctx):
    _calibrated_index(ctx, names=["a", "b", "c"])


def case_distance_calibration(ctx):
    embedding = ctx.model.get_latent_representation()
    index = cellular.ReferenceIndex.from_embedding(embedding, backend="exact")
    index.transfer_labels(embedding[:10], distance_calibration=np.ones((3, 2)))


def _indexed_query(ctx, model):
    return _query(ctx.symphony), cellular.ReferenceIndex.build(model, _counts(ctx.symphony))


def case_gene_classifier_weight(ctx):
    query, index = _indexed_query(ctx, ctx.model)
    cellular.tl.cellular_map(query, ctx.model, index, gene_classifier_weight=1.5)


def case_no_gene_classifier(ctx):
    model = _quick_model(ctx, classifier=False)
    query, index = _indexed_query(ctx, model)
    cellular.tl.cellular_map(query, model, index, gene_classifier_weight=0.5)


def case_gene_classifier_without_model(ctx):
    query, index = _indexed_query(ctx, ctx.model)
    query.obsm["X_cellular"] = ctx.model.get_latent_representation(query)
    plain = cellular.ReferenceIndex.from_embedding(index.embedding, {"cell_type": np.repeat("T", index.n_cells)})
    cellular.tl.cellular_map(query, None, plain, use_rep="X_cellular", gene_classifier_weight=0.5)


def case_gene_classifier_c(ctx):
    _quick_model(ctx, classifier_kwargs={"gene_classifier_c": 0})


def case_novelty_gene_uncertainty_weight(ctx):
    _quick_model(ctx, classifier_kwargs={"novelty_gene_uncertainty_weight": -1.0})


def case_gene_uncertainty_needs_gene_classifier(ctx):
    _quick_model(ctx, classifier_kwargs={"novelty_gene_uncertainty_weight": 0.2, "gene_classifier": False})


def _evidence_transfer(ctx, evidence):
    query, index = _indexed_query(ctx, ctx.model)
    index.transfer_labels(ctx.model.get_latent_representation(query), evidence={"cell_type": evidence})


def case_evidence_weight(ctx):
    cellular.index.ClassEvidence(np.ones((2, 2)), ["B cell", "CD4 T cell"], 2)


def case_evidence_shape(ctx):
    _evidence_transfer(ctx, cellular.index.ClassEvidence(np.ones((3, 2)) / 2, ["B cell", "CD4 T cell"], 0.5))


def case_evidence_values(ctx):
    probabilities = np.full((50, 2), 0.5)
    probabilities[3, 1] = np.nan
    _evidence_transfer(ctx, cellular.index.ClassEvidence(probabilities, ["B cell", "CD4 T cell"], 0.5))


def case_evidence_classes(ctx):
    _evidence_transfer(ctx, cellular.index.ClassEvidence(np.ones((50, 2)) / 2, ["B cell", "CD4 T cell"], 0.5))


def case_no_saved_model(ctx):
    CELLULAR.load(ctx.tmp_path / "nothing_here")


def case_incompatible_model_version(ctx):
    CELLULAR.load(_saved_model_with_version(ctx, 999))


def case_model_exists(ctx):
    path = ctx.tmp_path / "model"
    ctx.model.save(path, overwrite=True)
    ctx.model.save(path)


def case_panel(ctx):
    cellular.tl.cellular_annotate(_query(ctx.symphony), ctx.model, panel="refitted")


def _saved_copy(ctx, name="saved"):
    path = ctx.tmp_path / name
    ctx.model.save(path, overwrite=True)
    return path


def _narrow_query(ctx, n_genes):
    query = _query(ctx.symphony)
    return query[:, [g for g in ctx.model.genes if g in set(query.var_names)][:n_genes]].copy()


def case_panel_needs_training_data(ctx):
    cellular.tl.cellular_annotate(_narrow_query(ctx, 100), CELLULAR.load(_saved_copy(ctx)))


def case_refit_without_training_data(ctx):
    CELLULAR.load(_saved_copy(ctx)).restrict_to_genes(_narrow_query(ctx, 100))


def case_too_few_refit_genes(ctx):
    ctx.model.restrict_to_genes(_narrow_query(ctx, 3))


def case_refit_index_mismatch(ctx):
    reference = _counts(ctx.symphony)
    index = ctx.model.build_reference_index(reference)
    try:
        cellular.tl.cellular_map(_narrow_query(ctx, 100), ctx.model, index, panel="refit")
    finally:
        ctx.model.reference_index_ = None


def case_augmentation_share(ctx):
    adata = _counts(ctx.symphony)
    CELLULAR.setup_anndata(adata, labels_key="cell_type")
    CELLULAR(adata, panel_masking=1.5)


def _legacy_copy(ctx, name="legacy"):
    """A saved copy turned into a version-3 model file (no checksums), as earlier releases wrote it."""
    path = _saved_copy(ctx, name)
    metadata = json.loads((path / "model.json").read_text())
    metadata["format_version"] = 3
    for key in ("files", "tensors", "metadata_sha256"):
        del metadata[key]
    (path / "model.json").write_text(json.dumps(metadata))
    return path


def _reseal(path, edit=lambda metadata: None, weights=None):
    """Edit a saved model's metadata (and optionally its tensors) and record matching checksums, as a deliberate
    editor could: what the checksums cannot catch, the consistency checks must."""
    from cellular._files import write_metadata

    if weights is not None:
        torch.save(weights, path / "model.pt")
    metadata = json.loads((path / "model.json").read_text())
    metadata.pop("metadata_sha256")
    edit(metadata)
    write_metadata(path / "model.json", metadata, path / "model.pt", "tensors", metadata["tensors"])
    return path


def case_damaged_calibration_cells(ctx):
    path = _legacy_copy(ctx)
    tensors = torch.load(path / "model.pt", weights_only=True)
    tensors["calibration.indptr"] = tensors["calibration.indptr"][:-5]
    torch.save(tensors, path / "model.pt")
    CELLULAR.load(path)


def case_damaged_novelty_space(ctx):
    path = _legacy_copy(ctx)
    tensors = torch.load(path / "model.pt", weights_only=True)
    # Consistent in itself, but spanning one gene fewer than the model reads.
    tensors["novelty.gene_mean"] = tensors["novelty.gene_mean"][:-1]
    tensors["novelty.gene_components"] = tensors["novelty.gene_components"][:-1]
    torch.save(tensors, path / "model.pt")
    CELLULAR.load(path)


def _self_assessment(x_train, labels_train, x_test, labels_test):
    from cellular.nn import held_out_type_aurocs

    held_out_type_aurocs(x_train, labels_train, x_test, labels_test)


def case_self_assessment_genes(ctx):
    _self_assessment(np.zeros((10, 5)), np.arange(10) % 3, np.zeros((6, 4)), np.arange(6) % 3)


def case_self_assessment_labels(ctx):
    _self_assessment(np.zeros((10, 5)), np.arange(10) % 3, np.zeros((6, 5)), np.arange(5) % 3)


def case_self_assessment_non_finite(ctx):
    x_test = np.zeros((6, 5))
    x_test[0, 0] = np.nan
    _self_assessment(np.zeros((10, 5)), np.arange(10) % 3, x_test, np.arange(6) % 3)


def _legacy_save_with_damage(ctx, name, classifier_kwargs, tensor):
    """Save a quick model as a version-3 file (no checksums) with ``tensor`` one entry short, then load it."""
    model = _quick_model(ctx, classifier_kwargs=classifier_kwargs)
    path = ctx.tmp_path / name
    model.save(path, overwrite=True)
    metadata = json.loads((path / "model.json").read_text())
    metadata["format_version"] = 3
    for key in ("files", "tensors", "metadata_sha256"):
        del metadata[key]
    (path / "model.json").write_text(json.dumps(metadata))
    tensors = torch.load(path / "model.pt", weights_only=True)
    tensors[tensor] = tensors[tensor][:-1]
    torch.save(tensors, path / "model.pt")
    CELLULAR.load(path)


def case_damaged_novelty_probe(ctx):
    _legacy_save_with_damage(ctx, "probe", {"novelty_gene_uncertainty_weight": 0.2}, "novelty.gene_uncertainty_bias")


def case_damaged_novelty_matching(ctx):
    _legacy_save_with_damage(ctx, "matching", {"novelty_gene_weight": 4.0}, "novelty.matching_calibration_scores")


def case_damaged_novelty_calibration(ctx):
    path = _legacy_copy(ctx)
    tensors = torch.load(path / "model.pt", weights_only=True)
    tensors["novelty.query_calibration_scores"] = tensors["novelty.query_calibration_scores"][:-1]
    torch.save(tensors, path / "model.pt")
    CELLULAR.load(path)


def case_novelty_projections_missing(ctx):
    query = _query(ctx.symphony)
    z = ctx.model.get_latent_representation(query, min_gene_overlap=0.0)
    ctx.model.novelty_scores_from_embedding(z, ctx.model.probabilities_from_embedding(z), query.obs_names)


def case_novelty_projections_width(ctx):
    query = _query(ctx.symphony)
    embedded = ctx.model.embed_query(query)
    probabilities = ctx.model.probabilities_from_embedding(embedded.z)
    ctx.model.novelty_scores_from_embedding(embedded.z, probabilities, query.obs_names, hidden=embedded.hidden[:, :3])


def case_changed_file(ctx):
    path = _saved_copy(ctx)
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    CELLULAR.load(path)


def _saved_index(ctx):
    path = ctx.tmp_path / "model" / "reference_index"
    cellular.ReferenceIndex.build(ctx.model, _counts(ctx.symphony)).save(path, overwrite=True)
    return path


def case_missing_file(ctx):
    path = _saved_index(ctx)
    (path / "arrays.npz").unlink()
    cellular.ReferenceIndex.load(path)


def case_edited_metadata(ctx):
    path = _saved_copy(ctx)
    metadata = json.loads((path / "model.json").read_text())
    metadata["target_sum"] = 1.0
    (path / "model.json").write_text(json.dumps(metadata))
    CELLULAR.load(path)


def case_invalid_metadata(ctx):
    path = _saved_copy(ctx)
    metadata = json.loads((path / "model.json").read_text())
    metadata["genes"] = 42
    (path / "model.json").write_text(json.dumps(metadata))
    CELLULAR.load(path)


def case_corrupt_json(ctx):
    path = _saved_copy(ctx)
    text = (path / "model.json").read_text()
    (path / "model.json").write_text(text[: len(text) // 2])
    CELLULAR.load(path)


def case_unchecked_version_with_checksums(ctx):
    _saved_model_with_version(ctx, 3)
    CELLULAR.load(ctx.tmp_path / "model")


def case_unreadable_tensors(ctx):
    path = _legacy_copy(ctx)
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 3])
    CELLULAR.load(path)


def case_tensor_shapes(ctx):
    def shrink(metadata):
        metadata["tensors"]["module.class_weights"] = [1]

    CELLULAR.load(_reseal(_saved_copy(ctx), shrink))


def case_not_finite_tensors(ctx):
    path = _saved_copy(ctx)
    tensors = torch.load(path / "model.pt", weights_only=True)
    name = next(key for key in tensors if key.startswith("module.encoder") and tensors[key].is_floating_point())
    tensors[name][0] = float("nan")
    CELLULAR.load(_reseal(path, weights=tensors))


def case_gene_count_mismatch(ctx):
    def drop_gene(metadata):
        metadata["genes"] = metadata["genes"][:-1]

    CELLULAR.load(_reseal(_saved_copy(ctx), drop_gene))


def case_tensors_do_not_fit(ctx):
    path = _legacy_copy(ctx)
    tensors = torch.load(path / "model.pt", weights_only=True)
    name = next(key for key in tensors if key.startswith("module.encoder") and tensors[key].ndim == 2)
    tensors[name] = tensors[name][:, :-1]
    torch.save(tensors, path / "model.pt")
    CELLULAR.load(path)


def case_foreign_index(ctx):
    path = _saved_copy(ctx)
    other = _quick_model(ctx)
    other.build_reference_index(_counts(ctx.symphony)).save(path / "reference_index", overwrite=True)
    CELLULAR.load(path)


def _unchecked_index(path, edit=None):
    """The index saved in ``path`` relabelled as format 1 (written before checksums: only the index's own checks
    stand guard), its metadata changed by ``edit``."""
    metadata = json.loads((path / "index.json").read_text())
    metadata["format_version"] = 1
    for key in ("files", "arrays", "metadata_sha256"):
        del metadata[key]
    if edit is not None:
        edit(metadata)
    (path / "index.json").write_text(json.dumps(metadata))
    return path


def case_index_arrays(ctx):
    path = _unchecked_index(_saved_index(ctx))
    with np.load(path / "arrays.npz") as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["label_codes_0"][0] = 99
    np.savez(path / "arrays.npz", **arrays)
    cellular.ReferenceIndex.load(path)


def case_index_level_names(ctx):
    cellular.ReferenceIndex.load(
        _unchecked_index(_saved_index(ctx), lambda metadata: metadata.update(level_names=["cell_type"] * 2))
    )


def case_join_other_index(ctx):
    query = _query(ctx.symphony)[:100].copy()
    cellular.tl.cellular_map(query, ctx.model, cellular.ReferenceIndex.build(ctx.model, _counts(ctx.symphony)))
    other = _quick_model(ctx)
    cellular.tl.join_reference_query(query, cellular.ReferenceIndex.build(other, _counts(ctx.symphony)))


def case_gene_name_case(ctx):
    query = _query(ctx.symphony)
    query.var_names = query.var_names.str.lower()
    cellular.tl.cellular_annotate(query, ctx.model)


def case_gene_id_versions(ctx):
    query = _query(ctx.symphony)
    query.var_names = [f"{gene}.1" for gene in query.var_names]
    cellular.tl.cellular_annotate(query, ctx.model)


def case_genes_in_another_column(ctx):
    query = _query(ctx.symphony)
    query.var["symbol"] = query.var_names.to_numpy()
    query.var_names = [f"ENSG{i:011d}" for i in range(query.n_vars)]
    cellular.tl.cellular_annotate(query, ctx.model)


def case_faiss_extra(ctx):
    from unittest import mock

    from cellular.index import _faiss

    def missing(name, *args):
        raise ImportError(f"No module named {name!r}")

    with mock.patch.object(_faiss, "import_module", missing):
        cellular.ReferenceIndex.from_embedding(np.eye(4, dtype=np.float32) + 0.1, backend="faiss")


def case_labels_text_collision(ctx):
    adata = _counts(ctx.symphony)
    adata.obs["cell_type"] = pd.Series([1 if i % 2 else "1" for i in range(adata.n_obs)], index=adata.obs_names)
    CELLULAR.setup_anndata(adata, labels_key="cell_type")


def case_lineage_map_name(ctx):
    cellular.data.lineage_map("liver")


def case_hierarchical_f1_shapes(ctx):
    cellular.metrics.hierarchical_f1(["B cell", "NK cell"], ["B cell"], cellular.data.lineage_map("pbmc"))


def case_invalid_index(ctx):
    cellular.ReferenceIndex.load(_unchecked_index(_saved_index(ctx), lambda metadata: metadata.update(n_neighbors=0)))


def case_hierarchy_cycle(ctx):
    cellular.metrics.hierarchical_f1(["CD8 T cell"], ["T cell"], {"CD8 T cell": "T cell", "T cell": "CD8 T cell"})


def case_labels_batch_same(ctx):
    CELLULAR.setup_anndata(_counts(ctx.symphony), labels_key="cell_type", batch_key="cell_type")


def case_training_diverged(ctx):
    _setup(_counts(ctx.symphony), batch_key="batch").train(max_epochs=1, lr=1e30, classifier=False, progress_bar=False)


def _damaged_copy(ctx, prefix):
    model = CELLULAR.load(_saved_copy(ctx))
    parameters = model.classifier_ if prefix == "classifier" else model.module.encoder
    with torch.no_grad():
        next(parameters.parameters()).fill_(float("nan"))
    return model


def case_not_finite_embedding(ctx):
    _damaged_copy(ctx, "encoder").get_latent_representation(_query(ctx.symphony))


def case_not_finite_classifier(ctx):
    cellular.tl.cellular_annotate(_query(ctx.symphony), _damaged_copy(ctx, "classifier"))


def case_use_rep_refit(ctx):
    query = _narrow_query(ctx, 100)
    cellular.tl.cellular_embed(query, ctx.model, min_gene_overlap=0.0)
    cellular.tl.cellular_annotate(query, ctx.model, use_rep="X_cellular")


def case_load_other_training_data(ctx):
    CELLULAR.load(_saved_copy(ctx), adata=_counts(ctx.symphony))


def case_saved_anndata_other_cells(ctx):
    path = _saved_copy(ctx)
    _counts(ctx.symphony).write_h5ad(path / "adata.h5ad")
    CELLULAR.load(path)


def case_legacy_model_missing_field(ctx):
    path = _legacy_copy(ctx)
    metadata = json.loads((path / "model.json").read_text())
    del metadata["target_sum"]
    (path / "model.json").write_text(json.dumps(metadata))
    CELLULAR.load(path)


def case_legacy_index_in_model_folder(ctx):
    path = _saved_copy(ctx, "with_index")
    index_path = path / "reference_index"
    cellular.ReferenceIndex.build(ctx.model, _counts(ctx.symphony)).save(index_path, overwrite=True)
    _unchecked_index(index_path)
    CELLULAR.load(path)


def case_not_finite_use_rep(ctx):
    query = _query(ctx.symphony)
    cellular.tl.cellular_embed(query, ctx.model)
    query.obsm["X_cellular"][3, 0] = np.nan
    cellular.tl.cellular_annotate(query, ctx.model, use_rep="X_cellular")


def case_not_finite_reference_embedding(ctx):
    embedding = np.ones((20, 4), dtype=np.float32)
    embedding[5, 1] = np.inf
    cellular.ReferenceIndex.from_embedding(embedding)


def case_index_without_fingerprint(ctx):
    query = _query(ctx.symphony)
    index = cellular.ReferenceIndex.build(ctx.model, _counts(ctx.symphony))
    plain = cellular.ReferenceIndex.from_embedding(index.embedding, {"cell_type": np.repeat("T", index.n_cells)})
    cellular.tl.cellular_map(query, ctx.model, plain)


def case_panel_mask(ctx):
    ctx.model.calibrate_for_panel(np.ones(10, dtype=bool))


def case_csc_on_disk(ctx):
    adata = _counts(ctx.symphony)
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(ctx.tmp_path / "csc.h5ad")
    ctx.model.get_latent_representation(ad.read_h5ad(ctx.tmp_path / "csc.h5ad", backed="r"))


def case_sampler_rng(ctx):
    MinibatchSampler(np.arange(10), 4)


def _saved_encoder(ctx):
    from cellular.lm import CellSentenceEncoder

    path = ctx.tmp_path / "encoder"
    CellSentenceEncoder.pretrained(device="cpu").save(path, overwrite=True)
    return path


def case_lm_extra(ctx):
    from unittest import mock

    from cellular.lm import _weights

    def missing(name, *args):
        raise ImportError(f"No module named {name!r}")

    adata = _query(ctx.symphony)
    cellular.tl.cell_sentences(adata)
    with mock.patch.object(_weights, "import_module", missing):
        cellular.tl.lm_embed(adata)


def case_weights_version(ctx):
    from unittest import mock

    from cellular.lm import _weights

    with mock.patch.object(_weights, "version", lambda name: "0.0.9"):
        _weights.pretrained_model_path()


def case_weights_hash(ctx):
    from cellular.lm import CellSentenceEncoder

    path = _saved_encoder(ctx)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    CellSentenceEncoder.load(path)


def case_unsafe_encoder_files(ctx):
    from cellular.lm import CellSentenceEncoder

    path = _saved_encoder(ctx)
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    CellSentenceEncoder.load(path)


def case_encoder_folder_in_use(ctx):
    from cellular.lm import CellSentenceEncoder

    path = ctx.tmp_path / "analysis"
    path.mkdir()
    (path / "notes.txt").write_text("the user's own file")
    try:
        CellSentenceEncoder.pretrained(device="cpu").save(path, overwrite=True)
    finally:
        assert (path / "notes.txt").read_text() == "the user's own file"


def case_encoder_exists(ctx):
    from cellular.lm import CellSentenceEncoder

    CellSentenceEncoder.pretrained(device="cpu").save(_saved_encoder(ctx))


def case_fine_tune_variant_option(ctx):
    from cellular.lm import CellSentenceEncoder

    cells = _query(ctx.symphony)[:40].copy()
    cellular.tl.cell_sentences(cells)
    CellSentenceEncoder.pretrained(device="cpu").fine_tune(cells, batch_key="batch", n_pairs=8)


def case_encoder_module_types(ctx):
    from cellular.lm import CellSentenceEncoder

    path = _saved_encoder(ctx)
    modules = json.loads((path / "modules.json").read_text())
    modules[0]["type"] = "builtins.eval"
    (path / "modules.json").write_text(json.dumps(modules))
    CellSentenceEncoder.load(path)


def case_sentences_missing(ctx):
    cellular.tl.lm_embed(_query(ctx.symphony))


def case_map_without_model(ctx):
    cellular.tl.cellular_map(_query(ctx.symphony), None, ctx.model.reference_index_)


def case_tree_rare_types(ctx):
    from cellular.trees import TreeAnnotator

    adata = _counts(ctx.symphony)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.iloc[:1, adata.obs.columns.get_loc("cell_type")] = "Platelet"
    TreeAnnotator(n_estimators=5).fit(adata, "cell_type")


def case_tree_untrusted_types(ctx):
    import os

    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    from cellular.trees import TreeAnnotator

    path = ctx.tmp_path / "trees"
    TreeAnnotator(n_estimators=5, n_top_genes=100).fit(_counts(ctx.symphony), "cell_type").save(path, overwrite=True)
    skops.io.dump(FunctionTransformer(os.system), path / "estimator.skops")
    reseal_tree_annotator(path)
    TreeAnnotator.load(path)


def case_tree_count_shares(ctx):
    from cellular.trees import TreeAnnotator

    path = ctx.tmp_path / "trees"
    TreeAnnotator(n_estimators=5, n_top_genes=100).fit(_counts(ctx.symphony), "cell_type").save(path, overwrite=True)

    def drop_one_share(manifest):
        manifest["features"]["gene_count_fractions"] = manifest["features"]["gene_count_fractions"][:-1]

    reseal_tree_annotator(path, drop_one_share)
    TreeAnnotator.load(path)


def case_tree_n_top_genes(ctx):
    from cellular.trees import TreeAnnotator

    TreeAnnotator(n_estimators=5, n_top_genes=10.7).fit(_counts(ctx.symphony), "cell_type")


def case_marker_min_cells(ctx):
    cellular.tl.marker_importances(_counts(ctx.symphony), "cell_type", min_cells=10_000)


def case_marker_plot_no_types(ctx):
    adata = _counts(ctx.symphony)[:400].copy()
    cellular.tl.marker_importances(adata, "cell_type", n_estimators=5, n_permutation_genes=2, n_repeats=1, min_cells=5)
    cellular.pl.marker_importances(adata, cell_types=[], show=False)


def _grid_model_copy(ctx):
    adata = _counts(ctx.symphony)
    CELLULAR.setup_anndata(adata, labels_key="cell_type")
    path = ctx.tmp_path / "grid"
    CELLULAR(adata, encoder="gene_grid", n_top_genes=500).save(path, overwrite=True)
    return path


def case_damaged_grid_layout(ctx):
    path = _grid_model_copy(ctx)
    tensors = torch.load(path / "model.pt", weights_only=True)
    tensors["module.encoder.grid_positions"][1] = tensors["module.encoder.grid_positions"][0]
    CELLULAR.load(_reseal(path, weights=tensors))


def case_encoder_tensors_mismatch(ctx):
    def claim_gene_grid(metadata):
        metadata["module_kwargs"]["encoder"] = "gene_grid"

    CELLULAR.load(_reseal(_saved_copy(ctx), claim_gene_grid))


def case_encoder_name(ctx):
    CELLULAR(_setup_only(ctx), encoder="cnn")


def case_hidden_sizes(ctx):
    CELLULAR(_setup_only(ctx), hidden_sizes=(256,))


def case_hidden_sizes_encoder(ctx):
    CELLULAR(_setup_only(ctx), encoder="gene_grid", hidden_sizes=(256, 128))


def case_hidden_sizes_name(ctx):
    CELLULAR(_setup_only(ctx), hidden_sizes="wide")


def case_gene_layout_name(ctx):
    CELLULAR(_setup_only(ctx), encoder="gene_grid", gene_layout="random")


def case_grid_layout(ctx):
    cellular.nn.GeneGridEncoder(3, grid_positions=torch.tensor([0, 0, 1]))


def case_layout_expression(ctx):
    cellular.data.gene_grid_layout(["CD3E", "CD19", "LYZ"], "coexpression")


def case_grid_positions_mlp(ctx):
    from cellular.module import CellularModule

    CellularModule(n_input=3, n_labels=2, n_batch=1, encoder="mlp", grid_positions=torch.tensor([0, 1, 2]))


def _setup_only(ctx, **kwargs):
    adata = _counts(ctx.symphony)
    CELLULAR.setup_anndata(adata, **{"labels_key": "cell_type", **kwargs})
    return adata


def _broad(ctx):
    adata = _counts(ctx.symphony)
    adata.obs["broad"] = adata.obs["cell_type_broad"].astype(str)
    return adata


def case_hierarchy_missing_labels(ctx):
    _setup_only(ctx, label_hierarchy={"CD4 T cell": "T cell"})


def case_hierarchy_two_parents(ctx):
    adata = _broad(ctx)
    adata.obs.loc[adata.obs_names[adata.obs["cell_type"] == "CD4 T cell"][:3], "broad"] = "NK"
    CELLULAR.setup_anndata(adata, labels_key=["broad", "cell_type"])


def case_hierarchy_level_conflict(ctx):
    adata = _broad(ctx)
    adata.obs["lineage"] = np.where(adata.obs["broad"] == "Mono", "myeloid", "lymphoid")
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "B cell")[:3]] = "T"
    adata.obs["cell_type"] = labels
    CELLULAR.setup_anndata(adata, labels_key=["lineage", "broad", "cell_type"])


def case_hierarchy_map_conflict(ctx):
    CELLULAR.setup_anndata(_broad(ctx), labels_key=["broad", "cell_type"], label_hierarchy={"CD4 T cell": "NK"})


def case_hierarchy_level_names(ctx):
    _setup_only(ctx, label_hierarchy=cellular.data.lineage_map("pbmc"), label_levels=["lineage", "type"])


def case_label_levels_without_hierarchy(ctx):
    _setup_only(ctx, label_levels=["type"])


def case_labels_key_list(ctx):
    _setup_only(ctx, labels_key=["cell_type"])


def case_label_hierarchy_type(ctx):
    _setup_only(ctx, label_hierarchy=[("CD4 T cell", "T cell")])


def case_unknown_label_in_hierarchy(ctx):
    model = _setup(_counts(ctx.symphony), batch_key="batch", label_hierarchy=cellular.data.lineage_map("pbmc"))
    model.train(max_epochs=1, progress_bar=False)
    cellular.tl.cellular_annotate(_query(ctx.symphony), model, unknown_label="T cell")


def case_threshold_range(ctx):
    cellular.tl.cellular_map(_query(ctx.symphony), ctx.model, hierarchy_threshold=1.5)


def case_damaged_batch_moments(ctx):
    path = _saved_copy(ctx, "moments")
    tensors = torch.load(path / "model.pt", weights_only=True)
    tensors["moments.batch_compositions"] = -tensors["moments.batch_compositions"] - 1.0
    CELLULAR.load(_reseal(path, weights=tensors))


def case_batch_names_length(ctx):
    query = _query(ctx.symphony)
    ctx.model._read(query, None, None, None, 0.0, batch_names=["a", "b"])


def case_query_batch_missing(ctx):
    query = _query(ctx.symphony)
    query.obs["batch"] = query.obs["batch"].astype(object)
    query.obs.iloc[0, query.obs.columns.get_loc("batch")] = np.nan
    ctx.model.get_latent_representation(query, min_gene_overlap=0.0)


def _query_files(ctx, n_files=2):
    query = _query(ctx.symphony)
    paths = []
    for position in range(n_files):
        part = query[position::n_files].copy()
        part.obs_names = [f"{name}-{position}" for name in part.obs_names]
        paths.append(ctx.tmp_path / f"query{position}.h5ad")
        part.write_h5ad(paths[-1])
    return paths


def case_collection_direct(ctx):
    from anndata.experimental import AnnCollection

    members = [ad.read_h5ad(path, backed="r") for path in _query_files(ctx)]
    ctx.model.get_latent_representation(AnnCollection(members, join_vars="inner"))


def case_collection_member_not_backed(ctx):
    from anndata.experimental import AnnCollection

    members = [ad.read_h5ad(path) for path in _query_files(ctx)]
    cellular.data.read_collection(AnnCollection(members, join_vars="inner"))


def case_collection_single_path(ctx):
    cellular.data.read_collection(str(_query_files(ctx)[0]))


def case_collection_no_files(ctx):
    cellular.data.read_collection([])


def case_collection_file_not_found(ctx):
    cellular.data.read_collection([ctx.tmp_path / "absent.h5ad"])


def case_collection_keys(ctx):
    cellular.data.read_collection(_query_files(ctx), keys=["a", "a"])


def case_collection_no_shared_genes(ctx):
    first, second = _query_files(ctx)
    renamed = ad.read_h5ad(second)
    renamed.var_names = [f"other-{name}" for name in renamed.var_names]
    renamed.write_h5ad(second)
    cellular.data.read_collection([first, second])


def case_collection_duplicate_genes(ctx):
    first, second = _query_files(ctx)
    renamed = ad.read_h5ad(second)
    renamed.var_names = [*renamed.var_names[:-1], renamed.var_names[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata warns about the duplicated names it writes
        renamed.write_h5ad(second)
    cellular.data.read_collection([first, second])


def case_collection_duplicate_cells(ctx):
    path = _query_files(ctx, n_files=1)[0]
    copy = ctx.tmp_path / "copy.h5ad"
    copy.write_bytes(path.read_bytes())
    cellular.data.read_collection([path, copy])


def case_collection_damaged(ctx):
    adata = cellular.data.read_collection(_query_files(ctx))
    del adata.obs["cellular_collection_row"]
    ctx.model.get_latent_representation(adata)


def case_collection_file_gone(ctx):
    paths = _query_files(ctx)
    adata = cellular.data.read_collection(paths)
    paths[1].unlink()
    ctx.model.get_latent_representation(adata)


def case_collection_file_changed(ctx):
    paths = _query_files(ctx)
    adata = cellular.data.read_collection(paths)
    ad.read_h5ad(paths[1])[:5].copy().write_h5ad(paths[1])
    ctx.model.get_latent_representation(adata)


def case_collection_layer_missing(ctx):
    ctx.model.get_latent_representation(cellular.data.read_collection(_query_files(ctx)), layer="counts")


CASES = {
    name.removeprefix("case_").replace("_", "-"): case for name, case in globals().items() if name.startswith("case_")
}


@dataclass
class Context:
    symphony: object
    model: CELLULAR
    tmp_path: Path


@pytest.fixture
def ctx(symphony, symphony_model, tmp_path):
    return Context(symphony, symphony_model, tmp_path)


def test_every_catalogue_entry_has_a_case_and_every_case_an_entry():
    documented = [entry.id for entry in read_catalogue()]
    assert len(documented) == len(set(documented)), "duplicate ids in docs/errors.md"
    assert set(documented) == set(CASES)


@pytest.mark.parametrize("entry", read_catalogue(), ids=lambda entry: entry.id)
def test_documented_error_is_raised(entry, ctx):
    exception = NotTrainedError if entry.exception == "NotTrainedError" else getattr(builtins, entry.exception)
    with pytest.raises(exception) as excinfo:
        CASES[entry.id](ctx)
    message = excinfo.value.args[0]
    assert entry.pattern().fullmatch(message), f"raised: {message!r}\ndocumented: {entry.message!r}"
