"""``planforge compare BUNDLE``: runners, data, tolerances and the comparison itself."""

from engines.evaluate.compare.api import CompareRequest, CompareResult, compare, cosine, top1

__all__ = ["CompareRequest", "CompareResult", "compare", "cosine", "top1"]
