"""The compiler's passes, in the order they run: this list is the table of contents."""

from gatedsl.passes.count_flops import count_flops
from gatedsl.passes.count_params import count_params
from gatedsl.passes.elaborate import elaborate
from gatedsl.passes.lower_recurrences import lower_recurrences
from gatedsl.passes.native_rnn import native_rnn
from gatedsl.passes.select_kernels import select_kernels
from gatedsl.passes.verify_graph import verify_graph

PIPELINE = [
    elaborate,  # spec AST -> graph IR, every shape inferred as its op is built
    verify_graph,  # every node well-formed, every recorded type re-derivable
    count_params,  # learned elements per block; reject a model over the limit before allocation
    count_flops,  # FLOPs as a polynomial in the symbolic sizes
    # Optimisations, each from the -O level OPTIMIZATIONS gives; they rewrite the graph the backend
    # reads, never what the passes above reported (shapes, gates, counts) nor a learned tensor's path.
    native_rnn,  # a scan of exactly torch's GRU or LSTM runs on torch's fused kernel
    lower_recurrences,  # other scan bodies: input projections hoisted out of the loop, one product for all steps
    select_kernels,  # every fused op and scan gets its implementation for the target, with the reason
    verify_graph,  # the rewritten graph is as well-formed as the elaborated one
]

OPTIMIZATIONS = {  # optimisation pass -> the least opt level (-O) at which it runs; every other pass always runs
    lower_recurrences: 1,
    native_rnn: 2,
}

MAX_OPT_LEVEL = 2


def run_pipeline(unit):
    for compiler_pass in PIPELINE:
        if OPTIMIZATIONS.get(compiler_pass, 0) <= unit.opt_level:
            unit = compiler_pass(unit)
    return unit
