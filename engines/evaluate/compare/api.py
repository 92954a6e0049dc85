"""``planforge compare BUNDLE``: every artifact of a bundle against its reference, with Polygraphy.

Runners (``engines.evaluate.compare.runners``): the reference first, PyTorch when the bundle was exported
from a PyTorch model whose source still hashes to the manifest's ``source_sha256`` (else ONNX
Runtime on the exported graph); then ONNX Runtime on the exported graph, ONNX Runtime on each
optimized graph, planforge's runtime on each backend that can run here, and Polygraphy's TensorRT
runner on the plan when TensorRT and a GPU are present. ``Comparator.run`` runs them all on one
data set (``engines.evaluate.compare.data``); ``Comparator.compare_accuracy`` checks each against the
reference with ``SimpleCompareFunc`` and the tolerances of its precision (``engines.evaluate.compare.tolerances``).

Beside Polygraphy's error statistics, each pair gets metrics for deciding whether a difference
matters: mean per-sample cosine similarity per output, top-1 agreement for classifiers, and the
INT8 budget's own metric (which is what decides an INT8 graph). A model with a task metric
(``digits_cnn``: test-split accuracy) gets it per runner.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from engines.bundle import Manifest, read_manifest, update_report, verified_path, write_atomic
from engines.evaluate.compare.data import load_data
from engines.evaluate.compare.polygraphy_lines import polygraphy_commands
from engines.evaluate.compare.results import CompareRequest, CompareResult, PairResult, Side
from engines.evaluate.compare.runners import (
    DecoderGraphRunner,
    PlanforgeRunner,
    TorchRunner,
    onnxrt_runner,
    polygraphy_quiet,
    tensorrt_runner,
)
from engines.evaluate.compare.tolerances import (
    OutputTolerance,
    check_output_names,
    tolerances,
)
from engines.runtime import ORDER, BundleView, unavailable
from engines.runtime.cpu import detect
from foundation.errors import UsageError
from foundation.numerics import Budget, budget_metric, cosine_per_sample, top1_agreement
from foundation.sequence import judged_outputs, run_sequence
from foundation.spec import InputSpec

logger = logging.getLogger(__name__)


def compare(request: CompareRequest) -> CompareResult:
    """Run every side on the same data, check each against the reference, write the report."""
    from polygraphy.comparator import Comparator  # noqa: PLC0415 - polygraphy is heavy

    bundle = Path(request.bundle)
    manifest = read_manifest(bundle)
    spec = manifest.inputs
    outputs = manifest.output_names
    overrides = request.overrides()
    check_output_names(overrides, outputs)
    module = _pytorch_module(manifest, request.reference, request.cache_dir, bundle)
    data = load_data(request.data, bundle, manifest, spec, request.iterations, request.point, request.seed, module)
    sides, skipped = _sides(bundle, manifest, spec, outputs, module, request.threads)
    logger.info("comparing %s against %s on %s", ", ".join(s.name for s in sides[1:]), sides[0].name,
                data.description)
    state = manifest.calibration.state if manifest.calibration else ()
    with polygraphy_quiet():
        if state:
            results = _run_sequences(sides, data.feeds, state)
        else:
            results = Comparator.run([s.runner for s in sides], data_loader=data.feeds,
                                     save_inputs_path=str(request.save_inputs) if request.save_inputs else None)
    prune = manifest.accuracy.prune if manifest.accuracy else None
    sparsity = manifest.accuracy.sparsity if manifest.accuracy else None
    pruned = prune is not None and prune.ratio > 0  # a pruned graph differs by design: its budget judges it
    sparse = sparsity is not None and bool(sparsity.sparse)  # so does the trt graph with 2:4 weights
    budget = manifest.calibration.budget if manifest.calibration else \
        (prune.budget if pruned else sparsity.budget if sparse else None)
    pairs = [_check_pair(results, sides[0], side, i, overrides, budget, manifest.model.task, data.feeds, state,
                         (pruned and side.artifact != "model.onnx")  # every side but the unpruned export
                         or (sparse and _runs_trt_graph(side, manifest)))
             for i, side in enumerate(sides[1:], start=1)]
    task = _task_metric(manifest, sides) or _decoder_metric(bundle, manifest, request.threads)
    if task and task.get("budget"):  # a 4-bit decoder: its perplexity budget decides, as at build
        for pair in pairs:
            if pair.precision == "int4":
                pair.budget = {"budget": task["budget"], "metric": task["budget"].split("=")[0],
                               "value": task["judged"], "passed": task["passed"]}
                pair.passed = pair.passed and task["passed"]
    result = CompareResult(bundle, data, sides[0].name, pairs, skipped, task,
                           polygraphy_commands(bundle, manifest, pairs, request.save_inputs, len(data.feeds)),
                           _cpu(manifest), stateful=bool(state))
    result.report = _write_report(bundle, result, request.report)
    return result


def _runs_trt_graph(side: Side, manifest) -> bool:
    """The side runs the TensorRT graph or its plan (where 2:4 weights are)."""
    return side.target == "trt" or side.artifact in ("model.trt.onnx", "model.plan") or side.name.startswith(
        ("tensorrt", "planforge trt"))


def _run_sequences(sides: list[Side], feeds: list[dict], state) -> object:
    """Polygraphy's RunResults for a stateful bundle: each runner runs the batches in order feeding its
    own state outputs back (``foundation.sequence``); Comparator.run gives every runner the same
    feeds, which would hide drift through the state."""
    from polygraphy.comparator import IterationResult, RunResults  # noqa: PLC0415 - polygraphy is heavy

    results = RunResults()
    for side in sides:
        with side.runner as runner:
            names: list[str] = []

            def infer(feed, runner=runner, names=names):
                out = runner.infer(feed)
                names[:] = list(out.keys())
                return [np.ascontiguousarray(v) for v in out.values()]  # Polygraphy's comparator needs it

            outputs = run_sequence(infer, names, feeds, state)  # ``names`` fills in on the first call
            iterations = [IterationResult(dict(zip(names, out)), runner_name=runner.name) for out in outputs]
        results.append((side.runner.name, iterations))
    return results


def _cpu(manifest: Manifest) -> dict:
    """This CPU's class beside the one the INT8 ONNX Runtime graph was validated on at build: the INT8
    ort sides' budget verdicts here re-validate it on this machine (``engines.build.int8``)."""

    report = manifest.int8_report("ort")
    return {**detect().to_json(), "int8_ort_validated_on": report.cpu_isa if report else None}


def _pytorch_module(manifest: Manifest, reference: str, cache_dir: Path, bundle: Path):
    """The PyTorch module the bundle came from, or None when the reference is the exported graph."""
    model = manifest.model
    if reference == "onnx" or (model.kind == "onnx" and reference == "auto"):
        return None
    if model.kind == "onnx":
        raise UsageError(f"--reference pytorch: the bundle was built from an ONNX file ({model.source}); "
                         "there is no PyTorch model to compare against. Use --reference onnx")
    from exporter.resolve import resolve_bundle_model  # noqa: PLC0415 - imports torch

    resolved = resolve_bundle_model(model.source, model.source_sha256, cache_dir, "rebuild the bundle, or compare "
                                    "against the exported graph with --reference onnx", bundle, model.relative,
                                    model.weights_sha256)
    return resolved.module


def _sides(bundle: Path, manifest: Manifest, spec: InputSpec, outputs: list[str], module,
           threads: int | None) -> tuple[list[Side], dict[str, str]]:

    backends = manifest.backends
    exported = verified_path(bundle, manifest, "model.onnx")
    for extra in [n for n, a in manifest.artifacts.items() if a.role == "external-data"]:
        verified_path(bundle, manifest, extra)
    sides = [Side("pytorch", "fp32", TorchRunner(module, spec, outputs, threads=threads))] if module is not None else []
    sides.append(
        Side("onnxruntime model.onnx", "fp32", onnxrt_runner(exported, "onnxruntime model.onnx"), "model.onnx")
    )
    for target in ("ort", "trt"):
        entry = backends.for_target(target)
        if entry.graph in manifest.artifacts:
            # one graph for both targets (identical bytes): the trt side runs it as written, the ort side optimized
            shared = target == "trt" and backends.ort.graph == entry.graph
            name = f"onnxruntime {entry.graph}{' as written' if shared else ''}"
            runner = onnxrt_runner(verified_path(bundle, manifest, entry.graph), name, optimize=target != "trt")
            if manifest.decoder is not None:
                runner = DecoderGraphRunner(runner, spec, target == "trt" and manifest.decoder.trt_cache == "static")
            sides.append(Side(name, entry.precision, runner, entry.graph, target))
    loaded, skipped = BundleView(bundle), {}
    for backend in ORDER:
        if (reason := unavailable(backend, loaded)) is not None:
            skipped[f"planforge {backend}"] = reason
            logger.debug("not comparing planforge %s: %s", backend, reason)
            continue
        target = "trt" if backend == "trt" else "ort"
        sides.append(Side(f"planforge {backend}", backends.for_target(target).precision,
                          PlanforgeRunner(bundle, backend, spec, threads=threads)))
        if backend == "trt":  # Polygraphy's own TensorRT runner on the same plan, as a second opinion
            plan = verified_path(bundle, manifest, backends.trt.plan)
            sides.append(Side("tensorrt (polygraphy)", backends.trt.precision, tensorrt_runner(plan), plan.name))
    if "planforge trt" in skipped:
        skipped["tensorrt (polygraphy)"] = skipped["planforge trt"]
    return sides, skipped


def _check_pair(results, reference: Side, side: Side, index: int, overrides: dict, budget, task,
                feeds: list[dict], state=(), pruned: bool = False) -> PairResult:
    from polygraphy.comparator import Comparator, SimpleCompareFunc  # noqa: PLC0415 - polygraphy is heavy

    ref_iters, act_iters = results[reference.runner.name], results[side.runner.name]
    names = list(ref_iters[0].keys())
    references = {n: [np.asarray(it[n]) for it in ref_iters] for n in names}
    judged = [names[i] for i in judged_outputs(names, state)] if budget and budget.output is None and \
        budget.metric != "user" else names  # the outputs the budget judges, as the build did (engines.build.int8)
    by_budget = side.precision == "int8" or pruned  # the budget decides (the build judged it so)
    tols = tolerances("pruned" if pruned and side.precision != "int8" else side.precision, references,
                      budget if by_budget else None, overrides, judged)
    func = SimpleCompareFunc(atol={n: _bound(t.atol) for n, t in tols.items()},
                             rtol={n: t.rtol for n, t in tols.items()},
                             check_error_stat={n: t.stat for n, t in tols.items()},
                             error_quantile={n: t.quantile for n, t in tols.items()})
    with polygraphy_quiet():
        accuracy = Comparator.compare_accuracy(results, comparisons=[(0, index)], compare_func=func)[0]
    per_iter = accuracy[(reference.runner.name, side.runner.name)]
    outputs = {}
    for name in names:
        ref = references[name]
        act = [np.asarray(it[name]) for it in act_iters]
        outputs[name] = {**_stats([it[name] for it in per_iter], tols[name]),
                         "cosine": cosine(ref, act), "top1": top1(ref, act) if task == "classification" else None}
    verdict = None
    if by_budget and budget:
        verdict = _budget_verdict(budget, [[np.asarray(it[n]) for n in judged] for it in ref_iters],
                                  [[np.asarray(it[n]) for n in judged] for it in act_iters], judged, feeds)
    passed = all(o["passed"] for o in outputs.values()) and (verdict is None or verdict["passed"])
    graph = side.artifact if side.target else None
    return PairResult(reference.name, side.name, side.precision, outputs, verdict, passed, graph, side.target)


def _bound(atol: float | None) -> float:
    return math.inf if atol is None else atol


def _stats(results: list, tol: OutputTolerance) -> dict:
    """Polygraphy's per-iteration statistics, worst (mean: average) over the iterations."""
    def worst(field):
        values = [getattr(r, field) for r in results if getattr(r, field) is not None]
        return float(max(values)) if values else None

    return {"max_abs": worst("max_absdiff"), "max_rel": worst("max_reldiff"),
            "mean_abs": float(np.mean([r.mean_absdiff for r in results])), "median_abs": worst("median_absdiff"),
            "quantile_abs": worst("quantile_absdiff"), "tolerance": tol.to_json(),
            "passed": all(bool(r) for r in results)}


def cosine(reference: list[np.ndarray], actual: list[np.ndarray]) -> float | None:
    """Mean per-sample cosine similarity (``foundation.numerics``); None for non-float outputs."""
    if any(r.dtype.kind != "f" or r.shape != a.shape or r.ndim == 0 for r, a in zip(reference, actual)):
        return None
    values = [cosine_per_sample(r, a) for r, a in zip(reference, actual)]
    return float(np.concatenate(values).mean()) if values else None


def top1(reference: list[np.ndarray], actual: list[np.ndarray]) -> float | None:
    """Share of samples whose argmax over the last axis agrees (classifier logits)."""
    if any(r.ndim < 2 or r.shape[-1] < 2 or r.shape != a.shape for r, a in zip(reference, actual)):
        return None
    return top1_agreement(reference, actual)


def _budget_verdict(budget: Budget, reference: list, actual: list, names: list[str], feeds: list[dict]) -> dict:
    value = budget_metric(budget, reference, actual, names, feeds)
    return {"metric": budget.metric, "value": float(value), "budget": str(budget), "passed": budget.met(value)}


def _task_metric(manifest: Manifest, sides: list[Side]) -> dict | None:
    """digits_cnn's test-split accuracy per runner (the zoo's one model with labelled data)."""
    if manifest.model.kind != "zoo" or manifest.model.name != "digits_cnn":
        return None
    from polygraphy.comparator import Comparator  # noqa: PLC0415 - polygraphy is heavy

    from exporter.zoo.digits import digits_split, logits_accuracy  # noqa: PLC0415 - imports torch

    images, labels = digits_split("test")
    batch = manifest.inputs["x"].dims[0].max
    feeds = [{"x": images[i:i + batch]} for i in range(0, len(images), batch)]
    with polygraphy_quiet():
        results = Comparator.run([s.runner for s in sides], data_loader=feeds)
    accuracy = {}
    for side in sides:
        logits = np.concatenate([np.asarray(it["logits"]) for it in results[side.runner.name]])
        accuracy[side.name] = logits_accuracy(logits)
    return {"metric": "digits test accuracy", "samples": len(labels), "values": accuracy}


def _decoder_metric(bundle: Path, manifest: Manifest, threads: int | None) -> dict | None:
    """A decoder bundle's perplexity and next-token agreement on held-out text (what its 4-bit budget judged
    at build, ``engines/build/int4.py``): the exported FP32 graph as the reference, the bundle's ONNX Runtime
    graph as planforge runs it. None without a decoder or a tokenizer."""
    decoder = manifest.decoder
    if decoder is None or "tokenizer.json" not in manifest.artifacts:
        return None
    import dataclasses  # noqa: PLC0415 - only for decoders

    from engines.runtime import load  # noqa: PLC0415
    from engines.runtime.generate import Generator  # noqa: PLC0415
    from engines.runtime.generate.perplexity import evaluation_ids, score  # noqa: PLC0415
    from engines.runtime.generate.text import Tokenizer  # noqa: PLC0415
    from foundation.decoder import DecoderBudget  # noqa: PLC0415
    from foundation.ort_session import create_session  # noqa: PLC0415

    verified_path(bundle, manifest, "tokenizer.json")
    ids = evaluation_ids(Tokenizer(bundle).encode, decoder.bos, min(512, decoder.max_length))
    exported = create_session(verified_path(bundle, manifest, "model.onnx"), threads)
    reference, choices = score(Generator(exported, dataclasses.replace(decoder, cache="grow")), ids)
    with load(bundle, backend="ort-cpu", threads=threads) as runner:
        ours, _ = score(runner.generator(), ids, choices)
    result = {"metric": f"perplexity on {reference.text}, next-token agreement", "samples": len(ids),
              "values": {"onnxruntime model.onnx": reference.perplexity, "planforge ort-cpu": ours.perplexity},
              "agreement": {"planforge ort-cpu": ours.agreement}}
    report = manifest.accuracy.int4.get("ort") if manifest.accuracy.int4 else None
    if report is not None:
        budget = DecoderBudget.parse(report.budget)
        result.update(budget=str(budget), passed=budget.met(ours.perplexity, ours.agreement, reference.perplexity),
                      judged=ours.perplexity if budget.metric == "perplexity" else ours.agreement)
    return result


def _write_report(bundle: Path, result: CompareResult, report: Path | None) -> Path:
    """The ``compare`` section of the bundle's report.json (the manifest updated), or ``report``."""
    if report is None:
        return update_report(bundle, "compare", result.to_json())
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(report, (json.dumps({"compare": result.to_json()}, indent=2) + "\n").encode())
    return report
