"""Kernel selection: every fused op has several implementations, each declaring where it applies; a cost rule picks one.

An implementation (a `Kernel`) names the function that runs it by import path, so that
`gatedsl check` and the compiler's passes read this table without importing torch or
triton. Where a kernel applies depends on the call (device, dtype, whether gradients
flow, sizes): the compiler reports the choice for a declared target (`--explain`, the
report's `kernels`), and `dispatch` makes the same choice again for the tensors of each
call, caching it per call signature, so a module moved to a GPU or run under `no_grad`
gets the kernel that fits. With `policy("measure")` the applicable kernels are timed on
the first call of each signature and the fastest is kept in a JSON cache on disk.

Under torch.compile every fused op runs its plain-PyTorch kernel, which inductor can see
through and fuse itself.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class Context:
    """Where one call of a fused op runs. `sizes` are the op's named sizes (None where not known at compile time)."""

    device: str  # "cpu", "cuda", ... (torch.device.type)
    dtype: str  # "float32", "float64", "float16", "bfloat16"
    training: bool  # gradients flow through the op
    sizes: tuple[tuple[str, int | None], ...] = ()

    def size(self, name: str) -> int | None:
        return dict(self.sizes).get(name)

    def with_size(self, name: str, value: int) -> "Context":
        """This context with size `name` set to `value` (one token's call: the time size set to 1)."""
        return Context(self.device, self.dtype, self.training,
                       tuple((n, value if n == name else v) for n, v in self.sizes))


@dataclass(frozen=True)
class Kernel:
    """One implementation of fused op `op`."""

    op: str
    name: str  # "triton", "torch", "reference", ...: unique per op
    fn: str  # "package.module:function", called as fn(config, *tensors)
    applies: Callable[[Context], str | None]  # None where it applies, else why not (shown by --explain)
    cost: Callable[[Context], float]  # relative cost estimate: the cheapest applicable kernel wins
    why: str = ""  # what the cost rule rests on, shown by --explain
    plain: bool = False  # the plain-PyTorch kernel: applies everywhere, used under torch.compile


class Candidate(BaseModel):
    kernel: str
    applies: bool
    why: str  # why it does not apply, or its cost and what that rests on


class Choice(BaseModel):
    """The kernel chosen for one fused op in one context, and every candidate considered."""

    node: str  # the op's name in the graph, e.g. NoisyTopKMoE.y
    op: str
    kernel: str
    reason: str
    target: dict[str, Any]  # the context it was chosen for: device, dtype, training, sizes
    candidates: list[Candidate]
    # For an op along a sequence (FusedOp.time): the choice for a call of one token (T = 1), as a decoder makes it
    decoding: Choice | None = None


@dataclass(frozen=True)
class FusedOp:
    """A fused IR op that runs through `dispatch`: how to read its named sizes and a key for its static config."""

    name: str
    # (config, the shapes of its tensor inputs, None for a size not known at compile time) -> named sizes
    sizes: Callable[[Any, list[tuple[int | None, ...]]], tuple[tuple[str, int | None], ...]]
    key: Callable[[Any], str] = repr  # the same for configs that run the same way: caches choices and timings
    time: str | None = None  # the named size counting the steps of an op along a sequence (a decoder's calls have 1)


FUSED_OPS: dict[str, FusedOp] = {}
KERNELS: dict[str, list[Kernel]] = {}


def register_op(fused: FusedOp) -> FusedOp:
    if fused.name in FUSED_OPS:
        raise ValueError(f"fused op {fused.name} is registered twice")
    FUSED_OPS[fused.name] = fused
    return fused


def fused_ops() -> dict[str, FusedOp]:
    _load_catalog()
    return FUSED_OPS


def register(kernel: Kernel) -> Kernel:
    existing = KERNELS.setdefault(kernel.op, [])
    if any(k.name == kernel.name for k in existing):
        raise ValueError(f"kernel {kernel.op}/{kernel.name} is registered twice")
    existing.append(kernel)
    return kernel


def kernels_for(op: str) -> list[Kernel]:
    _load_catalog()
    if op not in KERNELS:
        raise KeyError(f"no kernels registered for fused op {op!r}")
    return KERNELS[op]


def plain_kernel(op: str) -> Kernel:
    return next(k for k in kernels_for(op) if k.plain)


def one_step_only(ctx: Context, time: str = "T") -> str | None:
    """`Kernel.applies` of a kernel that runs one step of an op along a sequence: a decoder's call for one token."""
    steps = ctx.size(time)
    if steps is None:
        return f"one step only ({time} = 1): {time} is not known at compile time (a call of one token takes it)"
    return None if steps == 1 else f"one step only ({time} = 1), this call has {time} = {steps}"


def _load_catalog() -> None:
    import gatedsl.kernels.catalog  # noqa: F401  (registers every kernel on import)


def choose(op: str, ctx: Context, node: str = "", measured: dict[str, float] | None = None) -> Choice:
    """The kernel for `op` in `ctx`: the fastest measured one where `measured` has times, else the cheapest by cost."""
    candidates: list[Candidate] = []
    usable: list[tuple[float, Kernel]] = []
    for k in kernels_for(op):
        blocked = k.applies(ctx)
        if blocked is not None:
            candidates.append(Candidate(kernel=k.name, applies=False, why=blocked))
            continue
        if measured and k.name in measured:
            score, why = measured[k.name], f"measured {measured[k.name] * 1e3:.3f} ms"
        else:
            score = k.cost(ctx)
            why = f"cost {score:.3g}" + (f" ({k.why})" if k.why else "")
        candidates.append(Candidate(kernel=k.name, applies=True, why=why))
        usable.append((score, k))
    if not usable:  # the plain kernel applies everywhere; a catalog where it does not is a bug
        raise AssertionError(f"no kernel for {op} applies in {ctx}")
    best_score, best = min(usable, key=lambda item: item[0])
    if len(usable) == 1:
        reason = "the only kernel that applies here"
    else:
        runner_up = min((s for s, k in usable if k is not best), default=best_score)
        basis = "measured" if measured and best.name in measured else "by the cost rule"
        reason = f"fastest {basis} ({best_score:.3g} vs {runner_up:.3g})"
    target = {"device": ctx.device, "dtype": ctx.dtype, "training": ctx.training, "sizes": dict(ctx.sizes)}
    return Choice(node=node, op=op, kernel=best.name, reason=reason, target=target, candidates=candidates)


# ------------------------------------------------------------------ run time
_POLICY = {"mode": "cost"}  # "cost" or "measure"
_CHOSEN: dict[tuple, Callable] = {}  # (op, config key, context) -> the loaded kernel function
_BY_SIGNATURE: dict[tuple, Callable] = {}  # (op, config key, grad mode, each argument's shape/dtype/device/grad) -> the same
_MAX_SIGNATURES = 4096
_LOADED: dict[str, Callable] = {}
_PLAIN: dict[str, Callable] = {}  # op -> its plain kernel, loaded before torch.compile traces (it cannot trace imports)


def policy(mode: str) -> None:
    """How `dispatch` chooses: "cost" (the rule, the default) or "measure" (time each applicable kernel once, cached on disk)."""
    if mode not in ("cost", "measure"):
        raise ValueError(f"kernel policy must be 'cost' or 'measure', got {mode!r}")
    _POLICY["mode"] = mode
    _CHOSEN.clear()
    _BY_SIGNATURE.clear()


def prepare(op: str) -> None:
    """Load `op`'s plain kernel now (the backend calls this as it emits the op), so tracing never imports."""
    if op not in _PLAIN:
        _PLAIN[op] = load(plain_kernel(op))


def load(kernel: Kernel) -> Callable:
    fn = _LOADED.get(kernel.fn)
    if fn is None:
        module, _, name = kernel.fn.partition(":")
        fn = _LOADED[kernel.fn] = getattr(importlib.import_module(module), name)
    return fn


_DTYPES = {"torch.float32": "float32", "torch.float64": "float64", "torch.float16": "float16",
           "torch.bfloat16": "bfloat16"}


def runtime_context(tensors, sizes: tuple[tuple[str, int | None], ...]) -> Context:
    import torch

    first = next(t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())
    training = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    return Context(first.device.type, _DTYPES.get(str(first.dtype), str(first.dtype)), training, sizes)


def dispatch(op: str, config: Any, config_key: str, *tensors):
    """Run fused op `op` on `tensors` with the kernel chosen for this call's context (cached per signature).

    The backend emits one call of this per fused op, `config` being the op's IR attributes and
    `config_key` FusedOp.key of them (computed once, at emission)."""
    import torch

    if torch.compiler.is_compiling():
        return _PLAIN[op](config, *tensors)
    # A fused op in a scan body dispatches once per step, so the common case must cost about a
    # microsecond: the call's raw signature (what the context is derived from) finds the kernel
    # directly; only a new signature builds the context and asks the cost rule.
    tensor = torch.Tensor
    signature = (op, config_key, torch.is_grad_enabled(),
                 *[(t.shape, t.dtype, t.device, t.requires_grad) if isinstance(t, tensor) else type(t)
                   for t in tensors])
    fn = _BY_SIGNATURE.get(signature)
    if fn is None:
        shapes = [tuple(t.shape) if isinstance(t, tensor) else () for t in tensors]
        ctx = runtime_context(tensors, FUSED_OPS[op].sizes(config, shapes))
        key = (op, config_key, ctx)
        fn = _CHOSEN.get(key)
        if fn is None:
            measured = _measure(op, config, config_key, ctx, tensors) if _POLICY["mode"] == "measure" else None
            choice = choose(op, ctx, measured=measured)
            fn = _CHOSEN[key] = load(next(k for k in kernels_for(op) if k.name == choice.kernel))
        if len(_BY_SIGNATURE) >= _MAX_SIGNATURES:  # shapes that never repeat (a growing sequence) must not grow it forever
            _BY_SIGNATURE.clear()
        _BY_SIGNATURE[signature] = fn
    return fn(config, *tensors)


# --------------------------------------------------------------- measurement
def cache_path() -> Path:
    root = os.environ.get("GATEDSL_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                               os.path.expanduser("~/.cache"), "gatedsl")
    return Path(root) / "kernel_times.json"


def _device_name(ctx: Context) -> str:
    import torch

    if ctx.device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"{ctx.device}:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


@dataclass
class _Cache:
    path: Path
    entries: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "_Cache":
        try:
            entries = json.loads(path.read_text())
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError):
            entries = {}  # a missing or damaged cache is re-measured, never an error
        return cls(path, entries)

    def write(self) -> None:
        from gatedsl.fileio import atomic_write

        text = json.dumps(self.entries, indent=1, sort_keys=True).encode()
        atomic_write(self.path, lambda f: f.write(text))


def _measure(op: str, config: Any, config_key: str, ctx: Context, tensors) -> dict[str, float]:
    """Median seconds of each applicable kernel on these tensors (forward, plus backward where training), cached."""
    import torch

    cache = _Cache.read(cache_path())
    key = json.dumps([op, config_key, _device_name(ctx), ctx.dtype, ctx.training, list(ctx.sizes)])
    if key in cache.entries:
        return cache.entries[key]
    times: dict[str, float] = {}
    for k in kernels_for(op):
        if k.applies(ctx) is not None:
            continue
        fn = load(k)
        args = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in tensors]

        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

        def run() -> None:
            out = fn(config, *args)
            if ctx.training and wrt:
                outs = out if isinstance(out, (tuple, list)) else (out,)
                total = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
                if isinstance(total, torch.Tensor):
                    # Gradients of the op's own inputs only: .backward() would also accumulate into the
                    # model's learned tensors that a kernel reads (an expert's weights), changing training.
                    torch.autograd.grad(total, wrt, allow_unused=True)

        samples = []
        for _ in range(4):  # the first call warms up (Triton compiles, caches fill)
            if ctx.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if ctx.device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        times[k.name] = sorted(samples[1:])[1]
    cache.entries[key] = times
    cache.write()
    return times
