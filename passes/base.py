"""The pass framework: ``Pass``, ``PassResult`` and the ``PassManager`` that runs a pipeline.

A pass rewrites an onnx-graphsurgeon graph in place and returns what it did. It declares the
passes that must run before it (``requires``); the manager refuses a pipeline that breaks
that order. With ``verify_feeds`` the manager runs the graph under ONNX Runtime CPU after every
pass that changed it and stops, naming the pass and the output, when the numbers moved.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from foundation.errors import PassError
from foundation.numerics import scaled_atol
from passes.verify import run_graph, worst_difference

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PassResult:
    changed: bool
    stats: dict = dataclasses.field(default_factory=dict)


class Pass:
    """Base class: subclasses implement ``run(graph) -> PassResult``."""

    requires: ClassVar[tuple[type[Pass], ...]] = ()

    def hint(self) -> str:
        """What a user can do when this pass breaks its numeric budget on their model."""
        return f"skip this pass with --skip-pass {self.name} (and report the model: the pass should not fire there)"

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, graph: gs.Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def budget(self, expected: dict[str, np.ndarray]) -> dict[str, tuple[float, float]] | None:
        """Per-output (atol, rtol) this pass may change outputs by; None: the manager's FP32 tolerance."""
        return None

    def verification_model(self, before: onnx.ModelProto, after: onnx.ModelProto) -> onnx.ModelProto:
        """The graph the manager runs to check this pass's numbers (default: its output as written)."""
        return after

    def feeds_after(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds that mean to the graph after this pass what ``feeds`` meant before (default: the same); a pass
        that changes the graph's interface (a static cache buffer) says how, and the manager verifies it and
        every later pass with them."""
        return feeds

    def repair(self, before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> str | None:
        """When the pass broke its budget: a change to its options that should fix it, described, after which
        the manager runs it again on the graph as it was (None: no repair; the budget error stands)."""
        return None

    def __repr__(self) -> str:
        return f"{self.name}()"


@dataclasses.dataclass
class PassRecord:
    name: str
    changed: bool
    stats: dict
    seconds: float
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def op_counts(graph: gs.Graph) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op for n in graph.nodes).items()))


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export keeping the source's IR version and opsets (gs would write onnx 1.23's IR 14)."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for opset in model.opset_import:  # a pass may raise the default domain's opset (FuseStandardAttention)
        if opset.domain in ("", "ai.onnx") and graph.opset and graph.opset > opset.version:
            opset.version = graph.opset
    known = {o.domain for o in like.opset_import} | {"ai.onnx"}
    for domain in sorted({n.domain for n in model.graph.node} - known):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # contrib ops a pass added
    model.producer_name, model.producer_version = like.producer_name, like.producer_version
    return model


def unrepresentable(model: onnx.ModelProto) -> str | None:
    """Why onnx-graphsurgeon cannot round-trip ``model`` (None when it can).

    graphsurgeon 0.6 imports optional-typed values but cannot export them (UnboundLocalError in
    its exporter, seen on ONNX's backend cases test_identity_opt, test_if_opt, test_loop16_seq_none).
    """
    def optional(value_infos) -> bool:
        return any(v.type.HasField("optional_type") or
                   (v.type.HasField("sequence_type") and v.type.sequence_type.elem_type.HasField("optional_type"))
                   for v in value_infos)

    def graphs(g):
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.g.node or attr.g.input:
                    yield from graphs(attr.g)
                for sub in attr.graphs:
                    yield from graphs(sub)

    for g in graphs(model.graph):
        if optional(list(g.input) + list(g.output) + list(g.value_info)) or any(
                n.op_type.startswith("Optional") for n in g.node):
            return "it holds optional-typed values, which onnx-graphsurgeon cannot export"
    return None


class FixedPoint:
    """A group of passes that feed each other: run in order, again, until a round changes nothing."""

    def __init__(self, passes: Sequence[Pass], max_rounds: int = 8):
        self.passes = tuple(passes)
        self.max_rounds = max_rounds

    def __repr__(self) -> str:
        return f"FixedPoint({list(self.passes)!r})"


Step = Pass | FixedPoint


def flatten(steps: Sequence[Step]) -> list[Pass]:
    return [p for s in steps for p in (s.passes if isinstance(s, FixedPoint) else (s,))]


class PassManager:
    """Runs passes in order; checks ``requires``; optionally verifies numbers after each pass (``scaled``:
    the FP32 atol relative to each output's magnitude, ``foundation.numerics.scaled_atol``: a decoder's logits)."""

    def __init__(self, passes: Sequence[Step], verify_feeds: Sequence[dict[str, np.ndarray]] | None = None,
                 atol: float = 1e-5, rtol: float = 1e-4, quiet: bool = False, scaled: bool = False):
        seen: set[type[Pass]] = set()
        for p in flatten(passes):
            missing = [r.__name__ for r in p.requires if r not in seen]
            if missing:
                raise PassError(
                    f"pipeline order: {p.name} requires {', '.join(missing)} to run before it; "
                    "fix the pipeline tuple in passes/__init__.py"
                )
            seen.add(type(p))
        self.passes = tuple(passes)
        self.verify_feeds = list(verify_feeds or [])
        self.atol, self.rtol, self.scaled = atol, rtol, scaled
        self.quiet = quiet  # log every pass at DEBUG (for managers run many times, e.g. sensitivity analysis)

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord]]:
        if reason := unrepresentable(model):
            logger.warning("passes skipped, the graph is returned unchanged: %s", reason)
            return model, [PassRecord("PassManager", False, {"skipped": reason}, 0.0, {}, {})]
        graph = gs.import_onnx(model)
        try:
            reference = [run_graph(model, f) for f in self.verify_feeds]
        except Exception as exc:  # ONNX Runtime raises its own types
            raise PassError(f"the verification feeds do not run the graph before the passes under ONNX Runtime: "
                            f"{str(exc).splitlines()[0][:300]}; give feeds (shapes and value ranges) it runs on, "
                            "or verify nothing") from exc
        records: list[PassRecord] = []
        for step in self.passes:
            if isinstance(step, FixedPoint):
                for _ in range(step.max_rounds):
                    if not any([self._run_one(p, graph, model, reference, records) for p in step.passes]):
                        break
            else:
                self._run_one(step, graph, model, reference, records)
        return to_model(graph, model), records

    MAX_REPAIRS = 16

    def _run_one(self, p: Pass, graph: gs.Graph, model: onnx.ModelProto, reference, records: list) -> bool:
        """Run ``p``; when verification fails and the pass can repair itself (``Pass.repair``), run it
        again from the graph as it was, up to ``MAX_REPAIRS`` times."""
        snapshot = to_model(graph, model) if self.verify_feeds and type(p).repair is not Pass.repair else None
        for attempt in range(self.MAX_REPAIRS + 1):
            try:
                return self._run_once(p, graph, model, reference, records)
            except PassError as exc:
                failed = getattr(exc, "candidate", None)
                if snapshot is None or failed is None or attempt == self.MAX_REPAIRS:
                    raise
                change = p.repair(snapshot, failed, exc.feeds)
                if change is None:
                    raise
                logger.warning("%s broke its budget (%s); %s, and runs again", p.name, exc, change)
                restored = gs.import_onnx(snapshot)
                graph.nodes, graph.inputs, graph.outputs = restored.nodes, restored.inputs, restored.outputs
                records.pop()
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_once(self, p: Pass, graph: gs.Graph, model: onnx.ModelProto, reference, records: list) -> bool:
        before = op_counts(graph)
        before_model = to_model(graph, model) if self.verify_feeds and type(p).verification_model is not \
            Pass.verification_model else None
        start = time.perf_counter()
        try:
            result = p.run(graph)
        except PassError:
            raise
        except Exception as exc:  # a pass bug must name the pass
            raise PassError(f"pass {p.name} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        record = PassRecord(p.name, result.changed, result.stats, seconds, before, op_counts(graph))
        records.append(record)
        log = logger.info if result.changed and not self.quiet else logger.debug
        log("%s: %s in %.2f s (%d -> %d nodes)", p.name, result.stats or "no change", seconds,
            sum(before.values()), sum(record.nodes_after.values()))
        if result.changed and self.verify_feeds:
            feeds = [p.feeds_after(f) for f in self.verify_feeds]
            self._verify(p, to_model(graph, model), reference, before_model, feeds)
            self.verify_feeds = feeds
        return result.changed

    def _verify(self, p: Pass, candidate: onnx.ModelProto, reference: list[dict[str, np.ndarray]],
                before: onnx.ModelProto | None = None, verify_feeds: list | None = None) -> None:
        """Compare with the graph before the pass; the result becomes the next pass's reference."""
        checked = p.verification_model(before, candidate) if before is not None else candidate
        for k, (feeds, expected) in enumerate(zip(verify_feeds or self.verify_feeds, reference)):
            try:
                actual = run_graph(checked, feeds)
            except Exception as exc:  # ORT raises its own types
                raise PassError(f"after pass {p.name} the graph no longer runs under ONNX Runtime: {exc}") from exc
            tolerances = p.budget(expected) or {
                n: (scaled_atol(self.atol, e) if self.scaled else self.atol, self.rtol) for n, e in expected.items()}
            name, err = worst_difference(actual, expected, tolerances)
            if name is not None:
                shapes = {key: list(v.shape) for key, v in feeds.items()}
                atol, rtol = tolerances[name]
                error = PassError(
                    f"pass {p.name} changed output {name!r} by {err:.3g} (atol={atol:.3g}, rtol={rtol:g}) "
                    f"at input shapes {shapes}; {p.hint()}"
                )
                error.candidate, error.feeds = candidate, feeds  # for Pass.repair
                raise error
            reference[k] = actual
