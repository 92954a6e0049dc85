"""A decoder computes logits only at the positions asked for: a ``logit_positions`` input (both targets).

    logits[b, k, :] = head(h[b, logit_positions[b, k], :])        logit_positions: int64 [batch, kept]

The LM head of a small LLM is its largest matrix (Gemma 3 270M: 262,144 x 640), and a prefill of S tokens
multiplies it by all S hidden states, though generation reads one row per sequence: each row's last real
token (not the same column for every row of a right-padded batch, hence positions per row rather than
Hugging Face's ``logits_to_keep``). Scoring text asks for every position. The hidden states the head reads
are gathered (``GatherElements`` on axis 1) right before it; ops between the head and the ``logits`` output
(a softcap) are position-wise and stay.

The graph's interface changes (a new input, ``logits`` ``[batch, kept, vocab]``), so ``feeds_after`` gives
old feeds every position, which means what they meant before, and the pass manager verifies with them.
Fires only on a decoder graph (``past_key_values.*`` inputs, a ``logits`` output written by a MatMul over
``[batch, seq, hidden]`` through position-wise ops); skipped with the reason otherwise, and when the input
already exists.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from foundation.decoder import LOGIT_POSITIONS, every_logit_position
from passes.base import Pass, PassResult
from passes.graph_utils import fresh_name, producer

logger = logging.getLogger(__name__)

POSITIONWISE = ("Div", "Mul", "Tanh", "Add", "Sub", "Cast", "Identity")


def lm_head(graph: gs.Graph) -> gs.Node | None:
    """The MatMul (or MatMulNBits) that writes a decoder's ``logits`` output, through position-wise ops."""
    logits = next((t for t in graph.outputs if t.name == "logits"), None)
    node = producer(logits) if logits is not None else None
    while node is not None and node.op in POSITIONWISE:
        node = next((producer(t) for t in node.inputs if producer(t) is not None), None)
    return node if node is not None and node.op in ("MatMul", "MatMulNBits") else None


class SelectLogitPositions(Pass):
    """Gathers the hidden states at ``logit_positions`` before a decoder's LM head."""

    def run(self, graph: gs.Graph) -> PassResult:
        if not any(t.name.startswith("past_key_values.") for t in graph.inputs):
            logger.debug("skip: not a decoder graph (no past_key_values inputs)")
            return PassResult(False)
        if any(t.name == LOGIT_POSITIONS for t in graph.inputs):
            logger.debug("skip: the graph already has %s", LOGIT_POSITIONS)
            return PassResult(False)
        node = lm_head(graph)
        if node is None:
            logger.debug("skip: no MatMul writes the logits output")
            return PassResult(False)
        hidden = node.inputs[0]
        if hidden.shape is not None and len(hidden.shape) != 3:
            logger.debug("skip: the LM head reads a %d-D tensor, not [batch, seq, hidden]", len(hidden.shape))
            return PassResult(False)
        positions = gs.Variable(LOGIT_POSITIONS, dtype=np.int64, shape=["batch", "kept"])
        graph.inputs.append(positions)

        def var(base, dtype=np.int64):
            return gs.Variable(fresh_name(graph, base), dtype=dtype)

        column = var("logit_positions_3d")
        graph.layer(op="Unsqueeze", name=column.name, inputs=[positions, gs.Constant(
            fresh_name(graph, "logit_axis2"), np.array([2], np.int64))], outputs=[column])
        width, shape = var("hidden_width"), var("gather_shape")
        graph.layer(op="Shape", name=width.name, inputs=[hidden], outputs=[width], attrs={"start": 2, "end": 3})
        kept = var("positions_shape")
        graph.layer(op="Shape", name=kept.name, inputs=[positions], outputs=[kept])
        graph.layer(op="Concat", name=shape.name, inputs=[kept, width], outputs=[shape], attrs={"axis": 0})
        index = var("logit_gather_index")
        graph.layer(op="Expand", name=index.name, inputs=[column, shape], outputs=[index])
        picked = gs.Variable(fresh_name(graph, "hidden_at_logit_positions"), dtype=hidden.dtype)
        graph.layer(op="GatherElements", name=picked.name, inputs=[hidden, index], outputs=[picked],
                    attrs={"axis": 1})
        node.inputs[0] = picked
        graph.toposort()
        return PassResult(True, {"head": node.name})

    def feeds_after(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return every_logit_position(feeds)
