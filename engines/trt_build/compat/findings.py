"""What the TensorRT checks report: findings (refused: the parser or builder will fail; check: it
depends on values known only at run time, or TensorRT will run it slower than intended) and the
report over a graph."""

from __future__ import annotations

import dataclasses

REFUSED, CHECK = "refused", "check"


@dataclasses.dataclass(frozen=True)
class Finding:
    node: str  # the node's name ("(model)" for graph-wide findings)
    op: str
    rule: str  # short id: unsupported-op, plugin, opset, type, uint8, quantized-type, qdq-zero-point, ...
    status: str  # refused | check
    message: str
    hint: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Finding:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class CompatReport:
    tensorrt_version: str
    source: str  # the operator table's citation
    graph: str  # what was checked
    nodes: int
    findings: tuple[Finding, ...]
    eligible_24: int = 0  # layers whose weights could hold TensorRT's 2:4 pattern
    sparse_24: tuple[str, ...] = ()  # those that do (passes/sparsify_24.py)

    @property
    def refused(self) -> list[Finding]:
        return [f for f in self.findings if f.status == REFUSED]

    @property
    def to_check(self) -> list[Finding]:
        return [f for f in self.findings if f.status == CHECK]

    @property
    def ok(self) -> bool:
        return not self.refused

    def summary(self) -> str:
        sparse = f"; 2:4 sparse weights in {len(self.sparse_24)} of {self.eligible_24} eligible layers" \
            if self.sparse_24 else ""
        return (f"TensorRT {self.tensorrt_version} compatibility: {self.nodes} nodes, {len(self.refused)} refused, "
                f"{len(self.to_check)} to check{sparse}")

    def to_json(self) -> dict:
        return {"tensorrt_version": self.tensorrt_version, "source": self.source, "graph": self.graph,
                "nodes": self.nodes, "refused": len(self.refused), "check": len(self.to_check),
                "findings": [f.to_json() for f in self.findings], "eligible_24": self.eligible_24,
                "sparse_24": list(self.sparse_24)}

    @classmethod
    def from_json(cls, data: dict) -> CompatReport:
        return cls(data["tensorrt_version"], data.get("source", ""), data.get("graph", ""), int(data["nodes"]),
                   tuple(Finding.from_json(f) for f in data.get("findings", ())), int(data.get("eligible_24", 0)),
                   tuple(data.get("sparse_24", ())))
