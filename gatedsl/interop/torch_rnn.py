"""Port weights between torch's built-in recurrent layers and compiled gatedsl modules."""

from __future__ import annotations

from torch import fx, nn

from gatedsl.backend import runtime
from gatedsl.interop.mapping import Mapping, fill, load_state_dict, split

# The gate order of torch's fused weight matrices, and the statement of the std cell
# (specs/std/cells.gate) that holds each gate's projections.
TORCH_GATES = {"GRU": ("r", "z", "n"), "LSTM": ("i", "f", "g", "o")}


def scanned_cells(module: fx.GraphModule) -> list[tuple[str, str, bool]]:
    """The cells `module` scans, in program order, as (submodule path, cell name, reversed)."""
    found = []
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in (runtime.scan, runtime.native_rnn):  # the same arguments 0 and 4
            cell_node, reverse = node.args[0], node.args[4]
            cell = module.get_submodule(cell_node.target)
            found.append((cell_node.target, type(cell).__name__, bool(reverse)))
    return found


def load_torch_rnn(module: fx.GraphModule, torch_rnn: nn.GRU | nn.LSTM, *,
                   scans: list[str] | None = None) -> list[str]:
    """Copy the weights of a torch.nn.GRU or torch.nn.LSTM into the std GRU / LSTM cells that `module` scans.

    `module` is a compiled spec whose recurrences are `scan GRU(...)` or `scan LSTM(...)`
    with the cells of `std.cells` (specs/gru.gate, specs/lstm.gate, or any model built
    on them). Torch's layer k, direction 0 and 1, is matched with the k-th pair of scans
    of that cell in program order (one scan per layer when not bidirectional); a
    direction-1 (`_reverse`) layer must be a `reverse` scan. Pass `scans` — the submodule
    paths of the scanned cells, in torch's order l0, l0_reverse, l1, ... — to choose
    them explicitly.

    Torch packs each layer's gates in one matrix, rows in the order r, z, n (GRU) or
    i, f, g, o (LSTM); gate `q`'s rows of weight_ih_l{k} go to `q.x_proj.weight`, of
    weight_hh_l{k} to `q.h_proj.weight`, and likewise bias_ih / bias_hh to the biases
    (zeros when the torch layer has bias=False). `batch_first` is a property of the
    inputs, not the weights: the std-cell specs take [B, T, D] as batch_first=True does.

    This is `load_state_dict` with the mapping `torch_rnn_mapping` makes, loading only the
    cells (`partial`). Returns the names of the parameters written. Raises ValueError
    (MappingError for sizes) when the layer does not fit: another kind of cell, another
    number of layers, or other sizes; then nothing is written.
    """
    kind = "GRU" if isinstance(torch_rnn, nn.GRU) else "LSTM" if isinstance(torch_rnn, nn.LSTM) else None
    if kind is None:
        raise TypeError(f"load_torch_rnn takes a torch.nn.GRU or torch.nn.LSTM, got {type(torch_rnn).__name__}")
    if kind == "LSTM" and torch_rnn.proj_size:
        raise ValueError("an LSTM with proj_size > 0 has no std-cell equivalent")
    directions = 2 if torch_rnn.bidirectional else 1
    wanted = torch_rnn.num_layers * directions
    if scans is None:
        found = [(path, reverse) for path, cell, reverse in scanned_cells(module) if cell == kind]
        if len(found) != wanted:
            raise ValueError(f"the torch {kind} has {torch_rnn.num_layers} layer(s) x {directions} direction(s) = "
                             f"{wanted} cells, but the module scans {len(found)} {kind} cell(s): "
                             f"{[p for p, _ in found]}")
        for i, (path, reverse) in enumerate(found):
            if reverse != (i % directions == 1):
                side = "a reversed" if reverse else "a forward"
                raise ValueError(f"{path} is {side} scan, but torch's {_suffix(i // directions, i % directions)} "
                                 f"runs {'backward' if i % directions else 'forward'}")
        scans = [path for path, _ in found]
    elif len(scans) != wanted:
        raise ValueError(f"the torch {kind} needs {wanted} scanned cells, got {len(scans)} paths")

    mapping = torch_rnn_mapping(kind, scans, directions, bias=torch_rnn.bias)
    return load_state_dict(module, torch_rnn.state_dict(), mapping, partial=True)


def torch_rnn_mapping(kind: str, scans: list[str], directions: int = 1, bias: bool = True) -> Mapping:
    """How a torch.nn.GRU's or LSTM's state dict maps onto the std cells at `scans` (in torch's layer order)."""
    gates = TORCH_GATES[kind]
    rules = []
    for i, path in enumerate(scans):
        suffix = _suffix(i // directions, i % directions)
        for side in ("x", "h"):
            torch_side = "ih" if side == "x" else "hh"
            rules.append(split(f"weight_{torch_side}{suffix}", [f"{gate}.{side}_proj.weight" for gate in gates]))
            biases = [f"{gate}.{side}_proj.bias" for gate in gates]
            rules.append(split(f"bias_{torch_side}{suffix}", biases) if bias else fill(biases, 0.0))
        rules[-4:] = [rule.under(path, "") for rule in rules[-4:]]
    return Mapping(rules)


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")
