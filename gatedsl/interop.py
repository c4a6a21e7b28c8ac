"""Port weights between torch's built-in recurrent layers and compiled gatedsl modules."""

from __future__ import annotations

import torch
from torch import fx, nn

from gatedsl.backend import runtime

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

    Returns the names of the parameters written. Raises ValueError when the layer does
    not fit: another kind of cell, another number of layers, or other sizes.
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

    gates = TORCH_GATES[kind]
    source = dict(torch_rnn.named_parameters())
    written = []
    with torch.no_grad():
        for i, path in enumerate(scans):
            suffix = _suffix(i // directions, i % directions)
            for torch_name, side in (("weight_ih", "x"), ("weight_hh", "h"), ("bias_ih", "x"), ("bias_hh", "h")):
                packed = source.get(torch_name + suffix)  # None for the biases of a bias=False layer
                blocks = packed.chunk(len(gates), dim=0) if packed is not None else [None] * len(gates)
                leaf = "weight" if torch_name.startswith("weight") else "bias"
                for gate, rows in zip(gates, blocks):
                    name = f"{path}.{gate}.{side}_proj.{leaf}"
                    try:
                        target = module.get_parameter(name)
                    except AttributeError:
                        raise ValueError(f"the module has no parameter {name}: is {path} a std.cells {kind}?") from None
                    if rows is None:
                        target.zero_()
                    elif target.shape != rows.shape:
                        raise ValueError(f"{name} is {list(target.shape)}, but torch's {torch_name + suffix} gives "
                                         f"{list(rows.shape)} per gate")
                    else:
                        target.copy_(rows)
                    written.append(name)
    return written


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")
