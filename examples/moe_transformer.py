"""Train the mixture-of-experts transformer of examples/moe_transformer.gate as a character-level language model.

Every feed-forward layer is a noisy top-k mixture of experts (std.moe.NoisyTopKMoE): a router
sends each character's representation to 2 of 4 expert MLPs and mixes their outputs. Left
alone, routers tend to favour a few experts; the paper's two balancing losses (importance and
load) push them to spread the tokens. The compiled module records them at every call with
`aux`, by layer: `model.aux` is {"blocks.0.NoisyTopKMoE.importance": tensor, ...}, and we add
them to the cross-entropy. The spec also records `routed`, each expert's share of the tokens,
which we print before and after training, and then once more for the same model trained
without the balancing losses (w_balance = 0): its routers crowd the tokens onto a few experts.

The text is examples/data/corpus.txt (gatedsl's own documentation) where it exists, and
otherwise generated sentences, so the example always runs (examples/text_data.py loads it).
We train on random windows of 90% of the text and evaluate on the other 10%.

    python examples/moe_transformer.py            # about half a minute on a laptop CPU (two trainings)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import gatedsl

HERE = Path(__file__).resolve().parent
SPEC = HERE / "moe_transformer.gate"
sys.path.insert(0, str(HERE))  # the text and its helpers, shared by the language-model examples, beside this file
from text_data import CORPUS, encode, every_window, load_text, random_windows, split_text  # noqa: E402


# ---------------------------------------------------------------- training
def losses(model, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-character cross-entropy, and the sum of the balancing losses this very call recorded."""
    logits = model(windows[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    balance = sum(value for name, value in model.aux.items() if name.endswith((".importance", ".load")))
    return ce, balance


@torch.no_grad()
def evaluate(model, windows: torch.Tensor) -> tuple[float, dict[str, list[float]]]:
    """Held-out cross-entropy (eval mode: no routing noise) and each layer's share of tokens per expert."""
    model.eval()
    ce, _ = losses(model, windows)
    load = {name.split(".")[1]: value.tolist() for name, value in model.aux.items() if name.endswith(".routed")}
    model.train()
    return ce.item(), load


def show_load(when: str, load: dict[str, list[float]]) -> None:
    for layer, shares in load.items():
        print(f"expert load {when}, layer {layer}: " + "  ".join(f"{s:5.1%}" for s in shares))


def main(steps: int = 600, context: int = 32, d: int = 48, layers: int = 2, heads: int = 4, experts: int = 4,
         k: int = 2, hidden: int = 96, batch: int = 32, lr: float = 3e-3, w_balance: float = 0.1,
         compare: bool = True, log_every: int = 100, seed: int = 0) -> dict:
    """Train for `steps` AdamW steps with the balancing losses weighted by `w_balance` (and, with `compare`, once
    more without them); returns the eval losses and the expert loads before and after."""
    # The matrices here are small: one thread is fastest on a busy machine, and leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        text, source = load_text(CORPUS)
        print(f"text: {source}, {len(text):,} characters, {len(set(text))} distinct")
        size = dict(context=context, d=d, layers=layers, heads=heads, experts=experts, k=k, hidden=hidden)
        result = train(text, size, w_balance, steps, batch, lr, log_every, seed, verbose=True)
        if compare:
            print(f"\nthe same model trained without the balancing losses (w_balance = 0), {steps} steps:")
            result["unbalanced"] = train(text, size, 0.0, steps, batch, lr, log_every, seed, verbose=False)
            show_load("after training without them", result["unbalanced"]["load_after"])
        return result
    finally:
        torch.set_num_threads(threads)


def train(text: str, size: dict, w_balance: float, steps: int, batch: int, lr: float, log_every: int, seed: int,
          verbose: bool) -> dict:
    torch.manual_seed(seed)
    ids, alphabet = encode(text)
    train_ids, eval_ids = split_text(ids)
    context = size["context"]
    eval_windows = every_window(eval_ids, context)

    model = gatedsl.compile(SPEC, params=dict(vocab=len(alphabet), w_balance=w_balance, **size))
    report = model.meta["gatedsl_report"]
    initial, load_before = evaluate(model, eval_windows)
    if verbose:
        print(f"{report.params:,} parameters; top-{size['k']} of {size['experts']} experts per layer; gates:",
              ", ".join(f"{g.name} ({g.kind})" for g in report.gates))
        print("aux values recorded at each call:", ", ".join(report.aux))
        print(f"eval loss before training {initial:.3f} nats/char "
              f"(a uniform guess scores {math.log(len(alphabet)):.3f})")
        print("(the routers start at zero, as in the paper: every logit ties and top-k takes the same experts; "
              "in training the noise spreads the tokens)")
        show_load("before training", load_before)

    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for step in range(1, steps + 1):
        ce, balance = losses(model, random_windows(train_ids, batch, context, gen))
        loss = ce + balance                     # the balancing losses reach the routers through autograd
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if verbose and (step % log_every == 0 or step == steps):
            print(f"step {step:4d}  train loss {ce.item():.3f}  balancing loss {balance.item():.4f}")

    final, load_after = evaluate(model, eval_windows)
    print(f"eval loss after training {final:.3f} nats/char (from {initial:.3f})")
    if verbose:
        show_load("after training", load_after)
    assert final < initial, "the loss did not fall"
    return {"initial_loss": initial, "final_loss": final, "load_before": load_before, "load_after": load_after}


if __name__ == "__main__":
    main()
