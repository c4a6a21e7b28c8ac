"""Train a small Mamba-style model on selective copying, the task that motivates Mamba's selection.

Selective copying (Gu & Dao 2023, section 3.1): a few data tokens sit at random positions among
noise tokens; after them come "go" markers, and at each marker the model must output the data
tokens, in order. A time-invariant recurrence (fixed decay, like a plain linear RNN or a
convolution) cannot do this well, because what to keep depends on what the token is; Mamba's Δ,
B and C are computed from the input, so it can write data tokens into its state and skip noise.

examples/mamba_model.gate stacks Mamba blocks from std.linear_rnn. We train on freshly sampled
sequences, with the loss on the answer positions only, and report the fraction of data tokens
recalled correctly on held-out sequences.

    python examples/mamba_model.py            # under a minute on a laptop CPU
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

SPEC = Path(__file__).resolve().parent / "mamba_model.gate"
NOISE, GO = 0, 1  # token ids; data tokens are 2, 3, ...


# ------------------------------------------------------------------ the data
def selective_copying(count: int, context: int, copies: int, symbols: int,
                      gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` sequences [context noise/data tokens, `copies` GO markers] and their answers [count, copies].

    Each sequence holds `copies` data tokens (drawn from `symbols` kinds) at random positions
    among the first `context`; the answer is those tokens in order of position.
    """
    data = torch.randint(2, 2 + symbols, (count, copies), generator=gen)
    positions = torch.rand(count, context, generator=gen).argsort(-1)[:, :copies].sort(-1).values
    tokens = torch.full((count, context + copies), NOISE)
    tokens.scatter_(1, positions, data)
    tokens[:, context:] = GO
    return tokens, data


# ---------------------------------------------------------------- training
def main(steps: int = 400, context: int = 16, copies: int = 4, symbols: int = 8, d: int = 32, layers: int = 2,
         batch: int = 64, lr: float = 3e-3, log_every: int = 50, seed: int = 0) -> dict[str, float]:
    """Train for `steps` Adam steps; returns the eval loss before and after and the recall accuracy."""
    # The matrices here are small: one thread is fastest, and it leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(steps, context, copies, symbols, d, layers, batch, lr, log_every, seed)
    finally:
        torch.set_num_threads(threads)


def train(steps: int, context: int, copies: int, symbols: int, d: int, layers: int, batch: int, lr: float,
          log_every: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    vocab = 2 + symbols
    print(f"selective copying: {copies} of {symbols} symbols hidden among {context} positions, then {copies} "
          f"markers (chance accuracy {1 / symbols:.1%})")
    model = gatedsl.compile(SPEC, params={"vocab": vocab, "d": d, "layers": layers, "state_size": 16})
    report = model.meta["gatedsl_report"]
    print(f"{report.params:,} parameters; gates:", ", ".join(f"{g.name} ({g.kind})" for g in report.gates))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)

    def answer_logits(tokens: torch.Tensor) -> torch.Tensor:
        # The model reads left to right; at each GO marker it must name the next data token.
        return model(tokens)[:, context:]                      # [count, copies, vocab]

    eval_tokens, eval_answers = selective_copying(1000, context, copies, symbols,
                                                  torch.Generator().manual_seed(seed + 12345))

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        logits = answer_logits(eval_tokens)
        model.train()
        loss = F.cross_entropy(logits.reshape(-1, vocab), eval_answers.reshape(-1)).item()
        return loss, (logits.argmax(-1) == eval_answers).float().mean().item()

    initial, initial_accuracy = evaluate()
    print(f"eval loss before training {initial:.3f}, accuracy {initial_accuracy:.1%}")
    for step in range(1, steps + 1):
        tokens, answers = selective_copying(batch, context, copies, symbols)
        loss = F.cross_entropy(answer_logits(tokens).reshape(-1, vocab), answers.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  train loss {loss.item():.3f}")
    final, accuracy = evaluate()
    print(f"eval loss after training {final:.3f} (from {initial:.3f}); "
          f"data tokens recalled: {accuracy:.1%} (chance {1 / symbols:.1%})")
    return {"initial_loss": initial, "final_loss": final, "accuracy": accuracy, "chance": 1 / symbols}


if __name__ == "__main__":
    main()
