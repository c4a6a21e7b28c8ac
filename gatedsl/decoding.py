"""Incremental decoding: a compiled model causal along its sequence axis, run a few positions per call with its state carried.

    decoder = gatedsl.Decoder(model)                       # shares the model's weights
    logits, state = decoder.prefill(prompt)                # the prompt's outputs, and the state after it
    logits, state = decoder.step(next_tokens, state=state)  # the next positions' outputs, and a new state

The compiler derives the state from the spec (gatedsl/passes/derive_decoding.py): scans carry their cells'
states, linear recurrences their state, causal attentions a key/value cache, causal convolutions their last
window, cumulative sums their total, rotary embeddings the positions' numbers. A spec that is not causal
along the axis is a SpecError at the first construct that prevents it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from gatedsl.backend.decode_emit import emit_decoder
from gatedsl.backend.decode_runtime import DecodeCall
from gatedsl.backend.decode_state import DecodeState, Entry
from gatedsl.backend.fx_emit import build_module_tree, parent_module
from gatedsl.ir.graph import Graph
from gatedsl.passes.derive_decoding import DecodePlan, derive_decoding

__all__ = ["Decoder", "DecodeState", "Entry"]


class Decoder(nn.Module):
    """Decodes `model` (a module from gatedsl.compile) along its symbolic sequence axis `seq`.

    It holds the model as a sub-module and reads its parameters, so training the model, moving it
    (`decoder.to(...)` or `model.to(...)`) or switching it to eval applies here too.
    """

    def __init__(self, model: nn.Module, seq: str = "T"):
        super().__init__()
        graph = getattr(model, "_ir", None)
        if not isinstance(graph, Graph):
            raise TypeError(f"Decoder takes a model from gatedsl.compile, got {type(model).__name__}")
        self.model = model
        self.seq = seq
        self.plan: DecodePlan = derive_decoding(graph, seq)
        root = _sharing(model, graph)
        # Not a sub-module: its parameters are the model's, which state_dict() already lists once.
        object.__setattr__(self, "_run", emit_decoder(graph, self.plan, root))
        self.inputs = [name for name, _ in graph.inputs]
        self.outputs = [name for name, _ in graph.outputs]

    def prefill(self, *inputs: torch.Tensor, **named: torch.Tensor) -> tuple[Any, DecodeState]:
        """The outputs for a prompt (each input with its whole sequence axis), and the state after its last position."""
        return self._call(None, inputs, named)

    def step(self, *inputs: torch.Tensor, state: DecodeState, **named: torch.Tensor) -> tuple[Any, DecodeState]:
        """The outputs at the next positions (each input holding just those), and the state after them; `state` is
        left as it was."""
        if not isinstance(state, DecodeState):
            raise TypeError(f"step takes the state a prefill or step returned, got {type(state).__name__}")
        return self._call(state, inputs, named)

    forward = prefill

    def __reduce__(self):  # pickled and copied as the model and the axis: the step graph is derived again
        return (Decoder, (self.model, self.seq))

    def __deepcopy__(self, memo):
        return Decoder(copy.deepcopy(self.model, memo), self.seq)

    def _call(self, state: DecodeState | None, inputs, named) -> tuple[Any, DecodeState]:
        args = self._arguments(inputs, named)
        steps = self._steps(args)
        rows = self._rows(args)
        if state is not None and state.batch_size != rows:
            raise ValueError(f"the state has {state.batch_size} rows but the inputs have {rows}")
        call = DecodeCall(state, rows, steps)
        out = self._run(call, *args)
        device = args[0].device
        before = state.position if state is not None else torch.zeros(rows, dtype=torch.long, device=device)
        after = DecodeState(before + steps, call.left)
        return (out[0] if len(out) == 1 else out), after

    def _arguments(self, inputs, named) -> list[torch.Tensor]:
        if len(inputs) > len(self.inputs):
            raise TypeError(f"the model takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(inputs)}")
        given = dict(zip(self.inputs, inputs))
        for name, value in named.items():
            if name not in self.inputs:
                raise TypeError(f"the model has no input {name!r} (its inputs: {', '.join(self.inputs)})")
            if name in given:
                raise TypeError(f"input {name!r} given twice")
            given[name] = value
        missing = [n for n in self.inputs if n not in given]
        if missing:
            raise TypeError(f"missing input{'s' * (len(missing) > 1)}: {', '.join(missing)}")
        return [given[n] for n in self.inputs]

    def _steps(self, args: list[torch.Tensor]) -> int:
        lengths = {name: t.shape[axis] for (name, axis), t in zip(self.plan.input_axes.items(), args)
                   if axis is not None and t.dim() > axis}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the inputs along {self.seq} must have one length, got "
                             + ", ".join(f"{n}: {v}" for n, v in lengths.items()))
        steps = next(iter(lengths.values()))
        if steps < 1:
            raise ValueError(f"a call decodes at least one position along {self.seq}, got {steps}")
        return steps

    def _rows(self, args: list[torch.Tensor]) -> int:
        if self.plan.batch is None:
            return 1
        return int(args[0].shape[0]) if args[0].dim() else 1


def _sharing(model: nn.Module, graph: Graph) -> nn.Module:
    """A module tree holding `model`'s own parameter and dropout objects at their spec paths (so the decoder sees
    every update), into which the decoding graph's cells are emitted without touching the model."""
    root = build_module_tree([], [])
    for spec in graph.all_params():
        parent, leaf = parent_module(root, spec.path)
        parent.register_parameter(leaf, model.get_parameter(spec.path))
    for spec in graph.all_modules():
        parent, leaf = parent_module(root, spec.path)
        parent.add_module(leaf, model.get_submodule(spec.path))
    return root

