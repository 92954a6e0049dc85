"""The manifest, typed: the contract between a build and everything that reads a bundle.

Frozen dataclasses with ``to_json`` / ``from_json``; readers use attributes, never raw keys. The
file is ``manifest.json``, written last by ``engines.bundle.store``. Schema 2 differs from schema 1
in two places, and schema 1 files still load (``from_json`` converts them):

- ``unquantized_nodes`` meant two things; now ``int8_float_layers`` (layers the INT8 budget kept
  in float, per target) and ``fp16_fp32_nodes`` (nodes the FP16 pass kept in FP32).
- INT8 budgets are ``{"metric": ..., "threshold": ...}``, not display strings.

Free-form statistics (pass records, parity errors, sensitivities, TensorRT options) stay plain
JSON mappings inside the typed sections. Standard library, NumPy-free spec types and profiles only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engines.profiles import Profile
from foundation.decoder import DecoderInfo
from foundation.errors import BundleError
from foundation.numerics import Budget
from foundation.spec import InputSpec, OutputSpec

SCHEMA_VERSION = 2
INT8_MIN_SPEEDUP = 1.1  # an INT8 ort graph less than 10% faster than FP32 is reported as not faster: within
# what a second timing on a shared CPU moves, and no reason to take INT8's error


def _fields(cls, data: dict) -> dict:
    """The keys of ``data`` that ``cls`` has (a newer writer's extra keys are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclasses.dataclass(frozen=True)
class Artifact:
    size: int
    sha256: str
    role: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What the bundle was built from: a zoo name, a file.py:factory, an .onnx file or an HF directory."""

    name: str
    kind: str  # zoo | python | onnx | hf | decoder
    source: str  # an absolute path for files and directories (a zoo name otherwise)
    source_sha256: str
    task: str | None = None
    relative: str | None = None  # the source's path relative to the bundle (found there when both moved)
    weights_sha256: str | None = None  # a PyTorch source's weights at build (exporter.resolve.weights_sha256)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    exporter: str | None  # dynamo | torchscript; None for an .onnx MODEL
    fallback_reason: str | None
    opset: int | None
    seconds: float
    external_data: bool
    reference: str  # pytorch | onnxruntime: what golden.npz's outputs came from

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OrtBackend:
    graph: str
    precision: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def to_json(self) -> dict:
        return {"graph": self.graph, "precision": self.precision, "providers": list(self.providers)}


@dataclasses.dataclass(frozen=True)
class TrtBackend:
    graph: str
    precision: str
    plan: str | None = None  # None: TensorRT did not build here (``skipped`` says why)
    skipped: str | None = None
    layers: str | None = None  # the engine inspector's JSON
    layer_count: int | None = None
    engine_key: str | None = None
    reused: bool | None = None  # taken from the engine cache
    options: dict | None = None

    def to_json(self) -> dict:
        out = {"graph": self.graph, "precision": self.precision, "plan": self.plan, "skipped": self.skipped}
        if self.plan:
            out.update(layers=self.layers, layer_count=self.layer_count, engine_key=self.engine_key,
                       reused=self.reused, options=self.options)
        return out


@dataclasses.dataclass(frozen=True)
class Backends:
    ort: OrtBackend
    trt: TrtBackend

    def for_target(self, target: str) -> OrtBackend | TrtBackend:
        return {"ort": self.ort, "trt": self.trt}[target]

    def to_json(self) -> dict:
        return {"ort": self.ort.to_json(), "trt": self.trt.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> Backends:
        ort = dict(data["ort"], providers=tuple(data["ort"].get("providers", ("CPUExecutionProvider",))))
        return cls(OrtBackend(**_fields(OrtBackend, ort)), TrtBackend(**_fields(TrtBackend, data["trt"])))


@dataclasses.dataclass(frozen=True)
class Environment:
    """Where the bundle was built: versions, the CPU class (INT8 verdicts of the ort graph hold for
    it), and TensorRT's GPU when it built."""

    python: str | None = None
    platform: str | None = None
    machine: str | None = None
    cpu_model: str | None = None
    cpu_isa: str | None = None
    cpus: int | None = None
    torch: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    ort_providers: tuple[str, ...] = ()
    tensorrt: str | None = None
    tensorrt_status: str | None = None
    cuda: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    hardware_compatibility_level: str | None = None

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), ort_providers=list(self.ort_providers))

    @classmethod
    def from_json(cls, data: dict) -> Environment:
        return cls(**dict(_fields(cls, data), ort_providers=tuple(data.get("ort_providers", ()))))


@dataclasses.dataclass(frozen=True)
class Calibration:
    method: str
    source: str
    samples: int
    evaluation_batches: int
    data_sha256: str
    file: str
    reused: dict[str, bool]
    budget: Budget
    cpu_isa: str | None = None  # where the budget was measured
    evaluation_file: str | None = None  # the held-out batches, kept for compare (None: too large)
    evaluation_samples: int | None = None
    state: tuple[tuple[str, str], ...] = ()  # --state (output, input) pairs: the budget ran as a sequence

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), budget=self.budget.to_json(), state=[list(p) for p in self.state])

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        return cls(**dict(_fields(cls, data), budget=_budget(data["budget"]),
                          state=tuple(tuple(p) for p in data.get("state", ()))))


@dataclasses.dataclass(frozen=True)
class Int8Report:
    """One target's INT8 verdict: the budget, all-INT8 and final metric, what stayed in float (units:
    ``name``, ``op``, ``reason``, and ``with``: the nodes excluded with it), the sensitivity (relative
    squared output error per unit), how it was judged (float emulation for trt, this CPU class's kernels for
    ort) and the ort form chosen.
    For ort, the graph's latency against the FP32 graph's on the build's CPU (``speedup``: FP32 time over INT8
    time, medians of interleaved runs on one held-out batch; None for trt and for bundles from before)."""

    budget: Budget
    met: bool
    full_int8: float
    final: float
    candidates: int
    kept_float: tuple[dict, ...] = ()
    sensitivity: dict[str, float] = dataclasses.field(default_factory=dict)
    judged_by: str | None = None
    cpu_isa: str | None = None
    form: dict | None = None  # ort: {"form", "cpu_isa", "measured", "reason"}
    quantized: bool = True  # False: the target's graph stayed float (``reason``); its backend precision says so
    reason: str | None = None
    evaluations: int | None = None  # quantized graphs the search measured (None: a bundle from before it was recorded)
    latency_ms: float | None = None  # ort: the INT8 graph's median on one held-out batch, on ``cpu_isa``
    fp32_latency_ms: float | None = None  # the FP32 graph's, timed interleaved with it
    speedup: float | None = None  # fp32_latency_ms / latency_ms: below INT8_MIN_SPEEDUP, INT8 is not faster here

    @property
    def not_faster(self) -> bool:
        """INT8 measured no faster than FP32 on the build's CPU (``INT8_MIN_SPEEDUP``)."""
        return self.quantized and self.speedup is not None and self.speedup < INT8_MIN_SPEEDUP

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), budget=self.budget.to_json(), kept_float=list(self.kept_float))

    @classmethod
    def from_json(cls, data: dict) -> Int8Report:
        return cls(**dict(_fields(cls, data), budget=_budget(data["budget"]),
                          kept_float=tuple(data.get("kept_float", ()))))


@dataclasses.dataclass(frozen=True)
class Int4Report:
    """How a decoder's 4-bit weights met their budget (``engines/build/int4.py``): the float graph's and the
    result's perplexity and agreement on the held-out text, which MatMuls went to 8 bits, every try."""

    budget: str
    block_size: int
    accuracy_level: int
    reference: dict  # Score of the float graph: perplexity, agreement, tokens, text
    result: dict  # Score of the chosen graph
    int4: int  # MatMuls at 4 bits
    int8: tuple[str, ...]  # MatMuls at 8 bits, the budget's choice
    tries: tuple[dict, ...]  # {"int8": n, "perplexity", "agreement", "met"[, "rescore": k]} in the order tried
    seconds: float
    rescored_head: str | None = None  # the LM head run as a 4-bit pass + its best candidates in 8 bits
    rescore: int = 0  # how many candidates
    carried: int = 0  # MatMuls whose blocks came from the source file unchanged (a GGUF's Q8_0/Q5_0/Q4_0/Q4_K)
    carried_offsets: int = 0  # of those, with offset blocks (Q4_K, Q4_1) and a block-sum correction

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"int8": list(self.int8), "tries": list(self.tries)}

    @classmethod
    def from_json(cls, data: dict) -> Int4Report:
        return cls(**{**data, "int8": tuple(data.get("int8", ())), "tries": tuple(data.get("tries", ()))})


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """What ``--prune`` removed (``engines/build/prune.py``): the ratio of units (MLP hidden units and conv
    channels; asked and chosen),
    the budget and its metric on the held-out batches against the unpruned graph, the groups and their
    units before, parameters (MLPs and whole graph) before and after, every ratio tried, ONNX Runtime CPU
    latency before and after."""

    requested: str  # "auto" or the ratio asked
    ratio: float  # the ratio applied (0: unchanged)
    budget: Budget
    metric: float | None
    passed: bool
    groups: int
    units: dict  # group (its down-projection node) -> hidden units before
    mlp_params_before: int
    mlp_params_after: int
    tries: tuple[dict, ...]
    latency_ms_before: float | None
    latency_ms_after: float | None
    seconds: float
    units_removed: int = 0
    params_before: int = 0
    params_after: int = 0
    method: str = ("MLP hidden units and conv channels: var(a) x |W_down row|^2; least-squares refit (MLPs, 1x1 convs) "
                   "or mean compensation (k x k convs) in the bias")
    evaluation_file: str | None = None  # the held-out batches judged (compare judges them again)
    calibration: str | None = None  # --calib as given (None: the zoo's data); bench-prune measures with it again
    kept: dict = dataclasses.field(default_factory=dict)  # group -> units it kept (heads, channels or units)
    allocation: str = "uniform"  # or "by sensitivity": each group its own ratio (engines/build/prune.py)
    kinds: dict = dataclasses.field(default_factory=dict)  # group -> "units" | "channels" | "heads"

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"budget": self.budget.to_json(), "tries": list(self.tries)}

    @classmethod
    def from_json(cls, data: dict) -> PruneReport:
        return cls(**{**_fields(cls, data), "budget": _budget(data["budget"]), "tries": tuple(data.get("tries", ()))})


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """What ``--sparsity 2:4`` did to the TensorRT graph (``engines/build/sparsity.py``): the layers made sparse
    and those the budget kept dense, the budget's metric against the dense graph, every try."""

    pattern: str
    budget: Budget
    metric: float | None
    passed: bool
    eligible: int
    sparse: tuple[str, ...]
    dense: tuple[str, ...]
    tries: tuple[dict, ...]
    seconds: float
    evaluation_file: str | None = None  # the held-out batches judged (compare judges them again)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"budget": self.budget.to_json(), "sparse": list(self.sparse),
                                           "dense": list(self.dense), "tries": list(self.tries)}

    @classmethod
    def from_json(cls, data: dict) -> SparsityReport:
        return cls(**{**_fields(cls, data), "budget": _budget(data["budget"]), "sparse": tuple(data["sparse"]),
                      "dense": tuple(data["dense"]), "tries": tuple(data.get("tries", ()))})


@dataclasses.dataclass(frozen=True)
class Accuracy:
    parity_ok: bool | None
    parity_worst: dict | None  # per output max abs / rel error against PyTorch
    graphs: dict[str, dict]  # optimized graph -> per output max abs error against the reference
    int8: dict[str, Int8Report] | None = None  # per target
    int4: dict[str, Int4Report] | None = None  # per target (a decoder's 4-bit weights)
    prune: PruneReport | None = None  # both targets' graphs start from the same pruned graph
    sparsity: SparsityReport | None = None  # the trt graph's 2:4 weights

    def to_json(self) -> dict:
        return {"parity_ok": self.parity_ok, "parity_worst": self.parity_worst, "graphs": self.graphs,
                "int8": {t: r.to_json() for t, r in self.int8.items()} if self.int8 is not None else None,
                **({"int4": {t: r.to_json() for t, r in self.int4.items()}} if self.int4 else {}),
                **({"prune": self.prune.to_json()} if self.prune else {}),
                **({"sparsity": self.sparsity.to_json()} if self.sparsity else {})}

    @classmethod
    def from_json(cls, data: dict) -> Accuracy:
        int8, int4, prune, sparsity = data.get("int8"), data.get("int4"), data.get("prune"), data.get("sparsity")
        return cls(data.get("parity_ok"), data.get("parity_worst"), data.get("graphs", {}),
                   {t: Int8Report.from_json(r) for t, r in int8.items()} if int8 is not None else None,
                   {t: Int4Report.from_json(r) for t, r in int4.items()} if int4 else None,
                   PruneReport.from_json(prune) if prune else None,
                   SparsityReport.from_json(sparsity) if sparsity else None)


@dataclasses.dataclass(frozen=True)
class Manifest:
    planforge_version: str
    created: str
    build_key: str
    model: ModelSource
    inputs: InputSpec
    outputs: tuple[OutputSpec, ...]
    profiles: tuple[Profile, ...]
    precision: str  # fp32 | fp16 | int8 (per graph: backends.*.precision)
    int8_float_layers: tuple[dict, ...]
    fp16_fp32_nodes: tuple[dict, ...]
    calibration: Calibration | None
    export: ExportInfo
    passes: dict[str, list[dict]]
    backends: Backends
    environment: Environment
    accuracy: Accuracy
    build_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, Artifact] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    packed: dict | None = None  # ``planforge pack``: what it came from, runtime_only, what it left out
    trt_check: dict | None = None  # the TensorRT compatibility check of the trt graph (engines.trt_build.compat)
    decoder: DecoderInfo | None = None  # a language-model decoder: cache layout, max length, special tokens

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def int8_report(self, target: str) -> Int8Report | None:
        return (self.accuracy.int8 or {}).get(target)

    def with_artifacts(self, artifacts: dict[str, Artifact]) -> Manifest:
        return dataclasses.replace(self, artifacts=dict(artifacts))

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version, "planforge_version": self.planforge_version,
            "created": self.created, "build_key": self.build_key, "model": self.model.to_json(),
            "inputs": self.inputs.to_json(), "outputs": [o.to_json() for o in self.outputs],
            "profiles": [p.to_json() for p in self.profiles], "precision": self.precision,
            "int8_float_layers": list(self.int8_float_layers), "fp16_fp32_nodes": list(self.fp16_fp32_nodes),
            "calibration": self.calibration.to_json() if self.calibration else None,
            "export": self.export.to_json(), "passes": self.passes, "backends": self.backends.to_json(),
            "environment": self.environment.to_json(), "accuracy": self.accuracy.to_json(),
            "build_seconds": self.build_seconds,
            "artifacts": {name: a.to_json() for name, a in self.artifacts.items()},
            **({"packed": self.packed} if self.packed else {}),
            **({"trt_check": self.trt_check} if self.trt_check else {}),
            **({"decoder": self.decoder.to_json()} if self.decoder else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "manifest.json") -> Manifest:
        """Typed from parsed JSON; schema 1 converted; a ``BundleError`` naming what is malformed."""
        try:
            if data.get("schema_version") == 1:
                data = _from_schema_1(data)
            return cls(
                planforge_version=data["planforge_version"], created=data["created"], build_key=data["build_key"],
                model=ModelSource(**_fields(ModelSource, data["model"])), inputs=InputSpec.from_json(data["inputs"]),
                outputs=tuple(OutputSpec.from_json(o) for o in data["outputs"]),
                profiles=tuple(Profile.from_json(p) for p in data.get("profiles", [])), precision=data["precision"],
                int8_float_layers=tuple(data.get("int8_float_layers", ())),
                fp16_fp32_nodes=tuple(data.get("fp16_fp32_nodes", ())),
                calibration=Calibration.from_json(data["calibration"]) if data.get("calibration") else None,
                export=ExportInfo(**_fields(ExportInfo, data["export"])), passes=data.get("passes", {}),
                backends=Backends.from_json(data["backends"]), environment=Environment.from_json(data["environment"]),
                accuracy=Accuracy.from_json(data["accuracy"]), build_seconds=data.get("build_seconds") or {},
                artifacts={n: Artifact(**_fields(Artifact, a)) for n, a in data["artifacts"].items()},
                schema_version=SCHEMA_VERSION, packed=data.get("packed"), trt_check=data.get("trt_check"),
                decoder=DecoderInfo.from_json(data["decoder"]) if data.get("decoder") else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where} is missing or has a malformed {exc!s}; rebuild the bundle") from exc


def _budget(value) -> Budget:
    if isinstance(value, dict):
        return Budget.from_json(value)
    metric, _, threshold = str(value).split()  # schema 1: "top1 >= 0.99"
    return Budget(metric, float(threshold))


def _from_schema_1(data: dict) -> dict:
    """Schema 1 -> 2: ``unquantized_nodes`` by precision; ``layers`` was the TensorRT layer count."""
    data = dict(data)
    nodes = data.pop("unquantized_nodes", []) or []
    data["int8_float_layers"] = nodes if data.get("precision") == "int8" else []
    data["fp16_fp32_nodes"] = nodes if data.get("precision") == "fp16" else []
    trt = dict(data["backends"]["trt"])
    if trt.get("plan") and isinstance(trt.get("layers"), int):
        trt.update(layer_count=trt["layers"], layers="model.layers.json")
    data["backends"] = dict(data["backends"], trt=trt)
    return data
