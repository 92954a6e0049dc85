"""Numbers every room agrees on: how two arrays compare, where an error starts, graph tolerances per
precision, cosine, top-1, the INT8 budget.

- Two arrays (``compare_arrays``): max abs error over the elements (a non-finite value where the
  reference is finite counts as infinite; NaN where the reference has NaN counts as equal), max
  relative error over the elements whose ``|ref| >= 1e-3``, ``max |ref|``, and whether
  ``|actual - ref| <= atol + rtol * |ref|`` holds everywhere (integers: exactly equal).
- Where an error starts (``where_error_starts``): the nodes whose output is beyond its bound while
  every tensor they read is within it; when there is none (the error grows gradually), the node
  with the largest growth from its inputs to its output.
- FP32 graph tolerance: ``|actual - ref| <= 1e-4 + 1e-3 * |ref|`` elementwise.
- FP16 budget (the FP16 pass, the build's graph check, compare): ``max |actual - ref| <=
  2e-2 * max|ref| + 1e-3`` per output.
- Cosine similarity per sample (a sample is one index of the first axis): two all-zero vectors
  agree (1.0); one all-zero vector against a non-zero one does not (0.0), so an INT8 output
  collapsed to zero on a sample fails a cosine budget instead of passing it.
- INT8 budgets: ``top1=0.99`` (top-1 agreement with FP32 on the first output), ``cosine=0.99``
  (mean per-sample cosine over all float outputs), ``relerr=0.05`` (max |INT8 - FP32| / max |FP32|
  per output); ``OUTPUT:`` picks one output, ``@STAT`` another statistic (relerr: mean, pNN,
  sample, channel; cosine: min, pNN); ``user``: a ``file.py:function`` decides (``metric_hook``).
- Padding: a budget with a ``mask`` (a model with an ``attention_mask`` input, ``Budget.for_inputs``)
  judges the outputs led by ``[batch, seq]`` of the mask's shape at the positions the mask keeps
  (non-zero) only; every user discards the outputs at padding positions (mean pooling, token
  labels), so their error must neither fail nor dilute the verdict. Other outputs are judged whole.
  cosine: padding positions are zeroed in both (each sample's vector is its kept positions);
  relerr: the kept elements (``sample``/``channel``: padding zeroed); top1: the kept positions' argmax
  (an output of exactly ``[batch, seq]``: the argmax over the kept positions).

NumPy and the standard library only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from foundation.errors import UsageError

GRAPH_ATOL, GRAPH_RTOL = 1e-4, 1e-3  # an optimized FP32 graph against its reference
REL_FLOOR = 1e-3  # relative error is reported over elements whose |reference| >= this
FP16_RANGE_FRACTION, FP16_FLOOR = 2e-2, 1e-3
BUDGET_METRICS = ("top1", "cosine", "relerr")
DEFAULT_BUDGETS = {"classification": "top1=0.99", "embedding": "cosine=0.99", "generation": "cosine=0.99"}
MASK_INPUT = "attention_mask"  # the input whose zeros mark padding positions (Hugging Face's name)


@dataclasses.dataclass(frozen=True)
class ArrayError:
    """How ``actual`` differs from a reference array (module docstring, "Two arrays")."""

    max_abs: float
    max_rel: float
    scale: float  # max |reference| over its finite elements
    ok: bool  # within atol + rtol * |ref| everywhere (True when no bound was given and the NaNs agree)

    def to_json(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "ok": self.ok}


def compare_arrays(actual: np.ndarray, expected: np.ndarray, atol: float | None = None,
                   rtol: float = 0.0) -> ArrayError:
    """``actual`` against ``expected`` (module docstring); ``atol=None`` measures without a bound."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return ArrayError(float("inf"), float("inf"), float("inf"), False)
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if expected.dtype.kind not in "fc":
        worst = float(np.abs(a - e).max(initial=0.0))
        return ArrayError(worst, worst, float(np.abs(e).max(initial=0.0)), worst == 0.0)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN here and handled below
        diff = np.abs(a - e)
    diff = np.where((np.isnan(a) & np.isnan(e)) | (np.isinf(e) & (a == e)), 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN against a number: unbounded
    finite_ref = np.isfinite(e)
    ref = np.abs(e)
    big = finite_ref & (ref >= REL_FLOOR)
    max_rel = float((diff[big] / ref[big]).max()) if big.any() else 0.0
    ok = bool(np.array_equal(np.isnan(a), np.isnan(e))) and (
        atol is None or bool(np.allclose(a, e, atol=atol, rtol=rtol, equal_nan=True)))
    return ArrayError(float(diff.max(initial=0.0)), max_rel, float(ref[finite_ref].max(initial=0.0)), ok)


def where_error_starts(nodes: list[tuple[str, float, float]]) -> list[str]:
    """``nodes``: (name, output ratio, input ratio) in topological order, a ratio being a tensor's error
    over its bound (the worst output, the worst tensor read). The names of the nodes where the error
    starts, in order (module docstring): beyond the bound (> 1) with every input within it (<= 1), else
    the one node with the largest growth from its inputs to its output; [] when every output is within."""
    over = [(name, out, into) for name, out, into in nodes if out > 1.0]
    starts = [name for name, _, into in over if into <= 1.0]
    if over and not starts:
        return [max(over, key=lambda n: n[1] / max(n[2], 1e-12))[0]]
    return starts


def fp16_atol(reference: np.ndarray) -> float:
    """The FP16 budget's absolute bound for one output."""
    return FP16_RANGE_FRACTION * float(np.abs(reference).max(initial=0.0)) + FP16_FLOOR


def graph_tolerance(precision: str, reference: np.ndarray, scaled: bool = False) -> tuple[float | None, float]:
    """(atol, rtol) a graph of this precision may differ from ``reference`` by; atol None records only
    (INT8, 4-bit weights, a pruned graph:
    the budget metric decides). ``scaled``: the FP32 atol relative to the output's magnitude
    (``scaled_atol``), for a language model's logits."""
    if precision == "fp16":
        return fp16_atol(reference), 0.0
    if precision in ("int8", "int4", "pruned"):
        return None, 0.0
    return (scaled_atol(GRAPH_ATOL, reference) if scaled else GRAPH_ATOL), GRAPH_RTOL


def scaled_atol(atol: float, reference: np.ndarray) -> float:
    """``atol * max(1, max|ref|)``: an absolute bound relative to an output's scale. A language model's
    logits reach tens, and FP32 summation order over many layers moves them by 1e-4..1e-3 (Gemma 3 270M:
    5e-4 on logits of 25), which a bound meant for outputs of order 1 would call a failure."""
    reference = np.asarray(reference)
    values = np.abs(reference[np.isfinite(reference)]) if reference.dtype.kind == "f" else np.abs(reference)
    return atol * max(1.0, float(values.max(initial=0.0)))


def cosine_per_sample(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (rows after flattening all but the first axis)."""
    rr = reference.reshape(reference.shape[0], -1).astype(np.float64)
    aa = actual.reshape(actual.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(rr, axis=1) * np.linalg.norm(aa, axis=1)
    both_zero = ~rr.any(axis=1) & ~aa.any(axis=1)
    return np.where(denom > 0, (rr * aa).sum(axis=1) / np.maximum(denom, 1e-300), both_zero.astype(float))


def top1_agreement(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Share of samples, over batches of one output, whose argmax over the last axis agrees."""
    agree = [np.argmax(a, -1) == np.argmax(r, -1) for r, a in zip(reference, actual)]
    return float(np.concatenate([x.reshape(-1) for x in agree]).mean())


def relative_squared_error(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]],
                           keeps: list[list[np.ndarray | None]] | None = None) -> float:
    """sum ||actual - ref||^2 / sum ||ref||^2 per float output over batches, averaged over outputs: a
    continuous error that orders INT8 sensitivities where a coarse metric (top-1 on few samples) ties.
    ``keeps`` (``kept_positions``): padding positions count for nothing."""
    if keeps is not None:
        reference, actual = _zero_padding(reference, keeps), _zero_padding(actual, keeps)
    errors = []
    for k in range(len(reference[0]) if reference else 0):
        if reference[0][k].dtype.kind != "f":
            continue
        num = sum(float(np.square(a[k].astype(np.float64) - r[k]).sum()) for r, a in zip(reference, actual))
        den = sum(float(np.square(r[k].astype(np.float64)).sum()) for r in reference)
        errors.append(num / den if den > 0 else float(num > 0))
    return float(np.mean(errors)) if errors else 0.0


class Score(float):
    """A budget metric's value; ``passed`` is set where a user metric decides (None: the threshold does)."""

    passed: bool | None = None

    def __new__(cls, value: float, passed: bool | None = None) -> Score:
        obj = super().__new__(cls, value)
        obj.passed = passed
        return obj


# Statistics a budget may take instead of its default (``METRIC@STAT``): relerr's default is ``max``
# (the worst element over everything, normalized by the output's max |FP32|).
RELERR_STATS = ("max", "mean", "sample", "channel")  # and pNN: the NN-th percentile of the elements' error
COSINE_STATS = ("mean", "min")  # and pNN: the NN-th percentile of the per-sample cosines (p5: the worst 5%)


@dataclasses.dataclass(frozen=True)
class Budget:
    """An INT8 accuracy budget: ``metric`` (top1 | cosine | relerr | user) against ``threshold``,
    on one ``output`` (None: the metric's default: top1 the first output, the others every float
    output) with a ``stat`` (``RELERR_STATS``, ``COSINE_STATS``, or ``pNN``). ``user``: ``hook`` names
    ``file.py:function`` (``foundation.metric_hook``), which decides. ``mask``: the input whose
    non-zero positions are judged (module docstring, "Padding"; None: every position)."""

    metric: str
    threshold: float
    output: str | None = None
    stat: str | None = None
    hook: str | None = None
    mask: str | None = None

    def __post_init__(self):
        if self.metric not in BUDGET_METRICS + ("user",):
            raise UsageError(f"budget metric {self.metric!r}: expected one of {', '.join(BUDGET_METRICS)}")
        if self.stat is not None and not _stat_ok(self.metric, self.stat):
            allowed = {"relerr": RELERR_STATS, "cosine": COSINE_STATS}.get(self.metric, ())
            raise UsageError(f"budget statistic {self.metric}@{self.stat}: expected "
                             f"{' | '.join(allowed + ('pNN',)) if allowed else 'none for ' + self.metric}")

    @classmethod
    def parse(cls, text: str | None, task: str | None, metric_hook: str | None = None) -> Budget:
        """``[OUTPUT:]METRIC[@STAT]=VALUE`` (the CLI's form: ``top1=0.99``, ``boxes:relerr@p99=0.05``,
        ``cosine@min=0.98``); None: the task's default; ``metric_hook``: ``--metric file.py:function``."""
        if metric_hook:
            if text:
                raise UsageError("--budget and --metric both given: a user metric decides on its own; give one")
            return cls("user", 0.0, hook=metric_hook)
        text = text or DEFAULT_BUDGETS.get(task or "", "relerr=0.05")
        head, _, value = text.rpartition("=")
        output, _, metric = head.rpartition(":")
        metric, _, stat = metric.partition("@")
        if metric not in BUDGET_METRICS or not value:
            raise UsageError(f"budget {text!r}: expected [OUTPUT:]METRIC[@STAT]=VALUE, e.g. top1=0.99, cosine=0.99, "
                             "relerr=0.05, probs:top1=0.99 or boxes:relerr@p99=0.05")
        try:
            threshold = float(value)
        except ValueError as exc:
            raise UsageError(f"budget {text!r}: {value!r} is not a number") from exc
        return cls(metric, threshold, output or None, stat or None)

    def for_inputs(self, inputs: list[str]) -> Budget:
        """This budget for a model with ``inputs``: judged at the positions ``attention_mask`` keeps where
        the model has one (a user metric gets the feeds and decides itself)."""
        if self.metric == "user" or self.mask is not None or MASK_INPUT not in inputs:
            return self
        return dataclasses.replace(self, mask=MASK_INPUT)

    def met(self, value: float) -> bool:
        if self.metric == "user":
            return bool(getattr(value, "passed", False))
        return value <= self.threshold if self.metric == "relerr" else value >= self.threshold

    def loss(self, value: float) -> float:
        """Larger is worse, for ordering sensitivities (a user metric's score: higher is better)."""
        return value if self.metric == "relerr" else (-value if self.metric == "user" else 1.0 - value)

    def check_outputs(self, names: list[str]) -> None:
        if self.output is not None and self.output not in names:
            raise UsageError(f"budget {self}: no output {self.output!r}; the model's outputs are {', '.join(names)}")

    def to_json(self) -> dict:
        extra = {k: v for k, v in (("output", self.output), ("stat", self.stat), ("hook", self.hook),
                                   ("mask", self.mask)) if v}
        return {"metric": self.metric, "threshold": self.threshold, **extra}

    @classmethod
    def from_json(cls, data: dict) -> Budget:
        return cls(data["metric"], float(data["threshold"]), data.get("output"), data.get("stat"), data.get("hook"),
                   data.get("mask"))

    def __str__(self) -> str:
        if self.metric == "user":
            return f"{self.hook} passes"
        name = f"{self.output + ':' if self.output else ''}{self.metric}{'@' + self.stat if self.stat else ''}"
        where = f" at the positions {self.mask} keeps" if self.mask else ""
        return f"{name} {'<=' if self.metric == 'relerr' else '>='} {self.threshold:g}{where}"


def _stat_ok(metric: str, stat: str) -> bool:
    if stat.startswith("p"):
        try:
            return metric in ("relerr", "cosine") and 0.0 <= float(stat[1:]) <= 100.0
        except ValueError:
            return False
    return stat in {"relerr": RELERR_STATS, "cosine": COSINE_STATS}.get(metric, ())


def budget_metric(budget: Budget, reference: list[list[np.ndarray]], actual: list[list[np.ndarray]],
                  names: list[str] | None = None, feeds: list[dict] | None = None) -> Score:
    """The budget's metric over batches (each a list of outputs in graph order, named by ``names``);
    ``feeds``: the inputs of each batch (a user metric's, and a masked budget's mask)."""
    if budget.metric == "user":
        from foundation.metric_hook import call_metric  # noqa: PLC0415 - loads user code only when asked

        return Score(*call_metric(budget.hook, reference, actual, names, feeds))
    keeps = kept_positions(budget, reference, feeds)
    if budget.output is not None:
        if names is None or budget.output not in names:
            raise UsageError(f"budget {budget}: no output {budget.output!r} among {names}")
        k = names.index(budget.output)
        reference, actual, keeps = [[r[k]] for r in reference], [[a[k]] for a in actual], [[kp[k]] for kp in keeps]
    if budget.metric == "top1":
        return Score(_top1_kept([r[0] for r in reference], [a[0] for a in actual], [kp[0] for kp in keeps]))
    if budget.metric == "cosine":
        return Score(_cosine(_zero_padding(reference, keeps), _zero_padding(actual, keeps), budget.stat))
    return Score(_relative_error(reference, actual, budget.stat or "max", keeps))


def kept_positions(budget: Budget, outputs: list[list[np.ndarray]],
                   feeds: list[dict] | None) -> list[list[np.ndarray | None]]:
    """Per batch and output: the boolean ``[batch, seq]`` positions ``budget.mask`` keeps, for an output led
    by the mask's shape; None where the output is judged whole (every output when the budget has no mask)."""
    if budget.mask is None:
        return [[None] * len(batch) for batch in outputs]
    if feeds is None or len(feeds) != len(outputs) or any(budget.mask not in f for f in feeds):
        raise UsageError(f"budget {budget}: the {budget.mask} of each batch is needed to judge it, found "
                         f"{'no inputs' if feeds is None else f'{len(feeds)} feed dicts for {len(outputs)} batches'}; "
                         "pass the batches' feeds")
    keeps = []
    for batch, feed in zip(outputs, feeds):
        mask = np.asarray(feed[budget.mask]) != 0
        keeps.append([mask if mask.ndim == 2 and np.ndim(x) >= 2 and np.shape(x)[:2] == mask.shape else None
                      for x in batch])
    return keeps


def _zero_padding(outputs: list[list[np.ndarray]], keeps: list[list[np.ndarray | None]]) -> list[list[np.ndarray]]:
    """``outputs`` with the positions ``keeps`` drops set to zero (float outputs; the rest unchanged)."""
    return [[x if keep is None or x.dtype.kind != "f" else
             np.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, np.zeros((), x.dtype))
             for x, keep in zip(batch, batch_keeps)] for batch, batch_keeps in zip(outputs, keeps)]


def _top1_kept(reference: list[np.ndarray], actual: list[np.ndarray], keeps: list[np.ndarray | None]) -> float:
    """Top-1 agreement at the kept positions: an output ``[batch, seq, classes]`` per kept position, one of
    exactly ``[batch, seq]`` (scores over the positions) by its argmax over the kept positions."""
    if all(keep is None for keep in keeps):
        return top1_agreement(reference, actual)
    agree = []
    for r, a, keep in zip(reference, actual, keeps):
        if keep is not None and r.ndim == 2:
            r, a = np.where(keep, r, -np.inf), np.where(keep, a, -np.inf)
        same = np.argmax(a, -1) == np.argmax(r, -1)
        agree.append(same[keep] if keep is not None and r.ndim > 2 else same.reshape(-1))
    return float(np.concatenate(agree).mean())


def _cosine(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]], stat: str | None) -> float:
    """Per-sample cosine over every float output (module docstring), then ``stat`` over the samples."""
    cos = []
    for r, a in zip(reference, actual):
        floats = [(np.atleast_1d(x), np.atleast_1d(y)) for x, y in zip(r, a) if x.dtype.kind == "f"]
        if len({x.shape[0] for x, _ in floats}) == 1:  # batch-first outputs: one vector per sample
            rr = np.concatenate([x.reshape(x.shape[0], -1) for x, _ in floats], axis=1)
            aa = np.concatenate([y.reshape(y.shape[0], -1) for _, y in floats], axis=1)
            cos.append(cosine_per_sample(rr, aa))
        else:  # outputs whose first dims differ (time-major, state, scalars): one vector per output
            cos += [cosine_per_sample(x.reshape(1, -1), y.reshape(1, -1)) for x, y in floats]
    values = np.concatenate(cos)
    if stat == "min":
        return float(values.min())
    if stat and stat.startswith("p"):
        return float(np.percentile(values, float(stat[1:])))
    return float(values.mean())


def _relative_error(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]], stat: str,
                    keeps: list[list[np.ndarray | None]]) -> float:
    """The worst over float outputs of: |INT8 - FP32| normalized by the output's max |FP32| (``max``,
    ``mean`` or the ``pNN`` percentile of the elements), by each sample's (``sample``: the worst sample's
    max) or each channel's (``channel``: axis 1, the worst channel's max); at the kept positions only."""
    worst = 0.0
    for k in range(len(reference[0]) if reference else 0):
        if reference[0][k].dtype.kind != "f":
            continue
        refs = [np.atleast_1d(r[k]).astype(np.float64) for r in reference]
        errs = [np.abs(np.atleast_1d(a[k]).astype(np.float64) - x) for a, x in zip(actual, refs)]
        masks = [kp[k] for kp in keeps]
        if stat in ("sample", "channel"):
            zeroed = _zero_padding([[x, e] for x, e in zip(refs, errs)], [[m, m] for m in masks])
            axis = 0 if stat == "sample" else 1
            worst = max(worst, _worst_slice([x for x, _ in zeroed], [e for _, e in zeroed], axis))
            continue
        refs = [x if m is None else x[m] for x, m in zip(refs, masks)]  # the kept positions' elements
        errs = [e if m is None else e[m] for e, m in zip(errs, masks)]
        scale = max(float(np.abs(x).max(initial=0.0)) for x in refs) or 1.0
        flat = np.concatenate([e.reshape(-1) for e in errs]) / scale
        if stat == "mean":
            value = float(flat.mean()) if flat.size else 0.0
        elif stat.startswith("p"):
            value = float(np.percentile(flat, float(stat[1:]))) if flat.size else 0.0
        else:
            value = float(flat.max(initial=0.0))
        worst = max(worst, value)
    return worst


def _worst_slice(refs: list[np.ndarray], errs: list[np.ndarray], axis: int) -> float:
    """The worst slice along ``axis`` (0: samples, 1: channels) of max error over that slice's max |ref|."""
    per = []
    for x, e in zip(refs, errs):
        if x.ndim <= axis:
            x, e = x.reshape(1, -1), e.reshape(1, -1)
        xx = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        ee = np.moveaxis(e, axis, 0).reshape(e.shape[axis], -1)
        scale = np.abs(xx).max(axis=1)
        per.append(ee.max(axis=1) / np.where(scale > 0, scale, 1.0))
    return float(np.concatenate(per).max(initial=0.0))
