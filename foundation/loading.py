"""User code named on the command line: ``path/to/file.py:function`` or ``module:function``.
Standard library only."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from foundation.errors import UsageError


def import_function(source: str, option: str) -> Callable:
    """The callable ``source`` names; ``option`` (``--metric``, ``--calib``) names it in the ``UsageError``
    for a malformed name, a missing file or function. Exceptions raised while importing the user's
    module propagate unchanged (the caller says what the code was for)."""
    target, _, name = source.rpartition(":")
    if not target or not name:
        raise UsageError(f"{option} {source!r}: expected path/to/file.py:function or module:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"{option} {source!r}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"planforge_user_{abs(hash(str(path.resolve())))}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"{option} {source}: {target} has no function {name!r}")
    return function
