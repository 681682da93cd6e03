"""The ``cellular`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    import cellular

    print(f"cellular-sc {cellular.__version__}: demo on scanpy's bundled pbmc68k_reduced (no download).")
    adata = cellular.data.pbmc68k_reduced_lognorm()
    print(
        f"  data: {adata.n_obs} cells x {adata.n_vars} genes, log-normalised; labels obs['bulk_labels'] "
        f"({adata.obs['bulk_labels'].nunique()} types)"
    )
    start = time.perf_counter()
    model = cellular.tl.cellular_embed(
        adata,
        labels_key="bulk_labels",
        log_normalized=True,
        max_epochs=args.epochs,
        model_kwargs={"n_latent": args.n_latent},
        train_kwargs={"progress_bar": not args.quiet, "seed": args.seed},
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
    print("  wrote adata.obsm['X_cellular'] and adata.uns['cellular']['params']")
    if args.output is not None:
        model.save(args.output, overwrite=True)
        print(f"  saved model to {args.output}/ (reload with cellular.CELLULAR.load({str(args.output)!r}))")
    return 0 if np.isfinite(embedding).all() else 1


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``cellular`` command."""
    parser = argparse.ArgumentParser(prog="cellular", description="CELLULAR cell embeddings for scverse.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train and embed on scanpy's bundled pbmc68k_reduced and report")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: model heuristic)")
    demo.add_argument("--n-latent", type=int, default=32, help="embedding dimension (default: 32)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("-o", "--output", default=None, help="folder to save the trained model to")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cellular`` command."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
