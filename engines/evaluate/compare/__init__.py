"""``planforge compare BUNDLE``: runners, data, tolerances and the comparison itself."""

from engines.evaluate.compare.api import compare, cosine, top1
from engines.evaluate.compare.results import CompareRequest, CompareResult

__all__ = ["CompareRequest", "CompareResult", "compare", "cosine", "top1"]
