"""Native RNN kernels: a scan whose cell is exactly torch's GRU or LSTM runs on torch's fused kernel; any other cell keeps the loop.

Exactly: the same ops, wiring, activations and gate order (add and mul in either operand
order), a distinct projection per gate and state, and a bias on every projection or on none.
The kernel's weights are concatenated at run time from the spec's own learned tensors, which
stay at their paths, so the state_dict is the same as the loop's.
"""

from __future__ import annotations

from typing import Any

from gatedsl.ir.graph import Graph, Port, rewrite_scans
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import ScanAttrs

# Templates, as torch computes them. ("lin", SRC, NAME): a projection of SRC whose weight (and bias)
# binds to NAME; "x", "h", "c": the cell's inputs; add and mul match either operand order.
_GRU_R = ("sigmoid", ("add", ("lin", "x", "ir"), ("lin", "h", "hr")))
_GRU_Z = ("sigmoid", ("add", ("lin", "x", "iz"), ("lin", "h", "hz")))
_GRU_N = ("tanh", ("add", ("lin", "x", "in"), ("mul", _GRU_R, ("lin", "h", "hn"))))
GRU = {"h": ("add", ("mul", ("rsub1", _GRU_Z), _GRU_N), ("mul", _GRU_Z, "h"))}
GRU_GATES = ("r", "z", "n")


def _lstm_gate(act: str, gate: str) -> tuple:
    return (act, ("add", ("lin", "x", "i" + gate), ("lin", "h", "h" + gate)))


_LSTM_C = ("add", ("mul", _lstm_gate("sigmoid", "f"), "c"),
           ("mul", _lstm_gate("sigmoid", "i"), _lstm_gate("tanh", "g")))
LSTM = {"h": ("mul", _lstm_gate("sigmoid", "o"), ("tanh", _LSTM_C)), "c": _LSTM_C}
LSTM_GATES = ("i", "f", "g", "o")


def native_rnn(unit: ModelIR) -> ModelIR:
    unit.graph = _select(unit.graph)
    return unit


def _select(graph: Graph) -> Graph:
    return rewrite_scans(graph, _select_kernel)


def _select_kernel(out: Graph, data: dict, inputs: list) -> tuple[ScanAttrs, list]:
    """A scan's attrs with a native kernel where its body is torch's GRU or LSTM; else with its body's scans selected."""
    attrs = data["attrs"]
    native = recognise(attrs)
    attrs = attrs.model_copy(update={"body": _select(attrs.body)} if native is None else
                             {"kernel": native[0], "weights": native[1]})
    return attrs, inputs


def recognise(a: ScanAttrs) -> tuple[str, tuple[tuple[str, ...], ...]] | None:
    """("gru" | "lstm", (input weights, state weights, input biases, state biases) in torch's gate order), or None."""
    body = a.body
    for kind, template, gates, roles in (("gru", GRU, GRU_GATES, ("seq", "state")),
                                         ("lstm", LSTM, LSTM_GATES, ("seq", "state", "state"))):
        if a.roles != roles or a.kernel != "loop" or len(body.outputs) != len(roles):  # out, then each state
            continue
        # By position: the sequence, then the states in torch's order (h, then c).
        leaves = dict(zip(("x", *template), (node for _, node in body.inputs)))
        x, h, *c = (body.type_of((leaves[name], 0)) for name in leaves)
        if x.shape[:-1] != h.shape[:-1] or any(t != h for t in c) or body.outputs[0][1] != body.outputs[1][1]:
            continue  # one batch for the sequence and the states, and the cell emits its new h
        bound: dict[str, Any] = {}
        if all(_match(body, port, template[state], leaves, bound) for state, (_, port) in
               zip(template, body.outputs[1:])):
            w_ih = tuple(bound["i" + g][0] for g in gates)
            w_hh = tuple(bound["h" + g][0] for g in gates)
            b_ih = tuple(bound["i" + g][1] for g in gates)
            b_hh = tuple(bound["h" + g][1] for g in gates)
            if len(set(w_ih + w_hh)) != 2 * len(gates):
                continue  # a projection shared between gates (z = r): torch's cell has one per gate
            biases = b_ih + b_hh
            if all(b is None for b in biases):
                return kind, (w_ih, w_hh, (), ())
            if all(b is not None for b in biases):
                return kind, (w_ih, w_hh, b_ih, b_hh)
    return None


def _match(body: Graph, port: Port, pattern, leaves: dict[str, int], bound: dict[str, Any]) -> bool:
    """Whether the value at `port` is `pattern`, binding projections by name (consistently) in `bound`."""
    node, index = port
    if index != 0:
        return False
    if isinstance(pattern, str):
        return leaves.get(pattern) == node
    data = body.node(node)
    op, a = data["op"], data["attrs"]
    head = pattern[0]
    if head == "lin":
        _, src, name = pattern
        state = body.type_of((leaves["h"], 0))
        if op != "linear" or data["types"][0] != state or not _match(body, data["inputs"][0], src, leaves, bound):
            return False  # every projection gives the state's shape: the kernel's weights are [gates * H, ...]
        weights = (a.weight, a.bias)
        return bound.setdefault(name, weights) == weights
    if head in ("sigmoid", "tanh"):
        return op == "unary" and a.fn == head and _match(body, data["inputs"][0], pattern[1], leaves, bound)
    if head == "rsub1":  # 1 - v
        return (op == "binary" and a.fn == "sub" and a.left_scalar == 1 and a.right_scalar is None
                and not isinstance(a.left_scalar, bool) and _match(body, data["inputs"][0], pattern[1], leaves, bound))
    if op != "binary" or a.fn != head or a.left_scalar is not None or a.right_scalar is not None \
            or len(data["inputs"]) != 2:
        return False
    left, right = data["inputs"]
    for first, second in ((left, right), (right, left)):
        trial = dict(bound)
        if _match(body, first, pattern[1], leaves, trial) and _match(body, second, pattern[2], leaves, trial):
            bound.clear()
            bound.update(trial)
            return True
    return False
