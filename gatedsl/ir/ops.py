"""The op registry: for each IR op, a pydantic schema of its attributes, its shape rule, its learned tensors and its FLOPs.

Shape rules raise ShapeError without a location; elaboration adds the statement's span
and where each operand came from.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gatedsl.errors import ShapeError
from gatedsl.ir.graph import Graph, InitSpec
from gatedsl.ir.types import (
    Dim,
    Poly,
    Shape,
    Sym,
    TensorType,
    broadcast,
    dim_div,
    dim_mul,
    normalize_axis,
    numel,
    promote,
    show_shape,
)


class Attrs(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")


@dataclass(frozen=True)
class ParamDecl:
    role: str  # the leaf name: weight, bias, ...
    shape: tuple[int, ...]
    init: InitSpec


@dataclass(frozen=True)
class OpDef:
    name: str
    attrs: type[Attrs]
    infer: Callable[[Any, list[TensorType]], list[TensorType]]
    flops: Callable[[Any, list[TensorType], list[TensorType]], Poly]
    params: Callable[[Any, list[TensorType]], list[ParamDecl]] = lambda a, ins: []


REGISTRY: dict[str, OpDef] = {}


def no_flops(a, ins, outs) -> Poly:
    """The FLOPs of an op that computes nothing (a source, a view): the default, which counting skips."""
    return Poly()


def op(name: str, attrs: type[Attrs], flops=None, params=None):
    def register(infer):
        REGISTRY[name] = OpDef(
            name,
            attrs,
            infer,
            flops or no_flops,
            params or (lambda a, ins: []),
        )
        return infer

    return register


def graph_flops(graph: Graph) -> Poly:
    """The FLOPs of running `graph` once: its ops' counts summed (a scan's, cascade's or expert's own body
    counted through its op)."""
    terms: dict[tuple[str, ...], int] = {}  # summed in place: a new Poly per node was most of this pass's time
    for n in graph.order():
        data = graph.node(n)
        flops = REGISTRY[data["op"]].flops
        if flops is no_flops:  # inputs, parameters, fills, views: a quarter of the nodes
            continue
        ins = [graph.type_of(p) for p in data["inputs"]]
        for factors, coeff in flops(data["attrs"], ins, data["types"]).terms.items():
            terms[factors] = terms.get(factors, 0) + coeff
    return Poly(terms)


def _elementwise_flops(a, ins, outs) -> Poly:
    return Poly.numel(outs[0].shape)


def _axis(dim: int, rank: int, what: str = "dim") -> int:
    axis = normalize_axis(dim, rank)
    if axis is None:
        raise ShapeError(f"{what}={dim} is out of range for a tensor of rank {rank}")
    return axis


def _float(t: TensorType, what: str) -> None:
    if t.dtype != "float":
        raise ShapeError(f"{what} needs a float tensor, got {t.dtype} {show_shape(t.shape)}")


# ---------------------------------------------------------------- sources
class InputAttrs(Attrs):
    name: str
    type: TensorType


@op("input", InputAttrs)
def _input(a: InputAttrs, ins):
    return [a.type]


class ParamAttrs(Attrs):
    path: str
    shape: tuple[int, ...]


@op("param", ParamAttrs)
def _param(a: ParamAttrs, ins):
    return [TensorType(a.shape)]


class FillAttrs(Attrs):
    value: float
    shape: tuple[Dim, ...]
    dtype: Literal["float", "int", "bool"] = "float"


@op("fill", FillAttrs)
def _fill(a: FillAttrs, ins):
    # With an input, the fill takes that input's shape (zeros_like and friends).
    return [TensorType(ins[0].shape if ins else a.shape, a.dtype)]


# ------------------------------------------------------------ element-wise
UNARY_FNS = (
    "sigmoid", "tanh", "relu", "gelu", "silu", "softplus", "logsigmoid", "exp", "log", "sqrt",
    "rsqrt", "abs", "neg", "sin", "cos", "elu", "square", "reciprocal", "sign", "not", "erf",
)


class UnaryAttrs(Attrs):
    fn: Literal[UNARY_FNS]  # type: ignore[valid-type]


@op("unary", UnaryAttrs, flops=_elementwise_flops)
def _unary(a: UnaryAttrs, ins):
    (x,) = ins
    if a.fn == "not":
        return [TensorType(x.shape, "bool")]
    if a.fn not in ("neg", "abs", "sign", "square"):
        _float(x, a.fn)
    elif x.dtype == "bool" and a.fn != "sign":
        raise ShapeError(f"{a.fn} needs a number tensor, got bool {show_shape(x.shape)}; use to_int or to_float first"
                         if a.fn != "neg" else f"cannot negate a bool tensor {show_shape(x.shape)}; use `not`")
    return [x]


BINARY_FNS = ("add", "sub", "mul", "div", "floordiv", "mod", "pow", "maximum", "minimum",
              "lt", "le", "gt", "ge", "eq", "ne", "and", "or")
COMPARISONS = ("lt", "le", "gt", "ge", "eq", "ne")


class BinaryAttrs(Attrs):
    """A binary element-wise op; at most one side may be a static scalar instead of a tensor."""

    fn: Literal[BINARY_FNS]  # type: ignore[valid-type]
    left_scalar: float | int | bool | None = None
    right_scalar: float | int | bool | None = None


_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "**"}


def _scalar_dtype(v) -> str:
    return "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float"


@op("binary", BinaryAttrs, flops=_elementwise_flops)
def _binary(a: BinaryAttrs, ins):
    types = list(ins)
    if a.left_scalar is not None:
        types.insert(0, TensorType((), _scalar_dtype(a.left_scalar)))
    if a.right_scalar is not None:
        types.append(TensorType((), _scalar_dtype(a.right_scalar)))
    left, right = types
    shape = broadcast(left.shape, right.shape)
    if shape is None:
        raise ShapeError(
            f"cannot broadcast {show_shape(left.shape)} with {show_shape(right.shape)}",
        )
    if a.fn in COMPARISONS or a.fn in ("and", "or"):
        return [TensorType(shape, "bool")]
    dtype = promote(left.dtype, right.dtype)
    if a.fn == "div":
        return [TensorType(shape, "float")]
    if a.fn in ("maximum", "minimum"):
        return [TensorType(shape, dtype)]
    bool_tensor = any(t.dtype == "bool" for t in ins)
    if dtype == "bool" or (a.fn == "sub" and bool_tensor):
        # torch adds and multiplies two bools as bools, and subtracts no bool tensor at all.
        raise ShapeError(f"arithmetic ({_SYMBOL[a.fn]}) on a bool tensor; convert it with to_int or to_float first")
    if dtype == "int":
        scalar = a.right_scalar
        if a.fn in ("floordiv", "mod") and scalar is not None and not isinstance(scalar, float) and scalar == 0:
            raise ShapeError(f"integer {'division' if a.fn == 'floordiv' else 'modulo'} by zero")
        if a.fn == "pow" and isinstance(scalar, int) and not isinstance(scalar, bool) and scalar < 0:
            raise ShapeError("an int tensor raised to a negative int power; use to_float first")
    return [TensorType(shape, dtype)]


class WhereAttrs(Attrs):
    pass


@op("where", WhereAttrs, flops=_elementwise_flops)
def _where(a, ins):
    cond, x, y = ins
    shape = broadcast(cond.shape, x.shape)
    shape = broadcast(shape, y.shape) if shape is not None else None
    if shape is None:
        raise ShapeError(f"where: cannot broadcast {show_shape(cond.shape)}, {show_shape(x.shape)} and {show_shape(y.shape)}")
    return [TensorType(shape, promote(x.dtype, y.dtype))]


class ClampAttrs(Attrs):
    min: int | float | None = None  # an int bound keeps an int tensor int
    max: int | float | None = None


@op("clamp", ClampAttrs, flops=_elementwise_flops)
def _clamp(a, ins):
    (x,) = ins
    if a.min is None and a.max is None:
        raise ShapeError("clamp needs min or max (or both)")
    if x.dtype == "bool":
        raise ShapeError(f"clamp needs a number tensor, got bool {show_shape(x.shape)}")
    if a.min is not None and a.max is not None and a.min > a.max:
        raise ShapeError(f"clamp: min {a.min} is above max {a.max}")
    if x.dtype == "int" and any(isinstance(b, float) for b in (a.min, a.max)):
        return [TensorType(x.shape, "float")]  # torch promotes an int tensor clamped to a float bound
    return [x]


class CastAttrs(Attrs):
    dtype: Literal["float", "int", "bool"]


@op("cast", CastAttrs)
def _cast(a, ins):
    return [TensorType(ins[0].shape, a.dtype)]


class StraightThroughAttrs(Attrs):
    """Hard 0/1 forward (x > threshold), identity gradient: the binary gate."""

    threshold: float = 0.5


@op("binary_gate", StraightThroughAttrs, flops=_elementwise_flops)
def _binary_gate(a, ins):
    _float(ins[0], "binary")
    return [ins[0]]


# ---------------------------------------------------------------- linear
class LinearAttrs(Attrs):
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    weight: str
    bias: str | None
    weight_init: InitSpec
    bias_init: InitSpec | None


def _linear_params(a: LinearAttrs, ins):
    decls = [ParamDecl("weight", (a.out_features, a.in_features), a.weight_init)]
    if a.bias is not None:
        decls.append(ParamDecl("bias", (a.out_features,), a.bias_init))
    return decls


@op("linear", LinearAttrs, params=_linear_params,
    flops=lambda a, ins, outs: Poly.numel(ins[0].shape[:-1]) * (2 * a.in_features * a.out_features))
def _linear(a: LinearAttrs, ins):
    (x,) = ins
    _float(x, "linear")
    if not x.shape or x.shape[-1] != a.in_features:
        raise ShapeError(f"linear expects last dim {a.in_features}, got {show_shape(x.shape)}")
    return [TensorType(x.shape[:-1] + (a.out_features,))]


class MatmulAttrs(Attrs):
    pass


def _matmul_shape(x: Shape, y: Shape) -> Shape:
    if len(x) < 1 or len(y) < 1:
        raise ShapeError("matmul needs tensors of rank ≥ 1")
    xs, ys = (x if len(x) > 1 else (1,) + x), (y if len(y) > 1 else y + (1,))
    if xs[-1] != ys[-2]:
        raise ShapeError(
            f"matmul: inner dims differ: {show_shape(x)} @ {show_shape(y)} ({xs[-1]} vs {ys[-2]})"
        )
    batch = broadcast(xs[:-2], ys[:-2])
    if batch is None:
        raise ShapeError(f"matmul: batch dims do not broadcast: {show_shape(x)} @ {show_shape(y)}")
    out = batch + (xs[-2], ys[-1])
    if len(x) == 1:
        out = out[:-2] + out[-1:]
    if len(y) == 1:
        out = out[:-1]
    return out


@op("matmul", MatmulAttrs,
    flops=lambda a, ins, outs: Poly.numel(outs[0].shape) * Poly.of(ins[0].shape[-1]) * 2)
def _matmul(a, ins):
    x, y = ins
    _float(x, "matmul")
    _float(y, "matmul")
    return [TensorType(_matmul_shape(x.shape, y.shape))]


class EinsumAttrs(Attrs):
    equation: str

    @field_validator("equation")
    @classmethod
    def _valid(cls, v: str) -> str:
        allowed = set(string.ascii_letters + ",->. ")
        if not set(v) <= allowed or v.count("->") != 1:
            raise ValueError("an einsum equation looks like 'bhtd,bhsd->bhts'")
        return v.replace(" ", "")


def _einsum_sizes(a: EinsumAttrs, ins) -> tuple[list[str], str, dict[str, Dim], Shape]:
    """The size of every letter, and the broadcast shape the operands' `...` stand for."""
    lhs, rhs = a.equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(ins):
        raise ShapeError(f"einsum '{a.equation}' names {len(terms)} operands, got {len(ins)}")
    for term in terms + [rhs]:
        if "." in term and (term.count("...") != 1 or term.count(".") != 3):
            raise ShapeError(f"einsum term '{term}': '...' may appear once, as three dots")
    sizes: dict[str, Dim] = {}
    ellipsis: Shape = ()
    for term, t in zip(terms, ins):
        before, _, after = term.partition("...")
        if "..." in term:
            n = t.rank - len(before) - len(after)
            if n < 0:
                raise ShapeError(f"einsum term '{term}' has {len(before) + len(after)} letters, operand is "
                                 f"{show_shape(t.shape)}")
            joined = broadcast(ellipsis, t.shape[len(before):len(before) + n])
            if joined is None:
                raise ShapeError(f"einsum: the dims '...' stands for do not broadcast: {show_shape(ellipsis)} "
                                 f"and {show_shape(t.shape[len(before):len(before) + n])}")
            ellipsis = joined
            dims = t.shape[:len(before)] + t.shape[len(before) + n:]
        else:
            if len(term) != t.rank:
                raise ShapeError(f"einsum term '{term}' has {len(term)} letters, operand is {show_shape(t.shape)}")
            dims = t.shape
        for letter, d in zip(before + after, dims):
            if letter in sizes and sizes[letter] != d and d != 1 and sizes[letter] != 1:
                raise ShapeError(f"einsum letter '{letter}' is {sizes[letter]} in one operand and {d} in another")
            if letter not in sizes or sizes[letter] == 1:
                sizes[letter] = d
    out_letters = rhs.replace("...", "")
    for letter in out_letters:
        if letter not in sizes:
            raise ShapeError(f"einsum output letter '{letter}' is not in any operand")
        if out_letters.count(letter) > 1:
            raise ShapeError(f"einsum output letter '{letter}' appears twice")
    return terms, rhs, sizes, ellipsis


def _einsum_flops(a, ins, outs) -> Poly:
    _, _, sizes, ellipsis = _einsum_sizes(a, ins)
    total: Dim = numel(ellipsis)
    for d in sizes.values():
        total = dim_mul(total, d)
    return Poly.of(total) * 2


@op("einsum", EinsumAttrs, flops=_einsum_flops)
def _einsum(a, ins):
    for t in ins:
        _float(t, "einsum")
    _, rhs, sizes, ellipsis = _einsum_sizes(a, ins)
    before, dots, after = rhs.partition("...")
    # Without '...' in the output, the dims it stands for are summed, as torch does.
    middle = ellipsis if dots else ()
    return [TensorType(tuple(sizes[c] for c in before) + middle + tuple(sizes[c] for c in after))]


# ------------------------------------------------------- softmax and routing
class SoftmaxAttrs(Attrs):
    dim: int = -1
    log: bool = False


@op("softmax", SoftmaxAttrs, flops=lambda a, ins, outs: Poly.numel(outs[0].shape) * 3)
def _softmax(a, ins):
    _float(ins[0], "softmax")
    _axis(a.dim, ins[0].rank)
    return [ins[0]]


class TopkAttrs(Attrs):
    k: int = Field(gt=0)
    dim: int = -1
    mode: Literal["values_indices", "softmax", "mask"] = "values_indices"


@op("topk", TopkAttrs, flops=lambda a, ins, outs: Poly.numel(ins[0].shape) * 2)
def _topk(a, ins):
    (x,) = ins
    _float(x, "topk")
    axis = _axis(a.dim, x.rank)
    if isinstance(x.shape[axis], int) and a.k > x.shape[axis]:
        raise ShapeError(f"top-k with k={a.k} over a dim of size {x.shape[axis]}")
    if a.mode != "values_indices":
        return [x]  # dense: softmax over the kept entries, zeros elsewhere; or a 0/1 mask
    shape = x.shape[:axis] + (a.k,) + x.shape[axis + 1:]
    return [TensorType(shape), TensorType(shape, "int")]


# ---------------------------------------------------------------- norms
class NormAttrs(Attrs):
    kind: Literal["layer", "rms", "group"]
    eps: float = Field(gt=0)
    groups: int = Field(default=1, gt=0)
    weight: str | None
    bias: str | None
    features: int = Field(gt=0)
    zero_centered: bool = False  # rms only: x / rms(x) ⊙ (1 + w), w starting at zeros (Qwen3-Next)


def _norm_params(a: NormAttrs, ins):
    out = []
    if a.weight is not None:
        out.append(ParamDecl("weight", (a.features,), InitSpec(kind="zeros" if a.zero_centered else "ones")))
    if a.bias is not None:
        out.append(ParamDecl("bias", (a.features,), InitSpec(kind="zeros")))
    return out


@op("norm", NormAttrs, params=_norm_params, flops=lambda a, ins, outs: Poly.numel(outs[0].shape) * 5)
def _norm(a: NormAttrs, ins):
    (x,) = ins
    _float(x, f"{a.kind}_norm")
    if not x.shape or x.shape[-1] != a.features:
        raise ShapeError(f"{a.kind}_norm over {a.features} features, got {show_shape(x.shape)}")
    if a.kind == "group" and a.features % a.groups:
        raise ShapeError(f"group_norm: {a.features} channels do not split into {a.groups} groups")
    if a.zero_centered and (a.kind != "rms" or a.weight is None):
        raise ShapeError("only an affine rms_norm is zero-centred (its weight w scales by 1 + w)")
    return [x]


# ---------------------------------------------------- convolution, pooling
class ConvAttrs(Attrs):
    """Channels-last convolution: [*, L, C] for 1-D, [*, H, W, C] for 2-D."""

    spatial: Literal[1, 2]
    in_channels: int = Field(gt=0)
    out_channels: int = Field(gt=0)
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]  # per spatial dim, both sides; causal pads the left only
    causal: bool = False
    groups: int = Field(default=1, gt=0)
    weight: str
    bias: str | None
    weight_init: InitSpec
    bias_init: InitSpec | None


def _conv_params(a: ConvAttrs, ins):
    decls = [ParamDecl("weight", (a.out_channels, a.in_channels // a.groups) + a.kernel, a.weight_init)]
    if a.bias is not None:
        decls.append(ParamDecl("bias", (a.out_channels,), a.bias_init))
    return decls


def _conv_out(size: Dim, kernel: int, stride: int, dilation: int, pad_total: int) -> Dim:
    span = dilation * (kernel - 1) + 1
    if isinstance(size, int):
        out = (size + pad_total - span) // stride + 1
        if out <= 0:
            raise ShapeError(f"convolution window {span} is larger than the padded input {size + pad_total}")
        return out
    if pad_total == span - 1 and stride == 1:
        return size  # 'same' or causal: a symbolic length is kept
    d = dim_div(size, stride) if pad_total == span - 1 else None
    if d is None:
        raise ShapeError(
            f"a symbolic length {size} needs 'same' or causal padding with stride 1 (or a stride that divides it)"
        )
    return d


def _conv_shape(a: ConvAttrs, x: TensorType) -> Shape:
    n = a.spatial
    if x.rank < n + 1:
        raise ShapeError(f"conv{n}d expects [*, {'L' if n == 1 else 'H, W'}, C], got {show_shape(x.shape)}")
    if x.shape[-1] != a.in_channels:
        raise ShapeError(f"conv{n}d expects {a.in_channels} channels last, got {show_shape(x.shape)}")
    spatial = []
    for i in range(n):
        pad_total = a.padding[i] * (1 if a.causal else 2)
        spatial.append(_conv_out(x.shape[-1 - n + i], a.kernel[i], a.stride[i], a.dilation[i], pad_total))
    return x.shape[: -1 - n] + tuple(spatial) + (a.out_channels,)


@op("conv", ConvAttrs, params=_conv_params,
    flops=lambda a, ins, outs: Poly.numel(outs[0].shape) * (2 * (a.in_channels // a.groups) * math.prod(a.kernel)))
def _conv(a: ConvAttrs, ins):
    _float(ins[0], "conv")
    if a.in_channels % a.groups or a.out_channels % a.groups:
        raise ShapeError(f"groups={a.groups} must divide both {a.in_channels} input and {a.out_channels} output channels")
    return [TensorType(_conv_shape(a, ins[0]))]


class PoolAttrs(Attrs):
    spatial: Literal[1, 2]
    kind: Literal["avg", "max"]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]


@op("pool", PoolAttrs, flops=lambda a, ins, outs: Poly.numel(outs[0].shape) * math.prod(a.kernel))
def _pool(a: PoolAttrs, ins):
    (x,) = ins
    n = a.spatial
    _float(x, f"{a.kind}_pool{n}d")  # torch pools floats only
    if x.rank < n + 1:
        raise ShapeError(f"{a.kind}_pool{n}d expects [*, {'L' if n == 1 else 'H, W'}, C], got {show_shape(x.shape)}")
    spatial = tuple(
        _conv_out(x.shape[-1 - n + i], a.kernel[i], a.stride[i], 1, 0) if isinstance(x.shape[-1 - n + i], int)
        else _pool_symbolic(x.shape[-1 - n + i], a.kernel[i], a.stride[i])
        for i in range(n)
    )
    return [TensorType(x.shape[: -1 - n] + spatial + x.shape[-1:], x.dtype)]


def _pool_symbolic(size: Dim, kernel: int, stride: int) -> Dim:
    if kernel == stride:
        d = dim_div(size, stride)
        if d is not None:
            return d
    raise ShapeError(f"pooling a symbolic length {size} needs kernel == stride dividing it")


# --------------------------------------------------------------- shapes
class ReshapeAttrs(Attrs):
    shape: tuple[Dim, ...]  # may hold one -1


@op("reshape", ReshapeAttrs)
def _reshape(a: ReshapeAttrs, ins):
    (x,) = ins
    total = numel(x.shape)
    known: Dim = 1
    holes = [i for i, d in enumerate(a.shape) if d == -1]
    if len(holes) > 1:
        raise ShapeError("reshape takes at most one -1")
    for d in a.shape:
        if d != -1:
            if isinstance(d, int) and d <= 0:
                raise ShapeError(f"reshape sizes must be positive, got {d}")
            known = dim_mul(known, d)
    if holes:
        rest = dim_div(total, known)
        if rest is None:
            raise ShapeError(f"cannot reshape {show_shape(x.shape)} ({total} elements) into {show_shape(a.shape)}")
        shape = tuple(rest if d == -1 else d for d in a.shape)
    else:
        if known != total:
            raise ShapeError(f"cannot reshape {show_shape(x.shape)} ({total} elements) into {show_shape(a.shape)} ({known})")
        shape = a.shape
    return [TensorType(shape, x.dtype)]


class PermuteAttrs(Attrs):
    dims: tuple[int, ...]


@op("permute", PermuteAttrs)
def _permute(a: PermuteAttrs, ins):
    (x,) = ins
    if sorted(a.dims) != list(range(x.rank)):
        raise ShapeError(f"permute({list(a.dims)}) is not a permutation of the {x.rank} dims of {show_shape(x.shape)}")
    return [TensorType(tuple(x.shape[i] for i in a.dims), x.dtype)]


class AxisAttrs(Attrs):
    dim: int


@op("unsqueeze", AxisAttrs)
def _unsqueeze(a: AxisAttrs, ins):
    (x,) = ins
    axis = _axis(a.dim, x.rank + 1)
    return [TensorType(x.shape[:axis] + (1,) + x.shape[axis:], x.dtype)]


@op("squeeze", AxisAttrs)
def _squeeze(a: AxisAttrs, ins):
    (x,) = ins
    axis = _axis(a.dim, x.rank)
    if x.shape[axis] != 1:
        raise ShapeError(f"squeeze: dim {a.dim} of {show_shape(x.shape)} is not 1")
    return [TensorType(x.shape[:axis] + x.shape[axis + 1:], x.dtype)]


class SplitAttrs(Attrs):
    sizes: tuple[int, ...]
    dim: int = -1


@op("split", SplitAttrs)
def _split(a: SplitAttrs, ins):
    (x,) = ins
    axis = _axis(a.dim, x.rank)
    if any(s <= 0 for s in a.sizes):
        raise ShapeError(f"split sizes must be positive, got {list(a.sizes)}")
    if x.shape[axis] != sum(a.sizes):
        raise ShapeError(f"split sizes {list(a.sizes)} sum to {sum(a.sizes)}, but dim {a.dim} of {show_shape(x.shape)} is {x.shape[axis]}")
    return [TensorType(x.shape[:axis] + (s,) + x.shape[axis + 1:], x.dtype) for s in a.sizes]


class JoinAttrs(Attrs):
    dim: int = -1
    stack: bool = False


@op("join", JoinAttrs)
def _join(a: JoinAttrs, ins):
    if not ins:
        raise ShapeError("concat/stack of an empty list")
    first = ins[0]
    if a.stack:
        for t in ins[1:]:
            if t.shape != first.shape:
                raise ShapeError(f"stack needs equal shapes, got {show_shape(first.shape)} and {show_shape(t.shape)}")
        axis = _axis(a.dim, first.rank + 1)
        dtype = first.dtype
        for t in ins[1:]:
            dtype = promote(dtype, t.dtype)  # torch.stack promotes, as torch.cat does
        return [TensorType(first.shape[:axis] + (len(ins),) + first.shape[axis:], dtype)]
    axis = _axis(a.dim, first.rank)
    total: Dim = 0
    for t in ins:
        if t.rank != first.rank or any(
            t.shape[i] != first.shape[i] for i in range(first.rank) if i != axis
        ):
            raise ShapeError(f"concat along dim {a.dim} needs the other dims equal: {show_shape(first.shape)} vs {show_shape(t.shape)}")
        d = t.shape[axis]
        if isinstance(total, int) and isinstance(d, int):
            total += d
        elif total == 0:
            total = d
        elif isinstance(total, Sym) and isinstance(d, Sym) and total.factors == d.factors:
            total = Sym(d.factors, total.coeff + d.coeff)  # T + 2*T = 3*T
        else:
            raise ShapeError(f"concat of dims {total} and {d} is not supported: the sum is not a single size")
    dtype = first.dtype
    for t in ins[1:]:
        dtype = promote(dtype, t.dtype)
    return [TensorType(first.shape[:axis] + (total,) + first.shape[axis + 1:], dtype)]


class HeadsAttrs(Attrs):
    heads: int = Field(gt=0)
    merge: bool = False


@op("heads", HeadsAttrs)
def _heads(a: HeadsAttrs, ins):
    (x,) = ins
    if x.rank < 2:
        raise ShapeError(f"head splitting needs [*, T, D], got {show_shape(x.shape)}")
    if a.merge:
        if x.rank < 3 or x.shape[-3] != a.heads:
            raise ShapeError(f"merge_heads expects [*, {a.heads}, T, d], got {show_shape(x.shape)}")
        return [TensorType(x.shape[:-3] + (x.shape[-2], dim_mul(x.shape[-1], a.heads)), x.dtype)]
    d = dim_div(x.shape[-1], a.heads)
    if d is None:
        raise ShapeError(f"{x.shape[-1]} features do not split into {a.heads} heads")
    return [TensorType(x.shape[:-2] + (a.heads, x.shape[-2], d), x.dtype)]


class IndexAttrs(Attrs):
    """Static basic indexing: ints, slices, '...', and None (a new axis)."""

    items: tuple[tuple[Any, ...], ...]  # ("int", i) | ("slice", start, stop, step) | ("ellipsis",) | ("new",)


def _slice_len(size: Dim, start, stop, step) -> Dim:
    if isinstance(size, int):
        return len(range(*slice(start, stop, step).indices(size)))
    if start in (None, 0) and stop is None and step in (None, 1):
        return size
    if step in (None, 1) and stop is not None and (start is None or start >= 0) and stop >= 0:
        return stop - (start or 0)  # a static prefix of a symbolic dim
    raise ShapeError(f"cannot slice a symbolic dim {size} with [{start}:{stop}:{step}] statically",
                     help="a slice of a symbolic dim keeps it whole or takes a static prefix ([:n]); for the "
                          "previous position along it (a token shift), use shift(x, dim=…)")


@op("index", IndexAttrs)
def _index(a: IndexAttrs, ins):
    (x,) = ins
    items = list(a.items)
    consumed = sum(1 for it in items if it[0] in ("int", "slice"))
    if sum(1 for it in items if it[0] == "ellipsis") > 1:
        raise ShapeError("an index may hold one '...'")
    if consumed > x.rank:
        raise ShapeError(f"too many indices ({consumed}) for {show_shape(x.shape)}")
    if not any(it[0] == "ellipsis" for it in items):
        items.append(("ellipsis",))
    out: list[Dim] = []
    axis = 0
    for it in items:
        if it[0] == "ellipsis":
            n = x.rank - consumed
            out.extend(x.shape[axis:axis + n])
            axis += n
        elif it[0] == "new":
            out.append(1)
        elif it[0] == "int":
            size = x.shape[axis]
            if isinstance(size, int) and not -size <= it[1] < size:
                raise ShapeError(f"index {it[1]} is out of range for dim {axis} of size {size}")
            axis += 1
        else:
            _, start, stop, step = it
            if step is not None and step <= 0:
                raise ShapeError("slice steps must be positive; use flip() to reverse")
            length = _slice_len(x.shape[axis], start, stop, step)
            if isinstance(length, int) and length <= 0:
                raise ShapeError(f"slice [{start}:{stop}] of dim {axis} (size {x.shape[axis]}) is empty")
            out.append(length)
            axis += 1
    return [TensorType(tuple(out), x.dtype)]


class GatherAttrs(Attrs):
    dim: int = -1


@op("gather", GatherAttrs)
def _gather(a, ins):
    x, idx = ins
    if idx.dtype != "int":
        raise ShapeError(f"gather indices must be int, got {idx.dtype}")
    if idx.rank != x.rank:
        raise ShapeError(f"gather needs indices of the same rank as the input: {show_shape(x.shape)} vs {show_shape(idx.shape)}")
    _axis(a.dim, x.rank)
    return [TensorType(idx.shape, x.dtype)]


class FlipAttrs(Attrs):
    dim: int


@op("flip", FlipAttrs)
def _flip(a, ins):
    _axis(a.dim, ins[0].rank)
    return [ins[0]]


class ShiftAttrs(Attrs):
    """y_t = x_{t−steps} along `dim`, the first `steps` positions filled (a token shift): with `value`, or with the
    last input where `given`, a tensor broadcasting to one slice of x (x's shape without `dim`)."""

    dim: int
    steps: int = Field(default=1, ge=1)
    value: float = 0.0
    given: bool = False


@op("shift", ShiftAttrs)
def _shift(a: ShiftAttrs, ins):
    x = ins[0]
    axis = _axis(a.dim, x.rank)
    if len(ins) != 1 + a.given:
        raise ShapeError(f"shift takes x{' and its fill' * a.given}, got {len(ins)} inputs")
    if a.given:
        fill, slice_shape = ins[1], x.shape[:axis] + x.shape[axis + 1:]
        if fill.dtype != x.dtype or broadcast(fill.shape, slice_shape) != slice_shape:
            raise ShapeError(f"shift's fill {fill} must be a {x.dtype} tensor broadcasting to "
                             f"{show_shape(slice_shape)}, one slice of x {show_shape(x.shape)} along dim {a.dim}")
    return [x]


# --------------------------------------------------------- reductions, scans
class ReduceAttrs(Attrs):
    fn: Literal["sum", "mean", "max", "min", "prod", "logsumexp"]
    dims: tuple[int, ...]
    keepdim: bool = False


@op("reduce", ReduceAttrs, flops=lambda a, ins, outs: Poly.numel(ins[0].shape))
def _reduce(a: ReduceAttrs, ins):
    (x,) = ins
    axes = sorted({_axis(d, x.rank) for d in a.dims})
    if len(axes) != len(a.dims):
        raise ShapeError(f"{a.fn} names a dim twice: {list(a.dims)} of a tensor of rank {x.rank}")
    if a.fn in ("mean", "logsumexp"):
        _float(x, a.fn)
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if a.keepdim else tuple(
        d for i, d in enumerate(x.shape) if i not in axes)
    dtype = x.dtype if a.fn in ("max", "min") else ("float" if x.dtype == "float" or a.fn == "mean" else "int")
    return [TensorType(shape, dtype)]


class CumulativeAttrs(Attrs):
    fn: Literal["sum", "prod"]
    dim: int
    reverse: bool = False


@op("cumulative", CumulativeAttrs, flops=lambda a, ins, outs: Poly.numel(ins[0].shape))
def _cumulative(a, ins):
    (x,) = ins
    _axis(a.dim, x.rank)
    return [TensorType(x.shape, "int" if x.dtype == "bool" else x.dtype)]  # a running count of bools


# ------------------------------------------------------------ attention
class AttentionAttrs(Attrs):
    """Scaled dot-product attention; inputs q, k, v, then the mask where `masked`, then the lengths where `lengths`.

    Every mask given applies together: `causal` (key s ≤ query t), `window` (t − window < s: the
    window's keys up to the query, as transformers' sliding_window), `lengths` (the valid keys of
    each sample, the first `lengths[b]` or, `left_padded`, the last) and `mask` (bool: true where a
    query may see a key; float: added to the scores).
    """

    causal: bool = False
    scale: float | None = None
    masked: bool = False
    lengths: bool = False
    left_padded: bool = False
    window: int | None = Field(default=None, gt=0)


def attention_groups(q: TensorType, k: TensorType) -> int:
    """How many query heads share each key/value head (dim -3): 1 unless the attention is grouped-query."""
    if q.rank < 3 or k.rank < 3 or q.shape[-3] == k.shape[-3] or 1 in (q.shape[-3], k.shape[-3]):
        return 1  # equal heads, or ones that broadcast
    groups = dim_div(q.shape[-3], k.shape[-3])
    if groups is None or not isinstance(groups, int):
        raise ShapeError(f"attention: q has {q.shape[-3]} heads (dim -3) and k {k.shape[-3]}; grouped-query "
                         f"attention needs the query heads to be a multiple of the key/value heads")
    return groups


def _attention_flops(a, ins, outs) -> Poly:
    q, k, v = ins[:3]
    # QK^T and PV: 2·T·S·d each, per batch and query head (a grouped key/value head is used once per query head).
    return Poly.numel(q.shape[:-1]) * Poly.of(k.shape[-2]) * (Poly.of(q.shape[-1]) + Poly.of(v.shape[-1])) * 2


@op("attention", AttentionAttrs, flops=_attention_flops)
def _attention(a: AttentionAttrs, ins):
    q, k, v = ins[:3]
    if len(ins) != 3 + a.masked + a.lengths:
        raise ShapeError(f"attention takes q, k, v{', a mask' * a.masked}{', lengths' * a.lengths}; "
                         f"got {len(ins)} inputs")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _float(t, "attention")
        if t.rank < 2:
            raise ShapeError(f"attention {name} needs [*, T, d], got {show_shape(t.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"attention: q and k widths differ: {show_shape(q.shape)} vs {show_shape(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"attention: k and v lengths differ: {show_shape(k.shape)} vs {show_shape(v.shape)}")
    groups = attention_groups(q, k)
    if groups > 1:  # grouped-query: dim -3 is the heads, q's a multiple of k's and v's
        if v.rank < 3 or v.shape[-3] != k.shape[-3] or not q.rank == k.rank == v.rank:
            raise ShapeError(f"attention: grouped-query attention needs k and v of one rank with q and the same "
                             f"heads (dim -3); got {show_shape(q.shape)}, {show_shape(k.shape)}, {show_shape(v.shape)}")
        lead = broadcast(broadcast(q.shape[:-3], k.shape[:-3]) or (), v.shape[:-3])
        if lead is None or broadcast(q.shape[:-3], k.shape[:-3]) is None:
            raise ShapeError(f"attention: batch dims differ: {show_shape(q.shape)}, {show_shape(k.shape)}, "
                             f"{show_shape(v.shape)}")
        batch = lead + (q.shape[-3],)
    else:
        batch = broadcast(broadcast(q.shape[:-2], k.shape[:-2]) or (), v.shape[:-2])
        if batch is None or broadcast(q.shape[:-2], k.shape[:-2]) is None:
            raise ShapeError(f"attention: batch dims differ: {show_shape(q.shape)}, {show_shape(k.shape)}, "
                             f"{show_shape(v.shape)}")
    out = batch + (q.shape[-2], v.shape[-1])
    if a.masked:
        mask = ins[3]
        if mask.dtype == "int":
            raise ShapeError(f"an attention mask is bool (true where a query may see a key) or float (added to the "
                             f"scores), got int {show_shape(mask.shape)}")
        if broadcast(mask.shape, batch + (q.shape[-2], k.shape[-2])) != batch + (q.shape[-2], k.shape[-2]):
            raise ShapeError(f"attention mask {show_shape(mask.shape)} does not broadcast to the scores "
                             f"{show_shape(batch + (q.shape[-2], k.shape[-2]))}")
    if a.lengths:
        lengths = ins[-1]
        if len(batch) < 1 or lengths.dtype != "int" or lengths.shape != batch[:1]:
            raise ShapeError(f"attention lengths are int[B], one valid length per sample, B the first dim of the "
                             f"scores {show_shape(batch + (q.shape[-2], k.shape[-2]))}; got {lengths}")
    if a.window is not None and not a.causal:
        raise ShapeError("a sliding window (window=) is causal: give causal=true too")
    if a.left_padded and not a.lengths:
        raise ShapeError('padding="left" says where the lengths= padding is: give lengths too')
    return [TensorType(out)]


class RopeAttrs(Attrs):
    """Rotary position embedding of [*, T, d] (transformers' rotate_half form) on its first `rotary_dim` features.

    Inputs: x, then the int positions [T] or [B, T] (B the first dim of x) where `positions`, else 0..T-1.
    """

    theta: float = Field(gt=0)
    rotary_dim: int = Field(ge=0)
    positions: bool = False


@op("rope", RopeAttrs, flops=lambda a, ins, outs: Poly.numel(ins[0].shape[:-1]) * (3 * a.rotary_dim))
def _rope(a: RopeAttrs, ins):
    x = ins[0]
    _float(x, "rope")
    if x.rank < 2:
        raise ShapeError(f"rope needs [*, T, d], got {show_shape(x.shape)}")
    width = x.shape[-1]
    if a.rotary_dim % 2 or (isinstance(width, int) and a.rotary_dim > width):
        raise ShapeError(f"rope rotates an even number of features, at most the {width} of {show_shape(x.shape)}; "
                         f"got rotary_dim={a.rotary_dim}")
    if len(ins) != 1 + a.positions:
        raise ShapeError(f"rope takes x{' and positions' * a.positions}, got {len(ins)} inputs")
    if a.positions:
        pos = ins[1]
        shapes = [(x.shape[-2],)] + [(x.shape[0], x.shape[-2])] * (x.rank >= 3)
        if pos.dtype != "int" or pos.shape not in shapes:
            raise ShapeError(f"rope positions are int[T] or int[B, T] (B the first dim of x) for x "
                             f"{show_shape(x.shape)}; got {pos}")
    return [x]


# ------------------------------------------------- embedding, dropout, misc
class EmbeddingAttrs(Attrs):
    num: int = Field(gt=0)
    dim: int = Field(gt=0)
    weight: str
    init: InitSpec


@op("embedding", EmbeddingAttrs, params=lambda a, ins: [ParamDecl("weight", (a.num, a.dim), a.init)])
def _embedding(a, ins):
    (idx,) = ins
    if idx.dtype != "int":
        raise ShapeError(f"embedding takes int indices, got {idx.dtype} {show_shape(idx.shape)}")
    return [TensorType(idx.shape + (a.dim,))]


class TakeAttrs(Attrs):
    pass


@op("take", TakeAttrs)
def _take(a, ins):
    table, idx = ins
    if table.rank != 2 or table.dtype != "float":
        raise ShapeError(f"take reads rows of a float [N, D] table, got {table.dtype} {show_shape(table.shape)}")
    if idx.dtype != "int":
        raise ShapeError(f"take takes int indices, got {idx.dtype} {show_shape(idx.shape)}")
    return [TensorType(idx.shape + (table.shape[1],))]


class OneHotAttrs(Attrs):
    num: int = Field(gt=0)


@op("one_hot", OneHotAttrs)
def _one_hot(a, ins):
    if ins[0].dtype != "int":
        raise ShapeError("one_hot takes int indices")
    return [TensorType(ins[0].shape + (a.num,))]


class DropoutAttrs(Attrs):
    p: float = Field(ge=0, lt=1)
    module: str


@op("dropout", DropoutAttrs)
def _dropout(a, ins):
    _float(ins[0], "dropout")  # torch's dropout scales by 1/(1-p): a float result
    return [ins[0]]


class NoiseAttrs(Attrs):
    module: str


@op("noise", NoiseAttrs)
def _noise(a, ins):
    _float(ins[0], "noise_like")  # N(0, 1) of the input's shape in training, zeros in eval
    return [ins[0]]


# ------------------------------------------------------------------ scan
class ScanAttrs(Attrs):
    """Runs `body` along one axis. Inputs are: sequences, then constants, then initial states."""

    cell: str
    path: str
    body: Any  # gatedsl.ir.graph.Graph: the cell, one step
    axes: tuple[int, ...]  # the scanned axis of each sequence input
    roles: tuple[Literal["seq", "const", "state"], ...]  # per cell parameter, in signature order
    n_states: int = Field(ge=1)
    reverse: bool = False
    last: bool = False
    # How it runs: "loop" steps the body; "gru" / "lstm" run torch's fused kernel (passes/native_rnn.py)
    # with these weights, concatenated in torch's gate order: (input, state, input bias, state bias).
    kernel: Literal["loop", "gru", "lstm"] = "loop"
    weights: tuple[tuple[str, ...], ...] = ()


def _scan_flops(a: ScanAttrs, ins, outs) -> Poly:
    seq = ins[a.roles.index("seq")]
    steps = Poly.of(seq.shape[a.axes[0]])
    return graph_flops(a.body) * steps  # the body's own count, once per step


@op("scan", ScanAttrs, flops=_scan_flops)
def _scan(a: ScanAttrs, ins):
    # The body was checked step by step during elaboration; the outputs are its emitted
    # value stacked along the axis (or the last one), then the final states.
    body = a.body
    emitted = body.type_of(body.outputs[0][1])
    seq = ins[a.roles.index("seq")]  # the first sequence sets the length (lower_recurrences may drop the spec's own)
    axis = a.axes[0]
    length = seq.shape[axis]
    if a.last:
        first = emitted
    else:
        # The emitted step has the sequence's leading dims before the axis; insert the axis back.
        lead = axis if axis <= emitted.rank else emitted.rank
        first = TensorType(emitted.shape[:lead] + (length,) + emitted.shape[lead:], emitted.dtype)
    finals = [body.type_of(port) for _, port in body.outputs[1:]]
    return [first] + finals


# ---------------------------------------------------------------- cascade
class CascadeStageAttrs(Attrs):
    """One stage of a cascade: `body` maps the values the stages read to (exit head, exit gate, *carried values)."""

    path: str
    body: Any  # gatedsl.ir.graph.Graph


def _stage_flops(a: CascadeStageAttrs, ins, outs) -> Poly:
    return graph_flops(a.body)


@op("cascade_stage", CascadeStageAttrs, flops=_stage_flops)
def _cascade_stage(a: CascadeStageAttrs, ins):
    expected = [a.body.node(n)["attrs"].type for _, n in a.body.inputs]
    if list(ins) != expected:
        raise ShapeError(f"stage {a.path} reads {[str(t) for t in expected]}, got {[str(t) for t in ins]}")
    return [a.body.type_of(port) for _, port in a.body.outputs]


class CascadeAttrs(Attrs):
    """Early exit over a stack of stages (GATES.md §7).

    `body` is the stack as a graph: the values the stages read, then one cascade_stage node
    per stage, each taking the previous stage's carried values. Per input, its role: "carry"
    (per sample, replaced by each stage), "rows" (per sample, read only) or "whole" (shared).
    A sample exits at the first stage l whose gate is > thresholds[l], else at the last.
    """

    path: str
    body: Any  # gatedsl.ir.graph.Graph
    roles: tuple[Literal["carry", "rows", "whole"], ...]
    thresholds: tuple[float, ...]


def cascade_stages(a: CascadeAttrs) -> list[CascadeStageAttrs]:
    return [a.body.node(n)["attrs"] for n in a.body.order() if a.body.node(n)["op"] == "cascade_stage"]


def _cascade_flops(a: CascadeAttrs, ins, outs) -> Poly:
    return graph_flops(a.body)  # every stage: the training cost, and inference's worst case


@op("cascade", CascadeAttrs, flops=_cascade_flops)
def _cascade(a: CascadeAttrs, ins):
    # Outputs: the prediction y (the head at each sample's exit), the exit index, every head
    # stacked [L, B, ...], every gate [L, B], then each carried value at the sample's exit.
    stages = cascade_stages(a)
    if len(stages) != len(a.thresholds) or len(ins) != len(a.roles) or not stages:
        raise ShapeError("a cascade needs one threshold per stage and one role per input")
    head, gate, *carried = [stages[0].body.type_of(port) for _, port in stages[0].body.outputs]
    samples = gate.shape[0]
    return [head, TensorType((samples,), "int"), TensorType((len(stages),) + head.shape, head.dtype),
            TensorType((len(stages), samples), gate.dtype), *carried]


# ------------------------------------------------------- expert routing
class MoeExpertAttrs(Attrs):
    """One expert of a moe_dispatch: `body` maps the tokens x to its output, row by row; its weights live under `path`."""

    path: str
    body: Any  # gatedsl.ir.graph.Graph


def _expert_flops(a: MoeExpertAttrs, ins, outs) -> Poly:
    return graph_flops(a.body)


@op("moe_expert", MoeExpertAttrs, flops=_expert_flops)
def _moe_expert(a: MoeExpertAttrs, ins):
    return [a.body.type_of(port) for _, port in a.body.outputs]


class MoeDispatchAttrs(Attrs):
    """y = base + Σ_i g[..., columns[i]] ⊙ E_i(x) (passes/route_experts.py), run densely or by routing each token to its experts.

    `body` holds the experts as a graph: the input x, then one moe_expert node per expert, in the
    order the spec added them; `columns` says which gate entry weights each. `active` is how many
    experts each token uses as the gate's form says (k for a top-k, all for a softmax), None where
    only each call's gate tells; the kernels' cost rule reads it.
    """

    path: str  # where the experts live (their common instance path), for --explain
    body: Any  # gatedsl.ir.graph.Graph
    columns: tuple[int, ...]
    active: int | None = Field(default=None, gt=0)
    flops_per_token: int = Field(ge=0)  # one expert on one token, the mean over the experts


def moe_experts(a: MoeDispatchAttrs) -> list[MoeExpertAttrs]:
    return [a.body.node(n)["attrs"] for n in a.body.order() if a.body.node(n)["op"] == "moe_expert"]


def _dispatch_flops(a: MoeDispatchAttrs, ins, outs) -> Poly:
    return graph_flops(a.body) + Poly.numel(outs[0].shape) * (2 * len(moe_experts(a)))  # weight and add each


@op("moe_dispatch", MoeDispatchAttrs, flops=_dispatch_flops)
def _moe_dispatch(a: MoeDispatchAttrs, ins):
    x, g, *base = ins  # base: the sum so far (absent where the mixture starts the sum)
    experts = moe_experts(a)
    _float(g, "moe_dispatch gate")
    if g.shape != x.shape[:-1] + (len(experts),):
        raise ShapeError(f"moe_dispatch: a gate {show_shape(g.shape)} for {len(experts)} experts over tokens "
                         f"{show_shape(x.shape)}")
    if sorted(a.columns) != list(range(len(experts))) or len(a.columns) != len(experts):
        raise ShapeError("moe_dispatch: each gate entry weights exactly one expert")
    results = {e.body.type_of(port) for e in experts for _, port in e.body.outputs}
    if len(results) != 1 or (base and base[0] not in results):
        raise ShapeError(f"moe_dispatch: the experts give {sorted(map(str, results))}, the sum so far is "
                         f"{base[0] if base else 'nothing'}")
    return list(results)


# ------------------------------------------------------------ gate chains
class GateChainAttrs(Attrs):
    """A chain of element-wise gate math run as one op (passes/fuse_gate_chains.py): a small program.

    `steps` in topological order, each (fn, operand values, constants); value i < n_inputs is
    input i, value n_inputs + k is step k's result; the op returns the values in `outputs`.
    gatedsl/kernels/gate_chain/program.py defines the fns and their derivatives."""

    n_inputs: int = Field(ge=1)
    steps: tuple[tuple[str, tuple[int, ...], tuple[float | int | bool | None, ...]], ...]
    outputs: tuple[int, ...]

    @cached_property
    def program(self):
        from gatedsl.kernels.gate_chain.program import Program

        return Program(self.n_inputs, self.steps, self.outputs)

    @cached_property
    def text(self) -> str:
        from gatedsl.kernels.gate_chain.program import text

        return text(self.program)


def _gate_chain_flops(a: GateChainAttrs, ins, outs) -> Poly:
    return Poly.numel(outs[0].shape) * sum(1 for fn, _, _ in a.steps if fn != "const")


@op("gate_chain", GateChainAttrs, flops=_gate_chain_flops)
def _gate_chain(a: GateChainAttrs, ins):
    from gatedsl.kernels.gate_chain.program import shapes, validate

    if any(t.dtype == "int" for t in ins):
        raise ShapeError("a gate chain takes float tensors (and bool conditions), not int ones")
    problem = validate(a.program, tuple(t.dtype for t in ins))
    if problem is not None:
        raise ShapeError(f"malformed gate chain: {problem}")
    values = shapes(a.program, [t.shape for t in ins], broadcast)
    full: Shape | None = ()
    for t in ins:
        full = broadcast(full, t.shape) if full is not None else None
    if full is None or values[-1] is None:
        raise ShapeError(f"gate chain operands do not broadcast: {', '.join(show_shape(t.shape) for t in ins)}")
    for o in a.outputs:
        if values[o] != full:
            raise ShapeError(f"a gate chain's outputs have the shape of all its operands together, "
                             f"{show_shape(full)}; {show_shape(values[o])} is smaller")
    return [TensorType(full) for _ in a.outputs]


# ------------------------------------------------------- linear scans
class LinearScanAttrs(Attrs):
    """S_t = a_t ⊙ S_{t−1} + b_t, read out every step: a scan passes/parallel_scan.py found linear in its one state.

    Inputs, each with a leading time axis (of size 1 where it is the same at every step): the
    decay a_t (its log where `log_decay`), at the state's rank and broadcasting to it; the drive
    (k_t and v_t of b_t = k_tᵀ v_t where `drive` is "outer", the state being [*, K, V]; else b_t
    itself); the readout's other operand x_t where there is a readout; then the initial state S_0.
    Each step emits S_t ("none"), einsum(equation, S_t, x_t) or S_t ⊙ x_t; the results are the
    emitted values stacked on a leading time axis (the last one where `last`) and the final state.
    """

    cell: str
    path: str  # the scan's instance path, for --explain
    body: Any  # the cell it replaces (gatedsl.ir.graph.Graph), never run: its weights and gate marks stay declared there
    log_decay: bool
    drive: Literal["outer", "given"]
    readout: Literal["none", "einsum", "mul"]
    equation: str = ""  # the readout einsum of one step, the state's operand first
    key_readout: bool = False  # the readout is o_t = q_t S_t over the key dim of a [*, K, V] state
    reverse: bool = False
    last: bool = False


def linear_scan_parts(a: LinearScanAttrs, ins: list) -> tuple[Any, list, Any, Any]:
    """(decay, drive inputs, readout operand or None, initial state) of a linear_scan's inputs."""
    n_drive = 2 if a.drive == "outer" else 1
    if len(ins) != 2 + n_drive + (a.readout != "none"):
        raise ShapeError(f"linear_scan with a {a.drive} drive and readout {a.readout} takes "
                         f"{2 + n_drive + (a.readout != 'none')} inputs, got {len(ins)}")
    return ins[0], list(ins[1:1 + n_drive]), ins[1 + n_drive] if a.readout != "none" else None, ins[-1]


def _linear_scan_flops(a: LinearScanAttrs, ins, outs) -> Poly:
    # the cell's own count, once per step
    return graph_flops(a.body) * Poly.of(max((t.shape[0] for t in ins[:-1]), key=lambda d: d != 1))


@op("linear_scan", LinearScanAttrs, flops=_linear_scan_flops)
def _linear_scan(a: LinearScanAttrs, ins):
    decay, drive, operand, state = linear_scan_parts(a, ins)
    for t in ins:
        _float(t, "linear_scan")
    ss = state.shape
    lengths = {t.shape[0] for t in ins[:-1] if t.rank} - {1}
    if len(lengths) > 1 or any(t.rank == 0 for t in ins[:-1]):
        raise ShapeError(f"linear_scan's per-step inputs need one time axis in front, got "
                         f"{', '.join(show_shape(t.shape) for t in ins[:-1])}")
    length = lengths.pop() if lengths else 1
    if decay.rank != len(ss) + 1 or broadcast(decay.shape[1:], ss) != ss:
        raise ShapeError(f"linear_scan: a decay {show_shape(decay.shape)} for a state {show_shape(ss)}")
    if a.drive == "outer":
        k, v = drive
        if len(ss) < 2 or k.shape[1:] != ss[:-1] or v.shape[1:] != ss[:-2] + ss[-1:]:
            raise ShapeError(f"linear_scan: k {show_shape(k.shape)} and v {show_shape(v.shape)} do not make "
                             f"a state {show_shape(ss)}")
    elif drive[0].shape[1:] != ss:
        raise ShapeError(f"linear_scan: a drive {show_shape(drive[0].shape)} for a state {show_shape(ss)}")
    if a.readout == "none":
        step = state
    elif a.readout == "mul":
        if operand.rank != len(ss) + 1 or broadcast(operand.shape[1:], ss) is None:
            raise ShapeError(f"linear_scan: a readout operand {show_shape(operand.shape)} for {show_shape(ss)}")
        step = TensorType(broadcast(operand.shape[1:], ss))
    else:
        step = _einsum(EinsumAttrs(equation=a.equation), [state, TensorType(operand.shape[1:])])[0]
    out = step if a.last else TensorType((length,) + step.shape)
    return [out, state]


# ------------------------------------------------------ delta rule scan
class DeltaRuleScanAttrs(Attrs):
    """The gated delta rule over a whole sequence (passes/chunk_delta_rule.py; GATES.md §5), from a scan of `cell`.

    Inputs: q, k [*, T, K], v [*, T, V], then the gate [*, T] unless gate == "none" (α_t, or log α_t
    where "log"), then β [*, T] where beta, then the state before the first step [*, V, K]. Outputs:
    o [*, T, V] (o_t = S_t q_t) and the final state [*, V, K].
    """

    cell: str
    path: str
    body: Any  # the scanned cell's step graph: it still declares the cell's learned tensors and gate marks; not run
    gate: Literal["none", "alpha", "log"]
    beta: bool


def _delta_rule_flops(a: DeltaRuleScanAttrs, ins, outs) -> Poly:
    q, state = ins[0], ins[-1]
    # Per step, as the cell computes it: S k, the two outer products and the update, and S q.
    return Poly.numel(q.shape[:-1]) * Poly.of(dim_mul(state.shape[-2], state.shape[-1])) * 8


@op("delta_rule_scan", DeltaRuleScanAttrs, flops=_delta_rule_flops)
def _delta_rule_scan(a: DeltaRuleScanAttrs, ins):
    expected = 4 + (a.gate != "none") + a.beta
    if len(ins) != expected:
        raise ShapeError(f"delta_rule_scan takes {expected} inputs, got {len(ins)}")
    q, k, v, *rest = ins
    state = rest[-1]
    for t in ins:
        _float(t, "delta_rule_scan")
    steps = q.shape[:-1]  # [*, T]
    well_formed = q.rank >= 2 and k.shape == q.shape and v.shape[:-1] == steps \
        and state.shape == q.shape[:-2] + v.shape[-1:] + q.shape[-1:] and all(t.shape == steps for t in rest[:-1])
    if not well_formed:
        raise ShapeError(f"delta_rule_scan: q, k [*, T, K], v [*, T, V], gates [*, T], state [*, V, K]; got "
                         f"{', '.join(show_shape(t.shape) for t in ins)}")
    return [TensorType(steps + v.shape[-1:]), state]


# ------------------------------------------------------ projection groups
class ProjectionGroupAttrs(Attrs):
    """Projections of one tensor x run as one op (passes/fuse_projections.py): output j is x W_jᵀ + b_j (+ its addend).

    Inputs: x; each projection's weight [out_j, in] in output order, then the biases of those that
    have one; or, `packed`, the weights concatenated [Σ out, in] (built once per call, before the
    loop that runs this op), with `transposed` the same transposed [in, Σ out] (row-major: a faster
    right operand for a product of few rows), and, where any projection has a bias, the biases
    concatenated [Σ out], zero where a projection has none; with `addend`, a last input [*, Σ out]
    added to the products.
    """

    in_features: int = Field(gt=0)
    out_features: tuple[int, ...]
    biases: tuple[bool, ...]  # per projection: whether it has a bias
    weights: tuple[str, ...]  # the projections' weight paths, for --explain (the tensors are inputs)
    packed: bool = False
    transposed: bool = False
    addend: bool = False

    @field_validator("out_features")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(o <= 0 for o in v):
            raise ValueError("a projection group has projections of positive widths")
        return v


def _projection_group_flops(a: ProjectionGroupAttrs, ins, outs) -> Poly:
    width = sum(a.out_features)
    return Poly.numel(ins[0].shape[:-1]) * (2 * a.in_features * width + width * a.addend)


@op("projection_group", ProjectionGroupAttrs, flops=_projection_group_flops)
def _projection_group(a: ProjectionGroupAttrs, ins):
    x, *rest = ins
    _float(x, "projection_group")
    n, width = len(a.out_features), sum(a.out_features)
    if len(a.biases) != n or len(a.weights) != n:
        raise ShapeError(f"projection_group: {n} projections need {n} bias flags and weight paths")
    if not x.shape or x.shape[-1] != a.in_features:
        raise ShapeError(f"projection_group expects last dim {a.in_features}, got {show_shape(x.shape)}")
    if a.transposed and not a.packed:
        raise ShapeError("projection_group: only packed weights come transposed too")
    if a.packed:
        expected = [(width, a.in_features)] + [(a.in_features, width)] * a.transposed + [(width,)] * any(a.biases)
    else:
        expected = [(o, a.in_features) for o in a.out_features] + [(o,) for o, b in zip(a.out_features, a.biases) if b]
    if a.addend:
        expected.append(x.shape[:-1] + (width,))
    got = [t.shape for t in rest]
    if got != expected or any(t.dtype != "float" for t in rest):
        raise ShapeError(f"projection_group of {show_shape(x.shape)} takes float tensors "
                         f"{', '.join(show_shape(s) for s in expected)}; got {', '.join(show_shape(s) for s in got)}")
    return [TensorType(x.shape[:-1] + (o,)) for o in a.out_features]
