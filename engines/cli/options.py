"""Options that travel together arrive as one typed object (Polygraphy's argument groups).

``option_group(param, factory, *options)`` adds the options to a command and calls the command with
``param=factory(**their values)`` instead of one parameter per option: ``build`` receives an
``ExportOptions``, a ``PassOptions``, an ``Int8Options``, a ``ProfileOptions`` and a ``TrtOptions``, the
same objects its ``BuildRequest`` holds. The options shared by several commands are defined here once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from engines.build.request import ExportOptions, Int8Options, PassOptions, ProfileOptions
from engines.trt_build.builder import TrtOptions


def option_group(param: str, factory: Callable[..., Any], *options: click.Option) -> Callable:
    """A decorator: ``options`` on the command, their values handed over as one ``factory(...)`` named ``param``."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {option.name: kwargs.pop(option.name) for option in options}
            return command(*args, **kwargs, **{param: factory(**values)})

        wrapper.__click_params__ = [*getattr(command, "__click_params__", []), *reversed(options)]
        return wrapper
    return decorate


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print machine-readable JSON on stdout instead of the table.")
input_option = click.option("--input", "inputs", multiple=True, metavar="SPEC",
                            help='Override an input, e.g. "x:float32:[batch=1..32@8,3,224,224]".')
threads_option = click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
                              help="CPU threads for every backend (0: all cores).")


export_options = option_group(
    "export", ExportOptions,
    click.Option(["--opset"], type=int, default=18, show_default=True, help="ONNX opset of the export."),
    click.Option(["--exporter"], type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
                 show_default=True, help="torch.onnx exporter; auto: dynamo, TorchScript where dynamo fails."),
    click.Option(["--parity-atol"], type=float, default=1e-4, show_default=True,
                 help="Absolute tolerance of the PyTorch-vs-ONNX Runtime parity check."),
    click.Option(["--parity-rtol"], type=float, default=1e-3, show_default=True,
                 help="Relative tolerance of the parity check."),
    click.Option(["--max-length"], type=click.IntRange(2), metavar="TOKENS",
                 help="Decoders: the longest sequence (prompt and new tokens) the bundle serves [2048, or less "
                      "where the model's positions end]."))

pass_options = option_group(
    "passes", PassOptions,
    click.Option(["--verify-passes/--no-verify-passes"], default=True, show_default=True,
                 help="Check numbers under ONNX Runtime after every pass."),
    click.Option(["--keep-fp32"], multiple=True, metavar="NAME_OR_OP",
                 help="Keep these nodes or op types in FP32 (fp16)."),
    click.Option(["--skip-pass", "skip_passes"], multiple=True, metavar="PASS",
                 help="Leave this pass out of the pipelines (repeat), e.g. --skip-pass FuseAttention."))


def _int8(metric_hook: str | None, time_limit: float, **options) -> Int8Options:
    """A ``file.py:function`` metric is recorded with the file's absolute path; a time limit of 0 is none."""
    if metric_hook and ".py:" in metric_hook:
        path, _, function = metric_hook.rpartition(":")
        metric_hook = f"{Path(path).resolve()}:{function}"
    return Int8Options(metric_hook=metric_hook, time_limit=time_limit or None, **options)


int8_options = option_group(
    "int8", _int8,
    click.Option(["--calib"], metavar="SOURCE", help="INT8 calibration data: a directory of .npz/.npy batches or "
                 "module:function (zoo models bring their own)."),
    click.Option(["--calib-method"], type=click.Choice(["max", "percentile", "entropy", "mse"]), default="max",
                 show_default=True, help="How activation ranges are taken from the calibration data."),
    click.Option(["--allow-random-calibration"], is_flag=True,
                 help="Accept random calibration data (accuracy unknown)."),
    click.Option(["--budget"], metavar="[OUTPUT:]METRIC[@STAT]=VALUE",
                 help="INT8 accuracy budget: top1=0.99, cosine=0.99 or relerr=0.05 [default by task]; OUTPUT: one "
                      "output (probs:top1=0.99); STAT: relerr@mean|pNN|sample|channel, cosine@min|pNN "
                      "(boxes:relerr@p99=0.05). A decoder's int4 budget: perplexity=0.015 [default] (at most 1.5% "
                      "above the float model's on held-out text) or agreement=0.95 (next-token choices)."),
    click.Option(["--metric", "metric_hook"], metavar="FILE.py:FUNCTION",
                 help="A task metric as the INT8 budget: FUNCTION(reference, candidate, feeds) -> (score, passed), "
                      "dicts of arrays over the held-out batches; compare uses it too."),
    click.Option(["--state"], multiple=True, metavar="OUTPUT:INPUT",
                 help="A stateful model's output that feeds an input on the next call (repeat): the INT8 budget and "
                      "compare run their batches as a sequence, each graph feeding its own state back (drift "
                      "counts)."),
    click.Option(["--ort-int8-form", "ort_form"],
                 type=click.Choice(["auto", "u8s8", "u8s8-rr", "u8u8", "u8s8-compute", "u8s8-rr-compute",
                                    "u8u8-compute"]), default="auto", show_default=True,
                 help="INT8 form of the ONNX Runtime graph. auto: the fastest accurate form among those that cannot "
                      "saturate on this CPU's class (u8s8 with VNNI, AMX or ARM dot product; u8s8-rr or u8u8 "
                      "without), each over every op or (-compute) over Conv/Gemm/MatMul layers only."),
    click.Option(["--require-int8", "require"], multiple=True, type=click.Choice(["trt", "ort", "all"]),
                 help="Fail (exit 7) when this target's graph cannot be INT8 within the budget, instead of keeping "
                      "it float (repeat, or all)."),
    click.Option(["--int8-time-limit", "time_limit"], type=click.FloatRange(0), default=900.0, show_default=True,
                 help="Seconds for each target's INT8 fallback search; when they run out the best graph found is "
                      "kept (0: no limit)."))

profile_options = option_group(
    "shapes", ProfileOptions,
    click.Option(["--profile", "profiles"], multiple=True, metavar="DIM=MIN..MAX@OPT,...",
                 help="A TensorRT optimization profile, e.g. batch=1..8@4 (repeat for several)."),
    click.Option(["--profiles", "profiles_auto"], metavar="auto:N[:DIM]", help="Split a dim's range into N profiles."),
    click.Option(["--static"], is_flag=True, help="Freeze the graphs to the opt shapes (a static engine)."))

trt_options = option_group(
    "trt",
    TrtOptions,
    click.Option(["--workspace-gib"], type=float, default=4.0, show_default=True, help="TensorRT workspace limit."),
    click.Option(
        ["--opt-level", "optimization_level"],
        type=click.IntRange(0, 5),
        default=3,
        show_default=True,
        help="Builder optimization level.",
    ),
    click.Option(["--strict-fp32"], is_flag=True, help="Clear TF32 so FP32 layers match ONNX Runtime."),
    click.Option(
        ["--hardware-compat", "hardware_compatibility"],
        type=click.Choice(["none", "ampere_plus", "same_compute_capability"]),
        default="none",
        show_default=True,
        help="TensorRT hardware compatibility level of the plan.",
    ),
    click.Option(
        ["--version-compatible"], is_flag=True, help="Embed a lean runtime (loads on later TensorRT versions)."
    ),
    click.Option(
        ["--sparse-weights"], is_flag=True, help="Let TensorRT use 2:4 structured-sparse kernels where weights allow."
    ),
    click.Option(
        ["--refit"], is_flag=True, help="Build a refittable plan (weights can be replaced without a rebuild)."
    ),
)
