"""A model causal along its sequence axis decodes a few positions per call: which ops carry state from one call to the next, or the first construct that is not causal (a SpecError saying why).

Decoding runs the model on the new positions only. An op that works on each position alone (element-wise math,
projections, norms over features, experts per token) needs nothing from earlier calls; an op that reads earlier
positions needs them carried: a scan over the axis its cell's states, a linear_scan or delta_rule_scan its
state, a causal attention the keys and values seen so far, a causal convolution its last window of inputs, a
cumulative sum or product its running total, a token shift its last inputs, and rotary embeddings at their default
positions the count of positions seen. Anything that reads later positions, or all of them (a bidirectional or
reversed scan, a non-causal attention, a reduction, softmax, flip, slice or concatenation along the axis), cannot
decode.

The sequence axis is a symbolic size (T by default): every dim whose size has it as a factor is along the axis,
and an op that carries state must run along the axis alone (not B*T, where rows follow one another).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gatedsl.errors import SpecError
from gatedsl.ir.graph import Graph
from gatedsl.ir.types import Dim, Sym, TensorType, numel, show_shape

CarriedKind = Literal["scan", "linear_scan", "delta_rule_scan", "kv_cache", "conv_window", "running_total",
                      "positions", "shift"]


@dataclass(frozen=True)
class Carried:
    """What one op keeps between calls: its kind, a key naming it in the decoding state, and details it needs."""

    kind: CarriedKind
    key: str
    batch_dims: tuple[int, ...] = ()  # per carried tensor: the dim of the batch's rows in it, -1 where unknown
    window: int | None = None  # a sliding-window attention's window: older keys are dropped
    width: int = 0  # the inputs a causal convolution (its receptive field less one) or a token shift keeps


@dataclass
class DecodePlan:
    """The decoding of one graph: the ops that carry state, the nodes the outputs need, the axis and the batch."""

    seq: str
    batch: str | None  # the symbolic size of the batch (the inputs' first dim), None where it is a number
    carried: dict[int, Carried] = field(default_factory=dict)
    needed: set[int] = field(default_factory=set)
    input_axes: dict[str, int | None] = field(default_factory=dict)  # each input's sequence dim, None if it has none


def along(d: Dim, seq: str) -> bool:
    return isinstance(d, Sym) and seq in d.factors


def seq_dims(t: TensorType, seq: str) -> list[int]:
    return [i for i, d in enumerate(t.shape) if along(d, seq)]


def derive_decoding(graph: Graph, seq: str = "T") -> DecodePlan:
    """The plan for decoding `graph` along `seq`; a SpecError at the first op that is not causal along it."""
    inputs = {name: graph.type_of((node, 0)) for name, node in graph.inputs}
    axes = {name: _one_axis(t, seq) for name, t in inputs.items()}
    if not any(a is not None for a in axes.values()):
        shown = ", ".join(f"{name}: {show_shape(t.shape)}" for name, t in inputs.items()) or "none"
        node = graph.node(graph.inputs[0][1]) if graph.inputs else None
        raise SpecError(f"cannot decode along {seq}: no input has a dim of symbolic size {seq} (inputs: {shown})",
                        node["span"] if node else None,
                        help=f"declare the sequence axis with a symbolic size, e.g. `input tokens: int[B, {seq}]`, "
                             f"or name another axis (seq=...)")
    firsts = [t.shape[0] for t in inputs.values() if t.rank and isinstance(t.shape[0], Sym)
              and len(t.shape[0].factors) == 1 and not along(t.shape[0], seq)]
    batch = firsts[0].factors[0] if firsts else None
    plan = DecodePlan(seq, batch, input_axes=axes)
    plan.needed = _needed(graph)
    for n in graph.order():
        if n in plan.needed:
            carried = _rule(graph, n, plan)
            if carried is not None:
                plan.carried[n] = carried
    for name, port in graph.outputs:
        t = graph.type_of(port)
        if not seq_dims(t, seq) and not _from_carried_last(graph, port, plan):
            raise SpecError(f"cannot decode along {seq}: output {name} {show_shape(t.shape)} has no {seq} axis, "
                            f"so it is not a value per position", graph.node(port[0])["span"])
    return plan


def _one_axis(t: TensorType, seq: str) -> int | None:
    dims = seq_dims(t, seq)
    return dims[0] if len(dims) == 1 else None


def _needed(graph: Graph) -> set[int]:
    """The nodes the outputs read, directly or not (aux values and what only they read are left out)."""
    todo = [port[0] for _, port in graph.outputs]
    seen: set[int] = set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += [src for src, _ in graph.node(n)["inputs"]]
    return seen


def _from_carried_last(graph: Graph, port, plan: DecodePlan) -> bool:
    """An output with no sequence axis is fine where it is the last step of a carried scan: the state after the
    latest position, which every call recomputes."""
    data = graph.node(port[0])
    return port[0] in plan.carried and getattr(data["attrs"], "last", False)


class _Refusal(Exception):
    pass


def _rule(graph: Graph, n: int, plan: DecodePlan) -> Carried | None:
    data = graph.node(n)
    try:
        return _decide(graph, n, data, plan)
    except _Refusal as why:
        raise SpecError(f"cannot decode along {plan.seq}: {why}", data["span"],
                        help=f"decoding computes only the new positions of {plan.seq}; every op must read "
                             f"nothing after a position (causal) and carry what it reads before it") from None


def _decide(graph: Graph, n: int, data: dict, plan: DecodePlan) -> Carried | None:
    seq = plan.seq
    op, a = data["op"], data["attrs"]
    ins = [graph.type_of(p) for p in data["inputs"]]
    outs = data["types"]
    key = getattr(a, "path", None) or data["name"]
    key = f"{key}#{n}"
    reading = [seq_dims(t, seq) for t in ins]
    if not any(reading):
        if op in ("input", "fill", "param") or not any(seq_dims(t, seq) for t in outs):
            return None
        raise _Refusal(f"{op} makes a value over {seq} from none")
    for t in list(outs):
        if len(seq_dims(t, seq)) > 1:
            raise _Refusal(f"{op} makes a value {show_shape(t.shape)} with two dims along {seq}: it relates "
                           f"positions to each other")
    for t, dims in zip(ins, reading):
        if len(dims) > 1:
            raise _Refusal(f"{op} reads a value {show_shape(t.shape)} with two dims along {seq}")

    def axis_of(i: int) -> int | None:
        return reading[i][0] if reading[i] else None

    def refuse_if_on(i: int, dim: int, what: str) -> None:
        axis = axis_of(i)
        if axis is not None and _norm_dim(dim, ins[i].rank) == axis:
            raise _Refusal(f"{what} along {seq} mixes positions, later ones into earlier ones")

    def rows(t: TensorType) -> int:
        return next((i for i, d in enumerate(t.shape) if plan.batch and d == Sym.named(plan.batch)), -1)

    match op:
        case "unary" | "binary" | "where" | "clamp" | "cast" | "binary_gate" | "dropout" | "noise" | "gate_chain" | "fill" \
             | "permute" | "unsqueeze" | "squeeze" | "embedding" | "take" | "one_hot" | "moe_dispatch":
            if op == "take":
                refuse_if_on(0, 0, "reading a table by rows")
            return None
        case "linear" | "projection_group" | "norm" | "heads":
            refuse_if_on(0, -1, {"linear": "a projection", "projection_group": "a projection", "norm": "a norm",
                                 "heads": "splitting heads"}[op])
            return None
        case "matmul":
            refuse_if_on(0, -1, "a matrix product's contraction")
            if ins[1].rank >= 2:
                refuse_if_on(1, -2, "a matrix product's contraction")
            return None
        case "einsum":
            spec, _, result = a.equation.replace(" ", "").partition("->")
            for letters, dims in zip(spec.split(","), reading):
                if dims and "." not in letters and letters[dims[0]] not in result:
                    raise _Refusal(f"einsum '{a.equation}' sums over {seq} (letter {letters[dims[0]]})")
            return None
        case "softmax" | "topk" | "split" | "gather" | "flip":
            refuse_if_on(0, a.dim, ALONG_ONE_DIM[op])
            return None
        case "join":
            for i in range(len(ins)):
                refuse_if_on(i, a.dim, "a concatenation" if not a.stack else "stacking")
            return None
        case "reduce":
            for d in a.dims:
                refuse_if_on(0, d, f"a {a.fn} reduction")
            return None
        case "pool":
            raise _Refusal("pooling over a value along it")
        case "index":
            return _index(a, ins[0], axis_of(0), seq)
        case "reshape":
            _reshape(ins[0], outs[0], seq)
            return None
        case "cumulative":
            axis = axis_of(0)
            if axis is None or _norm_dim(a.dim, ins[0].rank) != axis:
                return None
            if a.reverse:
                raise _Refusal(f"a reversed cumulative {a.fn} along {seq} reads later positions")
            _alone(ins[0], axis, seq, f"a cumulative {a.fn}")
            return Carried("running_total", key, (rows(outs[0]),))
        case "shift":
            axis = axis_of(0)
            if axis is None or _norm_dim(a.dim, ins[0].rank) != axis:
                return None
            _alone(ins[0], axis, seq, "a token shift")
            return Carried("shift", key, (rows(outs[0]),), width=a.steps)
        case "rope":
            if axis_of(0) is not None and axis_of(0) != ins[0].rank - 2:
                raise _Refusal(f"rope turns positions along dim -2 of {show_shape(ins[0].shape)}, not along {seq}")
            if a.positions:
                return None
            _alone(ins[0], axis_of(0), seq, "rope's count of positions")
            return Carried("positions", key)
        case "attention":
            return _attention(a, ins, reading, seq, key, rows)
        case "conv":
            return _conv(a, ins[0], axis_of(0), seq, key, rows)
        case "scan" | "linear_scan" | "delta_rule_scan":
            return _scan(op, a, data, ins, reading, seq, key, rows)
        case "cascade":
            raise _Refusal("an early-exit cascade decides each sample's exit over the whole sequence, and a "
                           "sample's skipped layers would have no state for the positions after")
        case _:
            raise _Refusal(f"{op} has no decoding rule")


ALONG_ONE_DIM = {"softmax": "a softmax", "topk": "top-k", "split": "a split", "gather": "a gather", "flip": "flipping"}


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _alone(t: TensorType, axis: int | None, seq: str, what: str) -> None:
    """An op that carries state runs along the axis itself: along the axis merged with another one (B*T, each row's
    positions after the previous row's) it would run on from one row's positions into the next row's."""
    if axis is not None and t.shape[axis] != Sym.named(seq):
        raise _Refusal(f"{what} runs along {t.shape[axis]}, {seq} merged with another axis: it runs on from one "
                       f"row's positions into the next row's")


def _index(a, x: TensorType, axis: int | None, seq: str) -> None:
    if axis is None:
        return None
    at = 0
    items = list(a.items)
    if any(it[0] == "ellipsis" for it in items):
        e = next(i for i, it in enumerate(items) if it[0] == "ellipsis")
        taken = sum(1 for it in items if it[0] in ("int", "slice"))
        items = items[:e] + [("slice", None, None, None)] * (x.rank - taken) + items[e + 1:]
    for it in items:
        if it[0] == "new":
            continue
        if at == axis and (it[0] == "int" or it[1:] not in ((None, None, None), (None, None, 1), (0, None, None),
                                                             (0, None, 1))):
            raise _Refusal(f"indexing or slicing along {seq} picks positions by number")
        at += 1
    return None


def _reshape(x: TensorType, y: TensorType, seq: str) -> None:
    """A reshape keeps positions apart where the elements of one position stay one contiguous block: the dims
    after the one along the axis hold as many elements before and after (batch dims may merge with it)."""
    before, after = seq_dims(x, seq), seq_dims(y, seq)
    if not before:
        return
    if not after:
        raise _Refusal(f"reshape {show_shape(x.shape)} -> {show_shape(y.shape)} hides the axis")
    inner_x, inner_y = _numel(x.shape[before[0] + 1:]), _numel(y.shape[after[0] + 1:])
    if inner_x != inner_y:
        raise _Refusal(f"reshape {show_shape(x.shape)} -> {show_shape(y.shape)} merges positions with features")


def _numel(shape) -> Dim:
    return numel(tuple(shape))


def _attention(a, ins, reading, seq, key, rows) -> Carried:
    q, k, v = ins[:3]
    if a.masked:
        raise _Refusal("an attention given a mask= relates every pair of positions the mask names; decoding "
                       "cannot extend it")
    if a.lengths:
        raise _Refusal("an attention with lengths= pads the sequence; in decoding, prompts of different lengths "
                       "are batched by the decoder (DecodeState.cat)")
    for t, dims, name in zip(ins[:3], reading[:3], "qkv"):
        if dims != [t.rank - 2]:
            raise _Refusal(f"attention's {name} {show_shape(t.shape)} is not along {seq} at dim -2")
        _alone(t, dims[0], seq, "an attention")
    if not a.causal:
        raise _Refusal("a non-causal attention lets each position read the later ones")
    return Carried("kv_cache", key, (rows(k), rows(v)), window=a.window)


def _conv(a, x: TensorType, axis: int | None, seq: str, key, rows) -> Carried | None:
    if axis is None:
        return None
    spatial = list(range(x.rank - a.spatial - 1, x.rank - 1))
    if axis not in spatial:
        if axis == x.rank - 1:
            raise _Refusal(f"a convolution mixes channels, and the channels are along {seq}")
        return None
    if a.spatial != 1:
        raise _Refusal(f"a 2-D convolution over {seq} reads the neighbours on both sides")
    if not a.causal:
        raise _Refusal(f"a convolution padded on both sides reads later positions along {seq} (make it causal)")
    if a.stride[0] != 1:
        raise _Refusal(f"a strided convolution along {seq} makes fewer positions than it reads")
    width = a.dilation[0] * (a.kernel[0] - 1)
    if a.padding[0] != width:
        raise _Refusal(f"a causal convolution padded by {a.padding[0]} for a reach of {width} changes the length")
    _alone(x, axis, seq, "a convolution")
    return Carried("conv_window", key, (rows(x),), width=width)


def _scan(op, a, data, ins, reading, seq, key, rows) -> Carried | None:
    finals = data["types"][1:]
    if op == "scan":
        seq_at = [i for i, r in enumerate(a.roles) if r == "seq"]
        along_axis = [reading[i] == [a.axes[j]] for j, i in enumerate(seq_at)]
        if not any(along_axis):
            return None  # a scan over another axis: each position's run is its own
        if not all(along_axis):
            raise _Refusal(f"scan of {a.cell} steps along {seq} for some sequences but not others")
        if a.reverse:
            raise _Refusal(f"a reversed scan of {a.cell} reads the sequence from its end")
        for i in seq_at:
            _alone(ins[i], reading[i][0], seq, f"a scan of {a.cell}")
        return Carried("scan", key, tuple(rows(t) for t in finals))
    # linear_scan: every per-step input has time in front (size 1 where it is the same at every step);
    # delta_rule_scan: q, k and v are [*, T, d], the gate and β [*, T].
    if op == "linear_scan":
        dims = [d for d in reading[:-1] if d]
        if any(d != [0] for d in dims):
            raise _Refusal(f"linear_scan of {a.cell} steps along another axis than {seq}")
    else:
        dims = [reading[0]] if reading[0] else []
        if dims and dims[0] != [ins[0].rank - 2]:
            raise _Refusal(f"delta_rule_scan of {a.cell} steps along another axis than {seq}")
    if not dims:
        return None
    if getattr(a, "reverse", False):
        raise _Refusal(f"a reversed {op} of {a.cell} reads the sequence from its end")
    for t, d in zip(ins, reading):
        if d:
            _alone(t, d[0], seq, f"{op} of {a.cell}")
    return Carried(op, key, tuple(rows(t) for t in finals))
