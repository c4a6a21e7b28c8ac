"""The compiler's passes, in the order they run: this list is the table of contents."""

from gatedsl.passes.count_flops import count_flops
from gatedsl.passes.count_params import count_params
from gatedsl.passes.elaborate import elaborate
from gatedsl.passes.verify_graph import verify_graph

PIPELINE = [
    elaborate,  # spec AST -> graph IR, every shape inferred as its op is built
    verify_graph,  # every node well-formed, every recorded type re-derivable
    count_params,  # learned elements per block; reject a model over the limit before allocation
    count_flops,  # FLOPs as a polynomial in the symbolic sizes
    # Optimisation passes (gate fusion, recurrence lowering, kernel selection) slot in here;
    # the backend reads only the graph, so each can rewrite it.
]


def run_pipeline(unit):
    for compiler_pass in PIPELINE:
        unit = compiler_pass(unit)
    return unit
