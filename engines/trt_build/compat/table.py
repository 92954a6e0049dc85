"""The TensorRT ONNX parser's operator table, one JSON file per TensorRT version in ``data/``.

Each file cites the onnx-tensorrt ``docs/operators.md`` it was transcribed from (the parser
submodule commit a TensorRT release ships); a newer TensorRT is a new file, picked with
``--trt-version``. Lean: standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from foundation.errors import UsageError

DATA = Path(__file__).parent / "data"
DEFAULT_VERSION = "11.1"

# ONNX TensorProto element types -> the table's type names
TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
              16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4", 8: "STRING",
              4: "UINT16", 5: "INT16", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 21: "UINT4"}
QUANTIZED = {"INT8", "INT4", "FP8", "FP4"}  # only through Q/DQ from a higher-precision float


@dataclasses.dataclass(frozen=True)
class Operator:
    op: str
    supported: bool
    types: tuple[str, ...]
    restrictions: str


@dataclasses.dataclass(frozen=True)
class OperatorTable:
    version: str
    source: str
    opset_min: int
    opset_max: int
    operators: dict[str, Operator]
    custom_ops: tuple[str, ...]

    def get(self, op: str) -> Operator | None:
        return self.operators.get(op)


def versions() -> list[str]:
    return sorted(p.stem.removeprefix("onnx_operators_") for p in DATA.glob("onnx_operators_*.json"))


@functools.cache
def load_table(version: str = DEFAULT_VERSION) -> OperatorTable:
    path = DATA / f"onnx_operators_{version}.json"
    if not path.is_file():
        raise UsageError(f"--trt-version {version}: no operator table for it; tables exist for {', '.join(versions())}")
    doc = json.loads(path.read_text())
    ops = {o["op"]: Operator(o["op"], bool(o["supported"]), tuple(o["types"]), o["restrictions"])
           for o in doc["operators"]}
    return OperatorTable(doc["tensorrt_version"], doc["source"], int(doc["opset_min"]), int(doc["opset_max"]), ops,
                         tuple(doc.get("trt_custom_ops", ())))
