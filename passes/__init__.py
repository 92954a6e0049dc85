"""ONNX -> ONNX graph passes. Imports onnx, onnx-graphsurgeon and onnxruntime; never torch.

``PIPELINES`` is the one reviewed order of passes per (target, precision). A nested tuple is a
fixed-point group: its passes feed each other, so it runs until a round changes nothing. A pass
that needs another first declares it in ``requires``; the ``PassManager`` enforces it.
"""

from __future__ import annotations

import functools
import inspect

from foundation.errors import UsageError
from passes.base import FixedPoint, Pass, PassManager, PassRecord, PassResult
from passes.cleanup import Cleanup
from passes.convert_fp16 import ConvertToFp16
from passes.deduplicate_constants import DeduplicateConstants
from passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
from passes.fold_attention_scale import FoldAttentionScale
from passes.fold_constants import FoldConstants
from passes.fold_shapes import FoldShapes
from passes.fuse_attention import FuseAttention
from passes.fuse_conv_bn import FuseConvBatchNorm
from passes.fuse_gelu import FuseGelu
from passes.fuse_group_query_attention import FuseGroupQueryAttention
from passes.fuse_layer_norm import FuseLayerNorm
from passes.fuse_linear_affine import FuseLinearAffine
from passes.fuse_matmul_add import FuseMatMulAdd
from passes.fuse_rms_norm import FuseRmsNorm
from passes.fuse_skip_rms_norm import FuseSkipRmsNorm
from passes.fuse_standard_attention import FuseStandardAttention
from passes.fuse_static_kv_cache import FuseStaticKVCache
from passes.infer_shapes import InferShapes
from passes.merge_parallel_matmuls import MergeParallelMatMuls
from passes.merge_reshapes import MergeReshapes
from passes.merge_transposes import MergeTransposes
from passes.remove_noops import RemoveNoOps
from passes.rotary_layout import RotaryLayout
from passes.select_logit_positions import SelectLogitPositions

TARGETS = ("trt", "ort")

SIMPLIFY = (InferShapes, FoldShapes, FoldConstants, Cleanup, RemoveNoOps, MergeTransposes, MergeReshapes,
            DeduplicateConstants, EliminateCommonSubexpressions)
FUSE_COMMON = (FuseConvBatchNorm, FuseLinearAffine, FuseMatMulAdd, FuseGelu, FuseLayerNorm, FuseRmsNorm)
FUSE_TRT = FUSE_COMMON + (FuseStandardAttention, FuseStaticKVCache, SelectLogitPositions)
# Attention for ONNX Runtime (docs/decisions/002-ort-attention-form.md); its other encoder fusions are not
# emitted (docs/decisions/003-ort-encoder-fusions.md).
FUSE_ORT = FUSE_COMMON + (FuseAttention, FuseGroupQueryAttention, RotaryLayout, FoldAttentionScale,
                          MergeParallelMatMuls, SelectLogitPositions, FuseSkipRmsNorm)

PIPELINES: dict[tuple[str, str], tuple] = {
    ("trt", "fp32"): (SIMPLIFY, FUSE_TRT, SIMPLIFY),
    ("ort", "fp32"): (SIMPLIFY, FUSE_ORT, SIMPLIFY),
    # FP16 only for TensorRT: the ONNX Runtime CPU fallback keeps FP32.
    ("trt", "fp16"): (SIMPLIFY, FUSE_TRT, SIMPLIFY, InferShapes, ConvertToFp16),
}


def pipeline(target: str, precision: str, skip: tuple[str, ...] = (), **options) -> list:
    """Fresh pass instances (and fixed-point groups) for ``target`` and ``precision``.

    ``options`` go to the passes whose constructor takes them (``keep=`` for ConvertToFp16).
    ``skip``: pass names left out (``--skip-pass``); one that another pass requires is refused by the
    pass manager, naming both.
    """
    key = (target, precision)
    if key not in PIPELINES:
        supported = ", ".join(f"{t}/{p}" for t, p in PIPELINES)
        raise UsageError(f"no pass pipeline for target {target!r} at precision {precision!r}; supported: {supported}")
    anywhere = {cls.__name__ for steps in PIPELINES.values() for cls in _classes(steps)}  # both targets share skip
    unknown = sorted(set(skip) - anywhere)
    if unknown:
        here = sorted({cls.__name__ for cls in _classes(PIPELINES[key])})
        raise UsageError(f"--skip-pass {', '.join(unknown)}: no such pass; the {target}/{precision} pipeline runs "
                         f"{', '.join(here)}")
    instances = (_instantiate(step, dict(options, target=target), set(skip)) for step in PIPELINES[key])
    return [s for s in instances if s is not None]


def _classes(steps) -> list[type]:
    return [c for step in steps for c in (_classes(step) if isinstance(step, tuple) else [step])]


def _instantiate(step, options: dict, skip: set[str]):
    """A class becomes an instance (given the options it takes); a tuple, a FixedPoint group; skipped
    passes become None (and groups without passes too)."""
    if isinstance(step, tuple):
        members = [m for m in (_instantiate(s, options, skip) for s in step) if m is not None]
        return FixedPoint(members) if members else None
    if step.__name__ in skip:
        return None
    params = _init_parameters(step)
    return step(**{k: v for k, v in options.items() if k in params})


@functools.cache
def _init_parameters(cls: type) -> frozenset[str]:
    """The names a pass's constructor takes. Cached: ``inspect.signature`` of a class without its own
    ``__init__`` parses ``object.__init__``'s text signature (~0.3 ms), and a pipeline is built per graph
    (the peer corpus builds ~4,000 of them)."""
    return frozenset(inspect.signature(cls.__init__).parameters)


__all__ = [
    "ConvertToFp16",
    "FixedPoint",
    "PIPELINES",
    "TARGETS",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "pipeline",
    "Cleanup",
    "DeduplicateConstants",
    "EliminateCommonSubexpressions",
    "FoldAttentionScale",
    "FoldConstants",
    "FoldShapes",
    "FuseAttention",
    "FuseConvBatchNorm",
    "FuseGelu",
    "FuseGroupQueryAttention",
    "FuseLayerNorm",
    "FuseLinearAffine",
    "FuseMatMulAdd",
    "FuseRmsNorm",
    "FuseSkipRmsNorm",
    "FuseStandardAttention",
    "FuseStaticKVCache",
    "InferShapes",
    "MergeParallelMatMuls",
    "MergeReshapes",
    "MergeTransposes",
    "RemoveNoOps",
    "RotaryLayout",
    "SelectLogitPositions",
]
