"""Sphinx configuration for the aichatonline-sync manual.

Build it with ``pip install ".[docs]" && sphinx-build -W -b html docs docs/_build/html``.
Nothing here reaches the network: no intersphinx inventories, no remote images or fonts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # autodoc imports the package from this checkout

import aichatonline_sync  # noqa: E402

project = "aichatonline-sync"
author = "aichatonline-sync contributors"
copyright = "aichatonline-sync contributors"  # noqa: A001 (Sphinx's name)
release = aichatonline_sync.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]
# sphinx.ext.intersphinx stays off: it downloads inventories, and the machines that build this
# manual may reach nothing but loopback.

exclude_patterns = ["_build", "deploy"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
# The examples use plain ``::`` blocks for shell commands and configuration files: no highlighting
# language is guessed for them.
highlight_language = "none"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}

# furo when it is installed (the ``docs`` extra), else Sphinx's own alabaster: the build works with
# nothing but ``sphinx``.
html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = f"aichatonline-sync {release}"
html_static_path: list[str] = []
