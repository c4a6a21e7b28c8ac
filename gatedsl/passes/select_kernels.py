"""Kernel selection: every fused op and every scan is given its implementation for the compile target, with the reason, in `unit.kernels`.

Fused ops (the ops gatedsl/kernels/catalog.py registers) choose among their kernels by the
registry's cost rule for the target's device, dtype and training mode, with the sizes the
graph knows statically; the backend runs them through `registry.dispatch`, which makes the
same choice again for each call's actual tensors. An op along a sequence (a linear scan, the
delta rule) also records the choice for a call of one token, what a decoder's steps run, and
why. Scans report how they run: on torch's fused GRU/LSTM kernel (native_rnn) or step by step.
The graph itself is not changed.
"""

from __future__ import annotations

from gatedsl.ir.graph import Graph
from gatedsl.ir.model import ModelIR
from gatedsl.kernels.registry import Candidate, Choice, Context, FusedOp, choose, fused_ops, kernels_for


def select_kernels(unit: ModelIR) -> ModelIR:
    unit.kernels = _choices(unit.graph, unit)
    return unit


def static_shapes(graph: Graph, data: dict) -> list[tuple[int | None, ...]]:
    """The shapes of a node's inputs with every symbolic size as None."""
    return [tuple(d if isinstance(d, int) else None for d in graph.type_of(p).shape) for p in data["inputs"]]


def where(data: dict) -> str:
    """The node as --explain names it: its instance path where it has one (a scan's cell), else its value's name."""
    span = data["span"]
    name = getattr(data["attrs"], "path", None) or data["name"]
    return f"{name} (line {span.line})" if span is not None else name


def _choices(graph: Graph, unit: ModelIR) -> list[Choice]:
    ops = fused_ops()
    target = unit.target
    out: list[Choice] = []
    for n in graph.order():
        data = graph.node(n)
        op = data["op"]
        if op in ops:
            sizes = ops[op].sizes(data["attrs"], static_shapes(graph, data))
            ctx = Context(target.device, target.dtype, target.training, sizes)
            choice = choose(op, ctx, node=where(data))
            if ops[op].time is not None:
                choice.decoding = _one_token(ops[op], ctx, choice.node)
            out.append(choice)
        elif op == "scan":
            out.append(_scan_choice(data, unit))
        body = getattr(data["attrs"], "body", None)
        if isinstance(body, Graph):
            out += _choices(body, unit)
    return out


def _one_token(fused: FusedOp, ctx: Context, node: str) -> Choice:
    """The choice for a call of one token (the op's time size 1, as a decoder's steps call it); its reason says what
    the kernel does and what each kernel that applies costs there."""
    one = ctx.with_size(fused.time, 1)
    choice = choose(fused.name, one, node=node)
    costs = sorted((k.cost(one), k.name) for k in kernels_for(fused.name) if k.applies(one) is None)
    why = next(k.why for k in kernels_for(fused.name) if k.name == choice.kernel)
    choice.reason = f"{why}; cost at {fused.time} = 1: " + ", ".join(f"{name} {cost:.3g}" for cost, name in costs)
    return choice


def _scan_choice(data: dict, unit: ModelIR) -> Choice:
    a = data["attrs"]
    t = unit.target
    target = {"device": t.device, "dtype": t.dtype, "training": t.training, "sizes": {}}
    if a.kernel in ("gru", "lstm"):
        name = f"torch.{a.kernel.upper()}"
        return Choice(node=where(data), op="scan", kernel=name, target=target,
                      reason=f"the cell {a.cell} is exactly torch's {a.kernel.upper()} (native_rnn)",
                      candidates=[Candidate(kernel=name, applies=True, why="torch's fused kernel, one call for all steps"),
                                  Candidate(kernel="loop", applies=True, why="the step-by-step form")])
    if unit.opt_level < 2:
        why = f"native-kernel recognition runs at -O2 (this is -O{unit.opt_level})"
    else:
        why = f"the cell {a.cell} is not exactly torch's GRU or LSTM"
    return Choice(node=where(data), op="scan", kernel="loop", target=target,
                  reason="the step-by-step form: " + why,
                  candidates=[Candidate(kernel="torch.GRU/LSTM", applies=False, why=why),
                              Candidate(kernel="loop", applies=True, why="the body once per step")])
