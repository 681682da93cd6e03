"""The argument parser of the ``cellular`` command."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from . import _commands

ACCELERATORS = ("auto", "cpu", "gpu", "mps")


def _number(convert: Callable[[str], float], accept: Callable[[float], bool], requirement: str) -> Callable:
    """An argparse ``type`` converting with ``convert`` and rejecting values for which ``accept`` is false."""
    kind = "an integer" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must {requirement}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda value: value >= 1, "be a positive integer")
_non_negative_int = _number(int, lambda value: value >= 0, "be a non-negative integer")
_batch_size = _number(int, lambda value: value >= 2, "be at least 2 (contrastive pairs)")
_positive_float = _number(float, lambda value: value > 0, "be a positive number")
_open_fraction = _number(float, lambda value: 0.0 < value < 1.0, "lie strictly between 0 and 1 (e.g. 0.05)")
_fraction = _number(float, lambda value: 0.0 <= value <= 1.0, "lie between 0 and 1")


_DESCRIPTION = """\
CELLULAR cell embeddings, annotation, novel cell-type detection and reference
mapping for scverse.

Train a model on a labelled reference h5ad once, then apply it to query h5ad
files. Each query command writes a new h5ad: the query plus the results, as the
Python functions of cellular.tl write them (obs, obsm, uns). The input file is
never modified."""

_TRAIN_DESCRIPTION = """\
Train a CELLULAR model on a labelled reference h5ad (raw counts, or
log1p-normalised values with --log-normalized), then its calibrated classifier
head and a reference index for `cellular map`, and save it to a folder."""

_EMBED_DESCRIPTION = """\
Embed query cells with a trained model (cellular.tl.cellular_embed).
Writes obsm[KEY] and uns['cellular']['params']."""

_ANNOTATE_DESCRIPTION = """\
Label query cells with the model's calibrated classifier head averaged with
its gene classifier (cellular.tl.cellular_annotate), after writing their
embedding as `cellular embed` does. Cells flagged as novel are labelled Unknown.
Writes obs[KEY], obs[KEY_confidence], obsm[KEY_probabilities] and
uns['cellular'][KEY]."""

_NOVEL_DESCRIPTION = """\
Flag query cells that belong to none of the reference cell types, with
conformal p-values (cellular.tl.novel_types), after writing their embedding as
`cellular embed` does. Writes obs[KEY] (flag), obs[KEY_score], obs[KEY_pvalue],
obs[KEY_qvalue], obs[KEY_nearest_type] (with --group also obs[KEY_group]) and
uns['cellular'][KEY]."""

_MAP_DESCRIPTION = """\
Map query cells onto the reference index saved with the model and transfer
its labels by a vote of their nearest reference cells
(cellular.tl.cellular_map).
Writes obsm[X_KEY]; for each label level L obs[KEY_L], obs[KEY_L_uncertainty]
and obsm[KEY_L_probabilities]; obs[KEY_distance], obs[KEY_distance_pvalue],
obsm[KEY_neighbor_indices], obsm[KEY_neighbor_distances] and
uns['cellular'][KEY_map]."""

_DEMO_DESCRIPTION = """\
Train a model on scanpy's bundled pbmc68k_reduced (no download), embed it and
report kNN label accuracy and silhouette against PCA."""

_EPILOG = """\
examples:
  cellular train ref.h5ad --labels-key cell_type --batch-key batch -o model/
  cellular annotate query.h5ad -m model/ -o query_annotated.h5ad
  cellular map query.h5ad -m model/ -o query_mapped.h5ad

exit codes:
  0  success
  1  the data or the model was rejected: the message names the problem
     (--debug also prints the traceback)
  2  bad arguments: unknown option, missing input file or model folder,
     output exists without --overwrite, number out of range

Run `cellular COMMAND --help` for the options of each command."""


def _diagnostics(quiet_help: str) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    loudness = parent.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    loudness.add_argument(
        "-v", "--verbose", action="count", default=0, help="log what the library does (-v: INFO, -vv: DEBUG)"
    )
    parent.add_argument("--debug", action="store_true", help="on error, also print the full traceback")
    return parent


def _add_command(
    commands, name: str, handler: Callable, parents: list, help_text: str, description: str, epilog: str = ""
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        parents=parents,
        help=help_text,
        description=description,
        epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler, parser=parser)
    return parser


def _add_query_options(parser: argparse.ArgumentParser, key_added: str, key_help: str, writes: str) -> None:
    parser.add_argument(
        "query",
        metavar="QUERY.h5ad",
        type=Path,
        nargs="+",
        help="query cells (genes matched by name); several files are read as one, their expression left on disk "
        "(the output then holds the results without the expression)",
    )
    parser.add_argument(
        "-m", "--model", required=True, metavar="MODEL_DIR", type=Path, help="folder written by `cellular train`"
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT.h5ad", type=Path, help=f"h5ad to write: the query plus {writes}"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.h5ad if it exists")
    parser.add_argument("--key-added", default=key_added, metavar="KEY", help=f"{key_help} (default: {key_added})")
    reading = parser.add_argument_group("reading the query")
    reading.add_argument(
        "--layer",
        metavar="LAYER",
        help="layer holding the expression; 'X' reads adata.X (default: the layer the model was trained on)",
    )
    reading.add_argument(
        "--log-normalized",
        action="store_true",
        help="the matrix holds log1p-normalised values scaled to the model's target sum, not raw counts "
        "(default: as in training)",
    )
    reading.add_argument("--gene-id-key", metavar="COLUMN", help="match genes on this column of var, not var_names")
    reading.add_argument(
        "--backed",
        action="store_true",
        help="keep the query's expression on disk and read it in chunks (automatic above 2 GiB)",
    )
    reading.add_argument(
        "--min-gene-overlap",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="smallest fraction of the model's genes the query must hold (default: 0, any overlap the model serves)",
    )
    reading.add_argument(
        "--reference",
        metavar="REF.h5ad",
        type=Path,
        nargs="+",
        help="the model's training data (one file or several); lets a query that lacks many of the model's genes be "
        "served by a model refitted on the shared genes (see --panel)",
    )
    if key_added != "X_cellular":
        reading.add_argument(
            "--panel",
            choices=("auto", "direct", "refit"),
            default="auto",
            help="how a query lacking some of the model's genes is served: the model itself (direct), a model "
            "refitted on the shared genes (refit, needs --reference), or by the documented rule (default: auto)",
        )
    reading.add_argument(
        "--batch-size", type=_positive_int, default=4096, metavar="N", help="cells per minibatch (default: 4096)"
    )
    reading.add_argument(
        "--accelerator", choices=ACCELERATORS, default="auto", help="where to run the model (default: auto)"
    )


def _add_embedding_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embedding-key",
        default="X_cellular",
        metavar="KEY",
        help="obsm key of the embedding written first, as `cellular embed` does (default: X_cellular)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``cellular`` command."""
    parser = argparse.ArgumentParser(
        prog="cellular",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    diagnostics = _diagnostics("print errors only: no progress bars, summary, log messages or warnings")

    train = _add_command(
        commands,
        "train",
        _commands.train,
        [diagnostics],
        "train a model on a labelled reference h5ad and save it",
        _TRAIN_DESCRIPTION,
        "example:\n  cellular train ref.h5ad --labels-key cell_type --batch-key batch -o model/",
    )
    train.add_argument(
        "reference",
        metavar="REF.h5ad",
        type=Path,
        nargs="+",
        help="labelled reference cells; several files are read as one (shared genes and obs columns), their "
        "expression left on disk",
    )
    train.add_argument(
        "--labels-key",
        required=True,
        nargs="+",
        metavar="COLUMN",
        help="obs column with the cell-type labels; several columns (coarse to fine, e.g. lineage cell_type) give "
        "labels at several levels, predicted consistently",
    )
    train.add_argument("--batch-key", metavar="COLUMN", help="obs column with the batches (default: one batch)")
    train.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", type=Path, help="folder to save to")
    train.add_argument("--overwrite", action="store_true", help="replace a model already saved in MODEL_DIR")
    data = train.add_argument_group("data")
    data.add_argument("--layer", metavar="LAYER", help="layer holding the expression (default: X)")
    data.add_argument(
        "--log-normalized", action="store_true", help="the matrix holds log1p-normalised values, not raw counts"
    )
    data.add_argument(
        "--unlabeled-category",
        default="Unknown",
        metavar="LABEL",
        help="label of unlabelled cells, left out of the supervised loss and of the index vote (default: Unknown)",
    )
    data.add_argument("--gene-id-key", metavar="COLUMN", help="var column of stable gene ids to record (e.g. Ensembl)")
    data.add_argument(
        "--lineage-map",
        choices=("pbmc", "pancreas"),
        help="place the labels in the package's lineage hierarchy for this tissue (type -> class -> lineage)",
    )
    data.add_argument(
        "--backed",
        action="store_true",
        help="keep the reference's expression on disk and read it in chunks (automatic above 2 GiB)",
    )
    model = train.add_argument_group("model and training")
    model.add_argument(
        "--n-top-genes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="highly variable genes (default: half of the reference's genes, at least 200 and at most 2000)",
    )
    model.add_argument(
        "--encoder",
        choices=("mlp", "gene_grid"),
        default="mlp",
        help="mlp (the paper's) or gene_grid (Spoticell's fingerprint encoder; slower) (default: mlp)",
    )
    model.add_argument(
        "--gene-layout",
        choices=("coexpression", "alphabetical"),
        default="coexpression",
        help="where the gene_grid encoder places the genes (default: coexpression)",
    )
    model.add_argument(
        "--n-latent", type=_positive_int, metavar="N", help="embedding size (default: 100; 64 with --encoder gene_grid)"
    )
    model.add_argument(
        "--no-batch-moments",
        action="store_true",
        help="do not match each batch's gene means and spreads to the reference's (default: matched, in training "
        "and for every query batch of the --batch-key column)",
    )
    model.add_argument(
        "--epochs", type=_positive_int, metavar="N", help="maximum training epochs (default: about 2,000 steps)"
    )
    model.add_argument(
        "--batch-size", type=_batch_size, default=256, metavar="N", help="cells per minibatch (default: 256)"
    )
    model.add_argument("--seed", type=_non_negative_int, default=0, metavar="N", help="random seed (default: 0)")
    model.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="where to train (default: auto)")
    model.add_argument(
        "--no-classifier",
        action="store_true",
        help="skip the classifier head (then `annotate` and `novel` cannot use the model)",
    )
    model.add_argument(
        "--classifier-epochs", type=_positive_int, metavar="N", help="maximum classifier epochs (default: heuristic)"
    )
    index = train.add_argument_group("reference index (for `cellular map`)")
    index.add_argument(
        "--index-label-keys",
        nargs="+",
        metavar="COLUMN",
        help="obs columns whose labels `map` transfers (default: the --labels-key column)",
    )
    index.add_argument(
        "--index-backend",
        choices=("auto", "exact", "pynndescent", "faiss"),
        default="auto",
        help="search of the index: auto (exact up to 20,000 cells, pynndescent above), or faiss (needs the faiss "
        "extra; no compilation when `map` starts)",
    )
    index.add_argument("--no-index", action="store_true", help="skip the reference index (then `map` cannot run)")

    embed = _add_command(
        commands,
        "embed",
        _commands.embed,
        [diagnostics],
        "embed query cells",
        _EMBED_DESCRIPTION,
        "example:\n  cellular embed query.h5ad -m model/ -o query_embedded.h5ad",
    )
    _add_query_options(embed, "X_cellular", "obsm key of the embedding", "the embedding")

    annotate = _add_command(
        commands,
        "annotate",
        _commands.annotate,
        [diagnostics],
        "label query cells with the calibrated classifier",
        _ANNOTATE_DESCRIPTION,
        "example:\n  cellular annotate query.h5ad -m model/ -o query_annotated.h5ad --alpha 0.01",
    )
    _add_query_options(
        annotate,
        "cellular_label",
        "obs column of the labels; the other keys derive from it",
        "the embedding and the labels",
    )
    _add_embedding_key(annotate)
    options = annotate.add_argument_group("annotation")
    options.add_argument(
        "--alpha",
        type=_open_fraction,
        default=0.05,
        help="novelty level in (0, 1): cells flagged at it are Unknown (default: 0.05)",
    )
    options.add_argument("--fdr", action="store_true", help="flag novel cells by q-value (false discovery rate)")
    options.add_argument(
        "--min-confidence",
        type=_fraction,
        default=0.0,
        metavar="P",
        help="also label Unknown cells whose calibrated confidence is below P (default: 0)",
    )
    options.add_argument(
        "--no-novel-as-unknown", action="store_true", help="keep the most probable type for cells flagged as novel"
    )
    options.add_argument(
        "--gene-classifier-weight",
        type=_fraction,
        default=None,
        metavar="W",
        help="weight of the model's gene classifier averaged with the classifier head; 0: the head alone "
        "(default: 0.5 when the model has one)",
    )
    _add_hierarchy_threshold(options)
    options.add_argument(
        "--unknown-label", default="Unknown", metavar="LABEL", help="label of unassigned cells (default: Unknown)"
    )

    novel = _add_command(
        commands,
        "novel",
        _commands.novel,
        [diagnostics],
        "flag query cells of types absent from the reference",
        _NOVEL_DESCRIPTION,
        "example:\n  cellular novel query.h5ad -m model/ -o query_novel.h5ad --fdr --group",
    )
    _add_query_options(
        novel,
        "cellular_novel",
        "obs column of the flags; prefix of the other keys",
        "the embedding and the novelty results",
    )
    _add_embedding_key(novel)
    options = novel.add_argument_group("novelty")
    options.add_argument("--alpha", type=_open_fraction, default=0.05, help="level in (0, 1) (default: 0.05)")
    options.add_argument("--fdr", action="store_true", help="control the false discovery rate (q-values)")
    options.add_argument(
        "--group", action="store_true", help="cluster flagged cells into candidate types and list marker genes"
    )
    options.add_argument(
        "--resolution",
        type=_positive_float,
        default=0.5,
        metavar="R",
        help="Leiden resolution of --group (default: 0.5)",
    )
    options.add_argument(
        "--min-group-size",
        type=_positive_int,
        default=10,
        metavar="N",
        help="fewest flagged cells that --group clusters (default: 10)",
    )
    options.add_argument(
        "--n-markers", type=_positive_int, default=10, metavar="N", help="marker genes per group (default: 10)"
    )

    map_ = _add_command(
        commands,
        "map",
        _commands.map_,
        [diagnostics],
        "map query cells onto the model's reference and transfer its labels",
        _MAP_DESCRIPTION,
        "example:\n  cellular map query.h5ad -m model/ -o query_mapped.h5ad -k 30",
    )
    _add_query_options(map_, "cellular", "prefix of every key written", "the embedding and the transferred labels")
    options = map_.add_argument_group("mapping")
    options.add_argument(
        "-k", type=_positive_int, default=15, metavar="K", help="reference neighbours per cell (default: 15)"
    )
    options.add_argument(
        "--levels", nargs="+", metavar="LEVEL", help="label levels to transfer (default: all levels of the index)"
    )
    options.add_argument(
        "--weighting",
        choices=("distance", "uniform"),
        default="distance",
        help="neighbour vote weights (default: distance)",
    )
    options.add_argument(
        "--temperature",
        type=_positive_float,
        metavar="T",
        help="kernel width of the distance weights (default: the index's, the model's learned temperature)",
    )
    options.add_argument(
        "--min-probability",
        type=_fraction,
        default=0.5,
        metavar="P",
        help="cells whose largest probability is below P are labelled Unknown (default: 0.5)",
    )
    options.add_argument(
        "--gene-classifier-weight",
        type=_fraction,
        default=None,
        metavar="W",
        help="weight of the model's gene classifier averaged with the vote for the model's labels; 0: the vote alone "
        "(default: 0.5 when the model has one)",
    )
    _add_hierarchy_threshold(options)
    options.add_argument(
        "--unknown-label", default="Unknown", metavar="LABEL", help="label of unassigned cells (default: Unknown)"
    )

    demo = _add_command(
        commands,
        "demo",
        _commands.demo,
        [_diagnostics("no progress bar (the report is still printed)")],
        "train and embed on scanpy's bundled pbmc68k_reduced and report",
        _DEMO_DESCRIPTION,
    )
    demo.add_argument(
        "--epochs", type=_positive_int, default=None, metavar="N", help="training epochs (default: model heuristic)"
    )
    demo.add_argument(
        "--classifier-epochs", type=_positive_int, metavar="N", help="maximum classifier epochs (default: heuristic)"
    )
    demo.add_argument("--n-latent", type=_positive_int, default=32, metavar="N", help="embedding size (default: 32)")
    demo.add_argument("--seed", type=_non_negative_int, default=0, metavar="N", help="random seed (default: 0)")
    demo.add_argument(
        "-o", "--output", type=Path, default=None, metavar="MODEL_DIR", help="save the trained model to this folder"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace a model already saved in MODEL_DIR")
    return parser


def _add_hierarchy_threshold(group) -> None:
    group.add_argument(
        "--hierarchy-threshold",
        type=_fraction,
        default=0.7,
        metavar="P",
        help="models with a label hierarchy: the probability the deepest confident label needs; an uncertain type "
        "backs off to its parent (default: 0.7)",
    )
