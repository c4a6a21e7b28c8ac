"""The text the character-level language-model examples learn, and the helpers they share to cut it up and write.

The text is examples/data/corpus.txt (gatedsl's own documentation) where it exists, and otherwise
generated sentences, so every example always runs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

import gatedsl

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "data" / "corpus.txt"


def generated_text(sentences: int = 3000, seed: int = 0) -> str:
    """Simple sentences from a small grammar, the fallback when the corpus is missing."""
    rng = random.Random(seed)
    subjects = ["The gate", "A cell", "The model", "Every layer", "The state", "A signal", "The input"]
    verbs = ["opens", "closes", "carries", "forgets", "keeps", "mixes", "scales", "passes"]
    objects = ["the memory", "a value", "the residual", "each feature", "the past", "its input", "the output"]
    endings = [".", " slowly.", " at once.", " over time.", " when asked."]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
                    for _ in range(sentences))


def load_text(path: Path) -> tuple[str, str]:
    """The text to learn, read from `path` or generated when there is no such file, and where it came from."""
    shown = os.path.relpath(path, HERE.parent)  # as seen from the repository root
    if path.is_file():
        return path.read_text(encoding="utf-8"), shown
    return generated_text(), f"generated sentences ({shown} is missing)"


def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    """Characters as integer ids, and the alphabet (id -> character)."""
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text]), alphabet


def decode(ids: torch.Tensor | list[int], alphabet: list[str]) -> str:
    """The text that `ids` stand for: the inverse of encode."""
    return "".join(alphabet[int(i)] for i in ids)


def split_text(ids: torch.Tensor, chunk: int = 1000, every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out every `every`-th chunk of `chunk` ids for evaluation, so both parts sample all the text."""
    pieces = ids.split(chunk)
    held_out = [i % every == every - 1 for i in range(len(pieces))]
    return (torch.cat([p for p, h in zip(pieces, held_out) if not h]),
            torch.cat([p for p, h in zip(pieces, held_out) if h]))


def random_windows(ids: torch.Tensor, count: int, length: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """`count` random windows of `length + 1` consecutive ids, [count, length + 1]: inputs [:, :-1], targets [:, 1:]."""
    starts = torch.randint(len(ids) - length - 1, (count,), generator=gen)
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()])


def every_window(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Consecutive windows of `length + 1` ids that overlap by one, so each id but the first is a target once."""
    count = (len(ids) - 1) // length
    return ids[:count * length + 1].unfold(0, length + 1, length)


def continue_text(model, prompt: str, alphabet: list[str], length: int, temperature: float, seed: int = 0) -> str:
    """The `length` characters the model writes after `prompt`, decoded incrementally by gatedsl.generate (the prompt
    in one call, then one character per call, the model's state carried between them), each drawn from
    softmax(logits / temperature) with draws seeded by `seed` (temperature 0 is greedy: the most likely)."""
    index = {c: i for i, c in enumerate(alphabet)}
    written = gatedsl.generate(model, [[index[c] for c in prompt]], length, temperature=temperature, seed=seed)
    return decode(written.tokens[0], alphabet)
