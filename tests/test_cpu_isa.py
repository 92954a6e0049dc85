"""The CPU's integer dot-product class and the ONNX Runtime INT8 form chosen for it."""

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import helper, make_model, run_pass, seeded

from engines.build.int8 import run_target
from engines.build.int8.forms import candidates, choose
from engines.runtime.cpu import CLASSES, detect, isa_class, parse_cpuinfo, saturates
from foundation.errors import UsageError
from foundation.numerics import Budget, budget_metric
from passes import InferShapes, PassManager
from passes.calibration import calibrate
from passes.quantize_ort import FORMS, QuantizeForOnnxRuntime

# flags as /proc/cpuinfo lists them (abridged to what decides the class)
SAMPLES = [
    ("x86_64", "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8", "amx"),
    ("x86_64", "fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni", "avx512-vnni"),
    ("x86_64", "fpu sse2 avx avx2 fma avx_vnni", "avx-vnni"),
    ("x86_64", "fpu sse2 avx avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl", "avx512"),
    ("x86_64", "fpu sse2 avx avx2 fma bmi2 adx sha_ni", "avx2"),
    ("x86_64", "fpu sse2 ssse3 sse4_1 sse4_2 avx", "x86"),
    (
        "aarch64",
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
        "arm-dotprod",
    ),
    ("aarch64", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid", "arm"),
    ("x86_64", "", "unknown"),
    ("riscv64", "rv64imafdc", "unknown"),
]


@pytest.mark.parametrize("machine, flags, expected", SAMPLES)
def test_isa_class_from_kernel_flags(machine, flags, expected):
    assert isa_class(set(flags.split()), machine) == expected
    assert expected in CLASSES
    # without 32-bit accumulation of INT8 products the fast U8xS8 form is never a candidate
    assert ("u8s8" in candidates(expected)) == (not saturates(expected))
    assert saturates(expected) == (expected in ("avx512", "avx2", "x86", "unknown"))


def test_parse_cpuinfo_reads_the_first_processor_and_this_machine_is_classified():
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6148\n"
            "flags\t\t: fpu avx2 avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    model, flags = parse_cpuinfo(text)
    assert model == "Intel(R) Xeon(R) Gold 6148" and flags == {"fpu", "avx2", "avx512f", "avx512bw"}
    arm = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"
    assert parse_cpuinfo(arm)[1] == {"fp", "asimd", "asimddp"}
    info = detect()
    if Path("/proc/cpuinfo").is_file():
        text = Path("/proc/cpuinfo").read_text()
        assert info.isa == isa_class(parse_cpuinfo(text)[1], __import__("platform").machine())
    assert info.isa in CLASSES and info.cores >= 1 and info.to_json()["cpu_isa"] == info.isa


def test_a_forced_form_is_checked_and_u8s8_on_a_saturating_class_warns(caplog):
    assert candidates("avx2", "u8u8") == ("u8u8",)
    with pytest.raises(UsageError, match="expected auto or one of u8s8, u8s8-rr, u8u8"):
        candidates("avx2", "s8s8")
    with caplog.at_level(logging.WARNING):
        assert candidates("avx2", "u8s8") == ("u8s8",)
    assert "can saturate" in caplog.text


def _mlp():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="second")]
    return run_pass(InferShapes(), make_model(nodes, [("x", np.float32, ["n", 32])], [("y", np.float32, ["n", 8])],
                                              {"W1": seeded((32, 64), 1), "W2": seeded((64, 8), 2)}))[1]


def test_form_choice_measures_every_candidate_and_keeps_the_fastest_accurate_one():
    """Both non-saturating forms run correctly on any CPU, so they can be measured on this one."""
    model = _mlp()
    ranges = calibrate(model, [{"x": seeded((16, 32), i)} for i in range(4)], "max")
    evaluation = [{"x": seeded((64, 32), 9)}, {"x": seeded((64, 32), 10)}]
    budget = Budget.parse("cosine=0.99", None)
    reference = run_target(model, evaluation, "ort")

    def quantize(form):
        return PassManager([InferShapes(), QuantizeForOnnxRuntime(ranges=ranges, form=form)], quiet=True).run(model)[0]

    choice = choose(
        ("u8s8-rr", "u8u8"),
        "avx2",
        quantize,
        lambda out: budget_metric(budget, reference, out),
        budget.loss,
        evaluation,
    )
    assert set(choice.measured) == {"u8s8-rr", "u8u8"}
    for form, measured in choice.measured.items():  # each recorded metric is that form's graph, recomputed
        assert measured["latency_ms"] > 0
        assert measured["metric"] == pytest.approx(
            budget_metric(budget, reference, run_target(quantize(form), evaluation, "ort")), abs=1e-9
        )
        assert measured["metric"] > 0.99  # both forms are accurate on this MLP
    assert choice.form == min(choice.measured, key=lambda f: choice.measured[f]["latency_ms"])
    assert choice.reason.startswith(f"{choice.form}: faster than") and "saturate on avx2" in choice.reason
    weights = [i for i in choice.model.graph.initializer if i.data_type in (2, 3) and len(i.dims) == 2]
    assert {i.data_type for i in weights} == {3 if FORMS[choice.form].weight.name == "QInt8" else 2}
    assert (
        budget_metric(budget, reference, run_target(choice.model, evaluation, "ort"))
        == choice.measured[choice.form]["metric"]
    )


def test_form_choice_prefers_accuracy_over_speed_beyond_the_slack():
    model = _mlp()
    ranges = calibrate(model, [{"x": seeded((16, 32), i)} for i in range(4)], "max")
    evaluation = [{"x": seeded((64, 32), 9)}]
    reference = run_target(model, evaluation, "ort")
    budget = Budget.parse("relerr=0.05", None)
    broken = dict(ranges, x=(-1e4, 1e4))  # the "u8s8-rr" candidate gets ranges that zero its input

    def quantize(form):
        use = broken if form == "u8s8-rr" else ranges
        return PassManager([InferShapes(), QuantizeForOnnxRuntime(ranges=use, form=form)], quiet=True).run(model)[0]

    choice = choose(
        ("u8s8-rr", "u8u8"),
        "avx2",
        quantize,
        lambda out: budget_metric(budget, reference, out),
        budget.loss,
        evaluation,
    )
    assert choice.measured["u8s8-rr"]["metric"] > 0.5 > choice.measured["u8u8"]["metric"]
    assert choice.form == "u8u8" and "more accurate than u8s8-rr" in choice.reason
