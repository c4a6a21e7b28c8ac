"""Train the gated forecaster of specs/forecaster.gate to predict Lorenz-96, one step ahead.

Lorenz-96 is the chaotic toy atmosphere of weather-forecasting papers: N variables on a
ring, dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F. With N = 8 it matches the
forecaster's 8 input channels. We integrate it with RK4, cut the trajectory into
windows, and train the model to read a window and predict every next step.

    python examples/train_forecaster.py            # about ten seconds on a laptop CPU
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

SPEC = Path(__file__).resolve().parent.parent / "specs" / "forecaster.gate"


# ------------------------------------------------------------------ the data
def lorenz96(x: torch.Tensor, forcing: float = 8.0) -> torch.Tensor:
    """dx/dt of Lorenz-96; the ring is the last dim."""
    return (x.roll(-1, -1) - x.roll(2, -1)) * x.roll(1, -1) - x + forcing


def simulate(steps: int, n: int = 8, dt: float = 0.01, every: int = 5, seed: int = 0) -> torch.Tensor:
    """A trajectory of `steps` states [steps, n], RK4 steps of dt, one state kept every `every` steps."""
    gen = torch.Generator().manual_seed(seed)
    x = 8.0 + torch.randn(n, generator=gen, dtype=torch.float64)
    states = []
    for i in range((steps + 200) * every):  # the first 200 kept states are a burn-in onto the attractor
        k1 = lorenz96(x)
        k2 = lorenz96(x + dt / 2 * k1)
        k3 = lorenz96(x + dt / 2 * k2)
        k4 = lorenz96(x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i % every == every - 1:
            states.append(x)
    return torch.stack(states[200:]).float()


def windows(series: torch.Tensor, length: int) -> torch.Tensor:
    """Every window of `length + 1` consecutive states, [count, length + 1, n]."""
    return series.unfold(0, length + 1, 1).transpose(1, 2).contiguous()


def train_and_test_windows(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of `length + 1` unit-scale states from the first 80% of a 2,000-state trajectory, and from the rest."""
    series = simulate(2000, seed=seed)
    series = (series - series.mean()) / series.std()  # the model sees unit-scale inputs
    split = int(0.8 * len(series))
    return windows(series[:split], length), windows(series[split:], length)


# ---------------------------------------------------------------- training
def main(steps: int = 300, d: int = 32, window: int = 32, batch: int = 32, lr: float = 3e-3,
         log_every: int = 50, seed: int = 0) -> dict[str, float]:
    """Train for `steps` Adam steps; returns the eval loss before and after, and that of predicting no change."""
    # The matrices here are tiny: one thread is fastest (several threads spin against each
    # other on a busy machine), and it leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(steps, d, window, batch, lr, log_every, seed)
    finally:
        torch.set_num_threads(threads)


def train(steps: int, d: int, window: int, batch: int, lr: float, log_every: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    train_set, test_set = train_and_test_windows(window, seed)

    # The model: one GRU layer and a gated-attention residual, widths d.
    model = gatedsl.compile(SPEC, params={"cell": "GRU", "d": d, "layers": 1, "attention": True})
    print(f"{model.meta['gatedsl_report'].params:,} parameters; gates:",
          ", ".join(g.name for g in model.meta["gatedsl_report"].gates))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_on(w: torch.Tensor) -> torch.Tensor:
        # Read states 0..T-1, predict states 1..T: the forecaster's attention is causal,
        # so each prediction sees only the past.
        return F.mse_loss(model(w[:, :-1]), w[:, 1:])

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        loss = loss_on(test_set).item()
        model.train()
        return loss

    persistence = F.mse_loss(test_set[:, :-1], test_set[:, 1:]).item()  # "tomorrow is like today"
    initial = evaluate()
    print(f"eval loss before training {initial:.4f} (predicting no change scores {persistence:.4f})")
    for step in range(1, steps + 1):
        batch_windows = train_set[torch.randint(len(train_set), (batch,))]
        loss = loss_on(batch_windows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  train loss {loss.item():.4f}")
    final = evaluate()
    print(f"eval loss after training {final:.4f} (from {initial:.4f})")
    assert final < initial, "the loss did not fall"
    return {"initial_loss": initial, "final_loss": final, "persistence_loss": persistence}


if __name__ == "__main__":
    main()
