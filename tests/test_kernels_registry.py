"""Kernel selection: the cost rule, where-it-applies rules, per-call dispatch, measurement with its disk cache, --explain."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

import gatedsl
from gatedsl.cli.main import main as cli
from gatedsl.ir.model import Target
from gatedsl.kernels import registry
from gatedsl.kernels.registry import Context, FusedOp, Kernel

OP = "test_scale"  # a fused op that exists only in these tests: y = 2 x, three ways


@pytest.fixture
def scale_op(monkeypatch):
    calls: list[str] = []
    module = types.ModuleType("gatedsl_test_scale_kernels")

    def make(name):
        def run(config, x):
            calls.append(name)
            return x * config

        return run

    for name in ("plain", "fast64", "inference_only"):
        setattr(module, name, make(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry.FUSED_OPS, OP, FusedOp(OP, sizes=lambda c, shapes: (("n", shapes[0][0]),)))
    kernels = [
        Kernel(OP, "plain", f"{module.__name__}:plain", applies=lambda ctx: None, cost=lambda ctx: 10.0, plain=True),
        Kernel(OP, "fast64", f"{module.__name__}:fast64",
               applies=lambda ctx: None if ctx.dtype == "float64" else "float64 only", cost=lambda ctx: 1.0),
        Kernel(OP, "inference_only", f"{module.__name__}:inference_only",
               applies=lambda ctx: None if not ctx.training else "no backward",
               cost=lambda ctx: 5.0 if (ctx.size("n") or 0) > 3 else 20.0),
    ]
    monkeypatch.setitem(registry.KERNELS, OP, kernels)
    monkeypatch.setattr(registry, "_CHOSEN", {})
    monkeypatch.setattr(registry, "_BY_SIGNATURE", {})
    monkeypatch.setattr(registry, "_LOADED", {})  # each test's kernels record into its own `calls`
    monkeypatch.setattr(registry, "_PLAIN", {})
    yield calls
    registry.policy("cost")


def test_choose_takes_the_cheapest_kernel_that_applies(scale_op):
    pick = registry.choose(OP, Context("cpu", "float64", True, (("n", 8),)))
    assert pick.kernel == "fast64"
    assert {c.kernel: c.applies for c in pick.candidates} == {"plain": True, "fast64": True, "inference_only": False}
    assert "no backward" in next(c.why for c in pick.candidates if c.kernel == "inference_only")
    assert registry.choose(OP, Context("cpu", "float32", True, (("n", 8),))).kernel == "plain"
    assert registry.choose(OP, Context("cpu", "float32", False, (("n", 8),))).kernel == "inference_only"
    # The sizes enter the cost: for n <= 3 the inference kernel costs more than the plain one.
    assert registry.choose(OP, Context("cpu", "float32", False, (("n", 2),))).kernel == "plain"


def test_dispatch_chooses_again_for_each_call_context(scale_op):
    x32 = torch.randn(8, requires_grad=True)
    out = registry.dispatch(OP, 2.0, "k", x32)
    assert scale_op[-1] == "plain" and torch.equal(out, x32 * 2)
    out.sum().backward()
    assert torch.equal(x32.grad, torch.full((8,), 2.0))
    with torch.no_grad():
        registry.dispatch(OP, 2.0, "k", x32)
    assert scale_op[-1] == "inference_only"
    registry.dispatch(OP, 2.0, "k", x32.detach().double())
    assert scale_op[-1] == "fast64"
    registry.dispatch(OP, 2.0, "k", torch.randn(2))  # small and not needing grad: the cost rule prefers plain
    assert scale_op[-1] == "plain"


def test_a_repeated_call_signature_skips_the_cost_rule_and_a_new_one_asks_it(scale_op, monkeypatch):
    asked = []
    choose = registry.choose
    monkeypatch.setattr(registry, "choose", lambda *a, **kw: asked.append(a[1]) or choose(*a, **kw))
    with torch.no_grad():
        for _ in range(5):  # a scan's steps: new tensors, the same shapes, dtype, device and grad mode
            registry.dispatch(OP, 2.0, "k", torch.randn(8))
        assert len(asked) == 1 and scale_op[-5:] == ["inference_only"] * 5
        registry.dispatch(OP, 2.0, "k", torch.randn(2))  # a new shape: its own choice (plain, for n <= 3)
        assert len(asked) == 2 and scale_op[-1] == "plain"
        registry.dispatch(OP, 2.0, "other config", torch.randn(8))  # another call site's config
        assert len(asked) == 3
    registry.dispatch(OP, 2.0, "k", torch.randn(8, requires_grad=True))  # gradients flow now
    assert len(asked) == 4 and scale_op[-1] == "plain"
    registry.policy("cost")  # a policy change forgets every choice
    with torch.no_grad():
        registry.dispatch(OP, 2.0, "k", torch.randn(8))
    assert len(asked) == 5


def test_measure_policy_times_each_kernel_once_and_caches_on_disk(scale_op, tmp_path, monkeypatch):
    monkeypatch.setenv("GATEDSL_CACHE_DIR", str(tmp_path))
    registry.policy("measure")
    x = torch.randn(16)
    with torch.no_grad():
        out = registry.dispatch(OP, 3.0, "k", x)
    assert torch.equal(out, x * 3)
    cache = json.loads((tmp_path / "kernel_times.json").read_text())
    (entry,) = cache.values()
    assert set(entry) == {"plain", "inference_only"}  # fast64 does not apply to float32
    timed = len(scale_op)
    registry.policy("measure")  # forgets the in-memory choices: the disk cache answers, nothing is re-timed
    with torch.no_grad():
        registry.dispatch(OP, 3.0, "k", x)
    assert len(scale_op) == timed + 1
    fastest = min(entry, key=entry.get)
    assert scale_op[-1] == fastest


def test_a_damaged_cache_is_measured_again_not_an_error(scale_op, tmp_path, monkeypatch):
    monkeypatch.setenv("GATEDSL_CACHE_DIR", str(tmp_path))
    (tmp_path / "kernel_times.json").write_text("{not json")
    registry.policy("measure")
    with torch.no_grad():
        registry.dispatch(OP, 1.0, "k", torch.randn(4))
    assert json.loads((tmp_path / "kernel_times.json").read_text())


def test_policy_rejects_unknown_modes():
    with pytest.raises(ValueError, match="cost' or 'measure"):
        registry.policy("fastest")


def test_cpu_never_picks_a_triton_kernel():
    ops = registry.fused_ops()
    for op in ops:
        for dtype in ("float32", "float64", "float16", "bfloat16"):
            for training in (True, False):
                for n in (None, 1, 64, 4096):
                    sizes = tuple((name, n) for name in ("T", "N", "tokens", "numel", "B", "E", "K", "V", "H"))
                    pick = registry.choose(op, Context("cpu", dtype, training, sizes))
                    assert "triton" not in pick.kernel.lower(), (op, dtype, training, n)
    for op in ops:  # every fused op has a plain-PyTorch kernel, which applies everywhere
        plain = registry.plain_kernel(op)
        assert plain.applies(Context("cuda", "float16", True, ())) is None


def test_the_report_lists_scans_with_their_kernel_and_reason():
    gru = gatedsl.check("specs/gru.gate")
    assert [k["kernel"] for k in gru.kernels] == ["torch.GRU"]
    assert "exactly torch's GRU" in gru.kernels[0]["reason"]
    loop = gatedsl.check("specs/gru.gate", opt_level=0)
    assert [k["kernel"] for k in loop.kernels] == ["loop"]
    assert "-O2" in loop.kernels[0]["reason"]
    cuda = gatedsl.check("specs/gru.gate", target=Target(device="cuda", dtype="float16", training=False))
    assert cuda.kernels[0]["target"] == {"device": "cuda", "dtype": "float16", "training": False, "sizes": {}}


def test_the_report_is_the_same_at_every_level_but_for_its_kernels():
    for spec in ("specs/forecaster.gate", "specs/lstm.gate", "specs/swiglu.gate"):
        fast, plain = gatedsl.check(spec).model_dump(), gatedsl.check(spec, opt_level=0).model_dump()
        fast.pop("kernels"), plain.pop("kernels")
        assert fast == plain


def test_a_bad_target_is_refused():
    with pytest.raises(ValueError, match="target device"):
        gatedsl.check("specs/gru.gate", target=Target(device="tpu"))


def test_cli_explain_and_json_kernels(capsys):
    assert cli(["compile", "specs/forecaster.gate", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "kernels (for cpu, float32, training" in out and "torch.GRU" in out and "layers.1.cell" in out
    assert cli(["compile", "specs/gru.gate", "--json", "--device", "cuda", "--inference", "-O0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (choice,) = summary["kernels"]
    assert choice["kernel"] == "loop" and choice["target"]["device"] == "cuda" and not choice["target"]["training"]
    assert cli(["compile", "specs/gru.gate", "--device", "tpu"]) == 2


def test_under_torch_compile_the_plain_kernel_runs(scale_op):
    @torch.compile(backend="eager", fullgraph=True)  # dynamo traces dispatch; eager runs what it captured
    def run(x):
        return registry.dispatch(OP, 2.0, "k", x)

    registry.prepare(OP)  # as the backend does when it emits a fused op
    x = torch.randn(8, dtype=torch.float64)
    with torch.no_grad():
        out = run(x)
    assert torch.equal(out, x * 2)
    assert scale_op and set(scale_op) == {"plain"}  # not fast64, which the cost rule would pick for float64


def test_measuring_in_training_leaves_the_models_gradients_alone(scale_op, tmp_path, monkeypatch):
    monkeypatch.setenv("GATEDSL_CACHE_DIR", str(tmp_path))
    registry.policy("measure")
    weight = torch.nn.Parameter(torch.tensor(2.0))  # a learned tensor the kernel reads, as an expert's weights are
    x = torch.randn(16, requires_grad=True)
    out = registry.dispatch(OP, weight, "w", x)
    assert weight.grad is None and x.grad is None  # the timing runs took gradients of their own copies only
    out.sum().backward()
    assert torch.equal(weight.grad, x.detach().sum()) and torch.equal(x.grad, torch.full((16,), 2.0))
