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
runs). The fastest candidate whose loss is within ``SLACK`` of the best candidate's wins; the
record keeps every measurement and the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import Callable

import onnx

from engines.runtime.cpu import saturates
from foundation.errors import UsageError
from foundation.ort_session import time_runs
from foundation.sequence import StatePairs, run_sequence
from passes.quantize_ort import FORMS
from passes.verify import session

logger = logging.getLogger(__name__)

SLACK = 0.1  # a candidate is as accurate as the best when its loss is within 10% of the best's (or 1e-3)
TIMED_RUNS = 5


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

    def to_json(self) -> dict:
        return {"form": self.form, "cpu_isa": self.cpu_isa, "measured": self.measured, "reason": self.reason}


def choose(forms: tuple[str, ...], isa: str, quantize: Callable[[str], onnx.ModelProto],
           score: Callable[[list], float], loss: Callable[[float], float], batches: list[dict],
           state: StatePairs = ()) -> FormChoice:
    """Quantize in every form of ``forms``, measure each on ``batches``, keep the fastest accurate one."""
    measured, models = {}, {}
    for form in forms:
        model = quantize(form)
        sess = session(model, optimize=True)
        names = [o.name for o in sess.get_outputs()]
        outputs = run_sequence(lambda feed: sess.run(names, feed), names, batches, state)
        value = score(outputs)
        latency = statistics.median(time_runs(sess, batches[0], warmup=1, runs=TIMED_RUNS))
        measured[form] = {"metric": value, "latency_ms": round(float(latency), 4)}
        models[form] = model
        logger.info("INT8 ort form %s on %s: metric %.4f, %.3f ms per held-out batch", form, isa, value,
                    measured[form]["latency_ms"])
    best = min(loss(m["metric"]) for m in measured.values())
    accurate = [f for f in forms if loss(measured[f]["metric"]) <= max(best * (1 + SLACK), best + 1e-3)]
    form = min(accurate, key=lambda f: measured[f]["latency_ms"])
    return FormChoice(form, isa, models[form], measured, _reason(form, forms, accurate, isa))


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
