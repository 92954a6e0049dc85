"""``python -m engines.cli``: the same as the ``planforge`` command."""

from engines.cli.app import entry

entry()
