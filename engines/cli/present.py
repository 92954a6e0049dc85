"""Tables for the CLI: build summary, bundle inspection, zoo listing, output summaries (rich)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engines.bundle import Int8Report, Manifest


def _row(table: Table, *cells) -> None:
    """Add a row of plain text: spec strings like [batch=1..8] are not rich markup."""
    table.add_row(*(escape(str(c)) for c in cells))


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def build_summary(console: Console, out: Path, manifest: Manifest, reused: bool, seconds: float,
                  title: str | None = None) -> None:
    table = Table(title=title or f"bundle {out}" + (" (reused)" if reused else f" built in {seconds:.1f} s"))
    table.add_column("artifact")
    table.add_column("role")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    for name, art in manifest.artifacts.items():
        _row(table, name, art.role, human_size(art.size), art.sha256[:12])
    console.print(table)
    backends = manifest.backends
    available = ["ort-cpu"] + (["trt"] if backends.trt.plan else [])
    parity = manifest.accuracy.parity_worst or {}
    worst = max((v["max_abs"] for v in parity.values()), default=None)
    console.print(f"backends available: {', '.join(available)}")
    if worst is not None:
        console.print(f"parity PyTorch vs ONNX Runtime: max abs error {worst:.2g} (ok)")
    prune = manifest.accuracy.prune
    if prune is not None:
        if prune.ratio:
            latency = (f"; ONNX Runtime CPU {prune.latency_ms_before:.2f} -> {prune.latency_ms_after:.2f} ms"
                       if prune.latency_ms_before and prune.latency_ms_after else "")
            removed = collections.Counter()
            for name, kind in prune.kinds.items():
                removed[kind] += prune.units[name] - prune.kept.get(name, prune.units[name])
            what = ", ".join(f"{n} {kind}" for kind, n in removed.items() if n) or f"{prune.units_removed} units"
            console.print(f"pruned {prune.ratio:.0%} of the prunable groups' parameters ({prune.allocation}: {what} "
                          f"in {prune.groups} groups; parameters {prune.params_before:,} -> {prune.params_after:,}); "
                          f"budget {prune.budget} met ({prune.metric:.4f}){latency}")
        else:
            console.print(f"--prune {prune.requested}: nothing pruned ({prune.groups} groups; no ratio kept the "
                          f"budget {prune.budget})" if prune.groups else f"--prune {prune.requested}: no group "
                          "to prune in this graph")
    sparsity = manifest.accuracy.sparsity
    if sparsity is not None:
        judged = "" if sparsity.metric is None else f"; budget {sparsity.budget} met ({sparsity.metric:.4f})"
        console.print(f"2:4 sparsity (trt): {len(sparsity.sparse)} of {sparsity.eligible} eligible layers sparse, "
                      f"{len(sparsity.dense)} kept dense by the budget{judged}")
    for target, report in (manifest.accuracy.int8 or {}).items():
        if not report.quantized:
            console.print(f"INT8 {target}: model.{target}.onnx stays FP32: {escape(report.reason or '')} "
                          f"(all-INT8 {report.full_int8:.4f}; {_judged(report)}; --require-int8 {target} makes "
                          "this an error)")
            continue
        console.print(f"INT8 {target}: budget {report.budget} {'met' if report.met else 'NOT met'} "
                      f"({report.final:.4f}; all-INT8 {report.full_int8:.4f}; "
                      f"{len(report.kept_float)} of {report.candidates} units kept in float"
                      f"{f' after {report.evaluations} evaluations' if report.evaluations else ''}; {_judged(report)}"
                      f"{f'; {report.speedup:.2f}x FP32 speed' if report.speedup is not None else ''})")
        if report.not_faster:
            console.print(f"INT8 {target}: NOT FASTER than FP32 on the build's {report.cpu_isa} CPU: "
                          f"{report.speedup:.2f}x (FP32 {report.fp32_latency_ms:.4g} ms, INT8 {report.latency_ms:.4g} "
                          "ms per held-out batch); the FP32 graph serves at least as fast without the INT8 error "
                          "(--precision fp32)")
    for target, report in (manifest.accuracy.int4 or {}).items():
        result, reference = report.result, report.reference
        scored = (f"perplexity {result['perplexity']:.3f} (float {reference['perplexity']:.3f}), agreement "
                  f"{result['agreement']:.3f}" if "perplexity" in result else "the ort graph's verdict applied")
        console.print(f"int4 {target}: {report.int4} MatMuls at 4 bits, {len(report.int8)} at 8 (block "
                      f"{report.block_size}); budget {report.budget}: {scored}"
                      + (f"; {report.carried} hold the GGUF's own blocks" if report.carried else "")
                      + (f" ({report.carried_offsets} with offsets)" if report.carried_offsets else "")
                      + (f"; LM head rescored ({report.rescore} candidates in 8 bits)" if report.rescored_head else ""))
    if manifest.trt_check:
        check = manifest.trt_check
        console.print(f"TensorRT {check['tensorrt_version']} compatibility: {check['nodes']} nodes, {check['refused']} "
                      f"refused, {check['check']} to check" + (" (planforge check-trt BUNDLE lists them)"
                                                              if check["findings"] else ""))
    if backends.trt.skipped:
        console.print(f"TensorRT skipped: {escape(backends.trt.skipped)}")


def _judged(report: Int8Report) -> str:
    """How an INT8 verdict was measured: float emulation (trt) or this CPU class's kernels and form (ort)."""
    if report.form:
        return f"form {report.form['form']}, measured on {report.cpu_isa}"
    return report.judged_by or "measured with ONNX Runtime"


def inspect_bundle(console: Console, path: Path, manifest: Manifest) -> None:
    model = manifest.model
    console.print(f"[bold]{escape(str(path))}[/bold]: {model.name} ({model.kind}: {escape(model.source)}), "
                  f"precision {manifest.precision}, schema {manifest.schema_version}, "
                  f"planforge {manifest.planforge_version}")
    io = Table(title="inputs and outputs")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for tensor in manifest.inputs:
        _row(io, "in", tensor.name, tensor.dtype, tensor.layout)
    for output in manifest.outputs:
        _row(io, "out", output.name, output.dtype, str(list(output.shape)))
    console.print(io)
    for target, records in manifest.passes.items():
        changed = sum(1 for r in records if r["changed"])
        console.print(pass_table(f"passes ({target}): {len(records)} ran, {changed} changed the graph", records))
        if records:
            console.print(op_diff_table(f"ops before/after ({target})", records[0]["nodes_before"],
                                        records[-1]["nodes_after"]))
    prune = manifest.accuracy.prune
    if prune is not None and prune.kept:  # what each group kept
        table = Table(title=f"pruned groups ({prune.allocation})")
        for col in ("group (its down-projection)", "kind", "before", "kept"):
            table.add_column(col)
        for name, before in prune.units.items():
            _row(table, name, prune.kinds.get(name, ""), str(before), str(prune.kept.get(name, before)))
        console.print(table)
    seconds = sum(manifest.build_seconds.values())
    built = f"built {manifest.created}" + (f" in {seconds:.1f} s" if seconds else "")
    build_summary(console, path, manifest, reused=False, seconds=0.0, title=f"bundle {path} ({built})")


def pass_table(title: str, records: list[dict]) -> Table:
    table = Table(title=title)
    for col in ("pass", "changed", "nodes before", "nodes after", "ms", "stats"):
        table.add_column(col)
    for r in records:
        _row(table, r["name"], "yes" if r["changed"] else "", str(sum(r["nodes_before"].values())),
                      str(sum(r["nodes_after"].values())), f"{1000 * r['seconds']:.0f}", str(r["stats"] or ""))
    return table


def op_diff_table(title: str, before: dict[str, int], after: dict[str, int]) -> Table:
    """Node count per op type before and after a pipeline, changed rows first."""
    table = Table(title=title)
    for col in ("op", "before", "after"):
        table.add_column(col, justify="left" if col == "op" else "right")
    rows = sorted(set(before) | set(after), key=lambda op: (before.get(op, 0) == after.get(op, 0), op))
    for op in rows:
        _row(table, op, before.get(op, 0), after.get(op, 0))
    _row(table, "total", sum(before.values()), sum(after.values()))
    return table


def optimize_summary(console: Console, out: Path, records: list[dict], worst: dict[str, float]) -> None:
    console.print(pass_table("passes", [r for r in records if r["changed"]]))
    if records:
        console.print(op_diff_table("ops before/after", records[0]["nodes_before"], records[-1]["nodes_after"]))
    console.print(f"wrote {escape(str(out))}; max abs difference from the input graph: "
                  + (", ".join(f"{n} {v:.2g}" for n, v in worst.items()) or "not compared"))


def inspect_onnx(console: Console, path: Path, inputs: list, outputs: list, ops: dict[str, int]) -> None:
    console.print(f"[bold]{escape(str(path))}[/bold]: {sum(ops.values())} nodes")
    table = Table()
    for col in ("", "name", "dtype", "shape"):
        table.add_column(col)
    for kind, items in (("in", inputs), ("out", outputs)):
        for name, dtype, shape in items:
            _row(table, kind, name, dtype, str(shape))
    console.print(table)
    console.print("ops: " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])))


def zoo_table(console: Console, entries) -> None:
    table = Table(title="planforge zoo")
    for col in ("name", "task", "inputs", "description"):
        table.add_column(col)
    for e in entries:
        _row(table, e.name, e.task, "\n".join(e.inputs), e.description)
    console.print(table)


def output_summary(console: Console, backend: str, outputs: dict[str, np.ndarray]) -> None:
    table = Table(title=f"outputs ({backend})")
    for col in ("name", "dtype", "shape", "min", "max", "mean"):
        table.add_column(col)
    for name, value in outputs.items():
        v = value.astype(np.float64) if value.size else np.zeros(1)
        _row(
            table, name, str(value.dtype), str(list(value.shape)), f"{v.min():.4g}", f"{v.max():.4g}", f"{v.mean():.4g}"
        )
    console.print(table)


def bench_table(console: Console, results) -> None:
    table = Table(title="passes on ONNX Runtime CPU (ORT graph optimizations on in both; opt shapes)")
    for col in ("model", "target", "nodes", "pass s", "exported ms", "optimized ms", "speedup"):
        table.add_column(col, justify="left" if col in ("model", "target") else "right")
    for r in results:
        _row(table, r.model, r.target, f"{r.nodes_before} -> {r.nodes_after}", f"{r.pass_seconds:.2f}",
             f"{r.exported_ms:.2f}", f"{r.optimized_ms:.2f}", f"{r.speedup:.2f}x")
    console.print(table)


def bench_int8_table(console: Console, rows, environment: dict, threads: int) -> None:
    table = Table(title=f"INT8 on ONNX Runtime CPU, {environment['cpu_model']} ({environment['cpu_isa']}), {threads} "
                        "thread(s) (same calibration data; speed vs the exported FP32 graph)")
    for col in ("model", "variant", "ms", "vs fp32", "metric", "value", "kept float", "judged by"):
        table.add_column(col, justify="left" if col in ("model", "variant", "metric") else "right")
    base = {r.model: r.latency_ms for r in rows if r.variant == "fp32"}
    for r in rows:
        _row(table, r.model, r.variant, f"{r.latency_ms:.2f}", f"{base[r.model] / r.latency_ms:.2f}x", r.metric,
             f"{r.value:.4f}", "" if r.kept_float is None else r.kept_float, r.judged_by)
    console.print(table)


def _num(value, fmt: str = ".3g") -> str:
    return "" if value is None else format(value, fmt)


def compare_table(console: Console, result) -> None:
    """One row per runner pair and output: Polygraphy's statistics, the tolerance, our metrics."""
    table = Table(title=f"compare {result.bundle} (reference: {result.reference}; data: {result.data.description})")
    for col in ("runner", "prec", "output", "check", "max abs", "mean abs", "max rel", "atol / rtol", "cosine",
                "top-1", "result"):
        table.add_column(
            col, justify="right" if col in ("max abs", "mean abs", "max rel", "cosine", "top-1") else "left"
        )
    for pair in result.pairs:
        for name, out in pair.outputs.items():
            tol = out["tolerance"]
            bound = "recorded (budget decides)" if tol["atol"] is None else f"{tol['atol']:.3g} / {tol['rtol']:.3g}"
            check = tol["stat"] + (f" q{tol['quantile']:g}" if tol["stat"] == "quantile" else "")
            _row(table, pair.runner, pair.precision, name, check, _num(out["max_abs"]), _num(out["mean_abs"]),
                 _num(out["max_rel"]), bound + (" (override)" if tol["source"] == "override" else ""),
                 _num(out["cosine"], ".6f"), _num(out["top1"], ".4f"), "pass" if out["passed"] else "FAIL")
        if pair.budget:
            b = pair.budget
            _row(table, pair.runner, pair.precision, "(all)", f"budget {b['budget']}", "", "", "", "",
                 "", "", f"{b['metric']} {b['value']:.4f} " + ("pass" if b["passed"] else "FAIL"))
    console.print(table)
    if result.task_metric:
        metric = result.task_metric
        task = Table(title=f"{metric['metric']} ({metric['samples']} samples)")
        task.add_column("runner")
        agreement = metric.get("agreement")
        task.add_column("perplexity" if agreement is not None else "accuracy", justify="right")
        if agreement is not None:
            task.add_column("agreement", justify="right")
        for name, value in metric["values"].items():
            extra = [] if agreement is None else [f"{agreement[name]:.4f}" if name in agreement else "reference"]
            _row(task, name, f"{value:.4f}", *extra)
        console.print(task)
        if "budget" in metric:
            console.print(f"budget {metric['budget']}: " + ("pass" if metric["passed"] else "FAIL"))
    for name, reason in result.skipped.items():
        console.print(f"not compared: {escape(name)}: {escape(reason)}")
    built, here = result.cpu.get("int8_ort_validated_on"), result.cpu.get("cpu_isa")
    if built:
        verdicts = [p.budget["passed"] for p in result.pairs if p.budget
                    and (p.target == "ort" or p.runner.startswith("planforge ort"))]
        console.print(f"INT8 ONNX Runtime graph: validated on {built} at build; re-validated here on {here}: "
                      f"{'budget met' if all(verdicts) else 'budget NOT met'}"
                      + ("" if built == here else " (another CPU class: its integer kernels differ)"))
    console.print(f"wrote {escape(str(result.report))}")
    if result.polygraphy:
        console.print("the same ONNX Runtime checks with Polygraphy's CLI (run the first line first):")
        for line in result.polygraphy:
            console.print(f"  {escape(line)}", soft_wrap=True)
    elif result.stateful:
        console.print("no polygraphy run lines: Polygraphy runs each batch on its own and cannot feed the state back")
    else:
        console.print("add --save-inputs FILE.json for polygraphy run lines that repeat these checks")


def bench_bundle_table(console: Console, doc: dict) -> None:
    """Per backend and batch: latency percentiles, throughput, the ratio to PyTorch eager, memory, build time."""
    env = doc["environment"]
    table = Table(title=f"{doc['model']}: {env.get('cpu_model')} ({env.get('cpu_isa')}), {doc['threads']} thread(s), "
                        f"{doc['iterations']} timed runs per point "
                        f"after {doc['warmup']} warm-up; 'vs eager' = PyTorch eager p50 / p50")
    for col in ("backend", "prec", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "vs eager", "peak MiB",
                "load s", "build s"):
        table.add_column(col, justify="left" if col in ("backend", "prec") else "right")
    for backend in doc["backends"]:
        for i, p in enumerate(backend["points"]):
            first = i == 0
            _row(
                table,
                backend["name"] if first else "",
                backend["precision"] if first else "",
                p["batch"],
                f"{p['p50_ms']:.3f}",
                f"{p['p90_ms']:.3f}",
                f"{p['p99_ms']:.3f}",
                f"{p['throughput']:.0f}",
                "" if p["speedup"] is None else f"{p['speedup']:.2f}x",
                _num(backend["peak_memory_mib"], ".0f") if first else "",
                f"{backend['load_seconds']:.2f}" if first else "",
                _num(backend["build_seconds"], ".1f") if first else "",
            )
    console.print(table)
    for name, reason in doc["skipped"].items():
        console.print(f"not benchmarked: {escape(name)}: {escape(reason)}")


def compat_table(console: Console, report) -> None:
    """``check-trt``: one row per finding (refused first), then the summary line."""
    if report.findings:
        table = Table(title=f"{report.graph}: TensorRT {report.tensorrt_version} ONNX parser")
        for col in ("status", "node", "op", "rule", "finding", "fix"):
            table.add_column(col, overflow="fold")
        for f in sorted(report.findings, key=lambda f: f.status != "refused"):
            table.add_row(f.status, escape(f.node), f.op, f.rule, escape(f.message), escape(f.hint))
        console.print(table)
    console.print(report.summary())


def debug_table(console: Console, result) -> None:
    """``debug``: where the error starts (node, op, PyTorch module, error, bound), then the outputs."""
    console.print(f"{escape(result.graph)} ({result.precision}) against model.onnx (FP32) on {escape(result.data)}: "
                  f"{result.compared} tensors compared, {len(result.diverging)} over their bound")
    rows = [("diverges here", t) for t in result.first] + [("output", t) for t in result.outputs]
    table = Table()
    for col in ("", "tensor", "node", "op", "module", "max abs err", "bound", "err/bound", "inputs err/bound"):
        table.add_column(col, justify="right" if "err" in col or col == "bound" else "left", overflow="fold")
    for kind, t in rows:
        table.add_row(kind, escape(t.tensor), escape(t.node), t.op, escape(t.module), f"{t.max_abs:.3g}",
                      f"{t.bound:.3g}", f"{t.ratio:.2f}", f"{t.inputs_ratio:.2f}")
    console.print(table)
    if result.bisect:
        b = result.bisect
        console.print(
            f"bisect: keeping {', '.join(map(escape, b['kept']))} in float brings the outputs within "
            f"budget ({b['metric']}) after {b['evaluations']} evaluations"
            if b.get("passed")
            else f"bisect: {escape(b.get('reason', 'no set of the suspected nodes brings the outputs within budget'))}"
        )


def layers_table(console: Console, doc: dict) -> None:
    """``inspect --layers``: per graph, every node's precision and module, then the counts."""
    if not doc["modules_recorded"]:
        console.print("the exported graph has no PyTorch name scopes (not a dynamo export): modules are unknown")
    for name, graph in doc["graphs"].items():
        table = Table(title=f"{escape(name)} ({'/'.join(graph['targets'])}, {graph['precision']})")
        for col in ("node", "op", "precision", "module"):
            table.add_column(col, overflow="fold")
        for row in graph["nodes"]:
            table.add_row(escape(row["node"]), row["op"], row["precision"], escape(row["module"]))
        console.print(table)
        console.print(f"{escape(name)}: " + ", ".join(f"{k} {v}" for k, v in sorted(graph["counts"].items())))
    if doc["trt_layers"]:
        table = Table(title="TensorRT engine layers (model.layers.json)")
        for col in ("layer", "type", "precision", "ONNX nodes", "modules"):
            table.add_column(col, overflow="fold")
        for row in doc["trt_layers"]:
            table.add_row(escape(row["layer"]), row["type"], row["precision"], escape(", ".join(row["onnx_nodes"])),
                          escape(", ".join(row["modules"])))
        console.print(table)


def serve_table(console: Console, doc: dict, out) -> None:
    """``bench-serve``: one row per mode and concurrency, the machine in the title, the targets below."""
    env = doc["environment"]
    table = Table(title=f"{doc['model']} ({doc['precision']}, {doc['backend']}): {env.get('cpu_model')} "
                        f"({env.get('cpu_isa')}), {doc['threads']} thread(s), {doc['duration_s']:g} s per row, "
                        f"load {env['load_1min']['start']}->{env['load_1min']['end']}")
    for col in ("mode", "concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms", "mean batch", "rejected", "cache hits"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in doc["rows"]:
        mode = r["mode"] if r.get("transport", "in-process") == "in-process" else f"{r['mode']} ({r['transport']})"
        table.add_row(mode, str(r["concurrency"]), f"{r['throughput_per_s']:.1f}", _ms(r["p50_ms"]),
                      _ms(r["p90_ms"]), _ms(r["p99_ms"]), _ms(r["mean_batch"]), str(r["rejected"]),
                      f"{r['cache_hit_ratio']:.2f}" if "cache_hit_ratio" in r else "")
    console.print(table)
    for k, v in doc["targets"].items():
        console.print(f"{k}: {v}")
    if out is not None:
        console.print(f"wrote {escape(str(out))}/bench-serve.json and bench-serve.png")


def serve_llm_table(console: Console, doc: dict, out) -> None:
    """``bench-serve`` on a decoder: one row per mode, transport and concurrency; the targets below."""
    env = doc["environment"]
    table = Table(title=f"{doc['model']} ({doc['precision']}): {env.get('cpu_model')} ({env.get('cpu_isa')}), "
                        f"{doc['threads']} thread(s), prompt {doc['prompt_tokens']}, new {doc['new_tokens']} "
                        f"(+-{doc['spread']:.0%}), shared prefix {doc['shared_prefix']}, "
                        f"load {env['load_1min']['start']}->{env['load_1min']['end']}")
    for col in ("mode", "transport", "streams", "req/s in", "ttft p50", "ttft p99", "tpot p50", "tpot p99",
                "tokens/s", "rejected", "prefix hits"):
        table.add_column(col, justify="left" if col in ("mode", "transport") else "right")
    for r in doc["rows"]:
        mode = r["mode"] + ("" if r.get("prefix_cache", True) else " (no prefix cache)")
        table.add_row(mode, r["transport"], str(r["concurrency"]), f"{r['rate_per_s']:.2f}", _ms(r["ttft_p50_ms"]),
                      _ms(r["ttft_p99_ms"]), _ms(r["tpot_p50_ms"]), _ms(r["tpot_p99_ms"]), _ms(r["tokens_per_s"]),
                      str(r["rejected"]), str(r["prefix_hits"]))
    console.print(table)
    if doc.get("peer"):
        console.print(f"peer: {doc['peer']}")
    for k, v in doc["targets"].items():
        console.print(f"{k}: {v}")
    if out is not None:
        console.print(f"wrote {escape(str(out))}/bench-serve.json and bench-serve.png")


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def rows_table(console: Console, rows: list[dict], columns: tuple[str, ...], written: tuple[Path, ...] = ()) -> None:
    """A benchmark's rows as a table of ``columns`` (a missing cell blank, floats to three decimals below 10),
    then the files it wrote."""
    table = Table(*columns)
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    console.print(table)
    if written:
        console.print(f"wrote {' and '.join(escape(str(p)) for p in written)}")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)
