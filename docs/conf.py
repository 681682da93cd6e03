"""Sphinx configuration of cellular-sc."""

import shutil
from importlib.metadata import version as package_version
from pathlib import Path

DOCS = Path(__file__).resolve().parent
TUTORIALS = DOCS.parent / "tutorials"

project = "cellular-sc"
author = "cellular-sc developers"
copyright = "2026, cellular-sc developers"
release = package_version("cellular-sc")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
myst_heading_anchors = 3
exclude_patterns = ["_build", "jupyter_execute", "generated/*.md", "**.ipynb_checkpoints"]
# The tutorials are executed by the test suite (nbmake) and committed with their outputs, which the docs render.
nb_execution_mode = "off"
templates_path = []
html_theme = "alabaster"
nitpicky = False
intersphinx_mapping = {}
suppress_warnings = ["myst.header"]


def _copy_tutorials() -> None:
    """Copy the notebooks from tutorials/ (their home, where CI executes them) into the documentation tree."""
    target = DOCS / "tutorials"
    for notebook in sorted(TUTORIALS.glob("*.ipynb")):
        shutil.copyfile(notebook, target / notebook.name)


def _write_cli_help() -> None:
    """Write the ``--help`` text of every subcommand, so the CLI page always matches the installed command."""
    import argparse

    from cellular._cli import build_parser

    parser = build_parser()
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    sections = [f"### `cellular`\n\n```text\n{parser.format_help()}```\n"]
    for name, subparser in subcommands.choices.items():
        sections.append(f"### `cellular {name}`\n\n```text\n{subparser.format_help()}```\n")
    (DOCS / "generated").mkdir(exist_ok=True)
    (DOCS / "generated" / "cli_help.md").write_text("\n".join(sections))


_copy_tutorials()
_write_cli_help()
