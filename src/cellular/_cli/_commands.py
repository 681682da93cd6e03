"""The subcommands: each takes the parsed arguments and returns the exit code."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ._common import (
    EXIT_OK,
    TRAINING_DATA_FILE,
    CommandError,
    UsageError,
    counts_line,
    error_message,
    existing_files,
    existing_model_folder,
    load_model,
    logger,
    model_output_folder,
    new_output_file,
    read_h5ad,
    say,
    show_progress,
    staged_folder,
    write_h5ad,
)


def train(args: argparse.Namespace) -> int:
    """``cellular train``: set up, train and index a model on a reference h5ad, and save it."""
    reference = existing_files(args.reference, "reference file")
    output = model_output_folder(args.output, args.overwrite)
    if args.no_index and (args.index_label_keys or args.index_backend != "auto"):
        raise UsageError("--index-label-keys and --index-backend have no effect with --no-index; drop one of them")

    if args.index_backend == "faiss":  # before training, not after it
        from cellular.index._faiss import require_faiss

        try:
            require_faiss()
        except ImportError as error:
            raise CommandError(str(error)) from None

    from cellular import CELLULAR
    from cellular.data import lineage_map

    start = time.perf_counter()
    adata = read_h5ad(reference, backed=args.backed)
    progress = show_progress(args)
    labels_key = args.labels_key[-1]
    CELLULAR.setup_anndata(
        adata,
        labels_key=args.labels_key if len(args.labels_key) > 1 else labels_key,
        batch_key=args.batch_key,
        layer=args.layer,
        unlabeled_category=args.unlabeled_category,
        log_normalized=args.log_normalized,
        gene_id_key=args.gene_id_key,
        label_hierarchy=None if args.lineage_map is None else lineage_map(args.lineage_map),
    )
    model = CELLULAR(
        adata,
        n_latent=args.n_latent,
        n_top_genes=args.n_top_genes,
        encoder=args.encoder,
        gene_layout=args.gene_layout,
        match_batch_moments=not args.no_batch_moments,
        seed=args.seed,
    )
    classifier_kwargs = {"progress_bar": progress}
    if args.classifier_epochs is not None:
        classifier_kwargs["max_epochs"] = args.classifier_epochs
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        progress_bar=progress,
        classifier=not args.no_classifier,
        classifier_kwargs=classifier_kwargs,
    )
    training_seconds = time.perf_counter() - start
    if not args.no_index:
        logger.info("Building the reference index of %d cells.", adata.n_obs)
        model.build_reference_index(
            adata,
            label_keys=args.index_label_keys or args.labels_key,
            unlabeled_category=args.unlabeled_category,
            backend=args.index_backend,
            progress_bar=progress,
        )
    with staged_folder(output, args.overwrite) as folder:
        model.save(folder)
        # Query commands refit the model on a query's genes when it lacks many of them; they find the reference here.
        (folder / TRAINING_DATA_FILE).write_text(
            json.dumps({"paths": [str(p.resolve()) for p in reference], "sizes": [p.stat().st_size for p in reference]})
        )

    labels = model.registered_labels()
    n_unlabelled = int((labels < 0).sum())
    summary = model.training_summary_
    say(
        args,
        f"cellular train: {adata.n_obs} cells x {adata.n_vars} genes from {', '.join(map(str, reference))}; "
        f"{len(model.cell_types)} cell types in obs[{labels_key!r}]"
        + (f" ({n_unlabelled} cells {args.unlabeled_category!r}, unlabelled)" if n_unlabelled else "")
        + (f", under the {args.lineage_map!r} lineage map" if args.lineage_map is not None else "")
        + (f", {model.n_batches} batches in obs[{args.batch_key!r}]" if args.batch_key else ""),
    )
    say(
        args,
        f"  model: {len(model.genes)} genes -> {model.n_latent} latent dims; {summary['epochs_run']} epochs "
        f"(best {summary['best_epoch']}) in {training_seconds:.1f} s on {summary['device']}",
    )
    if model.has_classifier:
        classifier = model.classifier_summary_
        say(
            args,
            f"  classifier: calibrated on {classifier['n_calibration_cells']} held-out cells, accuracy "
            f"{classifier['calibration_accuracy']:.3f}",
        )
    if model.reference_index_ is not None:
        index = model.reference_index_
        say(args, f"  reference index: {index.n_cells} cells, label levels {index.label_levels} ({index.backend})")
    say(args, f"  saved to {output}/ in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


# ---------------------------------------------------------------------------------------- query commands
def _prepare_query(args: argparse.Namespace):
    """Check the paths and load the model: ``(model, output path, options of how to read the query)``."""
    query = existing_files(args.query, "query file")
    model_dir = existing_model_folder(args.model)
    output = new_output_file(args.output, query, args.overwrite)
    reference = None
    if args.reference is not None:
        reference = read_h5ad(existing_files(args.reference, "reference file"), backed=args.backed)
    model = load_model(model_dir, args.accelerator, reference)
    if args.layer is None:
        layer = model.setup_args["layer"]
    else:
        layer = None if args.layer == "X" else args.layer
    reading = {
        "batch_size": args.batch_size,
        "layer": layer,
        "log_normalized": True if args.log_normalized else None,
        "gene_id_key": args.gene_id_key,
        "min_gene_overlap": args.min_gene_overlap,
    }
    return model, output, reading


def _served(reading: dict, args: argparse.Namespace) -> dict:
    """The reading options plus how a query with missing genes is served (annotate, novel, map)."""
    return {**reading, "panel": args.panel}


def _would_refit(model, adata, args: argparse.Namespace, reading: dict) -> bool:
    """Whether the query lacks genes and the panel rule (``--panel``) serves it with a model refitted on its genes."""
    from cellular.data import align_genes
    from cellular.tl._common import refit_preferred

    if args.panel == "direct":
        return False
    gene_id_key = reading["gene_id_key"]
    present = align_genes(
        adata, model.gene_names_for(gene_id_key), gene_id_key=gene_id_key, min_gene_overlap=0.0
    ).present
    if args.panel == "refit":
        return not present.all()
    return refit_preferred(present, model.expression_share(present))


def _with_training_data(model, args: argparse.Namespace, refit: bool):
    """The model, reloaded with its training data when a refit will serve the query (``refit``) and the data is known.

    The data is ``--reference``, else the reference ``cellular train`` recorded in the model folder (when that file
    is still there, unchanged in size).
    """
    if model.adata is not None or not refit:
        return model
    record_path = args.model / TRAINING_DATA_FILE
    if not record_path.exists():
        return model
    try:
        record = json.loads(record_path.read_text())
        # folders saved before multi-file references record one "path" and "size"
        reference = [Path(p) for p in record.get("paths", [record.get("path")])]
        sizes = [int(size) for size in record.get("sizes", [record.get("size")])]
        if len(reference) != len(sizes):
            raise ValueError("paths and sizes differ in number")
    except (ValueError, TypeError, AttributeError) as error:
        logger.warning(
            "%s cannot be read (%s); pass the training data with --reference to refit on the query's genes.",
            record_path,
            error_message(error),
        )
        return model
    if not all(path.exists() and path.stat().st_size == size for path, size in zip(reference, sizes, strict=True)):
        logger.warning(
            "The model's training data %s is gone or changed; it cannot be refitted on the query's genes.",
            ", ".join(map(str, reference)),
        )
        return model
    say(
        args,
        f"  the query lacks many of the model's genes: refitting on the shared genes with "
        f"{', '.join(map(str, reference))}",
    )
    return load_model(args.model, args.accelerator, read_h5ad(reference, backed=args.backed))


def require_classifier(model, args: argparse.Namespace) -> None:
    if not model.has_classifier:
        raise CommandError(
            f"the model in {str(args.model)!r} has no classifier head (it was trained with --no-classifier), which "
            f"`cellular {args.command}` needs. Retrain it without --no-classifier, or call model.train_classifier() "
            "in Python and save it again."
        )


def _serving_model(adata, model, args, reading):
    """The model annotate and novel serve the query with (:func:`_with_training_data`), after the embedding.

    The model's embedding of the query is written unless a refit will serve it: a refitted model reads the query in
    its own space, so the model's embedding would not match the labels (and may not exist, e.g. for cells without
    counts over the few model genes the query has).
    """
    import cellular

    refit = _would_refit(model, adata, args, reading)
    model = _with_training_data(model, args, refit)
    if not (refit and model.adata is not None):
        cellular.tl.cellular_embed(
            adata, model, key_added=args.embedding_key, progress_bar=show_progress(args), **reading
        )
    return model


def embed(args: argparse.Namespace) -> int:
    """``cellular embed``: :func:`cellular.tl.cellular_embed` on a query h5ad."""
    import cellular

    start = time.perf_counter()
    model, output, reading = _prepare_query(args)
    adata = read_h5ad(args.query, backed=args.backed)
    cellular.tl.cellular_embed(adata, model, key_added=args.key_added, progress_bar=show_progress(args), **reading)
    write_h5ad(adata, output, args.overwrite)
    params = adata.uns["cellular"]["params"]
    say(
        args,
        f"cellular embed: {adata.n_obs} cells ({params['n_genes_matched']} of {len(model.genes)} model genes found) "
        f"-> obsm[{args.key_added!r}] ({model.n_latent} dims); wrote {output} in {time.perf_counter() - start:.1f} s",
    )
    return EXIT_OK


def annotate(args: argparse.Namespace) -> int:
    """``cellular annotate``: the embedding (if the model itself serves the query), then ``tl.cellular_annotate``."""
    import cellular

    start = time.perf_counter()
    model, output, reading = _prepare_query(args)
    require_classifier(model, args)
    adata = read_h5ad(args.query, backed=args.backed)
    model = _serving_model(adata, model, args, reading)
    cellular.tl.cellular_annotate(
        adata,
        model,
        key_added=args.key_added,
        novel_as_unknown=not args.no_novel_as_unknown,
        alpha=args.alpha,
        fdr=args.fdr,
        min_confidence=args.min_confidence,
        unknown_label=args.unknown_label,
        hierarchy_threshold=args.hierarchy_threshold,
        gene_classifier_weight=args.gene_classifier_weight,
        **_served(reading, args),
    )
    write_h5ad(adata, output, args.overwrite)
    say(
        args,
        f"cellular annotate: {adata.n_obs} cells -> obs[{args.key_added!r}]: "
        f"{counts_line(adata.obs[args.key_added], always=args.unknown_label)}",
    )
    say(args, f"  wrote {output} in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def novel(args: argparse.Namespace) -> int:
    """``cellular novel``: the embedding (if the model itself serves the query), then ``tl.novel_types``."""
    import cellular

    start = time.perf_counter()
    model, output, reading = _prepare_query(args)
    require_classifier(model, args)
    adata = read_h5ad(args.query, backed=args.backed)
    model = _serving_model(adata, model, args, reading)
    cellular.tl.novel_types(
        adata,
        model,
        alpha=args.alpha,
        fdr=args.fdr,
        key_added=args.key_added,
        group=args.group,
        resolution=args.resolution,
        min_group_size=args.min_group_size,
        n_markers=args.n_markers,
        **_served(reading, args),
    )
    write_h5ad(adata, output, args.overwrite)
    summary = adata.uns["cellular"][args.key_added]["summary"]
    level = "q-value (FDR)" if args.fdr else "p-value"
    say(
        args,
        f"cellular novel: {summary['n_novel']} of {summary['n_cells']} cells ({summary['fraction_novel']:.1%}) "
        f"flagged as novel at {level} <= {args.alpha} -> obs[{args.key_added!r}]",
    )
    for name, group in adata.uns["cellular"][args.key_added].get("groups", {}).items():
        markers = ", ".join(list(group["markers"])[:5])
        say(args, f"  {name}: {group['n_cells']} cells, nearest type {group['nearest_type']}; markers {markers}")
    say(args, f"  wrote {output} in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def map_(args: argparse.Namespace) -> int:
    """``cellular map``: :func:`cellular.tl.cellular_map` of a query h5ad onto the model's reference index."""
    import cellular

    start = time.perf_counter()
    model, output, reading = _prepare_query(args)
    if model.reference_index_ is None:
        raise CommandError(
            f"the model in {str(args.model)!r} has no reference index to map onto. Retrain it without --no-index "
            "(`cellular train REF.h5ad ... -o MODEL_DIR`), or build one in Python with "
            "model.build_reference_index(adata_ref) and save the model again (model.save(MODEL_DIR, overwrite=True))."
        )
    adata = read_h5ad(args.query, backed=args.backed)
    model = _with_training_data(model, args, _would_refit(model, adata, args, reading))
    cellular.tl.cellular_map(
        adata,
        model,
        k=args.k,
        key_added=args.key_added,
        levels=args.levels,
        weighting=args.weighting,
        temperature=args.temperature,
        min_probability=args.min_probability,
        unknown_label=args.unknown_label,
        hierarchy_threshold=args.hierarchy_threshold,
        gene_classifier_weight=args.gene_classifier_weight,
        progress_bar=show_progress(args),
        **_served(reading, args),
    )
    write_h5ad(adata, output, args.overwrite)
    record = adata.uns["cellular"][f"{args.key_added}_map"]
    say(
        args,
        f"cellular map: {adata.n_obs} cells mapped onto {record['params']['n_reference_cells']} reference cells "
        f"(k={args.k}) -> obsm['X_{args.key_added}']",
    )
    for level in record["params"]["levels"]:
        column = f"{args.key_added}_{level}"
        say(args, f"  obs[{column!r}]: {counts_line(adata.obs[column], always=args.unknown_label)}")
    say(args, f"  wrote {output} in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------- demo
def demo(args: argparse.Namespace) -> int:
    """``cellular demo``: train and embed on scanpy's bundled pbmc68k_reduced and report."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    import cellular

    if args.output is not None:
        model_output_folder(args.output, args.overwrite)
    print(f"cellular-sc {cellular.__version__}: demo on scanpy's bundled pbmc68k_reduced (no download).")
    adata = cellular.data.pbmc68k_reduced_lognorm()
    print(
        f"  data: {adata.n_obs} cells x {adata.n_vars} genes, log-normalised; labels obs['bulk_labels'] "
        f"({adata.obs['bulk_labels'].nunique()} types)"
    )
    start = time.perf_counter()
    classifier_kwargs = {"progress_bar": show_progress(args)}
    if args.classifier_epochs is not None:
        classifier_kwargs["max_epochs"] = args.classifier_epochs
    model = cellular.tl.cellular_embed(
        adata,
        labels_key="bulk_labels",
        log_normalized=True,
        max_epochs=args.epochs,
        model_kwargs={"n_latent": args.n_latent},
        train_kwargs={"progress_bar": show_progress(args), "seed": args.seed, "classifier_kwargs": classifier_kwargs},
    )
    seconds = time.perf_counter() - start
    summary = model.training_summary_
    print(
        f"  trained: {summary['epochs_run']} epochs (best {summary['best_epoch']}) in {seconds:.1f} s on "
        f"{summary['device']}; final temperature {model.history['temperature'].iloc[-1, 0]:.3f}"
    )
    embedding = adata.obsm["X_cellular"]
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    pca = PCA(n_components=min(50, len(model.genes) - 1), random_state=0).fit_transform(
        adata[:, model.genes].X.toarray()
    )
    knn = KNeighborsClassifier(n_neighbors=15)
    for name, space, metric in (("CELLULAR", embedding, "cosine"), ("PCA", pca, "euclidean")):
        knn.set_params(metric=metric)
        accuracy = cross_val_score(knn, space, labels, cv=5).mean()
        silhouette = silhouette_score(space, labels, metric=metric)
        print(
            f"  {name:8s} embedding {space.shape[1]:3d} dims: 5-fold kNN label accuracy {accuracy:.3f}, "
            f"label silhouette {silhouette:.3f}"
        )
    print("  note: the demo scores cells the model was trained on; see the docs for held-out evaluations.")
    print("  results: adata.obsm['X_cellular'] and adata.uns['cellular']['params'] of the in-memory AnnData")
    if args.output is None:
        print("  nothing was written to disk; pass -o MODEL_DIR to save the trained model")
    else:
        with staged_folder(args.output, args.overwrite) as folder:
            model.save(folder)
        print(f"  saved the model to {args.output}/ (reload with cellular.CELLULAR.load({str(args.output)!r}))")
    return 0 if np.isfinite(embedding).all() else 1
