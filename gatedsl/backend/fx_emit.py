"""Emit a torch.fx.GraphModule from the graph IR: learned tensors under their spec paths, one fx node per op, scanned cells as sub-modules."""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gatedsl.backend import runtime
from gatedsl.ir.graph import Graph, InitSpec, ModuleSpec, ParamSpec
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import attention_groups, cascade_stages
from gatedsl.ir.types import Sym, TensorType


def emit(unit: ModelIR) -> fx.GraphModule:
    gm = emit_graph(unit.graph)
    gm.meta["gatedsl"] = {"model": unit.model.name,
                          "parameters": {k: getattr(v, "name", v) for k, v in unit.parameters.items()}}
    return gm


def emit_graph(graph: Graph) -> fx.GraphModule:
    root = build_module_tree(graph.all_params(), graph.all_modules())
    gm = _emit_graph(graph, root, prefix="", top=True)
    gm._ir = graph  # spec paths never start with "_", so this cannot clash with a weight
    return gm


def _unpickle(graph: Graph, state: dict, training: bool, meta: dict) -> fx.GraphModule:
    gm = emit_graph(graph)
    gm.load_state_dict(state, assign=True)  # the saved dtypes and devices: a .double() model stays double
    gm.train(training)
    gm.meta.update(meta)
    return gm


class CompiledModule(fx.GraphModule):
    """A compiled model: a GraphModule whose `aux` holds the `aux NAME = ...` values of its latest call.

    fx pickles and deep-copies a GraphModule by re-tracing its code, which cannot see
    through a scan's Python loop (and drops this class); both go through the IR instead.
    """

    aux = property(runtime.aux_values)
    _ir: Graph  # the graph this module was emitted from

    def __reduce__(self):
        return (_unpickle, (self._ir, self.state_dict(), self.training, self.meta))

    def __deepcopy__(self, memo):
        state = {k: copy.deepcopy(v.detach(), memo) for k, v in self.state_dict().items()}
        return _unpickle(self._ir, state, self.training, copy.deepcopy(self.meta, memo))


# ---------------------------------------------------------------- modules
def build_module_tree(params: list[ParamSpec], modules: list[ModuleSpec]) -> nn.Module:
    """An nn.Module whose parameters sit at their spec paths, initialised in declaration order."""
    root = nn.Module()
    for p in params:
        parent, leaf = parent_module(root, p.path)
        tensor = torch.empty(p.shape)
        init_tensor(tensor, p.init)
        parent.register_parameter(leaf, nn.Parameter(tensor))
    for m in modules:
        parent, leaf = parent_module(root, m.path)
        parent.add_module(leaf, runtime.Noise() if m.kind == "noise" else nn.Dropout(m.args["p"]))
    return root


def parent_module(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parts, leaf = path.split(".")
    module = root
    for part in parts:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module, leaf


def init_tensor(tensor: torch.Tensor, spec: InitSpec) -> None:
    a = spec.args
    init = nn.init
    with torch.no_grad():
        match spec.kind:
            case "zeros":
                init.zeros_(tensor)
            case "ones":
                init.ones_(tensor)
            case "constant":
                init.constant_(tensor, a[0])
            case "normal":
                init.normal_(tensor, a[0], a[1])
            case "trunc_normal":
                init.trunc_normal_(tensor, std=a[0], a=-2 * a[0], b=2 * a[0])
            case "uniform":
                init.uniform_(tensor, a[0], a[1])
            case "xavier_uniform":
                init.xavier_uniform_(tensor, gain=a[0] if a else 1.0)
            case "xavier_normal":
                init.xavier_normal_(tensor, gain=a[0] if a else 1.0)
            case "kaiming_uniform":
                init.kaiming_uniform_(tensor, a=a[0] if a else 0.0)
            case "kaiming_normal":
                init.kaiming_normal_(tensor, a=a[0] if a else 0.0)
            case "orthogonal":
                init.orthogonal_(tensor, gain=a[0] if a else 1.0)
            case "fan_in_uniform":
                runtime.fan_in_uniform_(tensor, a[0])
            case "s4d_real":
                runtime.s4d_real_(tensor)
            case "dt_bias":
                runtime.dt_bias_(tensor, a[0], a[1], a[2])
            case "log_of_uniform":
                tensor.uniform_(a[0], a[1]).log_()
            case _:
                raise AssertionError(f"unknown init {spec.kind}")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, leaf = parent_module(root, path)
    parent._modules[leaf] = module


def _module_at(root: nn.Module, path: str) -> nn.Module:
    """The module at `path`, made empty where the spec put nothing there (a cell without weights)."""
    parent, leaf = parent_module(root, path)
    if leaf not in parent._modules:
        parent.add_module(leaf, nn.Module())
    return parent._modules[leaf]


# ------------------------------------------------------------------ graphs
class Emitter:
    def __init__(self, graph: Graph, root: nn.Module, prefix: str):
        self.ir = graph
        self.root = root
        self.prefix = prefix
        self.fx = fx.Graph()
        self.values: dict[tuple[int, int], fx.Node] = {}
        self.sym_sources: dict[Sym, tuple[fx.Node, int]] = {}
        self.sym_values: dict[Sym, Any] = {}
        self.like: fx.Node | None = None  # a float tensor whose dtype and device new tensors follow

    def rel(self, path: str) -> str:
        assert path.startswith(self.prefix), (path, self.prefix)
        return path[len(self.prefix):]

    def get_attr(self, path: str) -> fx.Node:
        return self.fx.get_attr(self.rel(path))

    def call(self, fn: Callable, args: tuple, kwargs: dict | None = None, name: str | None = None) -> fx.Node:
        # fx keeps keywords and globals out of its names, but not `self`, forward()'s first argument.
        if name == "self":
            name = "self_"
        return self.fx.create_node("call_function", fn, args, kwargs or {}, name=name)

    def size(self, d) -> Any:
        """A runtime size for a static dim: the int itself, or an fx value read off a tensor that has it."""
        if isinstance(d, int):
            return d
        if d in self.sym_values:
            return self.sym_values[d]
        if d in self.sym_sources:
            node, axis = self.sym_sources[d]
            value = self.fx.call_method("size", (node, axis))
        else:
            value = d.coeff
            for factor in d.factors:
                source = self.sym_sources.get(Sym.named(factor))
                if source is None:
                    raise AssertionError(f"no tensor in scope has the size {factor}")
                size = self.size(Sym.named(factor))
                value = size if value == 1 else self.call(operator.mul, (value, size))
        self.sym_values[d] = value
        return value

    def float_like(self) -> fx.Node | None:
        """`like`, or where no float tensor came before, a learned tensor (which follows .double())."""
        if self.like is None and self.ir.params:
            self.like = self.get_attr(self.ir.params[0].path)
        return self.like

    def record(self, node: fx.Node, ttype: TensorType) -> None:
        for axis, d in enumerate(ttype.shape):
            if isinstance(d, Sym) and d not in self.sym_sources:
                self.sym_sources[d] = (node, axis)
        if self.like is None and ttype.dtype == "float":
            self.like = node


def _emit_graph(graph: Graph, root: nn.Module, prefix: str, top: bool) -> fx.GraphModule:
    em = Emitter(graph, root, prefix)
    for n in graph.order():
        data = graph.node(n)
        emit_node(em, n, data, lower_node(em, data, [em.values[p] for p in data["inputs"]]))
    if top and graph.aux:  # every call hands its aux values to a recorder on the module (gatedsl.aux_outputs)
        root.add_module("_aux", runtime.AuxRecorder([name for name, _ in graph.aux]))
        em.fx.call_module("_aux", tuple(em.values[port] for _, port in graph.aux))
    results = [em.values[port] for _, port in graph.outputs]
    if top:
        em.fx.output(results[0] if len(results) == 1 else tuple(results))
    else:
        em.fx.output(tuple(results))
    em.fx.lint()
    owner = root if not prefix else _module_at(root, prefix.rstrip("."))
    gm = (CompiledModule if top else fx.GraphModule)(owner, em.fx, class_name=graph.name)
    if not top:
        # fx copies only what the graph reads; a weight an optimisation moved out of the body
        # (a hoisted input projection) stays here, at its path, so the state_dict is unchanged.
        for name, param in owner.named_parameters():
            if not _has_parameter(gm, name):
                parent, leaf = parent_module(gm, name)
                parent.register_parameter(leaf, param)
        _follow_order(gm, owner)  # declaration order, as at every opt level, not the order of first use
    return gm


def lower_node(em: Emitter, data: dict, args: list[fx.Node]):
    """The fx value(s) of one node: its op's lowering, or the registry's dispatch for a fused op."""
    return (LOWERINGS.get(data["op"]) or _fused)(em, data, args)


def emit_node(em: Emitter, n: int, data: dict, out) -> None:
    """Record what lowering node `n` gave (one fx value, or one per result) as its results' values."""
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if len(data["types"]) > 1 and len(outs) == 1:
        named = data.get("out_names", {})
        outs = [em.call(operator.getitem, (outs[0], i), name=named.get(i, f"{data['name']}_{i}"))
                for i in range(len(data["types"]))]
    for i, (node, ttype) in enumerate(zip(outs, data["types"])):
        em.values[(n, i)] = node
        em.record(node, ttype)


def _follow_order(module: nn.Module, like: nn.Module) -> None:
    """Reorder `module`'s parameters and sub-modules, recursively, as `like` has them."""
    for attr in ("_parameters", "_modules"):
        mine, theirs = getattr(module, attr), list(getattr(like, attr))
        ordered = sorted(mine, key=lambda k: theirs.index(k) if k in theirs else len(theirs))
        items = [(k, mine[k]) for k in ordered]
        mine.clear()
        mine.update(items)
    for name, child in module._modules.items():
        other = like._modules.get(name)
        if child is not None and other is not None and other is not child:
            _follow_order(child, other)


def _has_parameter(module: nn.Module, path: str) -> bool:
    try:
        module.get_parameter(path)
    except AttributeError:
        return False
    return True


# ------------------------------------------------------------- lowerings
LOWERINGS: dict[str, Callable[[Emitter, dict, list[fx.Node]], Any]] = {}


def _fused(em, data, args):
    """A fused op (gatedsl/kernels/catalog.py): one call of the registry's dispatch, which picks its kernel per call."""
    return em.call(fused_runner(data), tuple(args), name=data["name"])


def fused_runner(data: dict) -> Callable:
    """The function that runs fused op `data` on its tensors through the registry's dispatch."""
    from gatedsl.kernels.registry import dispatch, fused_ops, prepare

    fused = fused_ops()[data["op"]]  # a KeyError here is an op the backend has no lowering for: a bug
    prepare(fused.name)
    a = data["attrs"]
    key = fused.key(a)

    def run(*tensors):  # the attrs ride in the closure: fx's generated code cannot spell a pydantic model
        return dispatch(fused.name, a, key, *tensors)

    run.__name__ = run.__qualname__ = fused.name
    return run


def lowering(op: str):
    def register(fn):
        LOWERINGS[op] = fn
        return fn

    return register


@lowering("input")
def _input(em, data, args):
    node = em.fx.placeholder(data["attrs"].name)
    return node


@lowering("param")
def _param(em, data, args):
    return em.get_attr(data["attrs"].path)


@lowering("fill")
def _fill(em, data, args):
    a = data["attrs"]
    if args:
        dtype = None if a.dtype == "float" else (torch.long if a.dtype == "int" else torch.bool)
        return em.call(torch.full_like, (args[0], a.value), {"dtype": dtype} if dtype else {})
    sizes = [em.size(d) for d in a.shape]
    return em.call(runtime.fill, (sizes, a.value, em.float_like(), a.dtype), name=data["name"])


_UNARY = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu,
    "softplus": F.softplus, "logsigmoid": F.logsigmoid, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "abs": torch.abs, "neg": operator.neg, "sin": torch.sin, "cos": torch.cos,
    "elu": F.elu, "square": torch.square, "reciprocal": torch.reciprocal, "sign": torch.sign,
    "not": torch.logical_not, "erf": torch.erf,
}


@lowering("unary")
def _unary(em, data, args):
    return em.call(_UNARY[data["attrs"].fn], (args[0],), name=data["name"])


_BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "lt": operator.lt,
    "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": operator.eq, "ne": operator.ne,
    "and": torch.logical_and, "or": torch.logical_or, "maximum": torch.maximum, "minimum": torch.minimum,
}


@lowering("binary")
def _binary(em, data, args):
    a = data["attrs"]
    if a.fn in ("maximum", "minimum") and len(args) == 1:
        scalar = a.left_scalar if a.left_scalar is not None else a.right_scalar
        bound = {"min": scalar} if a.fn == "maximum" else {"max": scalar}
        return em.call(torch.clamp, (args[0],), bound, name=data["name"])
    operands = list(args)
    if a.left_scalar is not None:
        operands.insert(0, a.left_scalar)
    if a.right_scalar is not None:
        operands.append(a.right_scalar)
    if a.fn == "floordiv":  # floor_divide has no derivative; div(rounding_mode="floor") has (zero)
        return em.call(torch.div, tuple(operands), {"rounding_mode": "floor"}, name=data["name"])
    if a.fn == "mod" and a.left_scalar is not None:  # remainder(scalar, x) has no derivative for x
        kind = torch.float64 if isinstance(a.left_scalar, float) else torch.long
        operands[0] = em.call(torch.as_tensor, (a.left_scalar,), {"dtype": kind})
    return em.call(_BINARY[a.fn], tuple(operands), name=data["name"])


@lowering("where")
def _where(em, data, args):
    return em.call(torch.where, tuple(args), name=data["name"])


@lowering("clamp")
def _clamp(em, data, args):
    a = data["attrs"]
    return em.call(torch.clamp, (args[0],), {"min": a.min, "max": a.max}, name=data["name"])


@lowering("cast")
def _cast(em, data, args):
    return em.call(runtime.cast, (args[0], data["attrs"].dtype, em.float_like()), name=data["name"])


@lowering("binary_gate")
def _binary_gate(em, data, args):
    return em.call(runtime.binary_gate, (args[0], data["attrs"].threshold), name=data["name"])


@lowering("linear")
def _linear(em, data, args):
    a = data["attrs"]
    weight = em.get_attr(a.weight)
    bias = em.get_attr(a.bias) if a.bias else None
    return em.call(F.linear, (args[0], weight, bias), name=data["name"])


@lowering("matmul")
def _matmul(em, data, args):
    return em.call(torch.matmul, tuple(args), name=data["name"])


@lowering("einsum")
def _einsum(em, data, args):
    return em.call(torch.einsum, (data["attrs"].equation, *args), name=data["name"])


@lowering("softmax")
def _softmax(em, data, args):
    a = data["attrs"]
    return em.call(torch.log_softmax if a.log else torch.softmax, (args[0], a.dim), name=data["name"])


@lowering("topk")
def _topk(em, data, args):
    a = data["attrs"]
    if a.mode == "softmax":
        return em.call(runtime.topk_softmax, (args[0], a.k, a.dim), name=data["name"])
    if a.mode == "mask":
        return em.call(runtime.topk_mask, (args[0], a.k, a.dim), name=data["name"])
    return em.call(torch.topk, (args[0], a.k, a.dim), name=data["name"])


@lowering("norm")
def _norm(em, data, args):
    a = data["attrs"]
    weight = em.get_attr(a.weight) if a.weight else None
    bias = em.get_attr(a.bias) if a.bias else None
    if a.kind == "layer":
        return em.call(F.layer_norm, (args[0], (a.features,), weight, bias, a.eps), name=data["name"])
    if a.kind == "rms":
        return em.call(runtime.rms_norm, (args[0], weight, a.eps, a.zero_centered), name=data["name"])
    return em.call(runtime.group_norm_last, (args[0], a.groups, weight, bias, a.eps), name=data["name"])


@lowering("conv")
def _conv(em, data, args):
    a = data["attrs"]
    weight = em.get_attr(a.weight)
    bias = em.get_attr(a.bias) if a.bias else None
    return em.call(runtime.conv_channels_last,
                   (args[0], weight, bias, a.spatial, a.stride, a.padding, a.dilation, a.groups, a.causal),
                   name=data["name"])


@lowering("pool")
def _pool(em, data, args):
    a = data["attrs"]
    return em.call(runtime.pool_channels_last, (args[0], a.kind, a.kernel, a.stride, a.spatial), name=data["name"])


@lowering("reshape")
def _reshape(em, data, args):
    sizes = [d if d == -1 else em.size(d) for d in data["attrs"].shape]
    return em.call(torch.reshape, (args[0], sizes), name=data["name"])


@lowering("permute")
def _permute(em, data, args):
    return em.call(torch.permute, (args[0], data["attrs"].dims), name=data["name"])


@lowering("unsqueeze")
def _unsqueeze(em, data, args):
    return em.call(torch.unsqueeze, (args[0], data["attrs"].dim), name=data["name"])


@lowering("squeeze")
def _squeeze(em, data, args):
    return em.call(torch.squeeze, (args[0], data["attrs"].dim), name=data["name"])


@lowering("split")
def _split(em, data, args):
    a = data["attrs"]
    return em.call(torch.split, (args[0], list(a.sizes), a.dim), name=data["name"])


@lowering("join")
def _join(em, data, args):
    a = data["attrs"]
    return em.call(torch.stack if a.stack else torch.cat, (list(args), a.dim), name=data["name"])


@lowering("heads")
def _heads(em, data, args):
    a = data["attrs"]
    if a.merge:
        return em.call(runtime.merge_heads, (args[0],), name=data["name"])
    return em.call(runtime.split_heads, (args[0], a.heads), name=data["name"])


@lowering("index")
def _index(em, data, args):
    items = []
    for it in data["attrs"].items:
        if it[0] == "int":
            items.append(it[1])
        elif it[0] == "slice":
            items.append(slice(it[1], it[2], it[3]))
        elif it[0] == "ellipsis":
            items.append(Ellipsis)
        else:
            items.append(None)
    return em.call(operator.getitem, (args[0], tuple(items)), name=data["name"])


@lowering("gather")
def _gather(em, data, args):
    return em.call(torch.gather, (args[0], data["attrs"].dim, args[1]), name=data["name"])


@lowering("flip")
def _flip(em, data, args):
    return em.call(torch.flip, (args[0], [data["attrs"].dim]), name=data["name"])


@lowering("shift")
def _shift(em, data, args):
    a = data["attrs"]
    return em.call(runtime.shift, (args[0], a.dim, a.steps, a.value, args[1] if a.given else None), name=data["name"])


@lowering("reduce")
def _reduce(em, data, args):
    a = data["attrs"]
    dims = list(a.dims)
    fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin,
          "logsumexp": torch.logsumexp}.get(a.fn)
    if fn is None:
        return em.call(runtime.prod, (args[0], dims, a.keepdim), name=data["name"])
    return em.call(fn, (args[0], dims), {"keepdim": a.keepdim}, name=data["name"])


@lowering("cumulative")
def _cumulative(em, data, args):
    a = data["attrs"]
    if not a.reverse:
        return em.call(torch.cumsum if a.fn == "sum" else torch.cumprod, (args[0], a.dim), name=data["name"])
    return em.call(runtime.cumulative, (args[0], a.fn, a.dim, True), name=data["name"])


@lowering("attention")
def _attention(em, data, args):
    a = data["attrs"]
    q, k = (em.ir.type_of(port) for port in data["inputs"][:2])
    groups = attention_groups(q, k)
    if a.lengths or a.window is not None or (a.masked and a.causal) or groups > 1:
        mask = args[3] if a.masked else None
        lengths = args[-1] if a.lengths else None
        return em.call(runtime.attention, (*args[:3], mask, lengths, a.causal, a.window, a.left_padded, a.scale,
                                           groups), name=data["name"])
    kwargs: dict[str, Any] = {"is_causal": a.causal}
    if a.masked:
        kwargs["attn_mask"] = args[3]
    if a.scale is not None:
        kwargs["scale"] = a.scale
    return em.call(F.scaled_dot_product_attention, tuple(args[:3]), kwargs, name=data["name"])


@lowering("rope")
def _rope(em, data, args):
    a = data["attrs"]
    positions = args[1] if a.positions else None
    return em.call(runtime.rope, (args[0], positions, a.theta, a.rotary_dim), name=data["name"])


@lowering("embedding")
def _embedding(em, data, args):
    return em.call(F.embedding, (args[0], em.get_attr(data["attrs"].weight)), name=data["name"])


@lowering("take")
def _take(em, data, args):
    return em.call(F.embedding, (args[1], args[0]), name=data["name"])


@lowering("one_hot")
def _one_hot(em, data, args):
    return em.call(runtime.one_hot, (args[0], data["attrs"].num, em.float_like()), name=data["name"])


@lowering("dropout")
def _dropout(em, data, args):
    return em.fx.call_module(em.rel(data["attrs"].module), (args[0],))


@lowering("noise")
def _noise(em, data, args):
    return em.fx.call_module(em.rel(data["attrs"].module), (args[0],))


def scan_cell(em, a) -> fx.Node:
    """The scanned cell, emitted as a sub-module at the scan's path (where its weights are)."""
    _set_submodule(em.root, a.path, _emit_graph(a.body, em.root, prefix=a.path + ".", top=False))
    return em.fx.get_attr(em.rel(a.path))


@lowering("scan")
def _scan(em, data, args):
    a = data["attrs"]
    cell = scan_cell(em, a)
    if a.kernel != "loop":  # torch's fused GRU / LSTM on the cell's own weights, by their paths in the cell
        weights = tuple(tuple(path[len(a.path) + 1:] for path in group) for group in a.weights)
        return em.call(runtime.native_rnn, (cell, tuple(args), a.kernel, weights, a.reverse, a.last, a.axes[0]),
                       name=data["name"])
    return em.call(runtime.scan, (cell, tuple(args), a.roles, a.axes, a.reverse, a.last), name=data["name"])


@lowering("cascade")
def _cascade(em, data, args):
    # Each stage becomes its own sub-module; runtime.early_exit runs them (on every sample in
    # training, on the samples still in at eval) and selects each sample's exit.
    a = data["attrs"]
    stages = []
    for stage in cascade_stages(a):
        _set_submodule(em.root, stage.path, _emit_graph(stage.body, em.root, prefix=stage.path + ".", top=False))
        stages.append(em.fx.get_attr(em.rel(stage.path)))
    return em.call(runtime.early_exit, (tuple(stages), tuple(args), a.roles, a.thresholds), name=data["name"])


@lowering("moe_dispatch")
def _moe_dispatch(em, data, args):
    # Each expert becomes its own sub-module at its path, where its weights already are (the state
    # dict is unchanged); the registry's kernel runs them on every token or each on its own tokens.
    from gatedsl.ir.ops import moe_experts
    from gatedsl.kernels.registry import dispatch, fused_ops, prepare

    a = data["attrs"]
    fused = fused_ops()["moe_dispatch"]
    prepare(fused.name)
    key = fused.key(a)
    experts = []
    for expert in moe_experts(a):
        _set_submodule(em.root, expert.path, _emit_graph(expert.body, em.root, prefix=expert.path + ".", top=False))
        experts.append(em.fx.get_attr(em.rel(expert.path)))

    def moe_dispatch(x, g, base, *modules):  # the attrs ride in the closure: fx's generated code cannot spell them
        return dispatch(fused.name, a, key, x, g, base, *modules)

    x, g, *base = args
    return em.call(moe_dispatch, (x, g, base[0] if base else None, *experts), name=data["name"])
