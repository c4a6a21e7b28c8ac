"""Train the gated-attention transformer of examples/gated_attention_transformer.gate as a character-level language model.

The same data (from examples/text_data.py), training and evaluation (imported from
examples/swiglu_transformer.py) as the SwiGLU example, with std.attention's gated_attention
in place of plain causal attention: each head's output is multiplied element-wise by a
sigmoid gate σ(x W_θ) computed from the layer's input (Qiu et al. 2025). After training we
run the model once more and print the mean value of every gate, to see how much each layer
lets through.

    python examples/gated_attention_transformer.py   # under half a minute on a laptop CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import gatedsl
import torch.fx

HERE = Path(__file__).resolve().parent
SPEC = HERE / "gated_attention_transformer.gate"
sys.path.insert(0, str(HERE))  # the shared text helpers and the SwiGLU example's set-up and training loop, beside this file
from swiglu_transformer import text_and_model, train_language_model  # noqa: E402
from text_data import continue_text, decode, every_window, split_text  # noqa: E402


class GateProbe(torch.fx.Interpreter):
    """Runs a compiled model node by node and keeps the output of every sigmoid: in this model, exactly the
    attention gates (the SwiGLU gates are SiLUs)."""

    def __init__(self, model):
        super().__init__(model)
        self.values: list[torch.Tensor] = []

    def run_node(self, node):
        out = super().run_node(node)
        if node.op == "call_function" and node.target is torch.sigmoid:
            self.values.append(out)
        return out


@torch.no_grad()
def gate_means(model, windows: torch.Tensor) -> dict[str, float]:
    """The mean of every sigmoid gate over `windows`, by the gate's name in the spec."""
    names = [g.name for g in model.meta["gatedsl_report"].gates if g.kind == "sigmoid"]
    # Read the gates off an -O0 twin with the same weights: there every spec statement is its own
    # node, while -O2 fuses the gate math into larger ops (the same function, the same state dict).
    twin = gatedsl.compile(SPEC, params=model.meta["gatedsl"]["parameters"], opt_level=0)
    twin.load_state_dict(model.state_dict(), assign=True)  # the model's own tensors: its dtype, no copy
    twin.train(model.training)
    probe = GateProbe(twin)
    probe.run(windows[:, :-1])
    assert len(probe.values) == len(names), "every sigmoid in this model is a gate"
    return {name: value.mean().item() for name, value in zip(names, probe.values)}


def main(steps: int = 400, context: int = 64, d: int = 64, layers: int = 2, heads: int = 4, batch: int = 32,
         lr: float = 3e-3, log_every: int = 50, seed: int = 0) -> dict[str, float]:
    """Train for `steps` AdamW steps; returns the eval loss before and after, the last train loss and the gate means."""
    # The matrices here are small: one thread is fastest on a busy machine, and leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model, ids, alphabet = text_and_model(SPEC, context, d, layers, heads)
        held_out = split_text(ids)[1]
        eval_windows = every_window(held_out, context)
        before = gate_means(model, eval_windows)
        result = train_language_model(model, ids, context, steps, batch, lr, log_every, seed)
        after = gate_means(model, eval_windows)
        for name in after:
            print(f"mean gate {name}: {before[name]:.3f} before training, {after[name]:.3f} after")
        prompt = decode(held_out[:context // 4], alphabet)  # the start of the held-out text
        # Decoded one character at a time; the learned positions end at `context`, and so does the text.
        print("sample:", repr(continue_text(model, prompt, alphabet, context - len(prompt), temperature=1, seed=seed)))
        return {**result, "gate_means": after}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
