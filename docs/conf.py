"""Sphinx configuration of cellular-sc."""

from importlib.metadata import version as package_version

project = "cellular-sc"
author = "cellular-sc developers"
copyright = "2026, cellular-sc developers"
release = package_version("cellular-sc")
version = release

extensions = [
    "myst_parser",
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
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "generated/*.md"]
templates_path = []
html_theme = "alabaster"
nitpicky = False
intersphinx_mapping = {}
suppress_warnings = ["myst.header"]
