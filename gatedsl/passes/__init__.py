"""The compiler's passes, in the order they run: this list is the table of contents."""

from gatedsl.passes.check_budgets import check_budgets
from gatedsl.passes.chunk_delta_rule import chunk_delta_rule
from gatedsl.passes.count_flops import count_flops
from gatedsl.passes.count_params import count_params
from gatedsl.passes.derive_decoding import derive_decoding
from gatedsl.passes.elaborate import elaborate
from gatedsl.passes.fuse_gate_chains import fuse_gate_chains
from gatedsl.passes.fuse_projections import fuse_projections
from gatedsl.passes.lower_recurrences import lower_recurrences
from gatedsl.passes.native_rnn import native_rnn
from gatedsl.passes.parallel_scan import parallel_scan
from gatedsl.passes.route_experts import route_experts
from gatedsl.passes.select_kernels import select_kernels
from gatedsl.passes.verify_graph import verify_graph

PIPELINE = [
    elaborate,  # spec AST -> graph IR, every shape inferred as its op is built
    verify_graph,  # every node well-formed, every recorded type re-derivable
    count_params,  # learned elements per block; reject a model over the limit before allocation
    count_flops,  # FLOPs as a polynomial in the symbolic sizes
    check_budgets,  # model-level `require`s on param_count() and flop_count(...) hold
    # Optimisations, each from the -O level OPTIMIZATIONS gives; they rewrite the graph the backend
    # reads, never what the passes above reported (shapes, gates, counts) nor a learned tensor's path.
    native_rnn,  # a scan of exactly torch's GRU or LSTM runs on torch's fused kernel
    lower_recurrences,  # other scan bodies: input projections hoisted out of the loop, one product for all steps
    parallel_scan,  # a scan linear in its state (S = a ⊙ S + b: GLA, RetNet, HGRN, Mamba) becomes one linear_scan
    chunk_delta_rule,  # a scan of the (gated) delta rule becomes one delta_rule_scan, run in chunks (WY form)
    route_experts,  # a mixture of row-wise experts over a gate: one moe_dispatch, dense or each expert on its tokens
    fuse_projections,  # linear ops reading one tensor: one projection_group (in a scan, weights concatenated once per call)
    fuse_gate_chains,  # chains of element-wise gate math (σ, tanh, products, 1 − z, lerps) become one gate_chain op
    select_kernels,  # every fused op and scan gets its implementation for the target, with the reason
    verify_graph,  # the rewritten graph is as well-formed as the elaborated one
]

# Not part of compiling: gatedsl.Decoder runs it on a compiled model's graph to find what each op carries from one
# decoding call to the next, or the first construct that is not causal along the sequence axis.
DECODING = derive_decoding

OPTIMIZATIONS = {  # optimisation pass -> the least opt level (-O) at which it runs; every other pass always runs
    lower_recurrences: 1,
    native_rnn: 2,
    parallel_scan: 2,
    chunk_delta_rule: 2,
    route_experts: 2,
    fuse_gate_chains: 2,
    fuse_projections: 2,
}

MAX_OPT_LEVEL = 2

# Passes that leave fused ops, which run through gatedsl's kernel registry: a standalone export
# (`gatedsl compile -o`, needing only torch) is compiled without them.
MAKES_FUSED_OPS: set = {route_experts, fuse_gate_chains, parallel_scan, chunk_delta_rule, fuse_projections}


def run_pipeline(unit):
    for compiler_pass in PIPELINE:
        if OPTIMIZATIONS.get(compiler_pass, 0) <= unit.opt_level and not (
                unit.standalone and compiler_pass in MAKES_FUSED_OPS):
            unit = compiler_pass(unit)
    return unit
