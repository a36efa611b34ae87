"""The ``aichatonline`` command line: ``main`` parses and runs (``commands.py``); ``io.py`` has its
input and output files. A front end: it uses the package's public API."""

from .commands import main

__all__ = ["main"]
