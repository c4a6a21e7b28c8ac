"""Train the SwiGLU transformer of examples/swiglu_transformer.gate as a character-level language model.

The text is examples/data/corpus.txt (gatedsl's own documentation) where it exists, and
otherwise a generated one, so the example always runs (examples/text_data.py loads it). The
model reads a window of characters and predicts, at every position, the next one; the loss is
the cross-entropy in nats per character, measured on a tenth of the text that it never trains on.
Then it writes a sample, decoded a character at a time with its attention's key/value cache; it
has learned `context` positions, so the prompt and the sample together fill one window.

    python examples/swiglu_transformer.py            # under half a minute on a laptop CPU
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

HERE = Path(__file__).resolve().parent
SPEC = HERE / "swiglu_transformer.gate"
sys.path.insert(0, str(HERE))  # the text and its helpers, shared by the language-model examples, beside this file
from text_data import (CORPUS, continue_text, decode, encode, every_window, load_text,  # noqa: E402
                       random_windows, split_text)


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


def train_language_model(model, ids: torch.Tensor, context: int, steps: int, batch: int, lr: float,
                         log_every: int, seed: int) -> dict[str, float]:
    """AdamW on random windows of 90% of `ids`; the eval loss is on the other 10%. Returns both losses."""
    train_ids, eval_ids = split_text(ids)
    eval_windows = every_window(eval_ids, context)
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


def text_and_model(spec: Path, context: int, d: int, layers: int, heads: int):
    """The text as ids, its alphabet, and `spec` compiled for that alphabet; prints what it loaded."""
    text, source = load_text(CORPUS)
    ids, alphabet = encode(text)
    print(f"text: {source}, {len(text):,} characters, {len(alphabet)} distinct")
    model = gatedsl.compile(spec, params=dict(vocab=len(alphabet), context=context, d=d, layers=layers, heads=heads))
    report = model.meta["gatedsl_report"]
    print(f"{report.params:,} parameters; gates:", ", ".join(f"{g.name} ({g.kind})" for g in report.gates))
    return model, ids, alphabet


def main(steps: int = 400, context: int = 64, d: int = 64, layers: int = 2, heads: int = 4, batch: int = 32,
         lr: float = 3e-3, log_every: int = 50, seed: int = 0) -> dict[str, float]:
    """Train for `steps` AdamW steps; returns the eval loss before and after, and the last train loss."""
    # The matrices here are small: one thread is fastest on a busy machine, and leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model, ids, alphabet = text_and_model(SPEC, context, d, layers, heads)
        result = train_language_model(model, ids, context, steps, batch, lr, log_every, seed)
        prompt = decode(split_text(ids)[1][:context // 4], alphabet)  # the start of the held-out text
        # Decoded one character at a time; the learned positions end at `context`, and so does the text.
        print("sample:", repr(continue_text(model, prompt, alphabet, context - len(prompt), temperature=1, seed=seed)))
        return result
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
