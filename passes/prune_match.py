"""Finding the units structured pruning can remove (no rewriting here; ``prune_units`` rewrites).

Two kinds of group, found the same way: an MLP's hidden units (below), and a convolution's output channels
between two Convs of group 1: ``Conv(W_up [C, I, kh, kw]) -> channel-wise ops (BatchNormalization,
activations, pooling; constants per channel) -> Conv(W_down [O, C, kh', kw'])``, channel ``c`` being filter
``c`` of the first and input channel ``c`` of the second. A residual ``Add`` or a ``Concat`` between them
is not channel-wise: such a pair is left whole.

An **MLP group** is a hidden layer of ``h`` units between up-projections and one down-projection:

    x --MatMul(W_up [d, h]) [--Add(b [h])]--+
    x --MatMul(W_gate [d, h]) [--Add]-------+--> elementwise region --> MatMul(W_down [h, d']) --> y

(one up-projection for BERT's and GPT-2's GELU MLP, two for LLaMA's and Gemma's gated ones). Unit ``j`` is
column ``j`` of every up weight and bias and row ``j`` of the down weight: removing it from all of them at once
keeps the graph consistent, since every op between them is elementwise along the last axis. The region is
every node from the up-projections' outputs to the down-projection's input; it must be elementwise
(``ELEMENTWISE``), each of its constants must be a scalar or a vector of ``h`` (sliced with the units), and
none of its tensors may be read outside it or be a graph output (a unit visible elsewhere cannot be removed).
The weights must be constant initializers read by this group alone, 2-D, and the hidden axis the last one.
Each group not found is logged with the reason at debug level.

An **attention-head group** is a multi-head attention block (``passes/attention_match.py``: q, k, v split into
``N`` heads of ``H``, softmax, merged back) whose q, k and v are each a projection of their own
(``MatMul(x, W [d, N*H])`` and its bias) and whose merged context is read by one output projection
``W_o [N*H, d']`` alone. Head ``n`` is columns ``n*H .. n*H+H-1`` of the three projections and the same rows of
``W_o``: every op between works on each head apart (batched MatMuls over the head axis, softmax over the
keys, scalar scales, a mask broadcast over heads), so removing them all at once leaves the other heads'
numbers unchanged. Refused when the head count is written in the graph (a Reshape target holding ``N`` or
``N*H`` rather than -1 or a shape read at run time: it would go stale), when a constant inside the block is
not a scalar (a per-head bias), when the mask has a head axis, or when a tensor of the block is read outside it.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_graphsurgeon as gs

from passes.attention_match import AttentionMatch, attention_blocks
from passes.graph_utils import constant_value, is_graph_output, producer

logger = logging.getLogger(__name__)

# Ops that act on each element (or broadcast a scalar or a per-unit vector) along the hidden axis.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Gelu", "FastGelu", "Erf", "Tanh",
                         "Sigmoid", "HardSigmoid", "HardSwish", "Pow", "Sqrt", "Neg", "Exp", "Softplus", "Elu",
                         "Selu", "Clip", "Identity", "Cast", "QuickGelu", "Mish"})
MIN_UNITS = 16  # a hidden layer narrower than this is left alone (nothing worth removing)
# Ops that act on each channel of an NCHW tensor apart (a Conv group's region; their constants per channel).
CHANNELWISE = frozenset({"BatchNormalization", "MaxPool", "AveragePool", "PRelu"})
# Ops an attention block may hold between its head split and its merge (each acts on every head apart, or
# computes a Reshape target from shapes read at run time).
HEADWISE = frozenset({"Reshape", "Transpose", "MatMul", "Mul", "Div", "Add", "Sub", "Softmax", "IsNaN", "Where",
                      "Shape", "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Cast", "Identity"})
MAX_BLOCK_NODES = 256  # a forward walk from q, k and v that grows past this has left the block


@dataclasses.dataclass(eq=False)
class Projection:
    """An up-projection: ``MatMul(x, weight)`` and the ``Add`` of its bias (None without one), or a ``Gemm``
    (its bias its third input, ``bias_add`` the Gemm itself). ``transposed``: the weight is stored
    ``[units, d]`` (Gemm's ``transB=1``, what torch.nn.Linear exports), its units along axis 0."""

    matmul: gs.Node
    weight: gs.Constant
    bias_add: gs.Node | None
    bias: gs.Constant | None
    transposed: bool = False

    @property
    def output(self) -> gs.Tensor:
        return (self.bias_add or self.matmul).outputs[0]


@dataclasses.dataclass(eq=False)
class UnitGroup:
    ups: list[Projection]
    region: list[gs.Node]  # the elementwise nodes between, in graph order
    hidden: gs.Tensor  # the down-projection's input: what is measured on calibration data
    down: gs.Node
    down_weight: gs.Constant
    down_bias_add: gs.Node | None
    down_bias: gs.Constant | None
    units: int
    down_transposed: bool = False  # the down weight stored [d', units] (Gemm transB=1)
    axis: int = -1  # the units' axis in the activations: -1 for an MLP, 1 for convolutions' channels (NCHW)
    block: int = 1  # channels per unit: an attention head's size (removed together), 1 otherwise
    head_tensors: list = dataclasses.field(default_factory=list)  # the attention block's tensors (shapes redone)

    @property
    def count(self) -> int:
        """Units in the group: hidden units, channels, or heads."""
        return self.units // self.block

    @property
    def kind(self) -> str:
        return "heads" if self.block > 1 else "channels" if self.conv else "units"

    @property
    def conv(self) -> bool:
        return self.axis == 1

    @property
    def down_matrix(self):
        """The down weight as ``[units, d']`` (a conv's ``[C, O * kh * kw]``)."""
        w = self.down_weight.values
        if self.conv:
            return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
        return w.T if self.down_transposed else w

    @property
    def pointwise(self) -> bool:
        """A 1x1 convolution with stride 1 and no padding: a matrix product at every pixel (refit exactly)."""
        attrs = self.down.attrs
        return self.down_weight.values.shape[2:] == (1, 1) and all(v == 1 for v in attrs.get("strides", [1])) \
            and not any(attrs.get("pads", [0])) and all(v == 1 for v in attrs.get("dilations", [1]))

    @property
    def name(self) -> str:
        """The down-projection's node name (its output's where the node has none: a hand-written graph)."""
        return self.down.name or self.down.outputs[0].name


def unit_groups(graph: gs.Graph) -> list[UnitGroup]:
    """Every MLP, convolution and attention-head group of ``graph`` (module docstring), in graph order of their
    down-projections."""
    uses = _uses(graph)
    found = head_groups(graph, uses)
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm", "Conv") or (node.op == "Gemm" and not _plain_gemm(node)) \
                or (node.op == "Conv" and node.attrs.get("group", 1) != 1):
            continue
        group, why = _group(node, graph, uses)
        if group is None:
            logger.debug("no prunable group ending at %s: %s", node.name, why)
        else:
            found.append(group)
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    return sorted(found, key=lambda g: order[id(g.down)])


def head_groups(graph: gs.Graph, uses: dict[int, int] | None = None) -> list[UnitGroup]:
    """Every attention-head group of ``graph`` (module docstring)."""
    uses = _uses(graph) if uses is None else uses
    found = []
    for match in attention_blocks(graph, logger):
        group, why = _head_group(match, graph, uses)
        if group is None:
            logger.debug("no prunable heads in the attention block at %s: %s", match.softmax.name, why)
        else:
            found.append(group)
    return found


def _head_group(m: AttentionMatch, graph: gs.Graph, uses: dict[int, int]) -> tuple[UnitGroup | None, str]:
    heads, size = m.heads, m.head_size
    width = heads * size
    if heads < 2:
        return None, "one head"
    if len({id(m.q), id(m.k), id(m.v)}) != 3:
        return None, "q, k and v are not three tensors"
    ups = [_projection(node, width, uses) if (node := producer(t)) is not None else None for t in (m.q, m.k, m.v)]
    if any(up is None for up in ups) or any(len(t.outputs) != 1 for t in (m.q, m.k, m.v)):
        return None, "q, k and v are not each a projection of their own (MatMul by a constant [d, N*H], its bias)"
    if m.bias is not None and (m.bias.shape is None or (len(m.bias.shape) == 4 and m.bias.shape[1] != 1)):
        return None, "the attention bias may differ per head"
    written = (heads, width)
    block, tensors, frontier, seen = [], [], [m.q, m.k, m.v], set()
    while frontier:  # every node from q, k and v to the merge
        tensor = frontier.pop()
        if is_graph_output(tensor, graph):
            return None, f"{tensor.name} is a graph output"
        for node in tensor.outputs:
            if node is m.merge or id(node) in seen:
                continue
            seen.add(id(node))
            block.append(node)
            if len(block) > MAX_BLOCK_NODES or node.op not in HEADWISE:
                return None, f"{node.op} {node.name} is read from the block and does not act per head"
            if node.op == "Softmax" and node is not m.softmax or node.op == "MatMul" and any(
                    constant_value(i) is not None for i in node.inputs):
                return None, f"{node.name} is read from the block and does not act per head"
            for operand in node.inputs:
                value = constant_value(operand)
                if value is not None and value.size > 1 and node.op not in ("Reshape", "Concat"):
                    return None, f"{node.name} has a constant of shape {value.shape} inside the block"
            if node.op == "Reshape":
                literal = _literals(node.inputs[1])
                if literal is None or any(t in written for t in literal):
                    return None, f"the target of {node.name} holds the head count (or is computed another way)"
            tensors += [t for t in node.outputs if t not in tensors]
            frontier += node.outputs
    literal = _literals(m.merge.inputs[1])
    if literal is None or width in literal or heads in literal:
        return None, "the merge's target holds N*H (a head count written in the graph)"
    y = m.merge.outputs[0]
    if len(y.outputs) != 1 or is_graph_output(y, graph):
        return None, "the merged context is read by more than the output projection"
    down = y.outputs[0]
    weight = down.inputs[1] if len(down.inputs) > 1 else None
    transposed = down.op == "Gemm" and bool(down.attrs.get("transB", 0))
    if down.op not in ("MatMul", "Gemm") or (down.op == "Gemm" and not _plain_gemm(down)) \
            or down.inputs[0] is not y or not isinstance(weight, gs.Constant) or weight.values.ndim != 2 \
            or weight.values.shape[1 if transposed else 0] != width or uses.get(id(weight), 0) != 1:
        return None, "the merged context is not read by an output projection by a constant [N*H, d'] of its own"
    bias_add, bias = _gemm_bias(down, uses) if down.op == "Gemm" else _bias_after(down, uses)
    if down.op == "Gemm" and len(down.inputs) > 2 and bias is None:
        return None, "the output projection's bias is not a constant vector of its own"
    return UnitGroup(ups, [], y, down, weight, bias_add, bias, width, transposed, -1, block=size,
                     head_tensors=tensors + [m.merge.inputs[0]]), ""


def _literals(tensor: gs.Tensor) -> list[int] | None:
    """The ints written in the graph that a Reshape target is made of (dims read by ``Shape`` at run time are
    not); None when it is computed in a way not followed here."""
    value = constant_value(tensor)
    if value is not None:
        return [int(x) for x in value.reshape(-1)]
    node = producer(tensor)
    if node is None or node.op == "Shape":
        return []
    if node.op == "Concat":
        parts = [_literals(t) for t in node.inputs]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]
    if node.op in ("Slice", "Gather", "Unsqueeze", "Squeeze", "Cast", "Identity"):  # indices are not dims
        return _literals(node.inputs[0])
    return None


def _uses(graph: gs.Graph) -> dict[int, int]:
    """How many node inputs read each tensor (by id)."""
    counts: dict[int, int] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    return counts


def _plain_gemm(node: gs.Node) -> bool:
    """A Gemm that is a linear layer: alpha = beta = 1, A not transposed."""
    attrs = node.attrs
    return attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)


def _group(down: gs.Node, graph: gs.Graph, uses: dict[int, int]) -> tuple[UnitGroup | None, str]:
    weight = down.inputs[1]
    conv = down.op == "Conv"
    if not isinstance(weight, gs.Constant) or weight.values.ndim != (4 if conv else 2):
        return None, f"the down-projection's weight is not a {4 if conv else 2}-D constant"
    if uses.get(id(weight), 0) != 1:
        return None, "the down-projection's weight is read elsewhere too"
    transposed = down.op == "Gemm" and bool(down.attrs.get("transB", 0))
    units = int(weight.values.shape[1 if transposed or conv else 0])
    if units < MIN_UNITS:
        return None, f"{units} hidden units (fewer than {MIN_UNITS})"
    hidden = down.inputs[0]
    # walk back through the elementwise region to the up-projections
    region, ups, frontier, seen = [], [], [hidden], set()
    while frontier:
        tensor = frontier.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if is_graph_output(tensor, graph):
            return None, f"{tensor.name} is a graph output"
        node = producer(tensor)
        if node is None:
            return None, f"{tensor.name} is a graph input"
        up = _conv_projection(node, units, uses) if conv else _projection(node, units, uses)
        if up is not None:
            ups.append(up)
            continue
        if node.op not in ELEMENTWISE and not (conv and node.op in CHANNELWISE):
            return None, f"{node.op} {node.name} between the projections is not elementwise"
        region.append(node)
        for operand in node.inputs:
            if isinstance(operand, gs.Constant) or constant_value(operand) is not None:
                value = constant_value(operand)
                if value is None or not (value.size == 1 or (value.size == units and unit_axis(value, node, conv)
                                                             is not None)):
                    return None, f"{node.name} has a constant of shape {None if value is None else value.shape}"
            elif not (isinstance(operand, gs.Variable) and operand.name == ""):
                frontier.append(operand)
    if not ups:
        return None, "no up-projection feeds it"
    # every tensor inside the region is read only inside it (or by the down-projection)
    inside = {id(n) for n in region} | {id(down)}
    tensors = [up.output for up in ups]
    tensors += [t for n in region for t in n.outputs]
    for tensor in tensors:
        if is_graph_output(tensor, graph):
            return None, f"{tensor.name} is a graph output"
        if any(id(c) not in inside for c in tensor.outputs):
            return None, f"{tensor.name} is read outside the MLP"
    bias_add, bias = _gemm_bias(down, uses) if down.op in ("Gemm", "Conv") else _bias_after(down, uses)
    if down.op in ("Gemm", "Conv") and len(down.inputs) > 2 and bias is None:
        return None, f"the down {down.op}'s bias is not a constant vector of its own"
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    region.sort(key=lambda n: order[id(n)])
    return UnitGroup(ups, region, hidden, down, weight, bias_add, bias, units, transposed, 1 if conv else -1), ""


def unit_axis(value, node: gs.Node, conv: bool) -> int | None:
    """The axis of a per-unit constant along which units run: the last for an MLP; for a conv group's NCHW
    activations, a BatchNormalization parameter's only axis or the channel axis of ``[C, 1, 1]`` /
    ``[1, C, 1, 1]``; None when the constant would broadcast along another axis."""
    if not conv:
        return value.ndim - 1 if value.shape[-1] == value.size else None
    if node.op == "BatchNormalization":
        return 0 if value.ndim == 1 else None
    if value.ndim >= 3 and value.shape[-3] == value.size:
        return value.ndim - 3
    return None


def _conv_projection(node: gs.Node, units: int, uses: dict[int, int]) -> Projection | None:
    """``node`` as a convolution of ``units`` output channels (group 1), its own bias the third input."""
    if node.op != "Conv" or node.attrs.get("group", 1) != 1:
        return None
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or weight.values.ndim != 4 or weight.values.shape[0] != units \
            or uses.get(id(weight), 0) != 1:
        return None
    bias_add, bias = _gemm_bias(node, uses)
    if len(node.inputs) > 2 and (bias is None or bias.values.shape != (units,)):
        return None
    return Projection(node, weight, bias_add, bias, transposed=True)  # units along the weight's axis 0


def _projection(node: gs.Node, units: int, uses: dict[int, int]) -> Projection | None:
    """``node`` as the end of an up-projection of ``units`` outputs: MatMul(x, W [d, units]) or Add(it, b), or
    a linear Gemm."""
    if node.op == "Gemm":
        weight, transposed = node.inputs[1], bool(node.attrs.get("transB", 0))
        bias_add, bias = _gemm_bias(node, uses)
        if not _plain_gemm(node) or not isinstance(weight, gs.Constant) or weight.values.ndim != 2 \
                or weight.values.shape[0 if transposed else 1] != units or uses.get(id(weight), 0) != 1 \
                or (len(node.inputs) > 2 and (bias is None or bias.values.shape != (units,))):
            return None
        return Projection(node, weight, bias_add, bias, transposed)
    bias_add = bias = None
    if node.op == "Add":
        for var, const in (node.inputs, node.inputs[::-1]):
            value = constant_value(const)
            inner = producer(var)
            if value is not None and value.shape == (units,) and inner is not None and inner.op == "MatMul" \
                    and isinstance(const, gs.Constant) and uses.get(id(const), 0) == 1 \
                    and len(inner.outputs[0].outputs) == 1:
                bias_add, bias, node = node, const, inner
                break
        else:
            return None
    if node.op != "MatMul":
        return None
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or weight.values.ndim != 2 or weight.values.shape[1] != units \
            or uses.get(id(weight), 0) != 1 or isinstance(node.inputs[0], gs.Constant):
        return None
    return Projection(node, weight, bias_add, bias)


def _gemm_bias(node: gs.Node, uses: dict[int, int]) -> tuple[gs.Node | None, gs.Constant | None]:
    """A Gemm's or Conv's own bias (its third input), when a constant vector read by it alone."""
    if len(node.inputs) < 3:
        return None, None
    bias = node.inputs[2]
    if isinstance(bias, gs.Constant) and bias.values.ndim == 1 and uses.get(id(bias), 0) == 1:
        return node, bias
    return None, None


def _bias_after(down: gs.Node, uses: dict[int, int]) -> tuple[gs.Node | None, gs.Constant | None]:
    """The Add of a constant [d'] right after the down-projection (where a refit's bias goes), if any."""
    out = down.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None, None
    add = out.outputs[0]
    width = down.inputs[1].values.shape[1]  # a MatMul's [h, d']
    for operand in add.inputs:
        if operand is not out and isinstance(operand, gs.Constant) and operand.values.shape == (width,) \
                and uses.get(id(operand), 0) == 1:
            return add, operand
    return None, None


__all__ = ["CHANNELWISE", "ELEMENTWISE", "HEADWISE", "MIN_UNITS", "UnitGroup", "Projection", "head_groups",
           "unit_groups", "unit_axis"]
