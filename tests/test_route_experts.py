"""passes/route_experts.py: which mixtures of experts become one moe_dispatch and which stay dense, and that -O2 computes
what -O0 computes, with either kernel, in float64: outputs, aux losses and the gradients of every weight and input.

Each -O0 / -O2 pair shares its weights (random, so the routers do not tie). The dense kernel is the spec's own
sum; the routed one adds each token's terms in another order, and its gradient w.r.t. a gate entry that is
exactly zero is zero instead of ⟨∂L/∂y, E_i(x)⟩, which the gate's own derivative (zero there) cancels before it
reaches anything learned: the gradients compared here are the ones a model trains with.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.api import analyse
from gatedsl.cli.main import main as cli
from gatedsl.ir.ops import moe_experts
from gatedsl.kernels import registry
from gatedsl.kernels.moe_dispatch import routed

ROOT = Path(__file__).resolve().parent.parent
# float64, and the same products either way: what differs is the order of a token's few float additions
# (~1e-16 relative each); 1e-10 is test_optimizer.py's tolerance, while a wrong expert or gate shows at 1e-2.
TOL = {"rtol": 1e-10, "atol": 1e-10}

TEMPLATE = """
import std.moe
import std.mlp
model M() {{
  input x: [B, T, 8]
  {body}
}}
"""
ROUTERS = {  # name -> (model body, the dispatch's expected `active`, experts)
    "noisy": ("output y = NoisyTopKMoE(x, experts=4, k=2, hidden=6, expert={expert})", 2, 4),
    "switch": ("output y = SwitchMoE(flatten(x, 0, 1), experts=4, hidden=6, expert={expert})", 1, 4),
    "shared": ("output y = SharedExpertMoE(x, experts=4, k=2, shared=1, hidden=6, expert={expert})", 2, 4),
    "temperature": ("output y = TemperatureMoE(x, experts=3, tau=0.7, hidden=6, expert={expert})", 3, 3),
    "mmoe, one task": ("ys = MMoE(x, tasks=1, experts=3, hidden=6, expert={expert})\n  output y = ys[0]", 3, 3),
}
EXPERTS = ["ExpertFFN", "SwiGLU"]


def dispatches(spec, opt_level=2):
    graph = analyse(spec, opt_level=opt_level).graph
    return [graph.node(n) for n in graph.order() if graph.node(n)["op"] == "moe_dispatch"]


@pytest.fixture
def kernel(monkeypatch):
    """force(name): every moe_dispatch runs kernel `name` (the cost rule is bypassed where it applies)."""

    def force(name: str) -> None:
        kernels = [dataclasses.replace(k, cost=lambda ctx, mine=k.name == name: 0.0 if mine else 1.0)
                   for k in registry.kernels_for("moe_dispatch")]
        monkeypatch.setitem(registry.KERNELS, "moe_dispatch", kernels)
        monkeypatch.setattr(registry, "_CHOSEN", {})
        monkeypatch.setattr(registry, "_BY_SIGNATURE", {})
        monkeypatch.setattr(routed, "_CHOSEN", {})

    return force


def pair(spec, seed=0):
    """(-O0, -O2) modules in float64 with the same random weights."""
    plain = gatedsl.compile(spec, opt_level=0).double()
    fast = gatedsl.compile(spec, opt_level=2).double()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def run(model, inputs, seed):
    xs = [x.clone().requires_grad_() for x in inputs]
    torch.manual_seed(seed)  # the same noise (NoisyTopKMoE in training) for both
    out = model(*xs)
    outs = (list(out) if isinstance(out, tuple) else [out]) + list(model.aux.values())
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    names = [name for name, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, xs + list(model.parameters()), allow_unused=True, materialize_grads=True)
    return outs, dict(zip([f"input {i}" for i in range(len(xs))] + names, grads))


def assert_same(plain, fast, inputs, seed=3):
    outs0, grads0 = run(plain, inputs, seed)
    outs2, grads2 = run(fast, inputs, seed)
    assert len(outs0) == len(outs2)
    for a, b in zip(outs0, outs2):
        torch.testing.assert_close(b, a, **TOL)
    assert grads0.keys() == grads2.keys()
    for name in grads0:
        torch.testing.assert_close(grads2[name], grads0[name], msg=name, **TOL)


def x_of(shape=(3, 5, 8), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------ recognised
@pytest.mark.parametrize("expert", EXPERTS)
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_std_routers_become_one_dispatch_and_compute_what_o0_does(router, expert, kernel):
    body, active, experts = ROUTERS[router]
    spec = TEMPLATE.format(body=body.format(expert=expert))
    if router == "mmoe, one task" and expert == "SwiGLU":
        # MMoE runs its experts before its gate: one dispatch after the gate would move the experts' SiLU
        # gates past it in the report's list, so the mixture stays dense (a softmax gate skips nothing).
        assert dispatches(spec) == []
        assert_same(*pair(spec), [x_of()])
        return
    (node,) = dispatches(spec)
    a = node["attrs"]
    assert a.active == active and a.columns == tuple(range(experts))
    paths = [e.path for e in moe_experts(a)]
    prefix = {"mmoe, one task": "MMoE.experts", "shared": "SharedExpertMoE.experts"}.get(router)
    assert paths == [f"{prefix or paths[0].split('.')[0] + '.experts'}.{i}.expert" for i in range(experts)]
    # The experts' nodes left the top graph: no linear there reads an expert's weight any more.
    top = analyse(spec).graph
    assert not any(".experts." in getattr(top.node(n)["attrs"], "weight", "") for n in top.order()
                   if top.node(n)["op"] == "linear")
    assert len(node["inputs"]) == 3  # x, g and the sum so far (zeros, or the shared expert's output)
    plain, fast = pair(spec)
    for name in ("dense", "sorted"):
        kernel(name)
        for mode in ("eval", "train"):
            plain.train(mode == "train"), fast.train(mode == "train")
            assert_same(plain, fast, [x_of()])


def test_the_whole_mixture_is_routed_with_the_kernel_the_cost_rule_picks():
    """The benchmark's model, top-2 of 8, at a size where routing pays: -O2 picks `sorted` and equals -O0."""
    spec = ROOT / "benchmarks" / "specs" / "moe.gate"
    params = {"d": 16, "experts": 8, "k": 2, "hidden": 512}
    plain = gatedsl.compile(spec, params, opt_level=0).double()
    fast = gatedsl.compile(spec, params, opt_level=2).double()
    with torch.no_grad():
        plain.get_parameter("NoisyTopKMoE.clean.x_proj.weight").normal_()
    fast.load_state_dict(plain.state_dict())
    registry._CHOSEN.clear()
    registry._BY_SIGNATURE.clear()
    assert_same(plain.eval(), fast.eval(), [x_of((256, 16))])
    chosen = [fn.__name__ for (op, _, _), fn in registry._CHOSEN.items() if op == "moe_dispatch"]
    assert chosen == ["sorted_experts"]


RELU_GATE = TEMPLATE.format(body="""gate g = relu(linear(x, 5))
  y = zeros_like(x)
  repeat i in 5 as experts {
    y = y + g[..., i:i + 1] * ExpertFFN(x, hidden=512)
  }
  output y""")


def test_a_gate_of_unknown_density_is_decided_per_call(kernel):
    (node,) = dispatches(RELU_GATE)
    assert node["attrs"].active is None
    (choice,) = [k for k in gatedsl.check(RELU_GATE).kernels if k["op"] == "moe_dispatch"]
    assert choice["kernel"] == "by_density"
    plain, fast = pair(RELU_GATE)
    kernel("by_density")
    assert_same(plain, fast, [x_of()])


MIXTURES = {  # spec body -> the dispatch's columns, and whether it adds onto a sum so far
    "reversed order": ("""gate g = topk_softmax(linear(x, 4), 2)
  y = zeros_like(x)
  repeat i in 4 as experts {
    y = y + ExpertFFN(x, hidden=6) * g[..., 3 - i:4 - i]
  }
  output y""", (3, 2, 1, 0), True),
    "no zeros to start from": ("""gate g = topk_softmax(linear(x, 2), 1)
  output y = g[..., 0:1] * ExpertFFN(x, hidden=6) + g[..., 1:2] * SwiGLU(x, hidden=6)""", (0, 1), False),
    "row-wise ops of every kind": ("""gate topk g = softmax(linear(x, 3)) * topk_mask(linear(x, 3), 2)
  y = zeros_like(x)
  repeat i in 3 as experts {
    h = layer_norm(x) * learned([8], init=ones) + 0.5
    a, b = chunk(linear(h, 12), 2)
    s = softmax(a) * sigmoid(b) - mean(b, -1, keepdim=true)
    u = concat([s[..., :2], rms_norm(s[..., 2:])]) @ learned([6, 8], init=normal(0.3))
    y = y + g[..., i:i + 1] * where(u > 0, u, clamp(u, min=-1.0))
  }
  output y""", (0, 1, 2), True),
}


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_other_mixtures_are_recognised_structurally(name, kernel):
    body, columns, with_base = MIXTURES[name]
    spec = TEMPLATE.format(body=body)
    (node,) = dispatches(spec)
    assert node["attrs"].columns == columns and (len(node["inputs"]) == 3) == with_base
    plain, fast = pair(spec)
    for which in ("dense", "sorted"):
        kernel(which)
        assert_same(plain, fast, [x_of()])


# -------------------------------------------------------------- not routed
NEGATIVE = {
    "an expert that sums over the tokens": "y = y + g[..., i:i + 1] * linear(cumsum(x, 1), 8)",
    "an expert that attends over the tokens": "y = y + g[..., i:i + 1] * attention(linear(x, 8), linear(x, 8), x)",
    "an expert that averages the tokens": "y = y + g[..., i:i + 1] * (x - mean(x, 1, keepdim=true))",
    "an expert with dropout": "y = y + g[..., i:i + 1] * dropout(ExpertFFN(x, hidden=6), 0.3)",
    "an expert reading another input": "y = y + g[..., i:i + 1] * ExpertFFN(x + c, hidden=6)",
    "an expert without weights": "y = y + g[..., i:i + 1] * tanh(x)",
    "an expert whose output is also used elsewhere": "e = ExpertFFN(x, hidden=6)\n    es = es + [e]\n"
                                                     "    y = y + g[..., i:i + 1] * e",
    "a gate that is not flat at zero": "y = y + f[..., i:i + 1] * ExpertFFN(x, hidden=6)",
    "a straight-through gate": "y = y + b[..., i:i + 1] * ExpertFFN(x, hidden=6)",
    "two columns for one expert": "y = y + g[..., 0:1] * ExpertFFN(x, hidden=6)",
}
NEGATIVE_SPEC = """
import std.moe
model M() {{
  input x: [B, T, 8]
  input c: [B, T, 8]
  gate g = topk_softmax(linear(x, 3), 2)
  gate softmax f = topk_softmax(linear(x, 3), 2) + 0.25 * tanh(linear(x, 3))
  gate b = binary(linear(x, 3))
  y = zeros_like(x)
  es = []
  repeat i in 3 as experts {{
    {term}
  }}
  output y = y + 0.0 * c
  {extra}
}}
"""


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_mixtures_that_cannot_be_routed_keep_the_dense_spec(case):
    extra = "output e0 = es[0]" if "elsewhere" in case else ""
    spec = NEGATIVE_SPEC.format(term=NEGATIVE[case], extra=extra)
    assert dispatches(spec) == []
    plain, fast = pair(spec)
    plain.eval(), fast.eval()  # dropout off: -O0 and -O2 then compute the same
    assert_same(plain, fast, [x_of(), x_of(seed=2)])


def test_mmoe_with_several_tasks_shares_its_experts_and_stays_dense():
    spec = TEMPLATE.format(body="a, b = MMoE(x, tasks=2, experts=3, hidden=6)\n  output a\n  output b")
    assert dispatches(spec) == []
    plain, fast = pair(spec)
    assert_same(plain, fast, [x_of()])


# -------------------------------------------- the rest of the compiler sees
def test_checkpoints_reports_and_gates_are_the_same_at_every_level():
    spec = TEMPLATE.format(body=ROUTERS["shared"][0].format(expert="SwiGLU"))
    plain, fast = pair(spec)
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == \
           [(k, v.shape) for k, v in fast.state_dict().items()]
    again = gatedsl.compile(spec, opt_level=0).double()
    again.load_state_dict(fast.state_dict())
    x = x_of()
    torch.testing.assert_close(again(x), plain(x), rtol=0, atol=0)
    reports = [gatedsl.check(spec, opt_level=level).model_dump() for level in (0, 2)]
    for r in reports:
        r.pop("kernels")
    assert reports[0] == reports[1]  # gates (the experts' SiLU gates included, in order), shapes, counts
    # The experts' sub-modules sit at the experts' own paths.
    assert isinstance(fast.get_submodule("SharedExpertMoE.experts.2.expert"), torch.fx.GraphModule)


def test_the_routed_module_copies_pickles_and_compiles():
    spec = TEMPLATE.format(body=ROUTERS["noisy"][0].format(expert="ExpertFFN"))
    _, fast = pair(spec)
    fast.eval()
    x = x_of()
    want = fast(x)
    torch.testing.assert_close(copy.deepcopy(fast)(x), want, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), want, rtol=0, atol=0)
    compiled = torch.compile(fast, backend="eager")  # traces the plain (dense) kernel
    torch.testing.assert_close(compiled(x), want, **TOL)


def test_explain_shows_the_choice(capsys):
    spec = str(ROOT / "benchmarks" / "specs" / "moe.gate")
    assert cli(["compile", spec, "--explain"]) == 0
    out = capsys.readouterr().out
    assert "NoisyTopKMoE.experts" in out and "moe_dispatch" in out and "sorted" in out and "dense" in out
    assert cli(["compile", spec, "--json", "-p", "experts=2", "-p", "k=1", "-p", "d=8", "-p", "hidden=8"]) == 0
    (choice,) = [k for k in json.loads(capsys.readouterr().out)["kernels"] if k["op"] == "moe_dispatch"]
    assert choice["op"] == "moe_dispatch" and choice["kernel"] == "dense"  # two tiny experts: dense
    assert {c["kernel"] for c in choice["candidates"]} == {"dense", "sorted", "by_density", "triton"}
    assert cli(["compile", spec, "--json", "-O0"]) == 0
    assert [k for k in json.loads(capsys.readouterr().out)["kernels"] if k["op"] == "moe_dispatch"] == []


def test_the_graph_draws_the_experts_as_clusters():
    from gatedsl.cli.draw import to_dot

    dot = to_dot(analyse(TEMPLATE.format(body=ROUTERS["noisy"][0].format(expert="SwiGLU")))).to_string()
    assert "moe_dispatch (NoisyTopKMoE.experts)" in dot and "moe_expert (NoisyTopKMoE.experts.3.expert)" in dot
