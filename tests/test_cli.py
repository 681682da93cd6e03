"""The `cellular` command line: h5ad in, h5ad out, the results of the Python API, clear exit codes and messages."""

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellular
from cellular import CELLULAR
from cellular._cli import main

TRAINING = ["--epochs", "3", "--classifier-epochs", "10"]
COMMANDS = ["train", "embed", "annotate", "novel", "map", "demo"]


def run(*argv) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``cellular *argv`` run in-process (argparse's ``SystemExit`` gives the code)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def subprocess_env() -> dict:
    """The environment with this checkout's ``cellular`` importable."""
    source = str(Path(cellular.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def cli(symphony_split, tmp_path_factory):
    """Reference and query h5ads (the Symphony split) and a model trained on the reference by `cellular train`."""
    train, test = symphony_split
    folder = tmp_path_factory.mktemp("cli")
    reference, query = folder / "reference.h5ad", folder / "query.h5ad"
    train.write_h5ad(reference)
    test.write_h5ad(query)
    digests = {reference: digest(reference), query: digest(query)}
    model = folder / "model"
    result = run("train", reference, "--labels-key", "cell_type", "--batch-key", "batch", "-o", model, *TRAINING)
    return SimpleNamespace(reference=reference, query=query, model=model, digests=digests, train=result)


@pytest.fixture(autouse=True)
def _inputs_unchanged(request):
    """Every test leaves the reference and query files of the module fixture byte for byte as they were."""
    yield
    if "cli" in request.fixturenames:
        state = request.getfixturevalue("cli")
        for path, expected in state.digests.items():
            assert digest(path) == expected, f"{path.name} was modified"


def assert_same(actual, expected, where: str) -> None:
    """Recursive equality of uns contents read back from h5ad (floats to 1e-5)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: {set(actual) ^ set(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(actual, expected, check_exact=False, rtol=1e-5, obj=where)
    elif isinstance(expected, np.ndarray) and expected.dtype.kind in "fc":
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7, equal_nan=True, err_msg=where)
    elif isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-5, nan_ok=True), where
    else:
        assert actual == expected, where


def test_train_reports_and_saves_an_indexed_model_like_the_python_api(cli, symphony_split):
    code, out, err = cli.train
    assert code == 0, err
    train, test = symphony_split
    assert f"{train.n_obs} cells x {train.n_vars} genes" in out
    assert "9 cell types in obs['cell_type'], 2 batches in obs['batch']" in out
    assert "3 epochs" in out and f"saved to {cli.model}/" in out
    assert "Training CELLULAR" not in err and "Training classifier" not in err  # no progress bars in a log file
    model = CELLULAR.load(cli.model)
    assert model.is_trained and model.has_classifier and model.training_summary_["epochs_run"] == 3
    assert model.classifier_summary_["epochs_run"] <= 10
    index = model.reference_index_
    assert index.label_levels == ["cell_type"] and index.n_cells == train.n_obs
    assert index.model_fingerprint == model.fingerprint
    assert list(index.cell_names) == list(train.obs_names)

    # The same settings through the Python API give the same encoder (on the reference's cells: a query batch's
    # moment matching also depends on the classifier head, which this Python model skips).
    reference = ad.read_h5ad(cli.reference)
    CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
    python_model = CELLULAR(reference)
    python_model.train(max_epochs=3, progress_bar=False, classifier=False)
    assert model.batch_moments_ is not None
    np.testing.assert_allclose(
        model.get_latent_representation(reference), python_model.get_latent_representation(), rtol=1e-4, atol=1e-5
    )


def _embed(adata, model):
    cellular.tl.cellular_embed(adata, model)


def _annotate(adata, model):
    cellular.tl.cellular_embed(adata, model)
    cellular.tl.cellular_annotate(adata, model, alpha=0.1, min_confidence=0.3, gene_classifier_weight=0.25)


def _novel(adata, model):
    cellular.tl.cellular_embed(adata, model)
    cellular.tl.novel_types(adata, model, fdr=True, alpha=0.2, group=True, min_group_size=3)


def _map(adata, model):
    cellular.tl.cellular_map(adata, model, k=10, min_probability=0.6, gene_classifier_weight=0.25)


QUERY_COMMANDS = {
    "embed": (["--quiet"], _embed, ["X_cellular"]),
    "annotate": (
        ["--alpha", "0.1", "--min-confidence", "0.3", "--gene-classifier-weight", "0.25"],
        _annotate,
        ["cellular_label", "X_cellular"],
    ),
    "novel": (
        ["--fdr", "--alpha", "0.2", "--group", "--min-group-size", "3"],
        _novel,
        ["cellular_novel_group", "X_cellular"],
    ),
    "map": (
        ["-k", "10", "--min-probability", "0.6", "--gene-classifier-weight", "0.25"],
        _map,
        ["cellular_cell_type", "cellular_neighbor_indices"],
    ),
}


@pytest.mark.parametrize("command", list(QUERY_COMMANDS))
def test_query_command_writes_what_the_python_api_writes(cli, command, tmp_path):
    options, python_api, some_keys = QUERY_COMMANDS[command]
    output = tmp_path / "sub" / "out.h5ad"
    code, out, err = run(command, cli.query, "-m", cli.model, "-o", output, *options)
    assert code == 0, err
    if "--quiet" in options:
        assert out == "" and err == ""
    else:
        assert f"wrote {output}" in out and "Embedding cells" not in err
    written = ad.read_h5ad(output)

    expected = ad.read_h5ad(cli.query)
    python_api(expected, CELLULAR.load(cli.model))
    expected.write_h5ad(tmp_path / "expected.h5ad")
    expected = ad.read_h5ad(tmp_path / "expected.h5ad")

    query = ad.read_h5ad(cli.query)  # the input is all there, unchanged
    assert (written.X != query.X).nnz == 0 and written.var.equals(query.var)
    pd.testing.assert_frame_equal(written.obs[query.obs.columns], query.obs)
    assert set(some_keys) <= set(written.obs) | set(written.obsm)
    pd.testing.assert_frame_equal(written.obs, expected.obs, check_exact=False, rtol=1e-5)
    assert set(written.obsm) == set(expected.obsm)
    for key in expected.obsm:
        np.testing.assert_allclose(written.obsm[key], expected.obsm[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert_same(dict(written.uns), dict(expected.uns), "uns")


def test_overwrite_replaces_output_and_verbose_logs(cli, tmp_path):
    output = tmp_path / "out.h5ad"
    output.write_text("an old result")
    package_logger = logging.getLogger("cellular")
    before = package_logger.level, package_logger.propagate, list(package_logger.handlers)
    code, _, err = run("embed", cli.query, "-m", cli.model, "-o", output, "--overwrite", "-v", "--batch-size", "100")
    assert code == 0, err
    assert (package_logger.level, package_logger.propagate, list(package_logger.handlers)) == before
    n_genes = len(cellular.CELLULAR.load(cli.model).genes)
    assert f"Matched {n_genes} of {n_genes} model genes" in err and "Embedding cells" not in err
    assert ad.read_h5ad(output).obsm["X_cellular"].shape[0] == ad.read_h5ad(cli.query).n_obs
    assert not list(tmp_path.glob(".*partial*"))


def test_help_of_every_command(capsys):
    options = {
        "train": ["--labels-key", "--batch-key", "--no-index", "--index-label-keys", "--epochs", "--accelerator"],
        "embed": ["QUERY.h5ad", "--model", "--key-added", "--layer", "--log-normalized", "--batch-size"],
        "annotate": ["--alpha", "--min-confidence", "--no-novel-as-unknown", "--embedding-key"],
        "novel": ["--alpha", "--fdr", "--group", "--resolution"],
        "map": ["-k", "--levels", "--weighting", "--min-probability", "--gene-classifier-weight"],
        "demo": ["--epochs", "--n-latent"],
    }
    for command in COMMANDS:
        with pytest.raises(SystemExit) as excinfo:
            main([command, "--help"])
        assert excinfo.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: cellular {command}")
        for option in [*options[command], "--quiet", "--verbose", "--debug"]:
            assert option in text, (command, option)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown option", "unrecognized arguments: --colour"),
        ("missing input", "does not exist"),
        ("missing model", "model folder"),
        ("existing output", "already exists; pass --overwrite"),
        ("output is input", "is the input file"),
        ("existing model", "already holds a saved model"),
        ("zero epochs", "argument --epochs: must be a positive integer"),
        ("alpha out of range", "argument --alpha: must lie strictly between 0 and 1"),
        ("no command", "required: COMMAND"),
    ],
)
def test_bad_arguments_exit_with_2(cli, tmp_path, case, message):
    existing = tmp_path / "existing.h5ad"
    existing.write_text("")
    query = ["embed", cli.query, "-m", cli.model, "-o", tmp_path / "out.h5ad"]
    train = ["train", cli.reference, "--labels-key", "cell_type", "-o", tmp_path / "model"]
    argv = {
        "unknown option": [*query, "--colour"],
        "missing input": ["embed", tmp_path / "missing.h5ad", "-m", cli.model, "-o", tmp_path / "out.h5ad"],
        "missing model": ["map", cli.query, "-m", tmp_path / "missing", "-o", tmp_path / "out.h5ad"],
        "existing output": ["annotate", cli.query, "-m", cli.model, "-o", existing],
        "output is input": ["novel", cli.query, "-m", cli.model, "-o", cli.query, "--overwrite"],
        "existing model": ["train", cli.reference, "--labels-key", "cell_type", "-o", cli.model],
        "zero epochs": [*train, "--epochs", "0"],
        "alpha out of range": ["annotate", cli.query, "-m", cli.model, "-o", tmp_path / "out.h5ad", "--alpha", "1"],
        "no command": [],
    }[case]
    code, out, err = run(*argv)
    assert code == 2
    assert message in err and "usage: cellular" in err and "Traceback" not in err
    assert existing.read_text() == "" and not (tmp_path / "out.h5ad").exists() and not (tmp_path / "model").exists()


def _write(adata, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def _bad_query(test, kind: str):
    query = test.copy()
    if kind in ("nan", "negative", "fraction"):
        query.X = query.X.copy()
        query.X.data[0] = {"nan": np.nan, "negative": -1.0, "fraction": 0.5}[kind]
    elif kind == "few genes":
        query = query[:, :10].copy()
    elif kind == "empty":
        query = query[:0].copy()
    return query


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", "contains 1 NaN or infinite values"),
        ("negative", "contains negative values"),
        ("fraction", "holds non-integer values up to"),
        ("few genes", "Only 10 of the reference's 1767 genes are shared"),
        ("empty", "adata.X is empty (shape (0, 1767))"),
    ],
)
def test_rejected_query_exits_with_1_and_names_the_problem(cli, symphony_split, tmp_path, kind, message):
    query = _write(_bad_query(symphony_split[1], kind), tmp_path / "query.h5ad")
    command = {"nan": "embed", "negative": "annotate", "fraction": "novel", "few genes": "map", "empty": "embed"}[kind]
    code, out, err = run(command, query, "-m", cli.model, "-o", tmp_path / "out.h5ad")
    assert code == 1
    assert err.startswith(f"cellular {command}: error: ") and message in err
    assert "--debug to see the traceback" in err and "Traceback" not in err
    assert not (tmp_path / "out.h5ad").exists()


def test_errors_name_command_line_flags_not_python_arguments(cli, symphony_split, tmp_path):
    query = _write(_bad_query(symphony_split[1], "few genes"), tmp_path / "query.h5ad")
    code, _, err = run("embed", query, "-m", cli.model, "-o", tmp_path / "out.h5ad", "--min-gene-overlap", "0.9")
    assert code == 1 and "lower --min-gene-overlap" in err and "see --gene-id-key" in err
    assert "min_gene_overlap" not in err and "gene_id_key" not in err


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("wrong labels key", "error: --labels-key cell_tpye is not a column of adata.obs"),  # flags, no KeyError quotes
        ("single cell type", "has 1 labelled cell type(s)"),
        ("not h5ad", "cannot read"),
    ],
)
def test_rejected_reference_exits_with_1(cli, symphony_split, tmp_path, kind, message):
    reference = cli.reference
    labels_key = "cell_tpye" if kind == "wrong labels key" else "cell_type"
    if kind == "single cell type":
        train = symphony_split[0].copy()
        train.obs["cell_type"] = "T cell"
        reference = _write(train, tmp_path / "reference.h5ad")
    elif kind == "not h5ad":
        reference = tmp_path / "reference.h5ad"
        reference.write_text("cell_type,batch\n")
    code, out, err = run("train", reference, "--labels-key", labels_key, "-o", tmp_path / "model", "--quiet")
    assert code == 1 and out == ""
    assert message in err and err.count("\n") == 1  # one paragraph
    assert not (tmp_path / "model" / "model.json").exists()


def test_model_without_index_or_classifier_is_refused_with_the_fix(cli, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(cli.model, model)  # retrained in place: the earlier model's index must not survive
    options = ["--epochs", "1", "--n-top-genes", "300", "--n-latent", "8", "--no-index", "--no-classifier", "-q"]
    code, _, err = run("train", cli.reference, "--labels-key", "cell_type", "-o", model, "--overwrite", *options)
    assert code == 0, err
    assert (model / "model.json").exists() and not (model / "reference_index").exists()
    assert CELLULAR.load(model).n_latent == 8

    code, _, err = run("map", cli.query, "-m", model, "-o", tmp_path / "out.h5ad")
    assert code == 1 and "has no reference index" in err and "without --no-index" in err
    assert "model.build_reference_index" in err
    code, _, err = run("annotate", cli.query, "-m", model, "-o", tmp_path / "out.h5ad")
    assert code == 1 and "has no classifier head" in err and "without --no-classifier" in err
    assert run("embed", cli.query, "-m", model, "-o", tmp_path / "out.h5ad", "-q")[0] == 0


def test_model_of_another_format_version_exits_with_1(cli, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(cli.model, model)
    metadata = json.loads((model / "model.json").read_text())
    metadata["format_version"] = 99
    (model / "model.json").write_text(json.dumps(metadata))
    code, _, err = run("embed", cli.query, "-m", model, "-o", tmp_path / "out.h5ad")
    assert code == 1 and f"cannot load the model in {str(model)!r}" in err and "version 99" in err
    assert "Traceback" not in err

    code, _, err = run("embed", cli.query, "-m", model, "-o", tmp_path / "out.h5ad", "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err and "version 99" in err.splitlines()[-1]


def test_entry_point_end_to_end(cli, symphony_split, tmp_path):
    env = subprocess_env()
    result = subprocess.run([sys.executable, "-m", "cellular._cli", "--help"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in COMMANDS) and "exit codes" in result.stdout

    query = _write(_bad_query(symphony_split[1], "negative"), tmp_path / "query.h5ad")
    argv = ["annotate", str(query), "-m", str(cli.model), "-o", str(tmp_path / "out.h5ad")]
    result = subprocess.run([sys.executable, "-m", "cellular._cli", *argv], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert "cellular annotate: error: adata.X contains negative values" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_and_saves_model(tmp_path, capsys):
    assert main(["demo", "--epochs", "3", "--classifier-epochs", "5", "--quiet", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "pbmc68k_reduced" in out and "kNN label accuracy" in out and "trained: 3 epochs" in out
    model = CELLULAR.load(tmp_path / "demo")
    assert model.is_trained and model.n_latent == 32 and model.classifier_summary_["epochs_run"] <= 5


@pytest.mark.parametrize("command", ["annotate", "novel"])
def test_refit_query_with_cells_empty_over_the_model_genes_is_served(cli, tmp_path, command):
    """A query holding 25 of the model's genes, its least expressed, plus other reference genes: some cells have no
    counts over those 25, so the model itself cannot embed them, but the refit on every shared gene can. annotate
    and novel used to embed with the model first and exit 1."""
    model = CELLULAR.load(cli.model)
    query = ad.read_h5ad(cli.query)
    in_model = np.isin(query.var_names, model.genes)
    totals = np.asarray(query.X.sum(axis=0)).ravel()
    rarest = np.flatnonzero(in_model)[np.argsort(totals[in_model])[:25]]
    others = np.flatnonzero(~in_model)[:200]
    panel = query[:, np.sort(np.concatenate([rarest, others]))].copy()
    assert (np.asarray(panel[:, panel.var_names.isin(model.genes)].X.sum(axis=1)).ravel() == 0).any()
    path = _write(panel, tmp_path / "panel.h5ad")
    code, out, err = run(command, path, "-m", cli.model, "-o", tmp_path / "out.h5ad")
    assert code == 0, err
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    key = "cellular_label" if command == "annotate" else "cellular_novel"
    params = written.uns["cellular"][key]["params"]
    assert params["panel_path"] == "refit" and params["n_refit_genes"] == panel.n_vars
    assert "X_cellular" not in written.obsm  # the model's embedding would not match the refitted labels


def test_query_lacking_most_model_genes_is_served_by_a_refit_on_the_recorded_reference(cli, tmp_path):
    import json
    import shutil

    model = CELLULAR.load(cli.model)
    query = ad.read_h5ad(cli.query)
    kept = [gene for gene in model.genes if gene in set(query.var_names)][::5]
    path = _write(query[:, kept].copy(), tmp_path / "panel.h5ad")
    code, out, err = run("map", path, "-m", cli.model, "-o", tmp_path / "mapped.h5ad")
    assert code == 0, err
    assert "refitting on the shared genes" in out
    params = ad.read_h5ad(tmp_path / "mapped.h5ad").uns["cellular"]["cellular_map"]["params"]
    assert params["panel_path"] == "refit" and params["n_refit_genes"] == len(kept)

    # Without the recorded reference the same query is refused with the fix, or served with --reference.
    moved = tmp_path / "model"
    shutil.copytree(cli.model, moved)
    record = json.loads((moved / "training_data.json").read_text())
    (moved / "training_data.json").write_text(json.dumps({**record, "sizes": [size + 1 for size in record["sizes"]]}))
    code, _, err = run("annotate", path, "-m", moved, "-o", tmp_path / "refused.h5ad")
    assert code == 1 and "Attach the training data" in err and "--reference" in err
    (moved / "training_data.json").write_text('{"paths": [')  # damaged: the same refusal, naming the file
    code, _, err = run("annotate", path, "-m", moved, "-o", tmp_path / "refused.h5ad")
    assert code == 1 and "training_data.json cannot be read" in err and "Attach the training data" in err
    code, _, err = run("annotate", path, "-m", moved, "-o", tmp_path / "annotated.h5ad", "--reference", cli.reference)
    assert code == 0, err
    assert (
        ad.read_h5ad(tmp_path / "annotated.h5ad").uns["cellular"]["cellular_label"]["params"]["panel_path"] == "refit"
    )


# ------------------------------------------------------------------------------- interrupted and racing runs
def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if ".partial" in path.name)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_interrupted_or_failed_write_leaves_no_output(cli, tmp_path, monkeypatch, failure):
    def write_then_fail(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half an h5ad")
        raise failure("disk full" if failure is OSError else "")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", write_then_fail)
    code, _, err = run("embed", cli.query, "-m", cli.model, "-o", tmp_path / "out.h5ad", "--quiet")
    assert code == (130 if failure is KeyboardInterrupt else 1), err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_interrupted_training_leaves_no_model_folder(cli, tmp_path, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CELLULAR, "build_reference_index", interrupted)
    code, _, err = run("train", cli.reference, "--labels-key", "cell_type", "-o", tmp_path / "model", *TRAINING)
    assert code == 130 and "interrupted" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_two_runs_writing_one_output_cannot_both_succeed(cli, tmp_path, monkeypatch):
    output = tmp_path / "out.h5ad"
    original = ad.AnnData.write_h5ad

    def another_run_finishes_first(self, path, *args, **kwargs):
        output.write_text("the other run's result")
        original(self, path, *args, **kwargs)

    monkeypatch.setattr(ad.AnnData, "write_h5ad", another_run_finishes_first)
    code, _, err = run("embed", cli.query, "-m", cli.model, "-o", output, "--quiet")
    assert code == 2 and "appeared while this command ran" in err
    assert output.read_text() == "the other run's result" and _leftovers(tmp_path) == []

    model = tmp_path / "model"

    def another_model_appears(self, *args, **kwargs):
        model.mkdir()
        (model / "model.json").write_text("{}")

    monkeypatch.setattr(CELLULAR, "build_reference_index", another_model_appears)
    code, _, err = run("train", cli.reference, "--labels-key", "cell_type", "-o", model, *TRAINING)
    assert code == 2 and "appeared while this command ran" in err
    assert (model / "model.json").read_text() == "{}" and _leftovers(tmp_path) == []


def test_progress_bars_only_on_a_terminal(cli, tmp_path, monkeypatch):
    code, _, logged = run("embed", cli.query, "-m", cli.model, "-o", tmp_path / "a.h5ad")
    assert code == 0 and "cells/s" not in logged and "Embedding cells" not in logged
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with contextlib.redirect_stderr(io.StringIO()) as terminal:
        terminal.isatty = lambda: True
        code = main([str(a) for a in ("embed", cli.query, "-m", cli.model, "-o", tmp_path / "b.h5ad")])
    assert code == 0 and "Embedding cells" in terminal.getvalue()


def test_demo_says_whether_it_wrote_anything(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--classifier-epochs", "3", "--quiet"]) == 0
    assert "nothing was written to disk; pass -o MODEL_DIR" in capsys.readouterr().out
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--quiet", "-o", str(tmp_path / "demo")])
    assert exit_.value.code == 2 and "holds other files" in capsys.readouterr().err
    assert (tmp_path / "demo" / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_files_beside_a_model(cli, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(cli.model, model)
    (model / "query_result.h5ad").write_text("a result the user keeps here")
    code, _, err = run("train", cli.reference, "--labels-key", "cell_type", "-o", model, "--overwrite", *TRAINING)
    assert code == 2 and "holds other files (query_result.h5ad)" in err
    assert (model / "query_result.h5ad").read_text() == "a result the user keeps here"


def test_faiss_backend_without_faiss_fails_before_training(cli, tmp_path, monkeypatch):
    from cellular.index import _faiss

    def missing(name, *args):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_faiss, "import_module", missing)
    trained = []
    monkeypatch.setattr(CELLULAR, "train", lambda *args, **kwargs: trained.append(True))
    options = ["--labels-key", "cell_type", "-o", tmp_path / "m", "--index-backend", "faiss"]
    code, _, err = run("train", cli.reference, *options)
    assert code == 1 and 'pip install "cellular-sc[faiss]"' in err and not trained


def test_train_with_label_levels_and_the_gene_grid_encoder(cli, tmp_path):
    model = tmp_path / "levels"
    options = ["--labels-key", "cell_type_broad", "cell_type", "--encoder", "gene_grid", "--n-top-genes", "300"]
    options.append("--no-batch-moments")
    code, _, err = run("train", cli.reference, *options, "--batch-key", "batch", "-o", model, *TRAINING, "--quiet")
    assert code == 0, err
    loaded = CELLULAR.load(model)
    assert loaded.module.encoder_name == "gene_grid" and loaded.n_latent == 64
    assert loaded.batch_moments_ is None and loaded.init_params_["non_kwargs"]["match_batch_moments"] is False
    assert loaded.label_hierarchy.level_names == ["cell_type_broad", "cell_type"]
    assert loaded.reference_index_.label_levels == ["cell_type_broad", "cell_type"]
    out = tmp_path / "annotated.h5ad"
    code, _, err = run("annotate", cli.query, "-m", model, "-o", out, "--hierarchy-threshold", "0.9", "--quiet")
    assert code == 0, err
    annotated = ad.read_h5ad(out)
    expected = ad.read_h5ad(cli.query)
    cellular.tl.cellular_annotate(expected, loaded, hierarchy_threshold=0.9)
    for column in ("cellular_label_cell_type_broad", "cellular_label_cell_type", "cellular_label_hierarchical"):
        assert (annotated.obs[column].astype(str) == expected.obs[column].astype(str)).all()
    code, _, err = run("map", cli.query, "-m", model, "-o", tmp_path / "mapped.h5ad", "--quiet")
    assert code == 0, err
    assert "cellular_cell_type_hierarchical" in ad.read_h5ad(tmp_path / "mapped.h5ad").obs


def test_train_under_the_package_lineage_map(cli, tmp_path):
    model = tmp_path / "lineage"
    options = ["--labels-key", "cell_type", "--batch-key", "batch", "--lineage-map", "pbmc", "--n-top-genes", "300"]
    code, out, err = run("train", cli.reference, *options, "-o", model, *TRAINING)
    assert code == 0, err
    assert "under the 'pbmc' lineage map" in out
    loaded = CELLULAR.load(model)
    levels = loaded.label_hierarchy.level_names
    assert len(levels) >= 2 and levels == [f"level_{depth}" for depth in range(len(levels))]
    out_path = tmp_path / "annotated.h5ad"
    code, _, err = run("annotate", cli.query, "-m", model, "-o", out_path, "--quiet")
    assert code == 0, err
    annotated = ad.read_h5ad(out_path)
    parents = cellular.data.lineage_map("pbmc")

    def lineage(label):
        chain = [label]
        while chain[-1] in parents:
            chain.append(parents[chain[-1]])
        return chain

    finest, coarser = (annotated.obs[f"cellular_label_{level}"].astype(str) for level in (levels[-1], levels[-2]))
    typed = finest.isin(loaded.cell_types)
    assert typed.mean() > 0.5  # the levels never contradict: the coarser label lies on the finest one's lineage
    assert all(parent in lineage(child) for child, parent in zip(finest[typed], coarser[typed], strict=True))


def test_label_counts_always_show_the_unknown_label():
    from cellular._cli._common import counts_line

    labels = pd.Series([f"type {i}" for i in range(14) for _ in range(20 - i)] + ["Unknown"] * 3)
    line = counts_line(labels, always="Unknown")
    assert line.startswith("type 0 20, type 1 19") and line.endswith("type 10 10, Unknown 3, ... (3 more)")
    assert "Unknown" not in counts_line(labels) and counts_line(labels).endswith("... (3 more)")
