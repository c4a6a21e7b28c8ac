"""Train a small character-level language model made of gated linear attention (GLA) layers, then let it write.

GLA (Yang et al. 2024) replaces softmax attention by a recurrence with a matrix state per head,
S_t = diag(α_t) S_{t−1} + k_tᵀ v_t, read out by o_t = q_t S_t, where the forget gate α_t is
computed from the input. examples/gla_lm.gate stacks GLA token mixers (std.linear_rnn) and
SwiGLU MLPs (std.mlp). The text is examples/data/corpus.txt (the project's own prose) when it is
there, else generated sentences (examples/text_data.py loads it). We train on random windows of
90% of the text and report bits per character and next-character accuracy on the other 10%.

Then the model writes with gatedsl.generate, which decodes incrementally: the prompt in one call,
then one character per call that updates each layer's state S_t instead of re-reading the text:
greedily, and sampled (temperature, top-p, a seed) after two prompts of different lengths in one
batch. Last, it writes the greedy text again the way a model without a
state must, a full forward over the whole text so far for every character, and prints the time
per character of both ways.

    python examples/gla_lm.py            # under a minute on a laptop CPU
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F

import gatedsl

HERE = Path(__file__).resolve().parent
SPEC = HERE / "gla_lm.gate"
sys.path.insert(0, str(HERE))  # the text and its helpers, shared by the language-model examples, beside this file
from text_data import CORPUS, decode, encode, every_window, load_text, random_windows, split_text  # noqa: E402

PROMPTS = ["A gate ", "The compiler "]  # greedy writes after the first; sampling after both, in one batch


# ---------------------------------------------------------------- training
def main(steps: int = 300, d: int = 48, layers: int = 2, heads: int = 2, window: int = 64, batch: int = 32,
         lr: float = 5e-3, log_every: int = 50, generate: int = 300, seed: int = 0) -> dict:
    """Train for `steps` Adam steps and write `generate` characters after each prompt; returns the eval loss before
    and after, bits per character, accuracy and (under "writing") the greedy text both ways and their times."""
    # The matrices here are small: one thread is fastest, and it leaves the other cores free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(steps, d, layers, heads, window, batch, lr, log_every, generate, seed)
    finally:
        torch.set_num_threads(threads)


def train(steps: int, d: int, layers: int, heads: int, window: int, batch: int, lr: float, log_every: int,
          generate: int, seed: int) -> dict:
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
    result = {"initial_loss": initial, "final_loss": final, "train_loss": loss.item(),
              "bits_per_char": final / math.log(2), "accuracy": accuracy}
    if generate:
        result["writing"] = write(model, alphabet, generate, seed)
    return result


# ---------------------------------------------------------------- writing
def write(model, alphabet: list[str], count: int, seed: int) -> dict:
    """Print `count` characters the model writes after the prompts, decoded incrementally, and the time per character
    against a full forward per character; returns the greedy text both ways and their times."""
    index = {c: i for i, c in enumerate(alphabet)}
    prompts = [[index[c] for c in prompt] for prompt in PROMPTS]
    started = time.process_time()
    decoder = gatedsl.Decoder(model)  # derives, once, what each layer carries from one character to the next
    built = time.process_time() - started

    decoding = Stopwatch()
    greedy = gatedsl.generate(decoder, prompts[:1], count, progress=decoding.lap).tokens[0]  # temperature 0
    print(f"greedy continuation of {PROMPTS[0]!r}:")
    print("  " + repr(PROMPTS[0] + decode(greedy, alphabet)))
    sampled = gatedsl.generate(decoder, prompts, count, temperature=0.8, top_p=0.9, seed=seed)
    print(f"sampled at temperature 0.8 from the top-p 0.9 nucleus (seed {seed}), both prompts in one batch:")
    for prompt, tokens in zip(PROMPTS, sampled.tokens):
        print("  " + repr(prompt + decode(tokens, alphabet)))

    forwards = Stopwatch()
    again = greedy_by_full_forwards(model, prompts[0], count, forwards.lap)
    part = max(1, count // 4)
    print(f"CPU time per character of the greedy text: the median over its first {part} and its last {part} "
          f"characters, and the total for all {count}")
    for way, laps in (("decoding (a step per character)", decoding.laps),
                      ("a full forward of the whole text so far", forwards.laps)):
        print(f"  {way:40s} {1e3 * median(laps[:part]):6.2f} ms {1e3 * median(laps[-part:]):6.2f} ms "
              f"{sum(laps):6.2f} s")
    print(f"  full forwards take {sum(forwards.laps) / sum(decoding.laps):.1f}x decoding's time (which builds its "
          f"decoder once first: {built:.2f} s)")
    if again == greedy:
        print("  both ways write the same text")
    else:  # float32 rounding tipped a near tie: a full forward and a step sum in different orders
        parted = next(i for i, (a, b) in enumerate(zip(again, greedy)) if a != b)
        print(f"  the two ways part at character {parted + 1}, where two characters nearly tie")
    return {"greedy": greedy, "greedy_by_full_forwards": again,
            "seconds": {"decoding": sum(decoding.laps), "full_forwards": sum(forwards.laps)}}


@torch.no_grad()
def greedy_by_full_forwards(model, prompt: list[int], count: int, lap) -> list[int]:
    """The `count` most likely next characters the way a model without a decoding state writes them: a forward over
    the whole text so far for each; `lap()` after each."""
    training = model.training
    model.eval()
    ids = list(prompt)
    for _ in range(count):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        lap()
    model.train(training)
    return ids[len(prompt):]


class Stopwatch:
    """The CPU seconds between successive calls of `lap` (whatever it is passed), the first since the stopwatch was
    made: with one torch thread, the wall time of an idle machine, and much less disturbed by a busy one."""

    def __init__(self):
        self.laps: list[float] = []
        self.last = time.process_time()

    def lap(self, *_) -> None:
        now = time.process_time()
        self.laps.append(now - self.last)
        self.last = now

if __name__ == "__main__":
    main()
