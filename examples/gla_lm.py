"""Train a small character-level language model made of gated linear attention (GLA) layers.

GLA (Yang et al. 2024) replaces softmax attention by a recurrence with a matrix state per head,
S_t = diag(α_t) S_{t−1} + k_tᵀ v_t, read out by o_t = q_t S_t, where the forget gate α_t is
computed from the input. examples/gla_lm.gate stacks GLA token mixers (std.linear_rnn) and
SwiGLU MLPs (std.mlp). The text is examples/data/corpus.txt (the project's own prose) when it is
there, else generated sentences (examples/text_data.py loads it). We train on random windows of
90% of the text, report bits per character and next-character accuracy on the other 10%, and let
the model write.

    python examples/gla_lm.py            # under a minute on a laptop CPU
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

HERE = Path(__file__).resolve().parent
SPEC = HERE / "gla_lm.gate"
sys.path.insert(0, str(HERE))  # the text and its helpers, shared by the language-model examples, beside this file
from text_data import CORPUS, continue_text, encode, every_window, load_text, random_windows, split_text  # noqa: E402


# ---------------------------------------------------------------- training
def main(steps: int = 300, d: int = 48, layers: int = 2, heads: int = 2, window: int = 64, batch: int = 32,
         lr: float = 5e-3, log_every: int = 50, generate: int = 120, seed: int = 0) -> dict[str, float]:
    """Train for `steps` Adam steps; returns the eval loss before and after, bits per character and accuracy."""
    # The matrices here are small: one thread is fastest, and it leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(steps, d, layers, heads, window, batch, lr, log_every, generate, seed)
    finally:
        torch.set_num_threads(threads)


def train(steps: int, d: int, layers: int, heads: int, window: int, batch: int, lr: float, log_every: int,
          generate: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    text, source = load_text(CORPUS)
    ids, alphabet = encode(text)
    train_ids, eval_ids = split_text(ids)
    print(f"{source}: {len(ids):,} characters, an alphabet of {len(alphabet)} "
          f"(uniform guessing: {math.log2(len(alphabet)):.2f} bits per character)")

    model = gatedsl.compile(SPEC, params={"vocab": len(alphabet), "d": d, "layers": layers, "heads": heads})
    report = model.meta["gatedsl_report"]
    print(f"{report.params:,} parameters; gates:", ", ".join(f"{g.name} ({g.kind})" for g in report.gates))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)

    def logits_and_targets(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Read characters 0..T-1, predict 1..T: GLA's recurrence only looks back.
        return model(w[:, :-1]).reshape(-1, len(alphabet)), w[:, 1:].reshape(-1)

    # The held-out text cut into windows of the training length, every character predicted once.
    eval_windows = every_window(eval_ids, window)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        logits, targets = logits_and_targets(eval_windows)
        model.train()
        return F.cross_entropy(logits, targets).item(), (logits.argmax(-1) == targets).float().mean().item()

    initial, _ = evaluate()
    print(f"eval loss before training {initial:.3f} ({initial / math.log(2):.2f} bits per character)")
    for step in range(1, steps + 1):
        loss = F.cross_entropy(*logits_and_targets(random_windows(train_ids, batch, window)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  train loss {loss.item():.3f}")
    final, accuracy = evaluate()
    print(f"eval loss after training {final:.3f}: {final / math.log(2):.2f} bits per character "
          f"(from {initial / math.log(2):.2f}); next-character accuracy {accuracy:.1%}")
    if generate:
        prompt = "A gate "
        print(f"greedy continuation of {prompt!r}:")
        print("  " + repr(prompt + continue_text(model, prompt, alphabet, generate, window, temperature=0)))
    return {"initial_loss": initial, "final_loss": final, "train_loss": loss.item(),
            "bits_per_char": final / math.log(2), "accuracy": accuracy}


if __name__ == "__main__":
    main()
