"""Per-node TensorRT ONNX parser rules, from the operator table (``table``) and its Restrictions column.

Decided statically on the graph TensorRT would get (folded, shapes inferred): the operator and its
domain, the model's opset, the tensor types an operator accepts, UINT8 only at network I/O, quantized
types only through Q/DQ, Q/DQ zero points, and the restrictions that depend on attributes, ranks or
constant inputs. What depends on run-time values is a "check" finding, never silently passed.
"""

from __future__ import annotations

import numpy as np
import onnx

from engines.trt_build.compat.findings import CHECK, REFUSED, Finding
from engines.trt_build.compat.graph import GraphIndex, attr, text
from engines.trt_build.compat.table import QUANTIZED, TYPE_NAMES, OperatorTable

STANDARD = ("", "ai.onnx")
# ONNX Runtime's QOperator / integer forms: TensorRT takes the Q/DQ form of the same quantization
QOPERATOR = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}
# The input whose element type an operator's "Supported Types" refers to, where it is not input 0
DATA_INPUT = {"Where": 1, "Cast": 0}
REDUCE = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
          "ReduceProd", "ReduceSum", "ReduceSumSquare"}
# "must be an initializer" (or a build-time constant): op -> {input index: what it is}
CONSTANT_INPUTS = {"CumSum": {1: "axis"}, "OneHot": {1: "depth"}, "STFT": {1: "frame_step", 2: "window"},
                   **{op: {1: "axes"} for op in REDUCE}}
RESIZE_ALLOWED = {"coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                     "asymmetric", "align_corners"},
                  "mode": {"nearest", "linear"},
                  "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
                  "keep_aspect_ratio_policy": {"stretch"}}


def finding(node: onnx.NodeProto, rule: str, status: str, message: str, hint: str) -> Finding:
    return Finding(node.name or f"({node.op_type} -> {node.output[0] if node.output else ''})", node.op_type, rule,
                   status, message, hint)


def model_findings(index: GraphIndex, table: OperatorTable) -> list[Finding]:
    opset = index.opset()
    if opset is None or table.opset_min <= opset <= table.opset_max:
        return []
    return [
        Finding(
            "(model)",
            "",
            "opset",
            REFUSED,
            f"opset {opset}: the TensorRT {table.version} parser reads opsets {table.opset_min}..{table.opset_max}",
            f"export with --opset {min(max(opset, table.opset_min), table.opset_max)}",
        )
    ]


def node_findings(node: onnx.NodeProto, index: GraphIndex, table: OperatorTable) -> list[Finding]:
    if node.domain not in STANDARD:
        return [_domain(node, table)]
    entry = table.get(node.op_type)
    if entry is None or not entry.supported:
        hint = ("this is ONNX Runtime's integer form; build the trt target, which writes INT8 as Q/DQ"
                if node.op_type in QOPERATOR else "rewrite it with supported operators in the model, or register a "
                f"TensorRT plugin named {node.op_type}")
        known = "not in" if entry is None else "marked unsupported in"
        return [finding(node, "unsupported-op", REFUSED, f"{node.op_type} is {known} the TensorRT {table.version} ONNX "
                   "parser's operator table", hint)]
    found = _types(node, index, entry.types, table.version)
    found += _restrictions(node, index)
    return found


def _domain(node: onnx.NodeProto, table: OperatorTable) -> Finding:
    if node.domain == "trt" and node.op_type in {c.split()[0] for c in table.custom_ops}:
        return finding(
            node,
            "plugin",
            CHECK,
            f"TensorRT custom op {node.domain}::{node.op_type}: imported by TensorRT "
            "itself (docs/TRT_custom_ops.md), with its own restrictions",
            "check its form against TRT_custom_ops.md",
        )
    hint = ("an ONNX Runtime contrib op: the ort target's fusions write these; TensorRT gets the trt graph"
            if node.domain == "com.microsoft" else f"register a TensorRT plugin named {node.op_type} "
            f"(namespace {node.domain!r}) with the builder, or rewrite the node with standard ONNX operators")
    return finding(
        node,
        "plugin",
        REFUSED,
        f"domain {node.domain!r} is not standard ONNX: the parser looks for a plugin "
        f"creator named {node.op_type} and fails without one",
        hint,
    )


def _types(node: onnx.NodeProto, index: GraphIndex, allowed: tuple[str, ...], version: str) -> list[Finding]:
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return []  # their types are the quantization rules' business (engines.trt_build.compat.qdq)
    k = DATA_INPUT.get(node.op_type, 0)
    names = [node.input[k]] if len(node.input) > k and node.input[k] else list(node.output[:1])
    if node.op_type == "Cast":
        names += list(node.output[:1])
    found = []
    for name in names:
        kind = TYPE_NAMES.get(index.types.get(name, 0))
        if kind is None or kind in allowed or kind in QUANTIZED or kind == "UINT8":
            continue  # unknown here; quantized and UINT8 tensors have rules of their own
        if kind == "DOUBLE":
            found.append(finding(node, "type", CHECK, f"{name} is DOUBLE: TensorRT casts it down to FLOAT, clamping to "
                            "+-FLT_MAX", "cast to float32 in the model if the values need no double range"))
            continue
        found.append(finding(node, "type", REFUSED, f"{node.op_type} on {kind} ({name}): TensorRT {version} runs it on "
                        f"{', '.join(allowed)} only", "keep it in a supported type: --keep-fp32 "
                        f"{node.name or node.op_type} for an FP16 build, or cast in the model"))
    return found


def _constant_input(node: onnx.NodeProto, index: GraphIndex, k: int, what: str, status: str) -> list[Finding]:
    if len(node.input) <= k or not node.input[k] or index.constant(node.input[k]) is not None:
        return []
    return [
        finding(
            node,
            "constant-input",
            status,
            f"{node.op_type} {what} ({node.input[k]}) is computed in the graph; "
            f"TensorRT needs it {'as an initializer' if status == REFUSED else 'resolvable to a constant at build'}",
            "fold it: planforge optimize --target trt (FoldConstants, FoldShapes), or fix the input shapes "
            "with --static",
        )
    ]


def _restrictions(node: onnx.NodeProto, index: GraphIndex) -> list[Finding]:
    op, found = node.op_type, []
    for k, what in CONSTANT_INPUTS.get(op, {}).items():
        found += _constant_input(node, index, k, what, REFUSED)
    if op in ("Squeeze", "Unsqueeze"):
        found += _constant_input(node, index, 1, "axes", CHECK)
    if op == "TopK":
        found += _topk(node, index)
    if op in ("MaxPool", "AveragePool", "LpPool"):
        found += _pool(node, index)
    if op == "LayerNormalization" and any(index.used(o) for o in node.output[1:]):
        found.append(
            finding(
                node,
                "outputs",
                REFUSED,
                "LayerNormalization's Mean / InvStdDev outputs are used; TensorRT supports only Y",
                "export the model in inference mode (training outputs unused)",
            )
        )
    if op in ("LSTM", "GRU", "RNN"):
        found += _recurrent(node)
    if op == "Resize":
        found += _resize(node)
    if op == "ScatterND" and text(attr(node, "reduction", b"none")) != "none":
        found.append(finding(node, "attribute", REFUSED, f"ScatterND reduction={text(attr(node, 'reduction'))!r}; "
                        "TensorRT supports only 'none'", "rewrite the scatter without a reduction"))
    if op == "GridSample" and index.ranks.get(node.input[0], 4) != 4:
        found.append(
            finding(
                node,
                "rank",
                REFUSED,
                f"GridSample on a rank-{index.ranks[node.input[0]]} input; TensorRT takes 4-D only",
                "reshape to 4-D around it",
            )
        )
    if op == "EyeLike" and any(not isinstance(d, int) or d <= 0 for d in index.dims.get(node.input[0], [None])):
        found.append(
            finding(
                node,
                "static-shape",
                REFUSED,
                "EyeLike's input has dynamic dimensions; TensorRT needs them static",
                "fix its shape with --input or --static",
            )
        )
    if op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
        found.append(finding(node, "attribute", REFUSED, "a sparse or string Constant; TensorRT supports neither",
                        "fold it away or make it a dense numeric initializer"))
    if op == "Dropout" and len(node.input) > 2 and node.input[2]:
        value = index.constant(node.input[2])
        if value is None or bool(np.asarray(value).item()):
            found.append(
                finding(
                    node,
                    "constant-input",
                    REFUSED,
                    "Dropout's training_mode must be an initializer that is False",
                    "export in eval mode (model.eval())",
                )
            )
    if op == "Attention":
        found += _attention(node, index)
    if op == "RotaryEmbedding" and len(node.input) > 3 and node.input[3] and \
            index.types.get(node.input[3], onnx.TensorProto.INT64) != onnx.TensorProto.INT64:
        found.append(finding(node, "type", REFUSED, "RotaryEmbedding position_ids must be INT64", "cast them to int64"))
    if op in ("QuantizeLinear", "DequantizeLinear"):
        found += _zero_point(node, index)
    if (
        op in ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike")
        and attr(node, "seed") is not None
    ):
        found.append(
            finding(
                node,
                "attribute",
                CHECK,
                f"{op} has a seed; TensorRT ignores it, so its values differ from ONNX Runtime's",
                "compare statistics, not values, for outputs it feeds",
            )
        )
    if op in ("If", "Loop"):
        found.append(
            finding(
                node,
                "control-flow",
                CHECK,
                f"{op}: TensorRT needs "
                + ("both branches to give outputs of the same rank" if op == "If" else
                   "loop-carried shapes constant across iterations and no dynamic scan output length"),
                "fold it with fixed shapes (--static) where the condition is a shape test",
            )
        )
    return found


def _topk(node, index) -> list[Finding]:
    found = []
    if attr(node, "sorted", 1) != 1:
        found.append(finding(node, "attribute", REFUSED, "TopK sorted=0; TensorRT supports sorted=1 only",
                        "export with sorted=True"))
    k = index.constant(node.input[1]) if len(node.input) > 1 else np.array(attr(node, "k", 1))
    if k is None:
        found.append(finding(node, "constant-input", CHECK, "TopK's K is computed at run time; TensorRT needs K < 3840",
                        "make K a constant, or make sure it stays below 3840"))
    elif int(np.asarray(k).max()) >= 3840:
        found.append(finding(node, "attribute", REFUSED, f"TopK K={int(np.asarray(k).max())}; TensorRT needs K < 3840",
                        "take the top K in two stages (TopK over chunks, then over their winners) or reduce K"))
    return found


def _pool(node, index) -> list[Finding]:
    found = []
    rank = index.ranks.get(node.input[0])
    if node.op_type != "LpPool" and rank is not None and rank not in (4, 5):
        found.append(finding(node, "rank", REFUSED, f"{node.op_type} on a rank-{rank} input ({rank - 2}-D pooling); "
                        "TensorRT pools 2-D or 3-D only", "reshape a 1-D pooling to 2-D (unsqueeze a unit height)"))
    dilations = attr(node, "dilations")
    if dilations and any(d != 1 for d in dilations):
        found.append(finding(node, "attribute", REFUSED, f"{node.op_type} dilations={list(dilations)}; TensorRT needs "
                        "them empty or all ones", "rewrite the dilated pooling"))
    if node.op_type == "MaxPool" and len(node.output) > 1 and index.used(node.output[1]):
        found.append(finding(node, "outputs", REFUSED, "MaxPool's Indices output is used; TensorRT does not produce it",
                        "avoid return_indices / MaxUnpool in the model"))
    return found


def _recurrent(node) -> list[Finding]:
    found = []
    if node.op_type == "LSTM":
        for name in ("input_forget", "layout"):
            if attr(node, name, 0) != 0:
                found.append(finding(node, "attribute", REFUSED, f"LSTM {name}={attr(node, name)}; TensorRT needs 0",
                                "export with batch_first=False handled by a Transpose, and no coupled input gate"))
    acts = [text(a) for a in attr(node, "activations", [])]
    if text(attr(node, "direction", b"forward")) == "bidirectional" and acts and \
            acts[:len(acts) // 2] != acts[len(acts) // 2:]:
        found.append(finding(node, "attribute", REFUSED, f"bidirectional {node.op_type} with different activations per "
                        f"direction ({acts}); TensorRT needs them the same", "use the same activations both ways"))
    return found


def _resize(node) -> list[Finding]:
    found = []
    for name, allowed in RESIZE_ALLOWED.items():
        value = text(attr(node, name))
        if value is not None and value not in allowed:
            found.append(finding(node, "attribute", REFUSED, f"Resize {name}={value!r}; TensorRT supports "
                            f"{', '.join(sorted(allowed))}", "use nearest or (bi)linear interpolation in the model"
                            if name == "mode" else f"export with a supported {name}"))
    if attr(node, "antialias", 0):
        found.append(finding(node, "attribute", REFUSED, "Resize antialias=1; TensorRT does not antialias",
                        "resize with antialias=False"))
    return found


def _attention(node, index) -> list[Finding]:
    found = []
    for k, name in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
        rank = index.ranks.get(node.input[k]) if len(node.input) > k and node.input[k] else None
        if rank is not None and rank != 4:
            found.append(finding(node, "rank", REFUSED, f"Attention {name} is rank {rank}; TensorRT needs 4-D",
                            "emit the 4-D [batch, heads, seq, head_dim] form"))
    for k, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if len(node.input) > k and node.input[k]:
            found.append(finding(node, "inputs", REFUSED, f"Attention input {name} is unsupported by TensorRT",
                            "concatenate the KV cache outside the Attention node"))
    for k, name in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        if len(node.output) > k and node.output[k]:
            found.append(finding(node, "outputs", REFUSED, f"Attention output {name} is unsupported by TensorRT",
                            "take the cache from the concatenation instead"))
    if attr(node, "qk_matmul_output_mode", 0) or attr(node, "softcap", 0.0):
        found.append(finding(node, "attribute", REFUSED, "Attention qk_matmul_output_mode / softcap are unsupported by "
                        "TensorRT", "leave the pattern unfused"))
    return found


def _zero_point(node, index) -> list[Finding]:
    if len(node.input) < 3 or not node.input[2]:
        return []
    value = index.constant(node.input[2])
    if value is None:
        return [finding(node, "qdq-zero-point", CHECK, "the zero point is computed at run time; TensorRT needs it 0",
                   "make it a zero initializer")]
    if np.any(np.asarray(value).astype(np.float64) != 0):
        return [finding(node, "qdq-zero-point", REFUSED, "non-zero zero point: TensorRT quantizes symmetrically only",
                   "quantize symmetrically (signed INT8, zero point 0): planforge's trt INT8 form does")]
    return []
