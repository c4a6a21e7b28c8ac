"""specs/std/moe.gate against plain-PyTorch references written from the equations (GATES.md §6).

Each reference loops over experts (and, for Switch routing, over tokens in order), picks the
top k explicitly (by counting larger entries), and reads the compiled module's own weights
by name. Outputs, aux losses and the gradients of a loss built from both (w.r.t. the input
and every parameter) are compared in float64. The noisy gate is compared exactly in eval
mode (noise off) and, in training mode, against the reference fed the same noise (same seed);
a probe expert exposes the gates themselves to check their structure.
"""

from __future__ import annotations

import math

import pytest
import torch

import gatedsl

TOL = dict(rtol=1e-10, atol=1e-10)
SHAPES = [(2, 3), (1, 5), (3, 1)]  # (B, T)
D = 6


def compile64(spec: str, seed: int = 0, scale: float = 0.5):
    """Compile in float64 and give every parameter random values (the routers start at zero, which ties)."""
    torch.manual_seed(seed)
    gm = gatedsl.compile(spec).double()
    with torch.no_grad():
        for p in gm.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return gm


def P(gm, name: str) -> torch.Tensor:
    return gm.get_parameter(name)


def ffn(gm, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """E(x) = W₂ ReLU(W₁ x + b₁) + b₂."""
    h = x @ P(gm, prefix + ".h.x_proj.weight").T + P(gm, prefix + ".h.x_proj.bias")
    h = torch.where(h > 0, h, torch.zeros_like(h))
    return h @ P(gm, prefix + ".y.h_proj.weight").T + P(gm, prefix + ".y.h_proj.bias")


def ffn_params(d: int, hidden: int) -> int:
    return d * hidden + hidden + hidden * d + d


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def top_k_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """True for the k largest entries of the last dim: fewer than k entries are larger."""
    larger = (z.unsqueeze(-2) > z.unsqueeze(-1)).sum(-1)
    return larger < k


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    m = v.sum() / v.numel()
    return ((v - m) ** 2).sum() / v.numel() / m**2


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def compare(gm, reference, inputs, seed=2):
    """Outputs, aux values and gradients of sum(y ⊙ r) + Σ c_j aux_j, compiled vs reference."""
    xs = [x.clone().requires_grad_() for x in inputs]
    out = gm(*xs)
    outs = list(out) if isinstance(out, tuple) else [out]
    aux = gm.aux
    xr = [x.clone().requires_grad_() for x in inputs]
    ref_outs, ref_aux = reference(*xr)
    assert list(aux) == list(ref_aux)  # the same names, in spec order
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, **TOL)
    for name in aux:
        torch.testing.assert_close(aux[name], ref_aux[name], **TOL)
    gen = torch.Generator().manual_seed(seed)
    rs = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    cs = [3.0 + j for j in range(len(aux))]

    def loss(os, av):
        return sum((o * r).sum() for o, r in zip(os, rs)) + sum(c * v for c, v in zip(cs, av.values()))

    params = list(gm.parameters())
    got = torch.autograd.grad(loss(outs, aux), xs + params, allow_unused=True)
    want = torch.autograd.grad(loss(ref_outs, ref_aux), xr + params, allow_unused=True)
    names = [f"input {i}" for i in range(len(xs))] + [n for n, _ in gm.named_parameters()]
    nonzero = 0
    for name, g, w in zip(names, got, want):
        g = torch.zeros_like(params[0]) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{name}: {m}")
        nonzero += bool(g.abs().sum() > 0)
    assert nonzero >= len(names) // 2  # the gradients are not trivially zero
    return outs, aux


def report_of(spec):
    return gatedsl.check(spec)


# ------------------------------------------------------------ noisy top-k
def noisy_spec(experts=4, k=2, hidden=5, x_decl="[B, T, 6]", w_importance=0.1, w_load=0.1, expert=""):
    extra = f", expert={expert}" if expert else ""
    return f"""
import std.moe
model M() {{
  input x: {x_decl}
  output y = NoisyTopKMoE(x, experts={experts}, k={k}, hidden={hidden}, w_importance={w_importance},
                         w_load={w_load}{extra})
}}
"""


def noisy_reference(gm, experts, k, w_importance=0.1, w_load=0.1, eps=None, expert=None):
    pre = "NoisyTopKMoE"
    expert = expert or (lambda i, x: ffn(gm, f"{pre}.experts.{i}.expert", x))

    def ref(x):
        clean = x @ P(gm, pre + ".clean.x_proj.weight").T                       # x W_g
        sd = torch.log(1 + torch.exp(x @ P(gm, pre + ".sd.x_proj.weight").T))   # softplus(x W_n)
        h = clean if eps is None else clean + eps * sd                          # H
        keep = top_k_mask(h, k)
        g = softmax(torch.where(keep, h, torch.full_like(h, -math.inf)))        # softmax(KeepTopK(H, k))
        y = sum(g[..., i:i + 1] * expert(i, x) for i in range(experts))
        importance = g.reshape(-1, experts).sum(0)
        # P(x, i) = Φ((clean_i − kth_excluding(H, k, i)) / sd_i), kth_excluding: the k-th largest of the others
        hf, cf, sf = h.reshape(-1, experts), clean.reshape(-1, experts), sd.reshape(-1, experts)
        probs = []
        for n in range(hf.shape[0]):
            for i in range(experts):
                others = torch.cat([hf[n, :i], hf[n, i + 1:]])
                kth = torch.sort(others, descending=True).values[k - 1]
                probs.append(torch.special.ndtr((cf[n, i] - kth) / sf[n, i]))
        load = torch.stack(probs).reshape(-1, experts).sum(0)
        return [y], {pre + ".importance": w_importance * cv_squared(importance),
                     pre + ".load": w_load * cv_squared(load)}

    return ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("experts, k", [(4, 2), (3, 1), (5, 4)])
def test_noisy_topk_eval_matches_reference(shape, experts, k):
    spec = noisy_spec(experts, k, w_importance=0.3, w_load=0.7)
    gm = compile64(spec).eval()
    compare(gm, noisy_reference(gm, experts, k, 0.3, 0.7), [randn(*shape, D)])


def test_noisy_topk_on_flat_tokens():
    gm = compile64(noisy_spec(x_decl="[N, 6]")).eval()
    compare(gm, noisy_reference(gm, 4, 2), [randn(7, D)])


@pytest.mark.parametrize("seed", [0, 5])
def test_noisy_topk_train_matches_reference_with_the_same_noise(seed):
    gm = compile64(noisy_spec()).train()
    x = randn(2, 3, D)
    torch.manual_seed(seed)
    y = gm(x)
    aux = gm.aux
    torch.manual_seed(seed)
    eps = torch.randn(2, 3, 4, dtype=torch.float64)  # what noise_like draws: N(0, 1) of the logits' shape
    (y_ref,), aux_ref = noisy_reference(gm, 4, 2, eps=eps)(x)
    torch.testing.assert_close(y, y_ref, **TOL)
    for name in aux_ref:
        torch.testing.assert_close(aux[name], aux_ref[name], **TOL)
    gm.eval()
    assert not torch.allclose(gm(x), y)  # the noise changed the output in training


PROBE = """
block Probe(x: [*, D], hidden: int) {
  w = learned([D])
  return zeros_like(x) + w
}
"""


@pytest.mark.parametrize("experts, k", [(4, 2), (6, 3), (3, 1)])
def test_noisy_topk_gates_in_training(experts, k):
    """With expert i returning the unit vector e_i, y is the gate G itself."""
    spec = PROBE + noisy_spec(experts, k, hidden=1, x_decl=f"[B, T, {experts}]", expert="Probe")
    gm = compile64(spec, scale=3.0)
    with torch.no_grad():
        for i in range(experts):
            P(gm, f"NoisyTopKMoE.experts.{i}.expert.w").copy_(torch.eye(experts, dtype=torch.float64)[i])
    x = randn(4, 5, experts)
    torch.manual_seed(0)
    gm.train()
    g1, g2 = gm(x), gm(x)
    gm.eval()
    g_eval = gm(x)
    for g in (g1, g2, g_eval):
        assert ((g > 0).sum(-1) == k).all()  # exactly k experts per token
        torch.testing.assert_close(g.sum(-1), torch.ones(4, 5, dtype=torch.float64), **TOL)
        assert (g >= 0).all()
    assert not torch.equal(g1, g2)  # fresh noise at each training call
    assert not torch.equal((g1 > 0), (g_eval > 0))  # noise moves tokens between experts
    torch.testing.assert_close(gm(x), g_eval, rtol=0, atol=0)  # no noise in eval


def test_noisy_topk_parameters_gates_and_aux():
    spec = noisy_spec(experts=4, k=2, hidden=5)
    rep = report_of(spec)
    assert rep.params == 2 * D * 4 + 4 * ffn_params(D, 5)
    assert [(g.name, g.kind) for g in rep.gates] == [("NoisyTopKMoE.g", "topk")]
    assert rep.aux == {"NoisyTopKMoE.importance": [], "NoisyTopKMoE.load": []}
    gm = gatedsl.compile(spec)
    assert sum(p.numel() for p in gm.parameters()) == rep.params
    # The paper's initialisation: W_g and W_n start at zero.
    assert P(gm, "NoisyTopKMoE.clean.x_proj.weight").abs().sum() == 0
    assert P(gm, "NoisyTopKMoE.sd.x_proj.weight").abs().sum() == 0


def test_noisy_topk_without_noise():
    """noisy=false: H = x W_g in training too, no W_n, and no load loss (its estimate needs the noise)."""
    spec = noisy_spec().replace("w_load=0.1)", "w_load=0.1, noisy=false)")
    rep = report_of(spec)
    assert rep.params == D * 4 + 4 * ffn_params(D, 5) and rep.aux == {"NoisyTopKMoE.importance": []}
    gm = compile64(spec).train()
    pre = "NoisyTopKMoE"

    def reference(x):
        h = x @ P(gm, pre + ".clean.x_proj.weight").T
        g = softmax(torch.where(top_k_mask(h, 2), h, torch.full_like(h, -math.inf)))
        y = sum(g[..., i:i + 1] * ffn(gm, f"{pre}.experts.{i}.expert", x) for i in range(4))
        return [y], {pre + ".importance": 0.1 * cv_squared(g.reshape(-1, 4).sum(0))}

    compare(gm, reference, [randn(2, 3, D)])


@pytest.mark.parametrize("k, experts", [(0, 4), (4, 4)])
def test_noisy_topk_needs_k_below_experts(k, experts):
    with pytest.raises(gatedsl.SpecError, match="0 < k < experts"):
        gatedsl.check(noisy_spec(experts, k))


def test_swiglu_as_expert():
    spec = "import std.mlp\n" + noisy_spec(experts=3, k=2, hidden=4, expert="SwiGLU")
    rep = report_of(spec)
    assert rep.params == 2 * D * 3 + 3 * (3 * D * 4)
    gm = compile64(spec).eval()

    def swiglu(i, x):
        pre = f"NoisyTopKMoE.experts.{i}.expert"
        a = x @ P(gm, pre + ".g.x_proj.weight").T
        return (a / (1 + torch.exp(-a)) * (x @ P(gm, pre + ".v.x_proj.weight").T)) @ P(gm, pre + ".y.proj.weight").T

    compare(gm, noisy_reference(gm, 3, 2, expert=swiglu), [randn(2, 3, D)])


# ------------------------------------------------------------------ switch
def switch_spec(experts=3, capacity_factor=1.25, hidden=5, alpha=0.01):
    return f"""
import std.moe
model M() {{
  input x: [N, 6]
  output y = SwitchMoE(x, experts={experts}, capacity_factor={capacity_factor}, hidden={hidden}, alpha={alpha})
}}
"""


def switch_reference(gm, experts, capacity_factor, alpha):
    pre = "SwitchMoE"

    def ref(x):
        n = x.shape[0]
        p = softmax(x @ P(gm, pre + ".p.x_proj.weight").T)
        choice = [int(torch.argmax(p[t])) for t in range(n)]
        capacity = math.ceil(capacity_factor * n / experts)
        taken = [0] * experts
        rows = []
        for t in range(n):  # tokens claim their expert's slots in order
            i = choice[t]
            taken[i] += 1
            if taken[i] <= capacity:
                rows.append(p[t, i] * ffn(gm, f"{pre}.experts.{i}.expert", x[t]))
            else:
                rows.append(torch.zeros(x.shape[1], dtype=x.dtype))  # dropped
        y = torch.stack(rows)
        f = torch.tensor([choice.count(i) / n for i in range(experts)], dtype=x.dtype)
        big_p = p.sum(0) / n
        return [y], {pre + ".balance": alpha * experts * (f * big_p).sum()}, taken, capacity

    return ref


@pytest.mark.parametrize("n, experts, capacity_factor", [
    (12, 3, 0.5),    # capacity 2: most tokens dropped
    (8, 4, 1.0),     # capacity exactly 2 (c·N/E an integer)
    (10, 3, 1.25),   # capacity ceil(4.17) = 5
    (7, 2, 1.1),     # capacity ceil(3.85) = 4
    (6, 3, 4.0),     # capacity 8 > N: nothing dropped
    (1, 2, 1.0),
])
def test_switch_matches_in_order_reference(n, experts, capacity_factor):
    gm = compile64(switch_spec(experts, capacity_factor, alpha=0.3))
    x = randn(n, D, seed=n)
    ref = switch_reference(gm, experts, capacity_factor, 0.3)
    _, _, taken, capacity = ref(x)
    compare(gm, lambda x: ref(x)[:2], [x])
    if capacity_factor == 0.5:
        assert max(taken) > capacity  # the case really drops tokens
        y = gm(x)
        dropped = sum(max(c - capacity, 0) for c in taken)
        assert int((y.abs().sum(-1) == 0).sum()) == dropped


def test_switch_drops_the_tokens_beyond_capacity_in_order():
    """All tokens routed to one expert: the first ceil(c·N/E) pass, the rest are zero."""
    gm = compile64(switch_spec(experts=2, capacity_factor=1.0))
    with torch.no_grad():
        w = P(gm, "SwitchMoE.p.x_proj.weight")
        w.zero_()
        w[0, 0] = 10.0  # x[:, 0] > 0 picks expert 0 for every token
    x = randn(7, D)
    x[:, 0] = x[:, 0].abs() + 1
    y = gm(x)
    kept = (y.abs().sum(-1) > 0).tolist()
    assert kept == [True] * 4 + [False] * 3  # ceil(1.0 · 7 / 2) = 4
    with torch.no_grad():
        p0 = torch.softmax(x @ w.T, -1)[:, 0].mean()  # f = (1, 0): balance = α · E · (1 · P_0 + 0 · P_1)
        torch.testing.assert_close(gm.aux["SwitchMoE.balance"], 0.01 * 2 * p0, **TOL)


def test_switch_parameters_gates_and_aux():
    spec = switch_spec(experts=3, hidden=5)
    rep = report_of(spec)
    assert rep.params == D * 3 + 3 * ffn_params(D, 5)
    assert [(g.name, g.kind) for g in rep.gates] == [("SwitchMoE.g", "topk")]
    assert rep.aux == {"SwitchMoE.balance": []}


# ------------------------------------------------------------ shared expert
def shared_spec(experts=4, k=2, shared=1, hidden=5, alpha=0.01):
    return f"""
import std.moe
model M() {{
  input x: [B, T, 6]
  output y = SharedExpertMoE(x, experts={experts}, k={k}, shared={shared}, hidden={hidden}, alpha={alpha})
}}
"""


def shared_reference(gm, experts, k, shared, alpha):
    pre = "SharedExpertMoE"

    def ref(x):
        s = softmax(x @ P(gm, pre + ".s.x_proj.weight").T)
        chosen = top_k_mask(s, k)
        g = torch.where(chosen, s, torch.zeros_like(s))
        y = sum(ffn(gm, f"{pre}.shared_experts.{j}.expert", x) for j in range(shared)) if shared else 0
        y = y + sum(g[..., i:i + 1] * ffn(gm, f"{pre}.experts.{i}.expert", x) for i in range(experts))
        n = s.numel() // experts
        counts = chosen.reshape(-1, experts).sum(0).to(x.dtype)
        f = experts / (k * n) * counts
        big_p = s.reshape(-1, experts).sum(0) / n
        return [y], {pre + ".balance": alpha * (f * big_p).sum()}

    return ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("experts, k, shared", [(4, 2, 1), (3, 1, 2), (3, 3, 0)])
def test_shared_expert_matches_reference(shape, experts, k, shared):
    gm = compile64(shared_spec(experts, k, shared, alpha=0.2))
    compare(gm, shared_reference(gm, experts, k, shared, 0.2), [randn(*shape, D)])


def test_shared_expert_parameters_gates_and_aux():
    rep = report_of(shared_spec(experts=4, k=2, shared=2, hidden=5))
    assert rep.params == D * 4 + (4 + 2) * ffn_params(D, 5)
    assert [(g.name, g.kind) for g in rep.gates] == [("SharedExpertMoE.g", "topk")]
    assert rep.aux == {"SharedExpertMoE.balance": []}


# ------------------------------------------------------------- temperature
def temperature_spec(experts=3, tau=0.5, hidden=5):
    return f"""
import std.moe
model M() {{
  input x: [B, T, 6]
  output y = TemperatureMoE(x, experts={experts}, tau={tau}, hidden={hidden})
}}
"""


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("experts, tau", [(3, 0.5), (2, 1.0), (4, 3.0)])
def test_temperature_gate_matches_reference(shape, experts, tau):
    gm = compile64(temperature_spec(experts, tau))
    pre = "TemperatureMoE"

    def ref(x):
        g = softmax((x @ P(gm, pre + ".g.x_proj.weight").T) / tau)
        return [sum(g[..., i:i + 1] * ffn(gm, f"{pre}.experts.{i}.expert", x) for i in range(experts))], {}

    compare(gm, ref, [randn(*shape, D)])


def test_temperature_parameters_gates_and_errors():
    rep = report_of(temperature_spec(experts=3, hidden=5))
    assert rep.params == D * 3 + 3 * ffn_params(D, 5)
    assert [(g.name, g.kind) for g in rep.gates] == [("TemperatureMoE.g", "softmax")]
    assert rep.aux == {}
    with pytest.raises(gatedsl.SpecError, match="temperature"):
        gatedsl.check(temperature_spec(tau=0.0))


# --------------------------------------------------------------------- MMoE
def mmoe_spec(tasks=3, experts=4, hidden=5):
    names = [f"t{t}" for t in range(tasks)]
    outs = "\n".join(f"  output y{t} = {name}" for t, name in enumerate(names))
    return f"""
import std.moe
model M() {{
  input x: [B, T, 6]
  {", ".join(names)} = MMoE(x, tasks={tasks}, experts={experts}, hidden={hidden})
{outs}
}}
"""


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tasks, experts", [(3, 4), (2, 2)])
def test_mmoe_matches_reference(shape, tasks, experts):
    gm = compile64(mmoe_spec(tasks, experts))

    def ref(x):
        f = [ffn(gm, f"MMoE.experts.{i}.expert", x) for i in range(experts)]
        outs = []
        for t in range(tasks):
            g = softmax(x @ P(gm, f"MMoE.tasks.{t}.g.x_proj.weight").T)
            outs.append(sum(g[..., i:i + 1] * f[i] for i in range(experts)))
        return outs, {}

    outs, _ = compare(gm, ref, [randn(*shape, D)])
    assert len(outs) == tasks
    assert not torch.allclose(outs[0], outs[1])  # each task mixes the experts its own way


def test_mmoe_parameters_and_one_gate_per_task():
    rep = report_of(mmoe_spec(tasks=3, experts=4, hidden=5))
    assert rep.params == 3 * D * 4 + 4 * ffn_params(D, 5)
    assert [(g.name, g.kind) for g in rep.gates] == [(f"MMoE.tasks.{t}.g", "softmax") for t in range(3)]
    assert list(rep.outputs) == ["y0", "y1", "y2"]


# ------------------------------------------------- language pieces MoE uses
def test_lists_concatenate_to_collect_values_in_a_repeat():
    spec = """
model M() {
  input x: [B, 3]
  ys = []
  repeat i in 3 { ys = ys + [x * (i + 1)] }
  a, b, c = ys
  output y = a + b * 10 + c * 100 + ys[1]
}
"""
    gm = gatedsl.compile(spec)
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), x * (1 + 20 + 300 + 2))
    with pytest.raises(gatedsl.SpecError, match="cannot apply"):
        gatedsl.check(spec.replace("ys + [x * (i + 1)]", "ys + 1"))
    with pytest.raises(gatedsl.SpecError, match="static list longer"):  # doubling a list cannot exhaust memory
        gatedsl.check(spec.replace("repeat i in 3 { ys = ys + [x * (i + 1)] }",
                                   "ys = [x]\n  repeat 40 { ys = ys + ys }"))


def test_erf_of_static_numbers():
    spec = "model M() {\n  input x: [B]\n  output y = x * erf(0.5)\n}"
    x = torch.randn(3)
    torch.testing.assert_close(gatedsl.compile(spec)(x), x * math.erf(0.5))


# ---------------------------------------------------------- routing shares
@pytest.mark.parametrize("call, share", [
    ("NoisyTopKMoE(x, experts=4, k=2, hidden=3, record_load=true)", "noisy"),
    ("SharedExpertMoE(x, experts=4, k=2, hidden=3, record_load=true)", "shared"),
    ("SwitchMoE(flatten(x, 0, 1), experts=4, hidden=3, record_load=true)", "switch"),
])
def test_record_load_gives_the_share_of_assignments_per_expert(call, share):
    block = call.split("(")[0]
    y = call if share != "switch" else f"reshape({call}, [B, T, 6])"
    spec = f"import std.moe\nmodel M() {{\n  input x: [B, T, 6]\n  output y = {y}\n}}"
    assert list(gatedsl.check(spec).aux)[-1] == f"{block}.routed"
    assert gatedsl.check(spec.replace(", record_load=true", "")).aux.get(f"{block}.routed") is None
    gm = compile64(spec).eval()
    x = randn(3, 5, D)
    gm(x)
    routed = gm.aux[f"{block}.routed"]
    logits = x.reshape(-1, D) @ P(gm, {"noisy": "NoisyTopKMoE.clean", "shared": "SharedExpertMoE.s",
                                       "switch": "SwitchMoE.p"}[share] + ".x_proj.weight").T
    k = 1 if share == "switch" else 2
    counts = top_k_mask(logits, k).sum(0).to(torch.float64)   # tokens per expert (the ranking of softmax = of logits)
    torch.testing.assert_close(routed, counts / (15 * k), **TOL)
    torch.testing.assert_close(routed.sum(), torch.tensor(1.0, dtype=torch.float64), **TOL)


def test_torch_compile_agrees_in_eval_and_training(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "fallback_random", True)  # compiled randn draws what eager draws
    spec = """
import std.moe
model M() {
  input x: [B, T, 6]
  output y = NoisyTopKMoE(x, hidden=8) + reshape(SwitchMoE(flatten(x, 0, 1), hidden=8), [B, T, 6])
}
"""
    gm = compile64(spec).float()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(gm)
    for mode in ("eval", "train"):
        getattr(gm, mode)()
        torch.manual_seed(3)
        y = compiled(x)
        aux = compiled.aux
        torch.manual_seed(3)
        torch.testing.assert_close(y, gm(x), rtol=1e-5, atol=1e-5)
        assert list(aux) == ["NoisyTopKMoE.importance", "NoisyTopKMoE.load", "SwitchMoE.balance"]
        for name in aux:
            torch.testing.assert_close(aux[name], gm.aux[name], rtol=1e-5, atol=1e-5)
