"""The ``planforge`` command: click parses (``app``), ``actions`` call the library, ``present`` prints."""

from engines.cli.app import entry, main

__all__ = ["entry", "main"]
