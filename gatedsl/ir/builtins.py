"""The language's primitive functions (linear, sigmoid, conv1d, attention, ...): each binds its arguments and adds IR ops.

Every builtin takes the elaborator and the call's AST, so that errors point at the
argument that is wrong.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

from gatedsl.errors import Note, Span, SpecError, SpecTypeError
from gatedsl.frontend import ast
from gatedsl.ir.elaboration import Elaborating
from gatedsl.ir.graph import InitSpec
from gatedsl.ir.ops import UNARY_FNS
from gatedsl.ir.types import Dim, Sym, dim_mul, normalize_axis
from gatedsl.ir.values import Tensor, describe

BUILTINS: dict[str, Callable[[Elaborating, ast.Call], Any]] = {}
REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # tensor, tensors, int, float, bool, str, ints, dims, init, any (a trailing ? allows none)
    default: Any = REQUIRED


def builtin(name: str, *spec: Arg, variadic: str | None = None):
    """Register a primitive; it receives bound arguments as {name: (value, span)}."""

    names = tuple(a.name for a in spec)

    def register(fn):
        def run(el: Elaborating, call: ast.Call):
            bound = bind_args(el, call, name, spec, variadic, names)
            return fn(el, call, bound)

        run.__doc__ = fn.__doc__
        run.spec = spec
        BUILTINS[name] = run
        return fn

    return register


def bind_args(el: Elaborating, call: ast.Call, fname: str, spec: tuple[Arg, ...],
              variadic: str | None, names: tuple[str, ...]) -> dict[str, tuple[Any, Span]]:
    out: dict[str, tuple[Any, Span]] = {}
    positional = call.args
    if variadic is None and len(positional) > len(spec):
        raise SpecTypeError(f"{fname} takes at most {len(spec)} arguments, got {len(positional)}", call.span,
                            help=_usage(fname, spec))
    for arg, node in zip(spec, positional):
        out[arg.name] = (_convert(el, arg, node, fname), node.span)
    if variadic is not None:
        extra = positional[len(spec):]
        out[variadic] = ([_convert(el, Arg(variadic, "tensor"), n, fname) for n in extra], call.span)
    for kw in call.kwargs:
        if kw.name not in names:
            raise SpecTypeError(f"{fname} has no argument '{kw.name}'", kw.span, help=_usage(fname, spec))
        if kw.name in out:
            raise SpecTypeError(f"argument '{kw.name}' of {fname} is given twice", kw.span)
        arg = spec[names.index(kw.name)]
        out[kw.name] = (_convert(el, arg, kw.value, fname), kw.value.span)
    for arg in spec:
        if arg.name not in out:
            if arg.default is REQUIRED:
                raise SpecTypeError(f"{fname} needs argument '{arg.name}'", call.span, help=_usage(fname, spec))
            out[arg.name] = (arg.default, call.span)
    return out


def _usage(fname: str, spec: tuple[Arg, ...]) -> str:
    parts = [a.name if a.default is REQUIRED else f"{a.name}={_show_default(a.default)}" for a in spec]
    return f"usage: {fname}({', '.join(parts)})"


def _show_default(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def _convert(el: Elaborating, arg: Arg, node: ast.Expr, fname: str) -> Any:
    kind = arg.kind.rstrip("?")
    if kind == "init":
        return parse_init(el, node)
    value = el.eval(node)
    if kind == "any" or (kind == "tensor" and type(value) is Tensor) or (kind == "int" and type(value) is int):
        return value  # the common cases, before building the message the others may need
    where = f"argument '{arg.name}' of {fname}"
    if kind == "tensor":
        if not isinstance(value, Tensor):
            raise SpecTypeError(f"{where} must be a tensor, got {describe(value)}", node.span)
        return value
    if kind == "tensors":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, Tensor) for v in value):
            raise SpecTypeError(f"{where} must be a list of tensors, got {describe(value)}", node.span)
        return list(value)
    if kind == "int":
        return el.as_int(value, node.span, where)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecTypeError(f"{where} must be a number, got {describe(value)}", node.span)
        if not math.isfinite(value):
            raise SpecTypeError(f"{where} must be finite", node.span)
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise SpecTypeError(f"{where} must be true or false, got {describe(value)}", node.span)
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise SpecTypeError(f"{where} must be a string, got {describe(value)}", node.span)
        return value
    if kind == "ints":
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(el.as_int(v, node.span, where) for v in items)
    if kind == "dims":
        if not isinstance(value, (list, tuple)):
            raise SpecTypeError(f"{where} must be a list of sizes, got {describe(value)}", node.span)
        return tuple(v if isinstance(v, Sym) else el.as_int(v, node.span, where) for v in value)
    raise AssertionError(kind)  # pragma: no cover


# ----------------------------------------------------------------- inits
INIT_ARITY = {
    "zeros": (0, 0), "ones": (0, 0), "constant": (1, 1), "normal": (1, 2), "uniform": (2, 2),
    "trunc_normal": (1, 1), "xavier_uniform": (0, 1), "xavier_normal": (0, 1), "kaiming_uniform": (0, 1),
    "kaiming_normal": (0, 1), "orthogonal": (0, 1), "fan_in_uniform": (1, 1),
    "s4d_real": (0, 0), "dt_bias": (2, 3), "log_of_uniform": (2, 2),
}


def parse_init(el: Elaborating, node: ast.Expr) -> InitSpec | None:
    """An init scheme: a name (`zeros`) or a call with static numbers (`normal(0.02)`)."""
    if isinstance(node, ast.Name) and node.id == "none":
        return None
    if isinstance(node, ast.Name):
        kind, arg_nodes = node.id, []
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.kwargs:
        kind, arg_nodes = node.func.id, node.args
    else:
        raise SpecTypeError("an init is a scheme name or call, like zeros or normal(0.02)", node.span,
                            help="schemes: " + ", ".join(INIT_ARITY))
    if kind not in INIT_ARITY:
        raise SpecTypeError(f"unknown init scheme '{kind}'", node.span, help="schemes: " + ", ".join(INIT_ARITY))
    low, high = INIT_ARITY[kind]
    if not low <= len(arg_nodes) <= high:
        raise SpecTypeError(f"init {kind} takes {low}{'' if low == high else f' to {high}'} arguments", node.span)
    args = []
    for a in arg_nodes:
        v = el.eval(a)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpecTypeError(f"init arguments are numbers, got {describe(v)}", a.span)
        args.append(float(v))
    if kind == "normal" and len(args) == 1:
        args = [0.0, args[0]]  # normal(std) means mean 0
    if kind == "normal" and args[-1] < 0:
        raise SpecTypeError("a standard deviation cannot be negative", node.span)
    if kind == "trunc_normal" and args[-1] <= 0:
        raise SpecTypeError("trunc_normal needs a positive standard deviation", node.span)
    if kind == "dt_bias" and not (0 < args[0] <= args[1] and (len(args) == 2 or args[2] >= 0)):
        raise SpecTypeError("dt_bias(dt_min, dt_max, floor) needs 0 < dt_min <= dt_max and floor >= 0", node.span)
    if kind == "dt_bias" and len(args) == 2:
        args.append(1e-4)  # Mamba's dt_init_floor
    if kind == "uniform" and args[0] > args[1]:
        raise SpecTypeError(f"uniform(a, b) needs a <= b, got uniform({args[0]:g}, {args[1]:g})", node.span)
    if kind == "log_of_uniform" and not 0 <= args[0] <= args[1]:
        raise SpecTypeError(f"log_of_uniform(a, b) needs 0 <= a <= b, got log_of_uniform({args[0]:g}, {args[1]:g})",
                            node.span)
    return InitSpec(kind=kind, args=tuple(args))


def _check_init(init: InitSpec | None, shape: tuple[int, ...], span: Span) -> None:
    """Schemes that read fans need a matrix (or a conv kernel); torch raises on a vector."""
    if init is not None and init.kind in ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
                                          "orthogonal") and len(shape) < 2:
        raise SpecTypeError(f"init {init.kind} needs a tensor of at least 2 dims, and this one is {list(shape)}",
                            span, help="use normal(std), uniform(a, b), zeros, ... for a vector")
    if init is not None and init.kind == "s4d_real" and not shape:
        raise SpecTypeError("init s4d_real fills the last dim with log 1, log 2, ...: it needs a tensor, not a scalar",
                            span)


@functools.lru_cache(maxsize=4096)
def fan_in_uniform(fan_in: int) -> InitSpec:  # InitSpec is frozen: one per fan-in serves every linear
    # PyTorch's default for Linear and Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return InitSpec(kind="fan_in_uniform", args=(float(fan_in),))


# --------------------------------------------------------------- helpers
def _dim_arg(el, t: Tensor, dim: int, span: Span) -> int:
    axis = normalize_axis(dim, t.type.rank)
    if axis is None:
        raise SpecTypeError(f"dim={dim} is out of range for {t.type}", span)
    return axis


def _static_size(t: Tensor, axis: int, what: str, span: Span) -> int:
    d = t.type.shape[axis]
    if not isinstance(d, int):
        raise SpecTypeError(f"{what} needs a static size, but dim {axis} of {t.type} is symbolic ({d})", span,
                            notes=[Note(f"{t.label or 'the input'} comes from here", t.origin)])
    return d


def _label(el, module_path: str | None = None) -> str:
    """A readable name for generated code: the module path inside the current block, or the statement."""
    if module_path is not None:
        return module_path[len(el.frame.path):]
    return el.frame.stmt.rsplit(".", 1)[-1] if el.frame.stmt else ""


def _weights_path(el, role: str) -> str:
    """A fresh instance path for a primitive's weights in the current statement (`z.x_proj`).

    A learned tensor is named by its statement alone (`w = learned([H])` is `w`); if the same
    statement also has other weights, which live under the statement's path, it moves to `w.learned`.
    """
    stmt = el.frame.stmt
    graph = el.frame.graph
    for p in graph.params[el.frame.stmt_params:]:
        if p.path == stmt:
            p.path = el.module_path("learned")
            for n in graph.order():
                data = graph.node(n)
                if data["op"] == "param" and data["attrs"].path == stmt:
                    data["attrs"] = data["attrs"].model_copy(update={"path": p.path})
            break
    return el.module_path(role)


def _proj_role(call: ast.Call, suffix: str = "proj") -> str:
    first = call.args[0] if call.args else None
    return f"{first.id}_{suffix}" if isinstance(first, ast.Name) else suffix


# ---------------------------------------------------------------- linear
@builtin("linear", Arg("x", "tensor"), Arg("out", "int"), Arg("bias", "bool", True),
         Arg("init", "init?", None), Arg("bias_init", "init?", None))
def _linear(el, call, a):
    """y = x Wᵀ + b over the last dim."""
    x, span = a["x"]
    in_features = _static_size(x, x.type.rank - 1, "linear", span) if x.type.rank else 0
    out = a["out"][0]
    if out <= 0:
        raise SpecTypeError(f"linear needs a positive output size, got {out}", a["out"][1])
    path = _weights_path(el, _proj_role(call))
    default = fan_in_uniform(max(in_features, 1))
    _check_init(a["bias_init"][0], (out,), a["bias_init"][1])
    attrs = {"in_features": max(in_features, 1), "out_features": out, "weight": path + ".weight",
             "bias": path + ".bias" if a["bias"][0] else None,
             "weight_init": a["init"][0] or default, "bias_init": (a["bias_init"][0] or default) if a["bias"][0] else None}
    return el.add("linear", attrs, [x], call.span, label=_label(el, path), params_at=path)[0]


@builtin("matmul", Arg("a", "tensor"), Arg("b", "tensor"))
def _matmul(el, call, a):
    return el.add("matmul", {}, [a["a"][0], a["b"][0]], call.span)[0]


@builtin("einsum", Arg("equation", "str"), variadic="operands")
def _einsum(el, call, a):
    """einsum("bhtd,bhsd->bhts", q, k)"""
    return el.add("einsum", {"equation": a["equation"][0]}, a["operands"][0], call.span)[0]


# ------------------------------------------------------------ element-wise
def _unary(fn: str):
    static = {"exp": math.exp, "log": math.log, "sqrt": math.sqrt, "abs": abs, "tanh": math.tanh,
              "sin": math.sin, "cos": math.cos, "erf": math.erf}

    def run(el, call, a):
        x, span = a["x"]
        if not isinstance(x, Tensor):
            if fn in static and isinstance(x, (int, float)) and not isinstance(x, bool):
                try:
                    return static[fn](x)
                except (ValueError, OverflowError) as err:
                    raise SpecTypeError(f"{fn}({x}): {err}", call.span) from None
            raise SpecTypeError(f"{fn} needs a tensor, got {describe(x)}", span)
        return el.add("unary", {"fn": fn}, [x], call.span)[0]

    builtin(fn, Arg("x", "any"))(run)


for _fn in UNARY_FNS:
    if _fn not in ("not", "neg"):
        _unary(_fn)


def _binary_fn(fn: str, static: Callable[[Any, Any], Any]):
    def run(el, call, a):
        x, y = a["a"][0], a["b"][0]
        if not isinstance(x, Tensor) and not isinstance(y, Tensor):
            for v, node in ((x, call.args[0] if call.args else call), (y, call.args[1] if len(call.args) > 1 else call)):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise SpecTypeError(f"{fn} needs numbers or tensors, got {describe(v)}", node.span)
            return static(x, y)
        attrs: dict[str, Any] = {"fn": fn}
        inputs = []
        for side, v in (("left", x), ("right", y)):
            if isinstance(v, Tensor):
                inputs.append(v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                attrs[f"{side}_scalar"] = v
            else:
                raise SpecTypeError(f"{fn} needs numbers or tensors, got {describe(v)}", call.span)
        return el.add("binary", attrs, inputs, call.span)[0]

    builtin(fn, Arg("a", "any"), Arg("b", "any"))(run)


_binary_fn("maximum", max)
_binary_fn("minimum", min)


@builtin("where", Arg("cond", "tensor"), Arg("a", "any"), Arg("b", "any"))
def _where(el, call, a):
    """where(cond, a, b): a where cond holds, else b."""
    cond = a["cond"][0]
    if cond.type.dtype != "bool":
        raise SpecTypeError(f"where needs a bool condition, got {cond.type}", a["cond"][1])
    values = []
    for key in ("a", "b"):
        v, span = a[key]
        if not isinstance(v, Tensor):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SpecTypeError(f"where needs numbers or tensors, got {describe(v)}", span)
            # A scalar is a 0-dim tensor of its own kind, so where(mask, idx, 0) stays int as in torch.
            (v,) = el.add("fill", {"value": float(v), "shape": (), "dtype": "int" if isinstance(v, int) else "float"},
                          [], span)
        values.append(v)
    return el.add("where", {}, [cond] + values, call.span)[0]


@builtin("clamp", Arg("x", "tensor"), Arg("min", "any", None), Arg("max", "any", None))
def _clamp(el, call, a):
    """clamp(x, min, max): either bound may be left out, not both; int bounds keep an int tensor int."""
    bounds = {}
    for key in ("min", "max"):
        v, span = a[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise SpecTypeError(f"clamp's {key} must be a static number, got {describe(v)}", span)
        bounds[key] = v
    if bounds["min"] is None and bounds["max"] is None:
        raise SpecTypeError("clamp needs min or max (or both)", call.span, help=_usage("clamp", _clamp_spec))
    return el.add("clamp", bounds, [a["x"][0]], call.span)[0]


_clamp_spec = BUILTINS["clamp"].spec


for _name, _dtype in (("to_float", "float"), ("to_int", "int"), ("to_bool", "bool")):
    def _cast(el, call, a, _dtype=_dtype):
        return el.add("cast", {"dtype": _dtype}, [a["x"][0]], call.span)[0]

    builtin(_name, Arg("x", "tensor"))(_cast)


@builtin("binary", Arg("x", "tensor"), Arg("threshold", "float", 0.5))
def _binary(el, call, a):
    """1[x > threshold] forward, with a straight-through (identity) gradient."""
    return el.add("binary_gate", {"threshold": a["threshold"][0]}, [a["x"][0]], call.span)[0]


# ------------------------------------------------------- softmax, routing
@builtin("softmax", Arg("x", "tensor"), Arg("dim", "int", -1))
def _softmax(el, call, a):
    return el.add("softmax", {"dim": a["dim"][0]}, [a["x"][0]], call.span)[0]


@builtin("log_softmax", Arg("x", "tensor"), Arg("dim", "int", -1))
def _log_softmax(el, call, a):
    return el.add("softmax", {"dim": a["dim"][0], "log": True}, [a["x"][0]], call.span)[0]


@builtin("topk", Arg("x", "tensor"), Arg("k", "int"), Arg("dim", "int", -1))
def _topk(el, call, a):
    """(values, indices) of the k largest along dim."""
    return tuple(el.add("topk", {"k": a["k"][0], "dim": a["dim"][0]}, [a["x"][0]], call.span))


@builtin("topk_softmax", Arg("x", "tensor"), Arg("k", "int"), Arg("dim", "int", -1))
def _topk_softmax(el, call, a):
    """Softmax over the k largest entries, zero elsewhere: a top-k routing gate."""
    return el.add("topk", {"k": a["k"][0], "dim": a["dim"][0], "mode": "softmax"}, [a["x"][0]], call.span)[0]


@builtin("topk_mask", Arg("x", "tensor"), Arg("k", "int"), Arg("dim", "int", -1))
def _topk_mask(el, call, a):
    """1 at the k largest entries, 0 elsewhere."""
    return el.add("topk", {"k": a["k"][0], "dim": a["dim"][0], "mode": "mask"}, [a["x"][0]], call.span)[0]


# ------------------------------------------------------------------ norms
def _norm(kind: str, eps: float):
    spec = [Arg("x", "tensor"), Arg("eps", "float", eps), Arg("affine", "bool", True)]
    if kind == "group":
        spec.insert(1, Arg("groups", "int"))
    if kind == "rms":
        spec.append(Arg("zero_centered", "bool", False))

    def run(el, call, a):
        x, span = a["x"]
        if x.type.rank == 0:
            raise SpecTypeError(f"{kind}_norm needs at least one dim", span)
        features = _static_size(x, x.type.rank - 1, f"{kind}_norm", span)
        path = _weights_path(el, "norm") if a["affine"][0] else None
        zero_centered = kind == "rms" and a["zero_centered"][0]
        if zero_centered and path is None:
            raise SpecTypeError("a zero-centred rms_norm scales by 1 + w: it needs its weight (affine=true)",
                                a["zero_centered"][1])
        attrs = {"kind": kind, "eps": a["eps"][0], "groups": a["groups"][0] if kind == "group" else 1,
                 "zero_centered": zero_centered,
                 "features": features,
                 "weight": path + ".weight" if path else None,
                 "bias": path + ".bias" if path and kind != "rms" else None}
        return el.add("norm", attrs, [x], call.span, label=_label(el, path), params_at=path)[0]

    builtin(f"{kind}_norm", *spec)(run)


_norm("layer", 1e-5)
_norm("rms", 1e-6)
_norm("group", 1e-5)


# ------------------------------------------------------ convolution, pool
def _tuple(value: tuple[int, ...], n: int, what: str, span: Span) -> tuple[int, ...]:
    if len(value) == 1:
        value = value * n
    if len(value) != n or any(v <= 0 for v in value):
        raise SpecTypeError(f"{what} must be {n} positive int(s), got {list(value)}", span)
    if any(v > 2**31 - 1 for v in value):  # torch's pooling kernels take 32-bit windows and strides
        raise SpecTypeError(f"{what} {list(value)} is too large", span)
    return value


def _conv(spatial: int, depthwise: bool):
    name = f"{'depthwise_' if depthwise else ''}conv{spatial}d"
    spec = [Arg("x", "tensor")]
    if not depthwise:
        spec.append(Arg("out", "int"))
    spec += [Arg("kernel", "ints"), Arg("stride", "ints", (1,)), Arg("dilation", "ints", (1,)),
             Arg("padding", "any", "same")]
    if spatial == 1:
        spec.append(Arg("causal", "bool", False))
    if not depthwise:
        spec.append(Arg("groups", "int", 1))
    spec += [Arg("bias", "bool", True), Arg("init", "init?", None), Arg("bias_init", "init?", None)]

    def run(el, call, a):
        x, span = a["x"]
        if x.type.rank < spatial + 1:
            raise SpecTypeError(f"{name} expects channels last, [*, {'L' if spatial == 1 else 'H, W'}, C]; "
                                f"got {x.type}", span)
        channels = _static_size(x, x.type.rank - 1, name, span)
        out = channels if depthwise else a["out"][0]
        groups = channels if depthwise else a["groups"][0]
        kernel = _tuple(a["kernel"][0], spatial, "kernel", a["kernel"][1])
        stride = _tuple(a["stride"][0], spatial, "stride", a["stride"][1])
        dilation = _tuple(a["dilation"][0], spatial, "dilation", a["dilation"][1])
        causal = spatial == 1 and a["causal"][0]
        padding_value, pspan = a["padding"]
        if causal:
            padding = tuple(dilation[i] * (kernel[i] - 1) for i in range(spatial))
        elif padding_value == "same":
            for i in range(spatial):
                if (dilation[i] * (kernel[i] - 1)) % 2:
                    raise SpecTypeError(f"'same' padding needs an odd kernel, got {kernel[i]}", a["kernel"][1],
                                        help="use causal=true, or padding=0 / an explicit int")
            padding = tuple(dilation[i] * (kernel[i] - 1) // 2 for i in range(spatial))
        elif padding_value == "valid":
            padding = (0,) * spatial
        else:
            pad = padding_value if isinstance(padding_value, (list, tuple)) else [padding_value]
            padding = tuple(el.as_int(p, pspan, "padding") for p in pad)
            if len(padding) == 1:
                padding *= spatial
            if len(padding) != spatial or any(p < 0 for p in padding):
                raise SpecTypeError(f"padding must be 'same', 'valid' or {spatial} non-negative ints", pspan)
        if out <= 0 or groups <= 0:
            raise SpecTypeError(f"{name} needs positive channels and groups", call.span)
        path = _weights_path(el, "conv")
        _check_init(a["bias_init"][0], (out,), a["bias_init"][1])
        fan_in = max(channels // groups, 1) * math.prod(kernel)
        default = fan_in_uniform(fan_in)
        attrs = {"spatial": spatial, "in_channels": channels, "out_channels": out, "kernel": kernel,
                 "stride": stride, "dilation": dilation, "padding": padding, "causal": causal, "groups": groups,
                 "weight": path + ".weight", "bias": path + ".bias" if a["bias"][0] else None,
                 "weight_init": a["init"][0] or default,
                 "bias_init": (a["bias_init"][0] or default) if a["bias"][0] else None}
        return el.add("conv", attrs, [x], call.span, label=_label(el, path), params_at=path)[0]

    builtin(name, *spec)(run)


for _spatial in (1, 2):
    _conv(_spatial, False)
    _conv(_spatial, True)


def _pool(spatial: int, kind: str):
    def run(el, call, a):
        kernel = _tuple(a["kernel"][0], spatial, "kernel", a["kernel"][1])
        stride = _tuple(a["stride"][0] or kernel, spatial, "stride", a["stride"][1])
        return el.add("pool", {"spatial": spatial, "kind": kind, "kernel": kernel, "stride": stride},
                      [a["x"][0]], call.span)[0]

    builtin(f"{kind}_pool{spatial}d", Arg("x", "tensor"), Arg("kernel", "ints"), Arg("stride", "ints?", None))(run)


for _spatial in (1, 2):
    _pool(_spatial, "avg")
    _pool(_spatial, "max")


# ----------------------------------------------------------------- shapes
@builtin("reshape", Arg("x", "tensor"), Arg("shape", "dims"))
def _reshape(el, call, a):
    """reshape(x, [B, T, 4, -1]); symbolic sizes must be ones the input has."""
    return el.add("reshape", {"shape": a["shape"][0]}, [a["x"][0]], call.span)[0]


@builtin("flatten", Arg("x", "tensor"), Arg("start", "int", 0), Arg("end", "int", -1))
def _flatten(el, call, a):
    x = a["x"][0]
    start = _dim_arg(el, x, a["start"][0], a["start"][1])
    end = _dim_arg(el, x, a["end"][0], a["end"][1])
    if end < start:
        raise SpecTypeError(f"flatten: end dim {end} comes before start dim {start}", call.span)
    merged: Dim = 1
    for d in x.type.shape[start:end + 1]:
        merged = dim_mul(merged, d)
    shape = x.type.shape[:start] + (merged,) + x.type.shape[end + 1:]
    return el.add("reshape", {"shape": shape}, [x], call.span)[0]


@builtin("transpose", Arg("x", "tensor"), Arg("a", "int", -2), Arg("b", "int", -1))
def _transpose(el, call, a):
    x = a["x"][0]
    i = _dim_arg(el, x, a["a"][0], a["a"][1])
    j = _dim_arg(el, x, a["b"][0], a["b"][1])
    dims = list(range(x.type.rank))
    dims[i], dims[j] = dims[j], dims[i]
    return el.add("permute", {"dims": tuple(dims)}, [x], call.span)[0]


@builtin("permute", Arg("x", "tensor"), Arg("dims", "ints"))
def _permute(el, call, a):
    x = a["x"][0]
    dims = tuple(d % x.type.rank if -x.type.rank <= d < x.type.rank else d for d in a["dims"][0])
    return el.add("permute", {"dims": dims}, [x], call.span)[0]


@builtin("unsqueeze", Arg("x", "tensor"), Arg("dim", "int"))
def _unsqueeze(el, call, a):
    return el.add("unsqueeze", {"dim": a["dim"][0]}, [a["x"][0]], call.span)[0]


@builtin("squeeze", Arg("x", "tensor"), Arg("dim", "int"))
def _squeeze(el, call, a):
    return el.add("squeeze", {"dim": a["dim"][0]}, [a["x"][0]], call.span)[0]


@builtin("split", Arg("x", "tensor"), Arg("sizes", "any"), Arg("dim", "int", -1))
def _split(el, call, a):
    """split(x, [64, 64, 128]) by sizes, or split(x, 3) into equal parts."""
    x = a["x"][0]
    axis = _dim_arg(el, x, a["dim"][0], a["dim"][1])
    sizes, span = a["sizes"]
    if isinstance(sizes, (list, tuple)):
        sizes = tuple(el.as_int(s, span, "a split size") for s in sizes)
    else:
        parts = el.as_int(sizes, span, "the number of parts")
        total = _static_size(x, axis, "split", a["x"][1])
        if parts <= 0 or total % parts:
            raise SpecTypeError(f"cannot split {total} into {parts} equal parts", span)
        sizes = (total // parts,) * parts
    return tuple(el.add("split", {"sizes": sizes, "dim": a["dim"][0]}, [x], call.span))


@builtin("chunk", Arg("x", "tensor"), Arg("n", "int"), Arg("dim", "int", -1))
def _chunk(el, call, a):
    x = a["x"][0]
    axis = _dim_arg(el, x, a["dim"][0], a["dim"][1])
    total = _static_size(x, axis, "chunk", a["x"][1])
    n = a["n"][0]
    if n <= 0 or total % n:
        raise SpecTypeError(f"cannot chunk {total} into {n} equal parts", a["n"][1])
    return tuple(el.add("split", {"sizes": (total // n,) * n, "dim": a["dim"][0]}, [x], call.span))


@builtin("concat", Arg("xs", "tensors"), Arg("dim", "int", -1))
def _concat(el, call, a):
    return el.add("join", {"dim": a["dim"][0]}, a["xs"][0], call.span)[0]


@builtin("stack", Arg("xs", "tensors"), Arg("dim", "int", 0))
def _stack(el, call, a):
    return el.add("join", {"dim": a["dim"][0], "stack": True}, a["xs"][0], call.span)[0]


@builtin("split_heads", Arg("x", "tensor"), Arg("heads", "int"))
def _split_heads(el, call, a):
    """[*, T, D] -> [*, heads, T, D/heads]"""
    return el.add("heads", {"heads": a["heads"][0]}, [a["x"][0]], call.span)[0]


@builtin("merge_heads", Arg("x", "tensor"), Arg("heads", "int"))
def _merge_heads(el, call, a):
    """[*, heads, T, d] -> [*, T, heads*d]"""
    return el.add("heads", {"heads": a["heads"][0], "merge": True}, [a["x"][0]], call.span)[0]


@builtin("gather", Arg("x", "tensor"), Arg("index", "tensor"), Arg("dim", "int", -1))
def _gather(el, call, a):
    return el.add("gather", {"dim": a["dim"][0]}, [a["x"][0], a["index"][0]], call.span)[0]


@builtin("flip", Arg("x", "tensor"), Arg("dim", "int"))
def _flip(el, call, a):
    return el.add("flip", {"dim": a["dim"][0]}, [a["x"][0]], call.span)[0]


@builtin("shift", Arg("x", "tensor"), Arg("dim", "int", -2), Arg("steps", "int", 1), Arg("fill", "any", 0.0))
def _shift(el, call, a):
    """shift(x, dim, steps, fill): x moved `steps` positions later along dim (a token shift: y_t = x_{t−1}), the
    first positions `fill`, a number or a tensor of one slice's shape; works on a symbolic dim, and decodes."""
    x = a["x"][0]
    dim = a["dim"][0]
    _dim_arg(el, x, dim, a["dim"][1])
    steps, span = a["steps"]
    if steps < 1:
        raise SpecTypeError(f"shift moves by at least one position, got steps={steps}", span)
    fill, fspan = a["fill"]
    if isinstance(fill, Tensor):
        return el.add("shift", {"dim": dim, "steps": steps, "given": True}, [x, fill], call.span)[0]
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
        raise SpecTypeError(f"shift's fill is a number or a tensor, got {describe(fill)}", fspan)
    return el.add("shift", {"dim": dim, "steps": steps, "value": float(fill)}, [x], call.span)[0]


@builtin("size", Arg("x", "tensor"), Arg("dim", "int"))
def _size(el, call, a):
    """The (static, possibly symbolic) size of one dim."""
    x = a["x"][0]
    return x.type.shape[_dim_arg(el, x, a["dim"][0], a["dim"][1])]


# ------------------------------------------------------------- reductions
def _reduce(fn: str, python: Callable | None):
    def run(el, call, a):
        x, span = a["x"]
        if not isinstance(x, Tensor):
            # min/max of static numbers: max(1, d // 64)
            if python is None or a["dim"][0] is None or isinstance(a["dim"][0], Tensor):
                raise SpecTypeError(f"{fn} needs a tensor, got {describe(x)}", span)
            values = [x, a["dim"][0]]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise SpecTypeError(f"{fn} of static values needs numbers, got {describe(v)}", call.span)
            return python(values)
        dim, dspan = a["dim"]
        if dim is None:
            dims = tuple(range(x.type.rank))
        else:
            raw = dim if isinstance(dim, (list, tuple)) else [dim]
            if not raw:
                raise SpecTypeError(f"{fn} over an empty list of dims", dspan,
                                    help=f"leave dim out to reduce over every dim: {fn}(x)")
            dims = tuple(el.as_int(d, dspan, "dim") for d in raw)
        return el.add("reduce", {"fn": fn, "dims": dims, "keepdim": a["keepdim"][0]}, [x], call.span)[0]

    builtin(fn, Arg("x", "any"), Arg("dim", "any", None), Arg("keepdim", "bool", False))(run)


_reduce("sum", None)
_reduce("mean", None)
_reduce("prod", None)
_reduce("logsumexp", None)
_reduce("max", max)
_reduce("min", min)


@builtin("cumsum", Arg("x", "tensor"), Arg("dim", "int"), Arg("reverse", "bool", False))
def _cumsum(el, call, a):
    return el.add("cumulative", {"fn": "sum", "dim": a["dim"][0], "reverse": a["reverse"][0]}, [a["x"][0]],
                  call.span)[0]


@builtin("cumprod", Arg("x", "tensor"), Arg("dim", "int"), Arg("reverse", "bool", False))
def _cumprod(el, call, a):
    return el.add("cumulative", {"fn": "prod", "dim": a["dim"][0], "reverse": a["reverse"][0]}, [a["x"][0]],
                  call.span)[0]


# -------------------------------------------------------------- attention
@builtin("attention", Arg("q", "tensor"), Arg("k", "tensor"), Arg("v", "tensor"), Arg("causal", "bool", False),
         Arg("scale", "float?", None), Arg("mask", "tensor?", None), Arg("lengths", "tensor?", None),
         Arg("window", "int?", None), Arg("padding", "str", "right"))
def _attention(el, call, a):
    """Scaled dot-product attention over [*, T, d] (heads at dim -3; fewer key/value heads than query heads group)."""
    inputs = [a["q"][0], a["k"][0], a["v"][0]] + [a[key][0] for key in ("mask", "lengths") if a[key][0] is not None]
    window, window_span = a["window"]
    if window is not None and window <= 0:
        raise SpecTypeError(f"a sliding window holds at least one key, got window={window}", window_span)
    if window is not None and not a["causal"][0]:
        raise SpecTypeError("a sliding window (window=) is causal: give causal=true too", window_span,
                            help="each query sees the `window` keys up to and including its own position, "
                                 "as transformers' sliding_window")
    padding, padding_span = a["padding"]
    if padding not in ("right", "left"):
        raise SpecTypeError(f'padding is "right" or "left", got "{padding}"', padding_span)
    if padding == "left" and a["lengths"][0] is None:
        raise SpecTypeError('padding="left" says where the padding of lengths= is: give lengths too', padding_span)
    attrs = {"causal": a["causal"][0], "scale": a["scale"][0], "masked": a["mask"][0] is not None,
             "lengths": a["lengths"][0] is not None, "left_padded": padding == "left", "window": window}
    return el.add("attention", attrs, inputs, call.span)[0]


@builtin("rope", Arg("x", "tensor"), Arg("positions", "tensor?", None), Arg("theta", "float", 10000.0),
         Arg("rotary_dim", "int?", None))
def _rope(el, call, a):
    """Rotary position embedding of [*, T, d] on its first rotary_dim features (all by default)."""
    x, span = a["x"]
    if x.type.rank < 2:
        raise SpecTypeError(f"rope needs [*, T, d], got {x.type}", span)
    width = _static_size(x, x.type.rank - 1, "rope", span)
    rotary_dim, rotary_span = a["rotary_dim"]
    rotary_dim = width if rotary_dim is None else rotary_dim
    if rotary_dim < 0 or rotary_dim % 2 or rotary_dim > width:
        raise SpecTypeError(f"rope rotates pairs of features: rotary_dim must be even and at most d = {width}, "
                            f"got {rotary_dim}", rotary_span)
    if a["theta"][0] <= 0:
        raise SpecTypeError(f"rope's base theta must be positive, got {a['theta'][0]:g}", a["theta"][1])
    positions = a["positions"][0]
    if rotary_dim == 0 and positions is None:
        return x  # nothing to rotate (transformers' partial_rotary_factor rounds small heads to 0)
    inputs = [x] + ([positions] if positions is not None else [])
    return el.add("rope", {"theta": a["theta"][0], "rotary_dim": rotary_dim, "positions": positions is not None},
                  inputs, call.span)[0]


# ------------------------------------------------- embeddings and learned
@builtin("embedding", Arg("index", "tensor"), Arg("num", "int"), Arg("dim", "int"), Arg("init", "init?", None))
def _embedding(el, call, a):
    path = _weights_path(el, "embedding")
    init = a["init"][0] or InitSpec(kind="normal", args=(0.0, 1.0))  # torch.nn.Embedding's default
    return el.add("embedding", {"num": a["num"][0], "dim": a["dim"][0], "weight": path + ".weight",
                                "init": init}, [a["index"][0]], call.span, label=_label(el, path), params_at=path)[0]


@builtin("take", Arg("table", "tensor"), Arg("index", "tensor"))
def _take(el, call, a):
    """Rows of a [N, D] table at int indices [*]: [*, D], an embedding read from a table the spec holds (so that
    the same `learned` table can also be the output head: `h @ transpose(E)`, tied weights)."""
    return el.add("take", {}, [a["table"][0], a["index"][0]], call.span)[0]


@builtin("one_hot", Arg("index", "tensor"), Arg("num", "int"))
def _one_hot(el, call, a):
    return el.add("one_hot", {"num": a["num"][0]}, [a["index"][0]], call.span)[0]


@builtin("dropout", Arg("x", "tensor"), Arg("p", "float", 0.1))
def _dropout(el, call, a):
    """Zeroes elements with probability p in training, identity in eval."""
    from gatedsl.ir.graph import ModuleSpec

    p = a["p"][0]
    if not 0 <= p < 1:
        raise SpecTypeError(f"dropout probability must be in [0, 1), got {p}", a["p"][1])
    path = _weights_path(el, "dropout")
    el.frame.graph.modules.append(ModuleSpec(path, "dropout", {"p": p}))
    return el.add("dropout", {"p": p, "module": path}, [a["x"][0]], call.span)[0]


@builtin("noise_like", Arg("x", "tensor"))
def _noise_like(el, call, a):
    """Standard normal noise of x's shape, dtype and device in training, zeros in eval (a module, like dropout)."""
    from gatedsl.ir.graph import ModuleSpec

    path = _weights_path(el, "noise")
    el.frame.graph.modules.append(ModuleSpec(path, "noise", {}))
    return el.add("noise", {"module": path}, [a["x"][0]], call.span)[0]


@builtin("learned", Arg("shape", "dims"), Arg("init", "init?", None))
def _learned(el, call, a):
    """A learned tensor: learned([H], init=zeros)."""
    shape, span = a["shape"]
    for d in shape:
        if not isinstance(d, int) or d <= 0:
            raise SpecTypeError(f"a learned tensor needs positive static sizes, got {list(shape)}", span)
    stmt = el.frame.stmt
    taken = any(p.path == stmt or p.path.startswith(stmt + ".") for p in el.frame.graph.params[el.frame.stmt_params:]) \
        or any(m.path.startswith(stmt + ".") for m in el.frame.graph.modules[el.frame.stmt_modules:])
    # Named by its statement (`w`), unless the statement already holds weights: then `w.learned`.
    path = _weights_path(el, "learned") if taken else stmt
    init = a["init"][0]
    if init is not None:
        _check_init(init, shape, a["init"][1])
    else:
        init = fan_in_uniform(shape[-1] if shape else 1)
    el.add_param(path, tuple(shape), init, call.span)
    return el.add("param", {"path": path, "shape": tuple(shape)}, [], call.span, label=_label(el))[0]


def _fill(name: str, value: float | None, like: bool):
    spec = [Arg("x", "tensor")] if like else [Arg("shape", "dims")]
    if value is None:
        spec.append(Arg("value", "float"))

    def run(el, call, a):
        v = a["value"][0] if value is None else value
        if like:
            x = a["x"][0]
            return el.add("fill", {"value": v, "shape": x.type.shape, "dtype": x.type.dtype}, [x], call.span)[0]
        for d in a["shape"][0]:
            if isinstance(d, int) and d <= 0:
                raise SpecTypeError(f"{name} needs positive sizes, got {list(a['shape'][0])}", a["shape"][1])
        return el.add("fill", {"value": v, "shape": a["shape"][0]}, [], call.span)[0]

    builtin(name, *spec)(run)


_fill("zeros", 0.0, False)
_fill("ones", 1.0, False)
_fill("full", None, False)
_fill("zeros_like", 0.0, True)
_fill("ones_like", 1.0, True)
_fill("full_like", None, True)


# ------------------------------------------------------- static helpers
def _static(name: str, fn: Callable[..., Any], *spec: Arg):
    def run(el, call, a):
        try:
            return fn(*(a[s.name][0] for s in spec))
        except (ValueError, OverflowError, ZeroDivisionError) as err:
            raise SpecTypeError(f"{name}: {err}", call.span) from None

    builtin(name, *spec)(run)


_static("int", lambda v: int(v), Arg("value", "float"))
_static("round", lambda v: int(round(v)), Arg("value", "float"))
_static("ceil", lambda v: int(math.ceil(v)), Arg("value", "float"))
_static("floor", lambda v: int(math.floor(v)), Arg("value", "float"))
def _round_up(value: int, multiple: int) -> int:
    if multiple <= 0:
        raise ValueError("the multiple must be positive")
    return -(-value // multiple) * multiple


_static("round_up", _round_up, Arg("value", "int"), Arg("multiple", "int"))


# ------------------------------------------------------------- budgets
# The whole model's counts, known only after the counting passes: passes/check_budgets.py evaluates the
# model-level `require`s that read them (el.counted is the counted unit there, None during elaboration).
BUDGETS = ("param_count", "flop_count")


def _counted(el: Elaborating, call: ast.Call, name: str):
    if el.counted is None:
        raise SpecError(f"{name}() is known only once the whole model is built", call.span,
                        help="use it in a `require` at the top level of a model, e.g. "
                             "`require param_count() <= 1_000_000` or `require flop_count(B=1, T=64) <= 5e8`")
    return el.counted


@builtin("param_count")
def _param_count(el, call, a):
    """The model's learned elements, as `gatedsl check` counts them."""
    return _counted(el, call, "param_count").param_count


def _flop_count(el: Elaborating, call: ast.Call) -> int:
    """The model's FLOPs with every symbolic size given by keyword: flop_count(B=1, T=64)."""
    unit = _counted(el, call, "flop_count")
    if call.args:
        raise SpecTypeError("flop_count takes the symbolic sizes by name: flop_count(B=1, T=64)", call.args[0].span)
    needed = sorted({f for factors in unit.flops.terms for f in factors})
    graph = unit.graph
    known = set(needed) | {f for _, n in graph.inputs for d in graph.node(n)["attrs"].type.shape
                           if isinstance(d, Sym) for f in d.factors}
    sizes = {}
    for kw in call.kwargs:
        if kw.name not in known:
            raise SpecTypeError(f"flop_count: the model has no symbolic size '{kw.name}'", kw.span,
                                help="its sizes: " + (", ".join(sorted(known)) or "none"))
        if kw.name in sizes:
            raise SpecTypeError(f"flop_count: size '{kw.name}' is given twice", kw.span)
        size = el.as_int(el.eval(kw.value), kw.value.span, f"flop_count's size {kw.name}")
        if size <= 0:
            raise SpecTypeError(f"flop_count: size {kw.name} must be positive, got {size}", kw.value.span)
        sizes[kw.name] = size
    missing = [name for name in needed if name not in sizes]
    if missing:
        raise SpecTypeError(f"flop_count needs a size for {', '.join(missing)}", call.span,
                            help="flop_count(" + ", ".join(f"{n}=..." for n in needed) + ")")
    return unit.flops.evaluate(sizes)


_flop_count.spec = ()
BUILTINS["flop_count"] = _flop_count


def builtin_names() -> list[str]:
    return sorted(BUILTINS)

