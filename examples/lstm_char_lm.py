"""Train a character-level LSTM language model on gatedsl's own documentation.

The text is examples/data/corpus.txt (the project's README, GATES.md, STYLE.md and
BENCHMARKS.md, about 20 KB; generated sentences if the file is missing), loaded by
examples/text_data.py. The model, examples/lstm_char_lm.gate, embeds characters, runs
std.layers' RNNStack of std.cells' LSTM over them, and predicts each next character. We train
on random windows of 90% of the text, report bits per character on the other 10% (every tenth
chunk of 1,000 characters; log2 of the alphabet size for a model that knows nothing), and let the
model write.

    python examples/lstm_char_lm.py            # about a minute on a laptop CPU
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

HERE = Path(__file__).resolve().parent
SPEC = HERE / "lstm_char_lm.gate"
sys.path.insert(0, str(HERE))  # the text and its helpers, shared by the language-model examples, beside this file
from text_data import CORPUS, continue_text, encode, every_window, load_text, random_windows, split_text  # noqa: E402


# ---------------------------------------------------------------- training
def main(steps: int = 400, d: int = 128, window: int = 64, batch: int = 32, lr: float = 4e-3,
         log_every: int = 100, generate: int = 200, seed: int = 0) -> dict[str, float]:
    """Train for `steps` Adam steps; returns the train and eval losses and the eval bits per character."""
    # The matrices here are small: one thread is fastest, and it leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(steps, d, window, batch, lr, log_every, generate, seed)
    finally:
        torch.set_num_threads(threads)


def train(steps: int, d: int, window: int, batch: int, lr: float, log_every: int, generate: int,
          seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    text, source = load_text(CORPUS)
    ids, alphabet = encode(text)
    train_ids, eval_ids = split_text(ids)
    print(f"{source}: {len(ids):,} characters, an alphabet of {len(alphabet)} "
          f"(uniform guessing: {math.log2(len(alphabet)):.2f} bits per character)")

    model = gatedsl.compile(SPEC, params={"vocab": len(alphabet), "d": d, "layers": 1, "cell": "LSTM"})
    report = model.meta["gatedsl_report"]
    print(f"{report.params:,} parameters; gates:", ", ".join(g.name for g in report.gates))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_on(w: torch.Tensor) -> torch.Tensor:
        # Read characters 0..T-1, predict 1..T: the LSTM only looks back, so each prediction sees the past.
        logits = model(w[:, :-1])
        return F.cross_entropy(logits.reshape(-1, len(alphabet)), w[:, 1:].reshape(-1))

    # The held-out text cut into windows of the training length, every character predicted once.
    eval_windows = every_window(eval_ids, window)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        loss = loss_on(eval_windows).item()
        model.train()
        return loss

    initial = evaluate()
    print(f"eval loss before training {initial:.3f} ({initial / math.log(2):.2f} bits per character)")
    for step in range(1, steps + 1):
        loss = loss_on(random_windows(train_ids, batch, window))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # recurrent nets occasionally spike
        optimizer.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  train loss {loss.item():.3f}  eval loss {evaluate():.3f}")
    final = evaluate()
    print(f"eval loss after training {final:.3f}: {final / math.log(2):.2f} bits per character "
          f"(from {initial / math.log(2):.2f})")
    if generate:
        prompt = "A gate "
        print(f"the model continues {prompt!r} (sampled at temperature 0.5):")
        written = continue_text(model, prompt, alphabet, generate, temperature=0.5, seed=seed)
        print("  " + repr(prompt + written))
    return {"initial_loss": initial, "final_loss": final, "train_loss": loss.item(),
            "bits_per_char": final / math.log(2)}


if __name__ == "__main__":
    main()
