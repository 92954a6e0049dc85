"""golden.npz: the reference inputs and outputs a build records at each shape point.

Keys are ``"<point>/in/<input>"`` and ``"<point>/out/<output>"`` (``golden_key``): the parity check
and the build of an ONNX file write them, compare and the graph checks read them. Standard library only.
"""

from __future__ import annotations


def golden_key(point: str, side: str, name: str) -> str:
    """The golden.npz key of ``name`` at shape ``point``; ``side`` is ``in`` or ``out``."""
    return f"{point}/{side}/{name}"


def golden_points(golden: dict) -> list[str]:
    """The shape points in golden.npz (keys are "<point>/in/<name>" and "<point>/out/<name>")."""
    return sorted({k.split("/", 1)[0] for k in golden})


def golden_feeds(golden: dict) -> list[dict]:
    """golden.npz's inputs, one feed dict per shape point, in ``golden_points`` order."""
    return [
        {k.split("/", 2)[2]: v for k, v in golden.items() if k.startswith(f"{p}/in/")} for p in golden_points(golden)
    ]
