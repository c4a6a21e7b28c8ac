"""Train the SwiGLU transformer of examples/swiglu_transformer.gate as a character-level language model.

The text is examples/data/corpus.txt (gatedsl's own documentation) where it exists, and
otherwise a generated one, so the example always runs. The model reads a window of
characters and predicts, at every position, the next one; the loss is the cross-entropy
in nats per character, measured on a tenth of the text that it never trains on.

    python examples/swiglu_transformer.py            # under half a minute on a laptop CPU
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

HERE = Path(__file__).resolve().parent
SPEC = HERE / "swiglu_transformer.gate"
CORPUS = HERE / "data" / "corpus.txt"


# ------------------------------------------------------------------ the data
def generated_text(sentences: int = 3000, seed: int = 0) -> str:
    """Simple sentences from a small grammar, the fallback when the corpus is missing."""
    rng = random.Random(seed)
    subjects = ["the gate", "a cell", "the model", "every layer", "the state", "a signal", "the input"]
    verbs = ["opens", "closes", "carries", "forgets", "keeps", "mixes", "scales", "passes"]
    objects = ["the memory", "a value", "the residual", "each feature", "the past", "its input", "the output"]
    endings = [".", " slowly.", " at once.", " over time.", " when asked."]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
                    for _ in range(sentences))


def load_text() -> tuple[str, str]:
    """The text to learn and where it came from."""
    if CORPUS.is_file():
        return CORPUS.read_text(encoding="utf-8"), str(CORPUS.relative_to(HERE.parent))
    return generated_text(), "generated sentences (examples/data/corpus.txt is missing)"


def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    """Characters as integer ids, and the alphabet (id -> character)."""
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text]), alphabet


def random_windows(ids: torch.Tensor, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random windows of `length + 1` consecutive ids: inputs are [:, :-1], targets [:, 1:]."""
    starts = torch.randint(len(ids) - length, (count,), generator=gen)
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()])


def every_window(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows covering `ids`, for a deterministic evaluation."""
    count = (len(ids) - 1) // length
    return torch.stack([ids[i * length:i * length + length + 1] for i in range(count)])


def split_text(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the text into pieces of 16 windows and hold out every tenth piece: the training text (the rest, joined)
    and the evaluation windows. Held-out pieces from all over the text keep both parts alike."""
    piece = 16 * context + 1
    pieces = list(ids.split(piece))
    held_out = [p for i, p in enumerate(pieces) if i % 10 == 9 and len(p) > context]
    train = torch.cat([p for i, p in enumerate(pieces) if i % 10 != 9])
    return train, torch.cat([every_window(p, context) for p in held_out])


# ---------------------------------------------------------------- training
def next_char_loss(model, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor) -> float:
    model.eval()
    loss = next_char_loss(model, windows).item()
    model.train()
    return loss


@torch.no_grad()
def sample(model, prompt: torch.Tensor, alphabet: list[str], length: int, gen: torch.Generator) -> str:
    """Continue `prompt` (one window of ids) by `length` characters, sampling from the model."""
    model.eval()
    window, out = prompt.clone(), []
    for _ in range(length):
        probs = torch.softmax(model(window[None])[0, -1], dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        out.append(alphabet[nxt.item()])
        window = torch.cat([window[1:], nxt])
    model.train()
    return "".join(out)


def train_language_model(model, ids: torch.Tensor, context: int, steps: int, batch: int, lr: float,
                         log_every: int, seed: int) -> dict[str, float]:
    """AdamW on random windows of 90% of `ids`; the eval loss is on the other 10%. Returns both losses."""
    train_ids, eval_windows = split_text(ids, context)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    initial = evaluate(model, eval_windows)
    print(f"eval loss before training {initial:.3f} nats/char")
    for step in range(1, steps + 1):
        loss = next_char_loss(model, random_windows(train_ids, batch, context, gen))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  train loss {loss.item():.3f}  eval loss {evaluate(model, eval_windows):.3f}")
    final = evaluate(model, eval_windows)
    print(f"eval loss after training {final:.3f} nats/char (from {initial:.3f}; a uniform guess scores "
          f"{math.log(model.meta['gatedsl_report'].parameters['vocab']):.3f})")
    assert final < initial, "the loss did not fall"
    return {"initial_loss": initial, "final_loss": final, "train_loss": loss.item()}


def main(steps: int = 400, context: int = 64, d: int = 64, layers: int = 2, heads: int = 4, batch: int = 32,
         lr: float = 3e-3, log_every: int = 50, seed: int = 0) -> dict[str, float]:
    """Train for `steps` AdamW steps; returns the eval loss before and after, and the last train loss."""
    # The matrices here are small: one thread is fastest on a busy machine, and leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        text, source = load_text()
        ids, alphabet = encode(text)
        print(f"text: {source}, {len(text):,} characters, {len(alphabet)} distinct")
        model = gatedsl.compile(SPEC, params=dict(vocab=len(alphabet), context=context, d=d, layers=layers,
                                                  heads=heads))
        report = model.meta["gatedsl_report"]
        print(f"{report.params:,} parameters; gates:", ", ".join(f"{g.name} ({g.kind})" for g in report.gates))
        result = train_language_model(model, ids, context, steps, batch, lr, log_every, seed)
        prompt = split_text(ids, context)[1][0, 1:]  # the start of the held-out text
        print("sample:", repr(sample(model, prompt, alphabet, 80, torch.Generator().manual_seed(seed))))
        return result
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
