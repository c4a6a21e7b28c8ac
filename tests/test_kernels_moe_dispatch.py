"""moe_dispatch's kernels (gatedsl/kernels/moe_dispatch/) against a plain formulation written here: token by token,
y[n] = base[n] + Σ_i g[n, i] · E_i(x[n]); the routed kernel against the dense one, outputs and every gradient in
float64; the gate's gradient exactly as stated; the routing order; the cost rule's choices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gatedsl.api import analyse
from gatedsl.kernels import registry
from gatedsl.kernels.moe_dispatch import reference, routed
from gatedsl.kernels.registry import Context

# Dense and routed compute the same products; only the order of the float additions differs (a token's
# terms onto the base at once instead of one running sum): ~1e-16 relative per addition, so 1e-12
# leaves a wide margin, while a wrong token, expert or gate shows at 1e-2 or more.
TOL = {"rtol": 1e-12, "atol": 1e-12}
D, H, D_OUT = 5, 7, 4


class FFN(nn.Module):
    """E(x) = W₂ relu(W₁ x + b₁) + b₂, returning a 1-tuple as the compiled experts do."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.inner = nn.Linear(D, H).double()
        self.outer = nn.Linear(H, D_OUT).double()

    def forward(self, x):
        return (self.outer(torch.relu(self.inner(x))),)


def per_token(g, x, base, experts, columns):
    """The mixture one token at a time, every expert written out: an independent formulation."""
    flat_x, flat_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    rows = []
    for n in range(flat_x.shape[0]):
        row = base.reshape(-1, D_OUT)[n] if base is not None else torch.zeros(D_OUT, dtype=x.dtype)
        for column, expert in zip(columns, experts):
            row = row + flat_g[n, column] * expert(flat_x[n:n + 1])[0][0]
        rows.append(row)
    return torch.stack(rows).reshape(*x.shape[:-1], D_OUT)


def top_k_gate(logits, k):
    values, index = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(values, -1))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_gate(kind: str, lead: tuple[int, ...], experts: int, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(*lead, experts, generator=gen(seed), dtype=torch.float64)
    if kind == "top1":
        return top_k_gate(logits, 1)
    if kind == "top2":
        return top_k_gate(logits, 2)
    if kind == "all":  # k = E: every expert on every token
        return torch.softmax(logits, -1)
    if kind == "one expert":  # every token to expert 1, the others get nothing
        return torch.zeros_like(logits).index_fill(-1, torch.tensor([1]), 0.7)
    if kind == "idle experts":  # experts 0 and 3 receive no token; some tokens none at all (dropped)
        g = top_k_gate(logits[..., 1:3], 1)
        g = torch.cat([torch.zeros_like(g[..., :1]), g, torch.zeros_like(g[..., :1])], -1)
        return g * (torch.rand(*lead, 1, generator=gen(seed + 1), dtype=torch.float64) < 0.7)
    if kind == "no token":
        return torch.zeros_like(logits)
    raise AssertionError(kind)


GATES = ["top1", "top2", "all", "one expert", "idle experts", "no token"]
KERNELS = {"dense": reference.dense, "sorted": routed.sorted_experts}


def run(kernel, g, x, base, experts, columns):
    config = SimpleNamespace(columns=columns)
    return KERNELS[kernel](config, x, g, base, *experts)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("kind", GATES)
def test_routed_equals_dense_and_the_token_by_token_sum(kind, with_base):
    lead, experts = (3, 5), 4
    g = make_gate(kind, lead, experts)
    x = torch.randn(*lead, D, generator=gen(1), dtype=torch.float64)
    base = torch.randn(*lead, D_OUT, generator=gen(2), dtype=torch.float64) if with_base else None
    modules = [FFN(seed) for seed in range(experts)]
    columns = (2, 0, 3, 1)  # the spec may add the experts in any order
    modules = [modules[c] for c in columns]
    want = per_token(g, x, base, modules, columns)
    for kernel in KERNELS:
        got = run(kernel, g, x, base, modules, columns)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL)


def _grads(kernel, g, x, base, modules, columns, upstream):
    g, x = g.clone().requires_grad_(), x.clone().requires_grad_()
    base = base.clone().requires_grad_() if base is not None else None
    out = run(kernel, g, x, base, modules, columns)
    weights = [p for m in modules for p in m.parameters()]
    inputs = [g, x] + ([base] if base is not None else []) + weights
    return torch.autograd.grad((out * upstream).sum(), inputs)


@pytest.mark.parametrize("kind", GATES)
def test_routed_gradients_equal_dense_except_the_gate_where_it_is_zero(kind):
    """∂L/∂x, ∂L/∂base and every expert weight's gradient are the dense ones (an expert that gets no token gets a
    zero gradient, not none); ∂L/∂g is the dense one where g ≠ 0 and 0 where g = 0, where the dense form has
    ⟨∂L/∂y, E_i(x)⟩."""
    lead, experts = (7,), 4
    g = make_gate(kind, lead, experts, seed=3)
    x = torch.randn(*lead, D, generator=gen(4), dtype=torch.float64)
    base = torch.randn(*lead, D_OUT, generator=gen(5), dtype=torch.float64)
    upstream = torch.randn(*lead, D_OUT, generator=gen(6), dtype=torch.float64)
    modules, columns = [FFN(seed) for seed in range(experts)], (0, 1, 2, 3)
    dense = _grads("dense", g, x, base, modules, columns, upstream)
    routed_ = _grads("sorted", g, x, base, modules, columns, upstream)
    for a, b in zip(dense[1:], routed_[1:]):
        torch.testing.assert_close(b, a, **TOL)
    support = g != 0
    torch.testing.assert_close(routed_[0][support], dense[0][support], **TOL)
    assert torch.all(routed_[0][~support] == 0)
    outputs = torch.stack([m(x)[0] for m in modules], -2)  # [N, E, D_out]
    torch.testing.assert_close(dense[0], (upstream.unsqueeze(-2) * outputs).sum(-1), **TOL)
    if (~support).any():
        assert dense[0][~support].abs().max() > 1e-3  # the dense gradient there is not zero: the two differ


def test_the_gradient_before_a_top_k_gate_is_the_dense_one():
    """Through the router: g = topk_softmax(x W), so the entries routing leaves out have zero derivative, and the
    gradients w.r.t. W and x are the dense form's."""
    experts, lead = 5, (4, 3)
    w = torch.randn(D, experts, generator=gen(7), dtype=torch.float64)
    x = torch.randn(*lead, D, generator=gen(8), dtype=torch.float64)
    upstream = torch.randn(*lead, D_OUT, generator=gen(9), dtype=torch.float64)
    modules, columns = [FFN(seed) for seed in range(experts)], tuple(range(experts))
    results = []
    for kernel in KERNELS:
        wk, xk = w.clone().requires_grad_(), x.clone().requires_grad_()
        out = run(kernel, top_k_gate(xk @ wk, 2), xk, None, modules, columns)
        results.append(torch.autograd.grad((out * upstream).sum(), [wk, xk]))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL)


def test_routing_lists_the_pairs_as_a_stable_sort_by_expert():
    g = make_gate("idle experts", (11,), 4, seed=4) + make_gate("top1", (11,), 4, seed=5)
    route = routed.Routing.of(g)
    tokens, experts = g.nonzero(as_tuple=True)  # token-major
    order = torch.argsort(experts, stable=True)
    assert torch.equal(route.tokens, tokens[order]) and torch.equal(route.experts, experts[order])
    assert route.counts == torch.bincount(experts, minlength=4).tolist()
    order_by_token, offsets = route.by_token()
    for n in range(11):
        pairs = order_by_token[offsets[n]:offsets[n + 1]]
        assert torch.all(route.tokens[pairs] == n)
        assert route.experts[pairs].tolist() == sorted(route.experts[pairs].tolist())
    assert offsets[-1] == len(route.tokens)


# ------------------------------------------------------------ choosing
def _ctx(E=8, N=4096, k=2, F=4 * 256 * 1024, D=256, device="cpu", dtype="float32"):
    return Context(device, dtype, True, (("E", E), ("N", N), ("k", k), ("F", F), ("D", D), ("D_out", D)))


def test_the_cost_rule_routes_many_experts_and_keeps_few_or_tiny_ones_dense():
    assert registry.choose("moe_dispatch", _ctx()).kernel == "sorted"  # top-2 of 8 over 4096 tokens
    assert registry.choose("moe_dispatch", _ctx(N=None)).kernel == "sorted"  # N unknown: priced at 1024
    assert registry.choose("moe_dispatch", _ctx(E=2, k=2)).kernel == "dense"  # every expert active: k = E
    assert registry.choose("moe_dispatch", _ctx(E=4, k=2, N=4)).kernel == "dense"  # a tiny batch
    assert registry.choose("moe_dispatch", _ctx(E=2, k=1, F=200, D=8)).kernel == "dense"  # few cheap experts
    assert registry.choose("moe_dispatch", _ctx(E=64, k=1, F=200, D=8)).kernel == "sorted"  # but many of them


def test_an_unknown_number_of_active_experts_is_decided_per_call():
    pick = registry.choose("moe_dispatch", _ctx(k=None))
    assert pick.kernel == "by_density"
    why = {c.kernel: (c.applies, c.why) for c in pick.candidates}
    assert why["sorted"][0] is False and "does not say" in why["sorted"][1]
    known = registry.choose("moe_dispatch", _ctx(k=2))
    assert {c.kernel: c.applies for c in known.candidates}["by_density"] is False


def test_triton_applies_on_cuda_only():
    for device in ("cpu", "cuda"):
        pick = registry.choose("moe_dispatch", _ctx(device=device))
        triton = next(c for c in pick.candidates if c.kernel == "triton")
        if device == "cpu":
            assert not triton.applies and "CUDA" in triton.why
    cuda = registry.choose("moe_dispatch", _ctx(device="cuda"))
    triton_installed = next(c for c in cuda.candidates if c.kernel == "triton").applies
    assert cuda.kernel == ("triton" if triton_installed else "sorted")


RELU_GATE = """
import std.moe
model M(experts: int = 6) {
  input x: [N, 8]
  gate g = relu(linear(x, experts))                 # any number of experts per token: only the call tells
  y = zeros_like(x)
  repeat i in experts as experts {
    y = y + g[..., i:i + 1] * ExpertFFN(x, hidden=16)
  }
  output y
}
"""


def test_by_density_counts_the_gate_then_runs_the_cheaper_kernel(monkeypatch):
    import gatedsl
    from gatedsl.ir.ops import moe_experts

    graph = analyse(RELU_GATE).graph
    (attrs,) = [graph.node(n)["attrs"] for n in graph.order() if graph.node(n)["op"] == "moe_dispatch"]
    assert attrs.active is None
    model = gatedsl.compile(RELU_GATE)
    experts = [model.get_submodule(e.path) for e in moe_experts(attrs)]
    x = torch.randn(4096, 8, generator=gen(10))
    sparse = make_gate("top1", (4096,), 6).float()
    dense = torch.softmax(torch.randn(4096, 6, generator=gen(11)), -1)
    for g, expected in ((sparse, routed.sorted_experts), (dense, reference.dense)):
        monkeypatch.setattr(routed, "_CHOSEN", {})
        with torch.no_grad():
            out = routed.by_density(attrs, x, g, None, *experts)
            want = reference.dense(attrs, x, g, None, *experts)
        assert list(routed._CHOSEN.values()) == [expected]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # float32: the summation order differs
