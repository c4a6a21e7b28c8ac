"""The gate chain's generated Triton kernels (gatedsl/kernels/gate_chain/triton.py), forward and backward, equal the plain
reference, run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, in a child process: triton reads it as it loads)."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed here")

from test_kernels_gate_chain import CASES  # noqa: E402  (the named chains, shared with the torch kernels' tests)

from triton_interpreter import interpreted, run_in_the_interpreter  # noqa: E402
RANDOM_PROGRAMS = 12


def test_triton_kernels_in_the_interpreter():
    run_in_the_interpreter(__file__, len(CASES) + 5)


# float32 kernels against the reference in float64 on the same (float32) values: each step rounds to
# float32 (~6e-8 relative) and tanh, softplus and the like are written with exp/log (a few ulps); over
# chains of up to ~15 steps and their derivatives the differences seen are below 2e-6. 2e-5 bounds them,
# while a wrong step or derivative rule shows at 1e-2 or more.
TOL = {"rtol": 2e-5, "atol": 2e-5}


def _compare(program, tensors, out_weights_seed=0, kinds=None):
    """Triton's outputs and input gradients against the reference's, in float64."""
    from gatedsl.kernels.gate_chain import reference, triton as kernels
    from test_kernels_gate_chain import Config

    config = Config(program)
    floats = [i for i, t in enumerate(tensors) if t.is_floating_point()]

    def run(fn, ts):
        ts = [t.detach().requires_grad_() if t.is_floating_point() else t for t in ts]
        outs = fn(config, *ts)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        gen = torch.Generator().manual_seed(out_weights_seed)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
        loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
        grads = torch.autograd.grad(loss, [ts[i] for i in floats], allow_unused=True)
        return outs, grads

    outs, grads = run(kernels.gate_chain, tensors)
    want, want_grads = run(reference.gate_chain, [t.double() if t.is_floating_point() else t for t in tensors])
    for a, b in zip(outs, want):
        assert a.dtype == tensors[floats[0]].dtype and a.is_contiguous()
        torch.testing.assert_close(a.double(), b, equal_nan=True, **TOL)
    for i, a, b in zip(floats, grads, want_grads):
        if b is None:
            assert a is None or not a.any()
            continue
        assert a.shape == tensors[i].shape and a.dtype == tensors[i].dtype
        torch.testing.assert_close(a.double(), b, equal_nan=True, **TOL)
    with torch.no_grad():  # the forward alone, no autograd node
        again = kernels.gate_chain(config, *tensors)
    again = list(again) if isinstance(again, (tuple, list)) else [again]
    for a, b in zip(again, outs):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0, equal_nan=True)


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_equals_the_reference_on_the_named_chains(case):
    from test_kernels_gate_chain import trace

    name, equations, shapes = case
    program = trace(equations, len(shapes))
    gen = torch.Generator().manual_seed(len(name))
    _compare(program, [torch.randn(s, generator=gen) for s in shapes])


@interpreted
def test_operand_layouts_contiguous_scalar_strided_and_expanded():
    from test_kernels_gate_chain import trace

    program = trace(CASES[5][1], 4)  # highway: t, bias [H], h, x
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(5, 3, generator=gen).t()  # transposed
    bias = torch.randn(5, generator=gen)
    h = torch.randn(1, 5, generator=gen).expand(3, 5)  # stride 0 on the batch
    x = torch.randn(3, 5, generator=gen)
    _compare(program, [t, bias, h, x])
    scaled = trace(CASES[6][1], 3)  # x, a 0-d scalar, a column [B, 1]
    _compare(scaled, [torch.randn(3, 5, generator=gen), torch.tensor(0.7), torch.randn(3, 1, generator=gen)])


@interpreted
def test_where_reads_a_bool_condition():
    from test_kernels_gate_chain import Program

    program = Program(3, (("where", (0, 1, 2), ()), ("tanh", (3,), ())), (4,))
    gen = torch.Generator().manual_seed(2)
    cond = torch.rand(4, 6, generator=gen) > 0.5
    _compare(program, [cond, torch.randn(4, 6, generator=gen), torch.randn(6, generator=gen)])


@interpreted
def test_large_blocks_and_half_precision():
    from gatedsl.kernels.gate_chain import reference, triton as kernels
    from test_kernels_gate_chain import Config, trace

    program = trace(CASES[0][1], 3)  # the GRU update over more than one block of 1024
    gen = torch.Generator().manual_seed(3)
    _compare(program, [torch.randn(3, 700, generator=gen) for _ in range(3)])
    # float16 operands computed in float32 and stored in float16: within float16's rounding (1e-3).
    halves = [torch.randn(4, 8, generator=gen).half() for _ in range(3)]
    got = kernels.gate_chain(Config(program), *halves)
    want = reference.gate_chain(Config(program), *[h.float() for h in halves])
    for a, b in zip(got, want):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), b, rtol=2e-3, atol=2e-3)


@interpreted
def test_each_program_and_layout_compiles_once():
    from gatedsl.kernels.gate_chain import triton as kernels
    from test_kernels_gate_chain import Config, trace

    config = Config(trace(CASES[2][1], 2))
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 3, generator=gen) for _ in range(2)]
    kernels.gate_chain(config, *xs)
    count = len(kernels._KERNELS)
    kernels.gate_chain(config, *[torch.randn(5, 7, generator=gen) for _ in range(2)])  # new sizes, same layouts
    assert len(kernels._KERNELS) == count
    kernels.gate_chain(config, xs[0], xs[1][:1])  # a broadcast operand: another layout, another kernel
    assert len(kernels._KERNELS) == count + 1


@interpreted
def test_triton_equals_the_reference_on_random_programs():
    from hypothesis import HealthCheck, given, settings

    from test_kernels_gate_chain import programs

    @settings(max_examples=RANDOM_PROGRAMS, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              database=None)
    @given(programs())
    def check(drawn):
        program, kinds, shapes = drawn
        gen = torch.Generator().manual_seed(len(program.steps))
        tensors = [(torch.rand(s, generator=gen) > 0.5) if k == "bool" else torch.randn(s, generator=gen)
                   for k, s in zip(kinds, shapes)]
        _compare(program, tensors)

    check()
