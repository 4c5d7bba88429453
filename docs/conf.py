"""Sphinx configuration for ncp.

Build with warnings as errors: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import ncp

project = "ncp"
author = "ncp developers"
copyright = "2024, ncp developers"
release = ncp.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Google-style docstrings only. ``Attributes:`` sections become ``:ivar:`` fields, so a
# dataclass documented with both a docstring section and ``:members:`` never defines the same
# attribute twice.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

# Types live in the signature only (house style); defaults are shown as written in the source
# (``loss_fn=losses.mse``), not as a repr with a memory address.
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"ncp {release}"
