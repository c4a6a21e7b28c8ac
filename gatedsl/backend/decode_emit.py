"""Emit a model's decoding step: the fx graph of the outputs over the new positions, each op that carries state
(passes/derive_decoding.py) calling gatedsl/backend/decode_runtime.py with the call's state."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from gatedsl.backend import decode_runtime
from gatedsl.backend.fx_emit import Emitter, emit_node, fused_runner, lower_node, scan_cell
from gatedsl.ir.graph import Graph
from gatedsl.ir.ops import attention_groups
from gatedsl.passes.derive_decoding import Carried, DecodePlan


def emit_decoder(graph: Graph, plan: DecodePlan, root: nn.Module) -> fx.GraphModule:
    """forward(call, *inputs) -> tuple of outputs, for a DecodeCall `call`; `root` holds the model's parameters
    at their spec paths (the scanned cells' sub-modules are added to it)."""
    em = Emitter(graph, root, prefix="")
    call = em.fx.placeholder("decode_call")
    for n in graph.order():
        data = graph.node(n)
        if n not in plan.needed and data["op"] != "input":
            continue  # what only aux values read (a load-balancing loss's logits) is not computed
        args = [em.values[p] for p in data["inputs"]]
        carried = plan.carried.get(n)
        if carried is not None:
            out = CARRYING[carried.kind](em, data, args, carried, call)
        else:
            out = lower_node(em, data, args)
        emit_node(em, n, data, out)
    em.fx.output(tuple(em.values[port] for _, port in graph.outputs))
    em.fx.lint()
    return fx.GraphModule(root, em.fx, class_name=graph.name + "Decoding")


def _scan(em, data, args, carried: Carried, call):
    a = data["attrs"]
    cell = scan_cell(em, a)
    weights = tuple(tuple(path[len(a.path) + 1:] for path in group) for group in a.weights)
    return em.call(decode_runtime.scan, (call, carried.key, carried.batch_dims, cell, tuple(args), a.roles, a.axes,
                                         a.last, a.kernel, weights), name=data["name"])


def _fused_scan(em, data, args, carried: Carried, call):
    run = fused_runner(data)

    def carrying(decode_call, *tensors):  # a closure: fx's generated code can call a function but not spell one
        return decode_runtime.fused_scan(decode_call, carried.key, carried.kind, carried.batch_dims, run, *tensors)

    carrying.__name__ = carrying.__qualname__ = run.__name__
    return em.call(carrying, (call, *args), name=data["name"])


def _attention(em, data, args, carried: Carried, call):
    a = data["attrs"]
    q, k = (em.ir.type_of(port) for port in data["inputs"][:2])
    return em.call(decode_runtime.attention, (call, carried.key, carried.batch_dims, carried.window, *args[:3],
                                              a.scale, attention_groups(q, k)), name=data["name"])


def _conv(em, data, args, carried: Carried, call):
    a = data["attrs"]
    weight = em.get_attr(a.weight)
    bias = em.get_attr(a.bias) if a.bias else None
    return em.call(decode_runtime.causal_conv, (call, carried.key, carried.batch_dims, carried.width, args[0], weight,
                                                bias, a.dilation, a.groups), name=data["name"])


def _running_total(em, data, args, carried: Carried, call):
    a = data["attrs"]
    return em.call(decode_runtime.running_total, (call, carried.key, carried.batch_dims, args[0], a.fn, a.dim),
                   name=data["name"])


def _rope(em, data, args, carried: Carried, call):
    a = data["attrs"]
    return em.call(decode_runtime.rope, (call, args[0], a.theta, a.rotary_dim), name=data["name"])


def _shift(em, data, args, carried: Carried, call):
    a = data["attrs"]
    return em.call(decode_runtime.shift, (call, carried.key, carried.batch_dims, args[0], a.dim, a.steps, a.value,
                                          args[1] if a.given else None), name=data["name"])


CARRYING = {
    "scan": _scan,
    "linear_scan": _fused_scan,
    "delta_rule_scan": _fused_scan,
    "kv_cache": _attention,
    "conv_window": _conv,
    "running_total": _running_total,
    "positions": _rope,
    "shift": _shift,
}
