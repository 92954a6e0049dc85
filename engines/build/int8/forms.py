"""Which ONNX Runtime INT8 form a build gets: the non-saturating candidates of this CPU's class, measured.

Candidates by class (``engines.runtime.cpu``): where products accumulate in 32 bits (VNNI, AMX, ARM's
dot product) only ``u8s8``, the fastest form there; where ONNX Runtime's U8xS8 kernels sum pairs
in 16 bits (x86 without VNNI) ``u8s8-rr`` and ``u8u8``, never ``u8s8``, which saturates there
(one layer's relative error 0.398 with the kernels against 0.0087 emulated, measured on AVX2).

Each form comes twice: over every op ONNX Runtime's quantizer knows, and over compute layers only
(``-compute``: Conv, Gemm, MatMul and the data movement between them, not the elementwise arithmetic,
normalizations and softmax; ``passes.quantize_ort.COMPUTE_OPS``). Each candidate is quantized in full
and measured on the held-out batches: the budget's metric and
the median latency of the first batch, with ONNX Runtime's graph optimizations on (as the bundle
runs), timed interleaved with each other and with the FP32 graph (one run of each per round, so a
busy machine slows all alike). The fastest candidate whose loss is within ``SLACK`` of the best
candidate's wins; the record keeps every measurement, the FP32 latency and the reason.

INT8 is not always faster: on small models ONNX Runtime's integer kernels and the Q/DQ around them
cost what they save (a Silero-style VAD step at 0.09 ms ran 0.97x FP32, MTCNN's PNet 1.01x).
``speed`` times the graph a build ships against the FP32 graph the same way, and the manifest
records the ratio (``Int8Report.speedup``), so a build that is not faster says so.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable

import onnx

from engines.runtime.cpu import saturates
from foundation.errors import UsageError
from foundation.sequence import StatePairs, run_sequence
from passes.quantize_ort import FORMS
from passes.verify import session

logger = logging.getLogger(__name__)

SLACK = 0.1  # a candidate is as accurate as the best when its loss is within 10% of the best's (or 1e-3)
TIMED_RUNS = 5  # rounds per candidate form
SPEED_ROUNDS = (10, 400)  # the shipped graph against FP32: at least 10 rounds, more while under SPEED_SECONDS
SPEED_SECONDS = 1.0
FP32 = "fp32"


def candidates(isa: str, asked: str = "auto") -> tuple[str, ...]:
    """The forms a build on ``isa`` measures (``asked``: ``auto`` or one form, forced)."""
    if asked != "auto":
        if asked not in FORMS:
            raise UsageError(f"--ort-int8-form {asked!r}: expected auto or one of {', '.join(FORMS)}")
        if asked == "u8s8" and saturates(isa):
            logger.warning("INT8 ort: form u8s8 forced on a %s CPU, whose U8xS8 kernels sum pairs in 16 bits and "
                           "can saturate; the budget is still measured here", isa)
        return (asked,)
    base = ("u8s8-rr", "u8u8") if saturates(isa) else ("u8s8",)
    return base + tuple(f"{f}-compute" for f in base)  # each over every op, and over compute layers only


@dataclasses.dataclass
class FormChoice:
    form: str
    cpu_isa: str
    model: onnx.ModelProto
    measured: dict[str, dict]  # form -> {"metric": value, "latency_ms": median of the first batch}
    reason: str
    fp32_ms: float | None = None  # the FP32 graph's median, timed interleaved with the candidates

    def to_json(self) -> dict:
        return {"form": self.form, "cpu_isa": self.cpu_isa, "measured": self.measured, "reason": self.reason,
                "fp32_latency_ms": self.fp32_ms}


def choose(forms: tuple[str, ...], isa: str, quantize: Callable[[str], onnx.ModelProto],
           score: Callable[[list], float], loss: Callable[[float], float], batches: list[dict],
           state: StatePairs = (), fp32: onnx.ModelProto | None = None) -> FormChoice:
    """Quantize in every form of ``forms``, measure each on ``batches``, keep the fastest accurate one;
    ``fp32``: timed beside them."""
    measured, models, sessions = {}, {}, {}
    for form in forms:
        models[form] = quantize(form)
        sess = sessions[form] = session(models[form], optimize=True)
        names = [o.name for o in sess.get_outputs()]
        outputs = run_sequence(lambda feed, sess=sess, names=names: sess.run(names, feed), names, batches,
                               state)
        measured[form] = {"metric": score(outputs)}
    if fp32 is not None:
        sessions[FP32] = session(fp32, optimize=True)
    latency, _ = interleaved(sessions, batches[0], TIMED_RUNS)
    for form in forms:
        measured[form]["latency_ms"] = latency[form]
        logger.info("INT8 ort form %s on %s: metric %.4f, %.3f ms per held-out batch", form, isa,
                    measured[form]["metric"], latency[form])
    best = min(loss(m["metric"]) for m in measured.values())
    accurate = [f for f in forms if loss(measured[f]["metric"]) <= max(best * (1 + SLACK), best + 1e-3)]
    form = min(accurate, key=lambda f: measured[f]["latency_ms"])
    return FormChoice(form, isa, models[form], measured, _reason(form, forms, accurate, isa), latency.get(FP32))


def interleaved(sessions: dict, feeds: dict, rounds: int, seconds: float = 0.0,
                most: int = 0) -> tuple[dict[str, float], int]:
    """(median milliseconds per session, rounds): one run of each session on ``feeds`` per round, after one
    untimed warm-up run each; ``rounds`` rounds, and more while under ``seconds`` (up to ``most``)."""
    for sess in sessions.values():
        sess.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    started, done = time.perf_counter(), 0
    while done < rounds or (done < most and time.perf_counter() - started < seconds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1000)
        done += 1
    return {name: round(float(statistics.median(t)), 4) for name, t in times.items()}, done


@dataclasses.dataclass(frozen=True)
class Speed:
    """The shipped INT8 graph's latency against the FP32 graph's, on this CPU (medians of interleaved rounds)."""

    fp32_ms: float
    int8_ms: float
    rounds: int

    @property
    def speedup(self) -> float:
        """FP32 time over INT8 time: above 1, INT8 is faster."""
        return round(self.fp32_ms / self.int8_ms, 3) if self.int8_ms > 0 else float("inf")


def speed(int8: onnx.ModelProto, fp32: onnx.ModelProto, feeds: dict) -> Speed:
    """``int8`` against ``fp32`` on one batch, as the bundle runs (graph optimizations on, the same session
    options), interleaved (see ``interleaved``)."""
    sessions = {"int8": session(int8, optimize=True), FP32: session(fp32, optimize=True)}
    latency, rounds = interleaved(sessions, feeds, SPEED_ROUNDS[0], SPEED_SECONDS, SPEED_ROUNDS[1])
    return Speed(latency[FP32], latency["int8"], rounds)


def _reason(form: str, forms: tuple[str, ...], accurate: list[str], isa: str) -> str:
    why = (f"U8xS8 pair sums can saturate on {isa}, so u8s8 is not a candidate" if saturates(isa)
           else f"{isa} accumulates INT8 products in 32 bits, so u8s8 cannot saturate")
    if len(forms) == 1:
        return f"{form}: {why}"
    rest = [f for f in forms if f != form]
    slower = [f for f in rest if f in accurate]
    lost = [f for f in rest if f not in accurate]
    parts = ([f"faster than {', '.join(slower)} at the same accuracy"] if slower else []) + \
            ([f"more accurate than {', '.join(lost)}"] if lost else [])
    return f"{form}: {'; '.join(parts)} ({why})"
