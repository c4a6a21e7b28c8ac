"""std.moe's MixtralMoE and Qwen3NextMoE equal transformers' MixtralSparseMoeBlock and Qwen3NextSparseMoeBlock
(through gatedsl/interop/moe.py, both ways), and gatedsl.load_balancing_loss equals transformers'
load_balancing_loss_func.

The references are transformers' modules built from tiny configs, taken from a MixtralForCausalLM /
Qwen3NextForCausalLM so that their weights start as the model initialises them, with experts_implementation="eager"
(the per-expert loop written in the modeling file; the default, grouped_mm, is a fused kernel of the same sum).
Everything runs in float64 except where transformers casts to float32: the routers take their softmax in float32
(router_logits.float() / dtype=torch.float), so the routing weights carry float32 rounding (~6e-8 relative), and
load_balancing_loss_func accumulates in float32. Hence rtol 1e-5 (the observed differences are ~1e-7), while a wrong
expert, weight or renormalisation is off by 1e-2 or more. Routing itself is compared exactly: the weights are
scaled so that no two router probabilities of a token are within float32's resolution.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gatedsl
from gatedsl.interop.mapping import MappingError, export_state_dict, load_state_dict
from gatedsl.interop.moe import mixtral_moe_from_transformers, qwen3_next_moe_from_transformers
from gatedsl.ir.ops import moe_experts
from test_route_experts import kernel  # noqa: F401 (a fixture: force(name) makes every moe_dispatch run kernel name)
from transformers_reference import grads_in_ref_layout, ks_distance

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-7)
D, HIDDEN, SHARED = 8, 5, 7


def mixtral(experts=4, k=2, layers=1):
    cfg = MixtralConfig(vocab_size=11, hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts,
                        num_experts_per_tok=k, experts_implementation="eager")
    return [layer.mlp for layer in MixtralForCausalLM(cfg).model.layers]


def qwen3_next(experts=4, k=2, norm_topk_prob=True):
    cfg = Qwen3NextConfig(vocab_size=11, hidden_size=D, intermediate_size=6, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=experts,
                          num_experts_per_tok=k, moe_intermediate_size=HIDDEN, shared_expert_intermediate_size=SHARED,
                          norm_topk_prob=norm_topk_prob, layer_types=["full_attention"], experts_implementation="eager")
    return Qwen3NextForCausalLM(cfg).model.layers[0].mlp


def spec(call: str) -> str:
    return f"import std.moe\nmodel M() {{\n  input x: [B, T, {D}]\n  output y = {call}\n}}\n"


def scaled(ref):
    """The reference in float64, its weights moved to float32-representable values of a larger scale (the init's
    std of 0.02 makes every output tiny and the router nearly uniform)."""
    ref = ref.double().eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_((p * 20 + 0.3 * torch.randn(p.shape, dtype=torch.float64)).float().double())
    return ref


def compare(ours, ref, mapping, block: str):
    """Outputs, router logits (aux), and the gradients (input and every weight) of sum(y ⊙ r) + ⟨logits, s⟩."""
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    torch.testing.assert_close(y_ours, y_ref, **TOL)
    logits_ref = ref.gate(x_ref.reshape(-1, D))[0]
    logits_ours = ours.aux[f"{block}.router_logits"]
    torch.testing.assert_close(logits_ours.reshape(-1, logits_ref.shape[-1]), logits_ref, rtol=1e-12, atol=0)
    gen = torch.Generator().manual_seed(2)
    r, s = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64), torch.randn(logits_ref.shape,
                                                                                     generator=gen, dtype=torch.float64)
    ((y_ours * r).sum() + (logits_ours.reshape(s.shape) * s).sum()).backward()
    ((y_ref * r).sum() + (logits_ref * s).sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    got = grads_in_ref_layout(ours, mapping)
    for name, p in ref.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], p.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    back = copy.deepcopy(ref)
    back.load_state_dict(export_state_dict(ours, mapping), strict=True)
    torch.testing.assert_close(back(x), y_ref.detach(), rtol=0, atol=0)


def compiled(call: str, opt_level: int, mapping, ref):
    model = gatedsl.compile(spec(call), opt_level=opt_level).double()
    assert sorted(load_state_dict(model, ref, mapping)) == sorted(k for k, _ in model.named_parameters())
    return model


# ------------------------------------------------------------------ Mixtral
# -O0, and -O2 with each expert on its own tokens (sorted) or on all of them (dense).
LEVELS = [(0, None), (2, "sorted")]


@pytest.mark.parametrize("experts, k, opt_level, routing", [(4, 2, 2, "dense")] + [
    (experts, k, *level) for experts, k in [(4, 2), (3, 1), (4, 4)] for level in LEVELS])
def test_mixtral_moe_equals_transformers(experts, k, opt_level, routing, kernel):
    if routing:
        kernel(routing)
    ref = scaled(mixtral(experts, k)[0])
    mapping = mixtral_moe_from_transformers(experts).under("MixtralMoE", "")
    ours = compiled(f"MixtralMoE(x, experts={experts}, k={k}, hidden={HIDDEN})", opt_level, mapping, ref)
    compare(ours, ref, mapping, "MixtralMoE")


def test_mixtral_moe_loads_the_per_expert_layout_of_released_checkpoints():
    """transformers 4's (and Mixtral's released) experts.{i}.w1/w3/w2 layout loads and exports as the fused one."""
    ref = scaled(mixtral(4, 2)[0])
    fused = mixtral_moe_from_transformers(4).under("MixtralMoE", "")
    ours = compiled("MixtralMoE(x, experts=4, k=2, hidden=5)", 0, fused, ref)
    legacy = mixtral_moe_from_transformers(4, fused=False).under("MixtralMoE", "")
    state = export_state_dict(ours, legacy)
    assert torch.equal(state["experts.1.w1.weight"], ref.experts.gate_up_proj[1, :HIDDEN])
    assert torch.equal(state["experts.1.w3.weight"], ref.experts.gate_up_proj[1, HIDDEN:])
    assert torch.equal(state["experts.2.w2.weight"], ref.experts.down_proj[2])
    again = gatedsl.compile(spec("MixtralMoE(x, experts=4, k=2, hidden=5)")).double()
    load_state_dict(again, state, legacy)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_a_checkpoint_with_other_sizes_is_refused_by_name():
    ref = scaled(mixtral(4, 2)[0])
    ours = gatedsl.compile(spec("MixtralMoE(x, experts=4, k=2, hidden=6)")).double()
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(MappingError, match="experts.gate_up_proj"):
        load_state_dict(ours, ref, mixtral_moe_from_transformers(4).under("MixtralMoE", ""))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), before.values()))


# --------------------------------------------------------------- Qwen3-Next
@pytest.mark.parametrize("norm_topk_prob, opt_level, routing", [(True, 2, "dense")] + [
    (norm, *level) for norm in (True, False) for level in LEVELS])
def test_qwen3_next_moe_equals_transformers(norm_topk_prob, opt_level, routing, kernel):
    if routing:
        kernel(routing)
    ref = scaled(qwen3_next(4, 2, norm_topk_prob))
    mapping = qwen3_next_moe_from_transformers(4).under("Qwen3NextMoE", "")
    call = (f"Qwen3NextMoE(x, experts=4, k=2, hidden={HIDDEN}, shared_hidden={SHARED}, "
            f"norm_topk_prob={str(norm_topk_prob).lower()})")
    ours = compiled(call, opt_level, mapping, ref)
    compare(ours, ref, mapping, "Qwen3NextMoE")


# ------------------------------------------------------ routing at -O2
@pytest.mark.parametrize("call, active", [
    ("MixtralMoE(x, experts=4, k=2, hidden=5)", 2),
    ("Qwen3NextMoE(x, experts=4, k=3, hidden=5, shared_hidden=7)", 3),
    ("Qwen3NextMoE(x, experts=4, k=1, hidden=5, shared_hidden=7, norm_topk_prob=false)", 1),
])
def test_the_new_mixtures_are_routed_at_o2(call, active):
    """One moe_dispatch per mixture, each expert a sub-module that sees only its tokens under the sorted kernel;
    the shared expert stays outside, as the sum the routed terms are added to."""
    graph = gatedsl.api.analyse(spec(call), opt_level=2).graph
    (node,) = [graph.node(n) for n in graph.order() if graph.node(n)["op"] == "moe_dispatch"]
    assert node["attrs"].active == active
    block = call.split("(")[0]
    assert [e.path for e in moe_experts(node["attrs"])] == [f"{block}.experts.{i}.expert" for i in range(4)]
    assert len(node["inputs"]) == 3  # x, g, and the sum so far (zeros, or the gated shared expert)


# ------------------------------------------------------------ initialisation
@pytest.mark.parametrize("which", ["mixtral", "qwen3_next"])
def test_moe_initialisation_matches_transformers(which):
    """Every weight N(0, 0.02), as the PreTrainedModels initialise them: the same distribution by a two-sample KS
    test at α = 0.001, on a config large enough for the test to mean something."""
    experts, hidden = 8, 32
    torch.manual_seed(0)
    if which == "mixtral":
        cfg = MixtralConfig(vocab_size=11, hidden_size=32, intermediate_size=hidden, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts)
        ref = MixtralForCausalLM(cfg).model.layers[0].mlp
        call = f"MixtralMoE(x, experts={experts}, k=2, hidden={hidden})"
        mapping = mixtral_moe_from_transformers(experts)
    else:
        cfg = Qwen3NextConfig(vocab_size=11, hidden_size=32, intermediate_size=6, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=experts,
                              num_experts_per_tok=2, moe_intermediate_size=hidden, shared_expert_intermediate_size=48,
                              layer_types=["full_attention"])
        ref = Qwen3NextForCausalLM(cfg).model.layers[0].mlp
        call = f"Qwen3NextMoE(x, experts={experts}, k=2, hidden={hidden}, shared_hidden=48)"
        mapping = qwen3_next_moe_from_transformers(experts)
    block = call.split("(")[0]
    torch.manual_seed(1)
    ours = export_state_dict(gatedsl.compile(spec(call).replace(f"[B, T, {D}]", "[B, T, 32]")),
                             mapping.under(block, ""))
    theirs = ref.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name
        n = ours[name].numel()
        assert ks_distance(ours[name], theirs[name]) < 1.95 * (2 / n) ** 0.5, name
        assert abs(ours[name].std().item() - 0.02) < 0.2 * 0.02 * max(1.0, (64 / n) ** 0.5), name


# ------------------------------------------------------ load-balancing loss
MIXTRAL_LM = """
import std.moe
model M() {{
  input x: [B, T, {d}]
  h = x
  repeat {layers} {{
    h = h + MixtralMoE(h, experts={experts}, k={k}, hidden=5)
  }}
  output y = h
}}
"""


@pytest.mark.parametrize("layers, experts, k", [(3, 4, 2), (2, 5, 1), (1, 4, 3)])
def test_load_balancing_loss_equals_transformers(layers, experts, k):
    """Pooled over several layers' router logits (from model.aux), without and with padding left out by an
    attention mask; its gradient with respect to every router weight too."""
    model = gatedsl.compile(MIXTRAL_LM.format(d=D, layers=layers, experts=experts, k=k), opt_level=0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p).float().double())
    x = torch.randn(3, 6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model(x)
    logits = tuple(model.aux[f"repeat.{i}.MixtralMoE.router_logits"].reshape(-1, experts) for i in range(layers))
    assert len(logits) == len([n for n in model.aux if n.endswith("router_logits")])
    routers = [p for n, p in model.named_parameters() if n.endswith("router.x_proj.weight")]
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [0] * 3 + [1] * 3])
    for attention_mask in (None, mask):
        ours = gatedsl.load_balancing_loss(model.aux, top_k=k, attention_mask=attention_mask)
        theirs = load_balancing_loss_func(logits, experts, k, attention_mask)
        torch.testing.assert_close(ours, theirs.double(), **TOL)
        got = torch.autograd.grad(ours, routers, retain_graph=True)
        want = torch.autograd.grad(theirs, routers, retain_graph=True)
        for g, w in zip(got, want):
            assert g.abs().sum() > 0
            torch.testing.assert_close(g, w, **TOL)
    assert not torch.allclose(gatedsl.load_balancing_loss(model.aux, top_k=k), ours)  # the mask matters


def test_load_balancing_loss_pools_over_layers_rather_than_summing():
    a = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 4.0], [0.0, 0.0, 4.0]])
    pooled = gatedsl.load_balancing_loss([a, b], top_k=1)
    separately = gatedsl.load_balancing_loss([a], top_k=1) + gatedsl.load_balancing_loss([b], top_k=1)
    torch.testing.assert_close(pooled, load_balancing_loss_func((a, b), 3, 1))
    assert pooled < separately / 2 + 1e-6  # two opposite imbalances cancel when pooled


def test_load_balancing_loss_errors():
    with pytest.raises(ValueError, match="no router logits"):
        gatedsl.load_balancing_loss({}, top_k=2)
    with pytest.raises(ValueError, match="differ in their number of experts"):
        gatedsl.load_balancing_loss([torch.zeros(4, 3), torch.zeros(4, 5)], top_k=2)
    with pytest.raises(ValueError, match="does not cover"):
        gatedsl.load_balancing_loss([torch.zeros(2, 3, 4)], top_k=2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="top_k"):
        gatedsl.load_balancing_loss([torch.zeros(4, 3)], top_k=4)
