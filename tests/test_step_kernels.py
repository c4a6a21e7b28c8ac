"""The one-token kernels (one_step.py of linear_scan and of delta_rule_scan): what a decoder's calls of one token run.

Each derived form, its op called as the std blocks compile at -O2 (caught at the registry's dispatch, with
the values the model computes): GLA (a decay per key dim, the drive kᵀ v, read out as q S), RetNet (a
scalar decay per head), HGRN (an element-wise decay, the state emitted), Mamba's selective SSM (a decay per
channel and state, y = S C) and the delta rule with β, gated (Gated DeltaNet) and not (DeltaNet). From a
random non-zero initial state, T = 1 and T = 2 tokens run one at a time through one_step (the state carried
from call to call, as a decoder carries it) equal the op over all T at once by the reference (the step
loop) and by the chunked form, in float64: outputs, final state, and the gradients with respect to every
input and the initial state. The registry chooses one_step for a call of one token and the step loop for
two. one_step also equals the kernel tests' own loop and equations (tests/test_kernels_linear_scan.py,
test_kernels_delta_rule.py) for every configuration: reversed, last step only, each readout and gate.

Tolerances: one_step does the reference's arithmetic re-associated ((α S) k for α (S k), a matrix product
for an einsum, one addcmul for a product and a sum), ~1e-16 relative per step, so 1e-12; the chunked forms
regroup sums across a chunk (~1e-15 relative), 1e-10 as in their own tests.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.cli.main import main as cli
from gatedsl.kernels import registry
from gatedsl.kernels.delta_rule.chunked import chunked as delta_chunked
from gatedsl.kernels.delta_rule.one_step import one_step as delta_one_step
from gatedsl.kernels.delta_rule.reference import step_loop
from gatedsl.kernels.linear_scan.chunked import chunked as scan_chunked
from gatedsl.kernels.linear_scan.one_step import one_step as scan_one_step, vector_side
from gatedsl.kernels.linear_scan.reference import step
from gatedsl.kernels.registry import Context
from test_kernels_delta_rule import assert_same, expected, make, results
from test_kernels_linear_scan import ELEMENTWISE, compare, config, gla_inputs, randn

ROOT = Path(__file__).resolve().parent.parent
SAME = dict(rtol=1e-12, atol=1e-12)  # one_step against the reference
REGROUPED = dict(rtol=1e-10, atol=1e-10)  # against the chunked forms

DELTA_NET = """
cell DeltaStep(q: [*, K], k: [*, K], v: [*, V], beta: [*, 1], state S: [*, V, K]) {
  S = S - einsum("...v,...k->...vk", beta * einsum("...vk,...k->...v", S, k), k) + einsum("...v,...k->...vk", beta * v, k)
  return einsum("...vk,...k->...v", S, q)
}
model M() {
  input x: [B, T, 8]
  q = split_heads(linear(x, 8), 2)
  k = split_heads(linear(x, 8), 2)
  k = k * rsqrt(sum(k * k, -1, keepdim=true) + 1e-6)
  v = split_heads(linear(x, 6), 2)
  beta = split_heads(sigmoid(linear(x, 2)), 2)
  output y = merge_heads(scan DeltaStep(q, k, v, beta) over T, 2)
}
"""


def std(call: str) -> str:
    lower = "  input lower: [8]\n" if "lower" in call else ""
    return f"import std.linear_rnn\nmodel M() {{\n  input x: [B, T, 8]\n{lower}  output y = {call}\n}}\n"


# form -> (its spec, the fused op it becomes, how its config reads)
FORMS = {
    "GLA": (std("GLA(x, heads=2, rank=4)"), "linear_scan", dict(drive="outer", key_readout=True)),
    "RetNet (scalar decay)": (std("RetNet(x, heads=2)"), "linear_scan", dict(drive="outer", key_readout=True)),
    "HGRN (element-wise decay)": (std("HGRN(x, lower)"), "linear_scan", dict(drive="given", readout="none")),
    "Mamba (selective SSM)": (std("Mamba(x, state_size=4)"), "linear_scan", dict(drive="given", readout="einsum")),
    "Gated DeltaNet": (std("GatedDeltaNet(x, heads=2, head_dim=4, v_head_dim=3)"), "delta_rule_scan",
                       dict(gate="log", beta=True)),
    "DeltaNet (no decay)": (DELTA_NET, "delta_rule_scan", dict(gate="none", beta=True)),
}
KERNELS = {  # op -> (reference, chunked, one_step)
    "linear_scan": (step, scan_chunked, scan_one_step),
    "delta_rule_scan": (step_loop, delta_chunked, delta_one_step),
}


def caught_call(form: str, T: int):
    """The config and inputs of the form's op as its compiled block calls it on T tokens, the initial state random."""
    spec, op, _ = FORMS[form]
    calls = []
    original = registry.dispatch

    def catching(name, config, key, *tensors):
        if name == op:
            calls.append((config, [t.detach().clone() for t in tensors]))
        return original(name, config, key, *tensors)

    with pytest.MonkeyPatch.context() as mp:  # the backend binds dispatch as it emits each fused op
        mp.setattr(registry, "dispatch", catching)
        torch.manual_seed(0)
        model = gatedsl.compile(spec, opt_level=2).double()
    inputs = [randn(2, T, 8, seed=T)] + ([torch.rand(8, dtype=torch.float64)] if "lower" in spec else [])
    with torch.no_grad():
        model(*inputs)
    (config, tensors), = calls
    tensors[-1] = randn(*tensors[-1].shape, seed=10 + T)  # a state carried from earlier tokens
    return config, tensors


def token(op: str, tensors: list[torch.Tensor], t: int) -> list[torch.Tensor]:
    """The inputs of token t alone: each per-step input's step t (one the same at every step kept), the state as is."""
    *per_step, state = tensors
    if op == "linear_scan":  # time first
        return [x[t:t + 1] if x.shape[0] > 1 else x for x in per_step] + [state]
    # delta_rule_scan: q, k, v [*, T, d], the gate and β [*, T]
    return [x[..., t:t + 1, :] for x in per_step[:3]] + [x[..., t:t + 1] for x in per_step[3:]] + [state]


def one_token_at_a_time(op: str, one_step):
    """The op over all T as a decoder runs it: one call of `one_step` per token, the state carried between calls."""
    time_axis = 0 if op == "linear_scan" else -2

    def run(config, *tensors):
        tensors = list(tensors)
        T = max(x.shape[0] for x in tensors[:-1]) if op == "linear_scan" else tensors[0].shape[-2]
        state, outs = tensors[-1], []
        for t in range(T):
            out, state = one_step(config, *token(op, tensors[:-1] + [state], t))
            outs.append(out)
        return torch.cat(outs, time_axis), state

    return run


def outputs_and_gradients(fn, config, tensors):
    """fn's outputs and final state, and the gradients of a fixed random combination of both wrt every input."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    out, final = fn(config, *leaves)
    probes = [randn(*x.shape, seed=20 + i) for i, x in enumerate((out, final))]
    loss = (out * probes[0]).sum() + (final * probes[1]).sum()
    return [out, final, *torch.autograd.grad(loss, leaves)]


def context(op: str, config, tensors, training=False) -> Context:
    sizes = registry.fused_ops()[op].sizes(config, [tuple(t.shape) for t in tensors])
    ctx = registry.runtime_context(tensors, sizes)
    return Context(ctx.device, ctx.dtype, training, ctx.sizes)


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("form", list(FORMS))
def test_one_token_at_a_time_equals_the_whole_sequence(form, T):
    _, op, reads = FORMS[form]
    config, tensors = caught_call(form, T)
    assert all(getattr(config, name) == value for name, value in reads.items()), config
    reference, chunked, one_step = KERNELS[op]
    stepped = outputs_and_gradients(one_token_at_a_time(op, one_step), config, tensors)
    names = ["output", "final state"] + [f"d input {i}" for i in range(len(tensors))]
    whole = outputs_and_gradients(reference, config, tensors)
    for name, got, want in zip(names, stepped, whole):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, **SAME, msg=lambda m, name=name: f"{name}: {m}")
    if op == "delta_rule_scan" or context(op, config, tensors).size("gla"):  # where the chunked form applies
        regrouped = outputs_and_gradients(chunked, config, tensors)
        for name, got, want in zip(names, stepped, regrouped):
            torch.testing.assert_close(got, want, **REGROUPED, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("form", list(FORMS))
def test_the_registry_runs_one_step_for_one_token_and_the_loop_for_two(form):
    _, op, _ = FORMS[form]
    config, tensors = caught_call(form, 2)
    loop = "step" if op == "linear_scan" else "loop"
    for training in (False, True):
        assert registry.choose(op, context(op, config, token(op, tensors, 0), training)).kernel == "one_step"
        assert registry.choose(op, context(op, config, tensors, training)).kernel == loop
    first = token(op, tensors, 0)
    got = registry.dispatch(op, config, registry.fused_ops()[op].key(config), *first)
    for a, b in zip(got, KERNELS[op][2](config, *first)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def gla_sizes(B, H, K, V):
    return (("T", 1), ("state", B * H * K * V), ("K", K), ("V", V), ("decay_width", K), ("gla", 1))


MAMBA = (("T", 1), ("state", 8 * 1536 * 16), ("K", None), ("V", None), ("decay_width", None), ("gla", 0))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_one_token_takes_one_step_on_every_device_dtype_and_mode(device):
    calls = [("linear_scan", gla_sizes(1, 4, 64, 64)), ("linear_scan", MAMBA),
             ("delta_rule_scan", (("T", 1), ("K", 128), ("V", 128), ("rows", 32)))]
    if device == "cpu":  # states of millions of elements too (on a GPU the cost rule's rates are estimates)
        calls += [("linear_scan", gla_sizes(8, 4, 64, 128)), ("linear_scan", gla_sizes(32, 16, 128, 256)),
                  ("delta_rule_scan", (("T", 1), ("K", 128), ("V", 128), ("rows", 8 * 16)))]
    for dtype, training in itertools.product(("float32", "float64"), (False, True)):
        for op, sizes in calls:
            pick = registry.choose(op, Context(device, dtype, training, sizes))
            assert pick.kernel == "one_step", (op, device, dtype, training, pick)
            longer = Context(device, dtype, training, tuple((n, 2 if n == "T" else v) for n, v in sizes))
            why = {c.kernel: c.why for c in registry.choose(op, longer).candidates}
            assert why["one_step"] == "one step only (T = 1), this call has T = 2"


@pytest.mark.parametrize("form", ["GLA", "Mamba (selective SSM)", "Gated DeltaNet"])
def test_a_decoder_runs_one_step_for_each_token(form, monkeypatch):
    """gatedsl.Decoder at -O2: after a prompt of 3, each token's call runs one_step, and the outputs are the full
    forward's (which runs the chunked form or the loop at T = 6)."""
    spec, op, _ = FORMS[form]
    torch.manual_seed(0)
    model = gatedsl.compile(spec, opt_level=2).double()
    x = randn(2, 6, 8, seed=4)
    with torch.no_grad():
        want = model(x)
        decoder = gatedsl.Decoder(model)
        outs, state = decoder.prefill(x[:, :3])
        monkeypatch.setattr(registry, "_CHOSEN", {})  # what runs from here on
        monkeypatch.setattr(registry, "_BY_SIGNATURE", {})
        for t in range(3, 6):
            out, state = decoder.step(x[:, t:t + 1], state=state)
            outs = torch.cat([outs, out], 1)
    ran = {fn for (name, *_), fn in registry._CHOSEN.items() if name == op}
    assert ran == {KERNELS[op][2]}, registry._CHOSEN
    torch.testing.assert_close(outs, want, **REGROUPED)


# ------------------------------------------------------- against the kernel tests' own loop and equations
@pytest.mark.parametrize("width", [1, 5], ids=["scalar", "per-key"])
def test_gla_form_one_step_equals_the_loop(width):
    for i, (reverse, last, initial) in enumerate(itertools.product([False, True], [False, True], [True, False])):
        g, drive, q, state = gla_inputs(1, width, seed=i, initial=initial)
        compare(scan_one_step, config(reverse=reverse, last=last), g, drive, q, state, seed=i)


@pytest.mark.parametrize("case", sorted(ELEMENTWISE))
def test_elementwise_forms_one_step_equals_the_loop(case):
    changes, shape, operand_shape = ELEMENTWISE[case]
    for i, (reverse, last, log_decay) in enumerate(itertools.product([False, True], [False, True], [False, True])):
        cfg = config(drive="given", key_readout=False, log_decay=log_decay, reverse=reverse, last=last, **changes)
        raw = randn(1, *shape, seed=i)
        decay = raw / 2 if log_decay else torch.where(raw.abs() < 0.3, 0.0, raw)
        operand = randn(1, *operand_shape, seed=i + 2) if operand_shape else None
        compare(scan_one_step, cfg, decay, [randn(1, *shape, seed=i + 1)], operand, randn(*shape, seed=i + 3))


def test_a_matrix_vector_readout_is_one_product_and_any_other_an_einsum():
    assert vector_side("...kv,...k->...v") == "left" and vector_side("...en,...n->...e") == "right"
    for other in ("...kv,...kv->...kv", "...kk,...k->...k", "kv,k->v", "...kv,...v->...kv", ""):
        assert vector_side(other) is None
    g, (k, v), q, state = gla_inputs(1, 5, seed=3)
    written = config(equation="...ab,...a->...b")  # q S under other letters
    compare(scan_one_step, written, g, (k, v), q, state)


@pytest.mark.parametrize("gate,beta,initial", [("alpha", True, True), ("log", True, True), ("none", True, True),
                                               ("alpha", False, True), ("none", False, False)])
def test_delta_rule_one_step_equals_the_equations(gate, beta, initial):
    config_, tensors = make(1, gate, beta, initial=initial, lead=(2, 3))
    assert_same(results(delta_one_step, config_, tensors), results(expected, config_, tensors))


def test_more_than_one_step_is_refused():
    g, drive, q, state = gla_inputs(2, 5, seed=1)
    with pytest.raises(ValueError, match="one step"):
        scan_one_step(config(), g, *drive, q, state)
    config_, tensors = make(2, "alpha", True)
    with pytest.raises(ValueError, match="one step"):
        delta_one_step(config_, *tensors)


# ------------------------------------------------------------------------------------- --explain
@pytest.mark.parametrize("spec,op", [(ROOT / "examples" / "gla_lm.gate", "linear_scan"),
                                     (FORMS["Gated DeltaNet"][0], "delta_rule_scan")], ids=["GLA", "delta rule"])
def test_explain_says_what_one_token_calls_run_and_why(spec, op, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # each line whole
    if isinstance(spec, str):
        path = tmp_path / "spec.gate"
        path.write_text(spec)
        spec = path
    assert cli(["compile", str(spec), "--explain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert cli(["compile", str(spec), "--json"]) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    assert all(c["decoding"] is None for c in kernels if c["op"] not in KERNELS)  # not along a sequence
    choices = [c for c in kernels if c["op"] == op]
    assert choices
    for choice in choices:
        decoding = choice["decoding"]
        assert decoding["kernel"] == "one_step" and decoding["target"]["sizes"]["T"] == 1
        assert "per token" in decoding["reason"] and "cost at T = 1: one_step " in decoding["reason"]
        at = next(i for i, line in enumerate(lines) if line.startswith(choice["node"] + f" {op}:"))
        shown = next(line for line in lines[at:] if line.startswith("  one-token calls"))
        assert shown.rstrip() == f"  one-token calls (decoding): one_step, {decoding['reason']}"
