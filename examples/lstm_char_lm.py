"""Train a character-level LSTM language model on gatedsl's own documentation.

The text is examples/data/corpus.txt (the project's README, GATES.md, STYLE.md and
BENCHMARKS.md, about 20 KB). The model, examples/lstm_char_lm.gate, embeds characters, runs
std.layers' RNNStack of std.cells' LSTM over them, and predicts each next character. We train
on random windows of 90% of the text, report bits per character on the other 10% (every tenth
chunk of 1,000 characters; log2 of the alphabet size for a model that knows nothing), and let the
model write.

    python examples/lstm_char_lm.py            # about a minute on a laptop CPU
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

HERE = Path(__file__).resolve().parent
SPEC = HERE / "lstm_char_lm.gate"
CORPUS = HERE / "data" / "corpus.txt"


# ------------------------------------------------------------------ the data
def load_text() -> tuple[torch.Tensor, list[str]]:
    """The corpus as character ids, and the alphabet (id -> character)."""
    text = CORPUS.read_text(encoding="utf-8")
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text]), alphabet


def split_text(ids: torch.Tensor, chunk: int = 1000, every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out every `every`-th chunk of `chunk` characters for evaluation, so both parts sample every file."""
    pieces = ids.split(chunk)
    held_out = [i % every == every - 1 for i in range(len(pieces))]
    return (torch.cat([p for p, h in zip(pieces, held_out) if not h]),
            torch.cat([p for p, h in zip(pieces, held_out) if h]))


def random_windows(ids: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` random windows of `length + 1` consecutive ids: [count, length + 1]."""
    starts = torch.randint(len(ids) - length - 1, (count,))
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()])


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
    ids, alphabet = load_text()
    train_ids, eval_ids = split_text(ids)
    print(f"{len(ids):,} characters, an alphabet of {len(alphabet)} "
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
    eval_windows = eval_ids[: (len(eval_ids) - 1) // window * window + 1]
    eval_windows = eval_windows.unfold(0, window + 1, window)

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
        print("the model continues 'A gate ' (sampled at temperature 0.5):")
        print("  " + repr(continue_text(model, "A gate ", alphabet, generate, window, seed=seed)))
    return {"initial_loss": initial, "final_loss": final, "train_loss": loss.item(),
            "bits_per_char": final / math.log(2)}


@torch.no_grad()
def continue_text(model, prompt: str, alphabet: list[str], length: int, context: int, temperature: float = 0.5,
                  seed: int = 0) -> str:
    """Sample `length` characters one at a time from softmax(logits / temperature), reading at most `context`
    characters back (temperature 0 is greedy: always the most likely character)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    index = {c: i for i, c in enumerate(alphabet)}
    ids = [index[c] for c in prompt]
    for _ in range(length):
        logits = model(torch.tensor([ids[-context:]]))[0, -1]
        if temperature == 0:
            ids.append(int(logits.argmax()))
        else:
            ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)))
    model.train()
    return "".join(alphabet[i] for i in ids)


if __name__ == "__main__":
    main()
