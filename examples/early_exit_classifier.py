"""Train an early-exit classifier (examples/early_exit_classifier.gate) and watch easy samples leave early.

The task mixes easy and hard samples. An easy one is a strong copy of its class's
prototype plus a little noise: one stage reads it off. A hard one carries no prototype;
its class is two XOR bits, c = 2·[x₀x₁ > 0] + [x₂x₃ > 0], which takes more depth.

Training runs every stage on every sample (model.train()) and returns every exit's logits
y_l and gate g_l. The loss weights the exits' cross-entropies, deeper exits more
(w_l ∝ l + 1), and teaches each gate to predict whether its exit is right,
BCE(g_l, 1[argmax y_l = c]) (the learning-to-exit idea of BERxiT, Xin et al. 2021).
In eval (model.eval()) each sample stops at the first exit whose gate is above τ, and
later stages run only on the samples still in. τ is a spec parameter: a sweep compiles
the spec again per τ and loads the trained weights.

    python examples/early_exit_classifier.py          # under ten seconds on a laptop CPU
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

SPEC = Path(__file__).resolve().with_suffix(".gate")
FEATURES, CLASSES = 16, 4


# ------------------------------------------------------------------ the data
def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n samples, half easy and half hard: inputs [n, 16], labels [n], and which are hard [n]."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)), dim=-1)
    hard = torch.rand(n, generator=gen) < 0.5
    noise = 0.3 * torch.randn(n, FEATURES, generator=gen)
    # Easy: 4 p_c + noise, the class drawn at random.
    easy_labels = torch.randint(CLASSES, (n,), generator=gen)
    easy_x = 4 * prototypes[easy_labels] + noise
    # Hard: the first four features are N(0, 1) and carry the class as two XOR bits; the rest is noise.
    hard_x = noise.clone()
    hard_x[:, :4] = torch.randn(n, 4, generator=gen)
    hard_labels = 2 * (hard_x[:, 0] * hard_x[:, 1] > 0).long() + (hard_x[:, 2] * hard_x[:, 3] > 0).long()
    x = torch.where(hard[:, None], hard_x, easy_x)
    labels = torch.where(hard, hard_labels, easy_labels)
    return x, labels, hard


# ---------------------------------------------------------------- training
def main(steps: int = 2000, batch: int = 128, lr: float = 3e-3, tau: float = 0.9, log_every: int = 250,
         seed: int = 0) -> dict:
    """Train for `steps` Adam steps, then evaluate with early exits; returns the losses and the exit statistics."""
    # The matrices here are tiny: one thread is fastest, and it leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(steps, batch, lr, tau, log_every, seed)
    finally:
        torch.set_num_threads(threads)


def exit_losses(exits: torch.Tensor, gates: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_l w_l CE(y_l, c) + mean_l BCE(g_l, 1[y_l is right]), w_l ∝ l + 1: every exit and every gate learn."""
    stages = exits.shape[0]
    weights = torch.arange(1, stages + 1, dtype=exits.dtype) / sum(range(1, stages + 1))
    ce = torch.stack([F.cross_entropy(exits[l], labels) for l in range(stages)])
    right = (exits.argmax(-1) == labels).to(gates.dtype).detach()  # is exit l right on this sample?
    return (weights * ce).sum() + F.binary_cross_entropy(gates, right)


def train(steps: int, batch: int, lr: float, tau: float, log_every: int, seed: int) -> dict:
    torch.manual_seed(seed)
    train_x, train_labels, _ = make_data(20_000, seed=seed)
    test_x, test_labels, test_hard = make_data(4_000, seed=seed + 1)

    model = gatedsl.compile(SPEC, params={"tau": tau})
    report = model.meta["gatedsl_report"]
    stages = report.outputs["exits"][0]
    print(f"{report.params:,} parameters, {stages} stages; exit gates:", ", ".join(g.name for g in report.gates))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    @torch.no_grad()
    def eval_loss() -> float:  # every exit on the test set: the training objective, in training mode
        model.train()
        _, exits, gates = model(test_x)
        return exit_losses(exits, gates, test_labels).item()

    initial = eval_loss()
    print(f"test loss before training {initial:.4f}")
    for step in range(1, steps + 1):
        i = torch.randint(len(train_x), (batch,))
        _, exits, gates = model(train_x[i])                 # training mode: every exit, every gate
        loss = exit_losses(exits, gates, train_labels[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  train loss {loss.item():.4f}")
    final = eval_loss()
    print(f"test loss after training {final:.4f} (from {initial:.4f})")

    # Every stage on every sample: how good is each exit alone?
    with torch.no_grad():
        _, exits, _ = model.train()(test_x)
    exit_accuracy = (exits.argmax(-1) == test_labels).float().mean(-1)
    print("accuracy of each exit on every sample:", "  ".join(f"{a:.3f}" for a in exit_accuracy.tolist()))

    # Early exit: each sample stops at the first exit whose gate is above τ.
    model.eval()
    with torch.no_grad():
        logits, _, _ = model(test_x)
    exit_at = gatedsl.aux_outputs(model)["exit_index"].long()
    right = logits.argmax(-1) == test_labels
    print(f"early exit at τ = {tau}:")
    print("  exit  samples  easy  hard  accuracy")
    for l in range(stages):
        here = exit_at == l
        accuracy = f"{right[here].float().mean().item():.3f}" if here.any() else "  -  "
        print(f"  {l:4d}  {int(here.sum()):7d}  {int((here & ~test_hard).sum()):4d}  {int((here & test_hard).sum()):4d}"
              f"     {accuracy}")
    accuracy = right.float().mean().item()
    mean_stages = (exit_at + 1).float().mean().item()
    print(f"accuracy {accuracy:.3f} with {mean_stages:.2f} of {stages} stages per sample on average "
          f"(the last exit alone: {exit_accuracy[-1].item():.3f} with all {stages})")

    # τ is a static parameter: compile the spec with another τ and load the trained weights.
    print("  τ     accuracy  stages per sample")
    for other in (0.5, 0.8, 0.95, 0.99):
        swept = gatedsl.compile(SPEC, params={"tau": other})
        swept.load_state_dict(model.state_dict())
        with torch.no_grad():
            swept_logits, _, _ = swept.eval()(test_x)
        swept_stages = (gatedsl.aux_outputs(swept)["exit_index"] + 1).mean().item()
        print(f"  {other:<5}  {(swept_logits.argmax(-1) == test_labels).float().mean().item():.3f}     {swept_stages:.2f}")
    assert final < initial, "the loss did not fall"
    return {"initial_loss": initial, "final_loss": final, "accuracy": accuracy, "mean_stages": mean_stages,
            "exit_counts": [int((exit_at == l).sum()) for l in range(stages)],
            "exit_accuracy": exit_accuracy.tolist()}


if __name__ == "__main__":
    main()
