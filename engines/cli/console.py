"""Where the CLI writes: results on stdout (``console``, ``print_json``), logs, progress and errors on
stderr (``err_console``). Piped output (logs, CI) is not wrapped at rich's default 80 columns, so
spec strings stay whole."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

console = Console() if sys.stdout.isatty() else Console(width=200)
err_console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)


def print_json(doc) -> None:
    """One JSON document on stdout (logs and progress go to stderr)."""
    click.echo(json.dumps(doc, indent=2, default=str))
