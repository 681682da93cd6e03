"""Shared pieces of the command line: exit codes, errors, paths, reading and writing h5ad files."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("cellular.cli")

EXIT_OK = 0
EXIT_DATA_ERROR = 1
EXIT_USAGE_ERROR = 2


class UsageError(Exception):
    """A problem with the command line itself (a missing input, an existing output): exit code 2."""


class CommandError(Exception):
    """A problem with the data or the model found by the command line: exit code 1."""


def say(args: argparse.Namespace, text: str) -> None:
    """Print a line of the command's summary (stdout), unless ``--quiet``."""
    if not args.quiet:
        print(text, flush=True)


def existing_file(path: Path, what: str) -> Path:
    """``path``, or a :class:`UsageError` when it is not an existing file."""
    if not path.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise UsageError(f"{what} {str(path)!r} is not a file")
    return path


def existing_files(paths: list[Path], what: str) -> list[Path]:
    """:func:`existing_file` for each of ``paths``; a :class:`UsageError` when one is named twice."""
    resolved = [existing_file(path, what).resolve() for path in paths]
    if len(set(resolved)) != len(resolved):
        raise UsageError(f"a {what} is named twice; name each file once")
    return list(paths)


def existing_model_folder(path: Path) -> Path:
    """``path``, or a :class:`UsageError` when it is not an existing folder."""
    if not path.exists():
        raise UsageError(f"model folder {str(path)!r} does not exist; train one with `cellular train`")
    if not path.is_dir():
        raise UsageError(f"model {str(path)!r} is not a folder; pass the folder written by `cellular train`")
    return path


def new_output_file(output: Path, queries: list[Path], overwrite: bool) -> Path:
    """``output``, or a :class:`UsageError` when it exists (without ``overwrite``), is a folder or an input."""
    if output.exists() or output.is_symlink():
        if output.is_dir():
            raise UsageError(f"output {str(output)!r} is a folder; pass the path of the .h5ad file to write")
        if any(output.resolve() == query.resolve() for query in queries):
            raise UsageError(f"output {str(output)!r} is the input file, which is never modified; write another file")
        if not overwrite:
            raise UsageError(f"output {str(output)!r} already exists; pass --overwrite to replace it")
    return output


# Files larger than this are opened backed (read from disk in chunks) unless --backed says otherwise.
BACKED_ABOVE_BYTES = 2 * 1024**3


def read_h5ad(paths: Path | list[Path], backed: bool = False):
    """The AnnData in ``paths``, or a :class:`CommandError` saying why it cannot be read.

    With ``backed`` (or a file above :data:`BACKED_ABOVE_BYTES`) the expression stays on disk: cells are read in
    chunks as they are needed and the file is opened read-only. Several files are read as one
    (:func:`cellular.data.read_collection`: shared genes and obs columns), their expression left on disk.
    """
    import anndata

    if isinstance(paths, list) and len(paths) > 1:
        from cellular.data import read_collection

        logger.info("Reading %d files as one (expression stays on disk).", len(paths))
        try:
            return read_collection(paths)
        except Exception as error:  # h5py and anndata raise many types for files that are not h5ad
            raise CommandError(f"cannot read {', '.join(map(str, paths))} as one: {error_message(error)}") from error
    path = paths[0] if isinstance(paths, list) else paths
    backed = backed or path.stat().st_size > BACKED_ABOVE_BYTES
    logger.info("Reading %s%s.", path, " (backed: expression stays on disk)" if backed else "")
    try:
        return anndata.read_h5ad(path, backed="r" if backed else None)
    except Exception as error:  # h5py and anndata raise many types for files that are not h5ad
        raise CommandError(f"cannot read {str(path)!r} as an h5ad file: {error_message(error)}") from error


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching a terminal: never with ``--quiet`` or when stderr is a log file."""
    return not args.quiet and sys.stderr.isatty()


def _partial_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")


def _appeared(path: Path) -> UsageError:
    return UsageError(
        f"output {str(path)!r} appeared while this command ran (another run writing the same output?); nothing was "
        "replaced. Pass --overwrite to replace it, or choose another output"
    )


@contextlib.contextmanager
def staged_file(path: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it becomes ``path`` only when the block succeeds.

    Any failure, including Ctrl-C, removes the temporary file. Without ``overwrite`` the file is published with an
    exclusive hard link, so two runs writing the same output cannot both succeed.
    """
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path, path.suffix)
    try:
        yield partial
        if overwrite:
            os.replace(partial, path)
            return
        try:
            os.link(partial, path)
        except FileExistsError:
            raise _appeared(path) from None
        except OSError:  # a file system without hard links: check, then rename (not atomic)
            if path.exists():
                raise _appeared(path) from None
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(path: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``path`` to save into; it becomes ``path`` only when the block succeeds.

    The folder is renamed into place (atomic on one file system): without ``overwrite`` that fails if another run
    published a folder there meanwhile; with it, a previous model folder is replaced. Any failure, including Ctrl-C,
    removes the temporary folder.
    """
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    previous = _partial_name(path, ".old")
    try:
        yield partial
        if overwrite and path.exists():
            os.replace(path, previous)
        try:
            os.rename(partial, path)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise _appeared(path) from None
            raise CommandError(f"could not save to {str(path)!r}: {error_message(error)}") from error
    finally:
        if previous.exists() and not path.exists():  # interrupted between the two renames: put the old one back
            os.replace(previous, path)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def write_h5ad(adata, path: Path, overwrite: bool = False) -> None:
    """Write ``adata`` to ``path`` through a temporary file, so a failed or interrupted write leaves no output."""
    logger.info("Writing %s.", path)
    with staged_file(path, overwrite) as partial:
        try:
            adata.write_h5ad(partial)
        except Exception as error:
            raise CommandError(f"could not write {str(path)!r}: {error_message(error)}") from error


# What a saved model folder holds; --overwrite replaces a folder holding nothing else.
MODEL_FOLDER_ENTRIES = {"model.json", "model.pt", "reference_index", "training_data.json", "adata.h5ad"}


def model_output_folder(output: Path, overwrite: bool) -> Path:
    """``output``, or a :class:`UsageError` when it is a file, holds a model (without ``overwrite``) or other files.

    A model is published by renaming a whole folder into place, so a folder holding anything besides a saved model
    (a query result written next to it, notes) is refused rather than replaced.
    """
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {str(output)!r} is a file; a model is saved as a folder, pass a folder path")
    if not output.is_dir():
        return output
    others = sorted(entry.name for entry in output.iterdir() if entry.name not in MODEL_FOLDER_ENTRIES)
    if others:
        raise UsageError(
            f"output folder {str(output)!r} holds other files ({', '.join(others[:5])}); the model is saved as a "
            "whole folder, so pass a new folder path or move those files"
        )
    if (output / "model.json").exists() and not overwrite:
        raise UsageError(f"{str(output)!r} already holds a saved model; pass --overwrite to replace it")
    return output


TRAINING_DATA_FILE = "training_data.json"


def load_model(path: Path, accelerator: str, reference=None):
    """The CELLULAR model saved in ``path``, or a :class:`CommandError` saying why it cannot be loaded.

    ``reference``, the model's training data, is attached to the model when given.
    """
    from cellular import CELLULAR

    logger.info("Loading the model in %s.", path)
    try:
        return CELLULAR.load(path, adata=reference, accelerator=accelerator)
    except Exception as error:
        raise CommandError(f"cannot load the model in {str(path)!r}: {error_message(error)}") from error


def error_message(error: BaseException) -> str:
    """One paragraph naming the problem (``KeyError`` quotes its ``str``: use its argument)."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    else:
        text = str(error)
    text = " ".join(text.split())
    return text or type(error).__name__


def counts_line(labels, limit: int = 12, always: str | None = None) -> str:
    """``"A 10, B 4, ..."``: cells per label, most frequent first.

    ``always`` (the unknown label) is shown even when it falls beyond ``limit``.
    """
    pairs = [(name, int(count)) for name, count in labels.value_counts().items() if count > 0]
    shown = pairs[:limit]
    beyond = [pair for pair in pairs[limit:] if pair[0] == always]
    if beyond:
        shown = shown[: limit - 1] + beyond
    hidden = len(pairs) - len(shown)
    return ", ".join(f"{name} {count}" for name, count in shown) + (f", ... ({hidden} more)" if hidden else "")


# Python arguments whose command-line flag has another name.
_PYTHON_ARGUMENTS = {"max_epochs": "epochs"}


def cli_wording(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` with the library's Python argument names replaced by the command's flags.

    ``min_gene_overlap`` becomes ``--min-gene-overlap``, ``panel='direct'`` becomes ``--panel direct`` and
    ``log_normalized=True`` becomes ``--log-normalized``, for the flags ``parser`` has.
    """
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    names = {python: actions[dest] for python, dest in _PYTHON_ARGUMENTS.items() if dest in actions}
    names.update(actions)
    for name in sorted(names, key=len, reverse=True):
        action = names[name]
        flag = max(action.option_strings, key=len)
        is_switch = isinstance(action, argparse._StoreTrueAction)

        def assignment(match: re.Match, flag=flag, is_switch=is_switch) -> str:
            value = match.group(2)
            if value == "None":
                return f"without {flag}"
            if is_switch:
                return flag if value == "True" else f"no {flag}"
            return f"{flag} {value}"

        value = r"""([^\s,;)'"]+?)(?=[\s,;)'"]|\.(?:\s|$)|$)"""
        message = re.sub(rf"(?<![\w./\['\"]){name}=(['\"]?){value}\1", assignment, message)
        if "_" in name:
            message = re.sub(rf"(?<![\w./\['\"]){name}\b(?![/'\"\]])", flag, message)
    return message
