"""The Python interface: gatedsl.check(spec) -> Report without allocating weights, gatedsl.compile(spec) -> torch.fx.GraphModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gatedsl.errors import SizeError, SpecError, Span
from gatedsl.frontend import ast
from gatedsl.frontend.loader import MAX_FILE_SIZE, Program, load_path, load_text
from gatedsl.ir.model import Limits, ModelIR, Target
from gatedsl.ir.types import Sym, TensorType
from gatedsl.passes import MAX_OPT_LEVEL, run_pipeline

ShapeList = list[int | str]


class GateInfo(BaseModel):
    name: str
    kind: str
    line: int
    file: str


class Report(BaseModel):
    """What `check` finds out about a model without allocating a weight."""

    model: str
    file: str
    parameters: dict[str, Any]  # the model parameters as bound (blocks by name)
    inputs: dict[str, ShapeList]
    input_dtypes: dict[str, str]
    outputs: dict[str, ShapeList]
    params: int
    params_by_block: dict[str, int]
    flops: int  # with every symbolic size set by `dims` (1 where not given)
    flops_expr: str  # the same as a polynomial in the symbolic sizes
    sizes: dict[str, int]  # every symbolic size of the model (B, T, ...) and the value `flops` counts it at
    gates: list[GateInfo]
    shapes: dict[str, ShapeList]  # every named value, by instance path
    aux: dict[str, ShapeList] = {}  # `aux NAME = ...` values by instance path, as gatedsl.aux_outputs(model) gives them
    kernels: list[dict[str, Any]] = []  # each fused op's and scan's implementation for the target, and why (--explain)


def _shape(t: TensorType) -> ShapeList:
    return [d if isinstance(d, int) else str(d) for d in t.shape]


def load(spec: str | Path | Program, *, max_file_size: int | None = None) -> Program:
    """Parse a spec given as a path or as source text, with its imports (a Program, already parsed, is used as is).

    Each file (and a text) may hold at most `max_file_size` bytes (default MAX_FILE_SIZE, 4 MiB), checked before
    it is read; a path must name a .gate file."""
    limit = MAX_FILE_SIZE if max_file_size is None else max_file_size
    if isinstance(spec, Program):
        return spec
    if isinstance(spec, Path):
        return load_path(spec, max_file_size=limit)
    looks_like_path = "\n" not in spec and "{" not in spec and (spec.endswith(".gate") or Path(spec).is_file())
    return load_path(spec, max_file_size=limit) if looks_like_path else load_text(spec, max_file_size=limit)


def pick_model(program: Program, name: str | None) -> ast.Definition:
    main_models = [d for d in program.main.definitions if d.kind == "model"]
    if name is not None:
        d = program.definitions.get(name)
        if d is None or d.kind != "model":
            raise SpecError(f"no model named '{name}'", Span(program.main.file, 1, 1),
                            help="models here: " + (", ".join(m.name for m in main_models) or "none"))
        return d
    if not main_models:
        raise SpecError("this file defines no model", Span(program.main.file, 1, 1),
                        help="add `model NAME() { input ...; output ... }`")
    if len(main_models) > 1:
        raise SpecError(f"this file defines {len(main_models)} models; say which", main_models[1].span,
                        help="pass model=NAME (--model NAME): " + ", ".join(m.name for m in main_models))
    return main_models[0]


_DEVICES = ("cpu", "cuda")
_DTYPES = ("float32", "float64", "float16", "bfloat16")


def analyse(spec: str | Path | Program, params: dict[str, Any] | None = None, *, model: str | None = None,
            max_params: int | None = None, opt_level: int = MAX_OPT_LEVEL, target: Target | None = None,
            standalone: bool = False, max_file_size: int | None = None, max_ops: int | None = None) -> ModelIR:
    """Run the whole pipeline (the optimisations up to `opt_level`) and return the compilation unit.

    `target` (device, dtype, training) is what the kernel choices in the report are made for;
    the compiled module makes them again for each call's tensors. `standalone` leaves out the
    passes whose fused ops need gatedsl at run time (for an export that needs only torch)."""
    if isinstance(opt_level, bool) or not isinstance(opt_level, int) or not 0 <= opt_level <= MAX_OPT_LEVEL:
        raise ValueError(f"opt_level must be an int from 0 to {MAX_OPT_LEVEL}, got {opt_level!r}")
    target = target or Target()
    if target.device not in _DEVICES or target.dtype not in _DTYPES:
        raise ValueError(f"target device must be one of {_DEVICES} and dtype one of {_DTYPES}, got {target}")
    program = load(spec, max_file_size=max_file_size)
    limits = Limits()
    if max_params is not None:
        limits.max_params = max_params
    if max_ops is not None:
        limits.max_nodes = max_ops
    unit = ModelIR(program, pick_model(program, model), dict(params or {}), limits, opt_level=opt_level,
                   target=target, standalone=standalone)
    return run_pipeline(unit)


def symbolic_sizes(unit: ModelIR) -> list[str]:
    """The model's symbolic sizes (B, T, ...): every name in its input and output shapes and its FLOP count, in the
    order the inputs first name them."""
    g = unit.graph
    types = [g.node(n)["attrs"].type for _, n in g.inputs] + [g.type_of(port) for _, port in g.outputs]
    names = [f for t in types for d in t.shape if isinstance(d, Sym) for f in d.factors]
    names += sorted(f for factors in unit.flops.terms for f in factors)
    return list(dict.fromkeys(names))


def check_dims(dims: dict[str, Any], sizes: list[str] | None, model: str) -> None:
    """Raise SizeError unless every entry of `dims` gives a positive int to one of `sizes`, model `model`'s symbolic
    sizes (a Report's `sizes`, or symbolic_sizes(unit)); with `sizes` None any name goes, as for `report`, where one
    dict may size several models."""
    for name, size in dims.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SizeError(f"{name}={size}: a size must be a positive integer")
        if sizes is not None and name not in sizes:
            known = ", ".join(sizes) if sizes else "none (every size is fixed)"
            raise SizeError(f"{name}={size}: model {model} has no symbolic size '{name}'; its sizes are: {known}")


def report(unit: ModelIR, dims: dict[str, int] | None = None) -> Report:
    """What `check` returns for an analysed unit; `dims` sizes symbolic dims for the FLOP count (SizeError if one
    is not a positive int; a name the model lacks counts for nothing)."""
    g = unit.graph
    inputs = {name: g.node(n)["attrs"].type for name, n in g.inputs}
    sizes = symbolic_sizes(unit)
    dims = dict(dims or {})
    check_dims(dims, None, unit.model.name)
    return Report(
        model=unit.model.name,
        file=unit.model.file,
        parameters={k: (v.name if isinstance(v, ast.Definition) else str(v) if not isinstance(
            v, (int, float, bool, str)) else v) for k, v in unit.parameters.items()},
        inputs={k: _shape(t) for k, t in inputs.items()},
        input_dtypes={k: t.dtype for k, t in inputs.items()},
        outputs={name: _shape(g.type_of(port)) for name, port in g.outputs},
        params=unit.param_count,
        params_by_block=unit.params_by_block,
        flops=unit.flops.evaluate(dims),
        flops_expr=str(unit.flops),
        sizes={name: dims.get(name, 1) for name in sizes},
        gates=[GateInfo(**m.model_dump()) for m in g.gates()],
        shapes={k: _shape(t) for k, t in unit.shapes.items()},
        aux={name: _shape(g.type_of(port)) for name, port in g.aux},
        kernels=[c.model_dump() for c in unit.kernels],
    )


def check(spec: str | Path | Program, params: dict[str, Any] | None = None, *, model: str | None = None,
          max_params: int | None = None, dims: dict[str, int] | None = None,
          opt_level: int = MAX_OPT_LEVEL, target: Target | None = None, max_file_size: int | None = None,
          max_ops: int | None = None) -> Report:
    """Validate a spec and report its shapes, parameter count, FLOPs, gates and kernels, allocating no weights."""
    return report(analyse(spec, params, model=model, max_params=max_params, opt_level=opt_level, target=target,
                          max_file_size=max_file_size, max_ops=max_ops), dims)


def compile(spec: str | Path, params: dict[str, Any] | None = None, *, model: str | None = None,
            max_params: int | None = None, opt_level: int = MAX_OPT_LEVEL, target: Target | None = None,
            standalone: bool = False, max_file_size: int | None = None, max_ops: int | None = None):
    """Compile a spec to a trainable torch.fx.GraphModule; opt_level 0 (-O0) skips every optimisation, 2 (default) runs all.

    Every level computes the same function with the same state_dict keys and shapes, so checkpoints move between them.
    `target` only sets what the report's kernel choices are made for: each fused op picks its kernel per call.
    `standalone=True` leaves out the passes whose fused ops need gatedsl at run time, so that
    gatedsl.backend.export.export_standalone can write the module as code that needs only torch.
    """
    unit = analyse(spec, params, model=model, max_params=max_params, opt_level=opt_level, target=target,
                   standalone=standalone, max_file_size=max_file_size, max_ops=max_ops)
    from gatedsl.backend.fx_emit import emit  # torch is imported only when compiling

    gm = emit(unit)
    gm.meta["gatedsl_report"] = report(unit)
    return gm


def aux_outputs(model) -> dict[str, Any]:
    """The `aux NAME = ...` values of the model's latest call, {instance path: tensor}, in spec order.

    Each call replaces them; they keep their autograd history (add them to the loss). Works on a
    compiled module, on torch.compile(module), and on a model exported with `-o` (also `model.aux`).
    """
    from gatedsl.backend.runtime import aux_values

    return aux_values(model)


def example_inputs(rep: Report, dims: dict[str, int] | None = None, *, seed: int = 0, dtype=None,
                   vocab: int = 2):
    """Random inputs matching a report's input shapes, symbolic sizes set by `dims` (default 2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dims = dims or {}
    out = []
    for name, shape in rep.inputs.items():
        sizes = [d if isinstance(d, int) else _eval_sym(d, dims) for d in shape]
        kind = rep.input_dtypes[name]
        if kind == "float":
            out.append(torch.randn(sizes, generator=gen, dtype=dtype or torch.get_default_dtype()))
        elif kind == "int":
            out.append(torch.randint(0, vocab, sizes, generator=gen))
        else:
            out.append(torch.rand(sizes, generator=gen) > 0.5)
    return tuple(out)


def _eval_sym(text: str, dims: dict[str, int]) -> int:
    value = 1
    for factor in text.split("*"):
        value *= int(factor) if factor.isdigit() else dims.get(factor, 2)
    return value


__all__ = ["Report", "GateInfo", "Target", "SizeError", "check", "compile", "analyse", "example_inputs", "aux_outputs"]
