"""Forecast Lorenz-96 with the study's best hybrid: a Recurrent Highway Network with gating and attention.

"Deconstructing Recurrence, Attention, and Gating" (Heidenreich, Vlachas & Koumoutsakos 2024)
trained every combination of recurrent cell (LSTM, GRU, RHN), residual gating and attention on
chaotic systems and found an RHN with neural gating and attention best. examples/rhn_hybrid.gate
writes that model with std.cells' RHN, std.attention's gated_attention and input-dependent gated
residuals; here it learns to predict Lorenz-96 one step ahead, on the same data as
examples/train_forecaster.py (whose data we import).

    python examples/rhn_hybrid.py              # about half a minute on a laptop CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

HERE = Path(__file__).resolve().parent
SPEC = HERE / "rhn_hybrid.gate"
sys.path.insert(0, str(HERE))
from train_forecaster import train_and_test_windows  # noqa: E402  (the Lorenz-96 data of the first example)


def main(steps: int = 300, d: int = 32, depth: int = 2, window: int = 32, batch: int = 32, lr: float = 3e-3,
         log_every: int = 50, seed: int = 0) -> dict[str, float]:
    """Train for `steps` Adam steps; returns the eval loss before and after, and that of predicting no change."""
    # The matrices here are tiny: one thread is fastest, and it leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(steps, d, depth, window, batch, lr, log_every, seed)
    finally:
        torch.set_num_threads(threads)


def train(steps: int, d: int, depth: int, window: int, batch: int, lr: float, log_every: int,
          seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    train_set, test_set = train_and_test_windows(window, seed)  # [count, window + 1, 8]: the Lorenz-96 ring

    model = gatedsl.compile(SPEC, params={"channels": train_set.shape[-1], "d": d, "depth": depth,
                                          "gating": "input", "attention": True})
    report = model.meta["gatedsl_report"]
    print(f"{report.params:,} parameters; gates:",
          ", ".join(f"{g.name} ({g.kind})" for g in report.gates))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_on(w: torch.Tensor) -> torch.Tensor:
        # Read states 0..T-1, predict states 1..T; the RHN and the attention only look back.
        return F.mse_loss(model(w[:, :-1]), w[:, 1:])

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        loss = loss_on(test_set).item()
        model.train()
        return loss

    persistence = F.mse_loss(test_set[:, :-1], test_set[:, 1:]).item()  # "the next state is this one"
    initial = evaluate()
    print(f"eval loss before training {initial:.4f} (predicting no change scores {persistence:.4f})")
    for step in range(1, steps + 1):
        loss = loss_on(train_set[torch.randint(len(train_set), (batch,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  train loss {loss.item():.4f}")
    final = evaluate()
    print(f"eval loss after training {final:.4f} (from {initial:.4f}); predicting no change scores "
          f"{persistence:.4f}, {persistence / final:.1f}x worse")
    return {"initial_loss": initial, "final_loss": final, "persistence_loss": persistence}


if __name__ == "__main__":
    main()
