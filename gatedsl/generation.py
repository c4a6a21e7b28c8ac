"""`generate`: new tokens from a compiled causal language model, decoded one token at a time with its carried state.

Like transformers' `generate`: greedy (temperature 0) or sampled from softmax(logits / temperature) after top-k and
top-p (nucleus) filtering, a seed, stop tokens, and batches of prompts of different lengths. Each row gets the tokens
it would get decoded alone: rows are prefilled in groups of one prompt length, their states joined by DecodeState.cat
(which left-pads and masks attention caches), and every unfinished row then steps one token at a time.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gatedsl.decoding import Decoder, DecodeState
from gatedsl.errors import SpecError
from gatedsl.ir.types import Sym

PADDING = ("left", "right")


@dataclass(frozen=True)
class Generation:
    """What `generate` returns, row by row: the prompt, the new tokens, and why the row stopped."""

    prompts: list[list[int]]
    tokens: list[list[int]]  # the new tokens; a row that stopped on a stop token ends with it
    finished: list[str]  # "stop": it emitted a stop token; "length": it reached max_new_tokens

    @property
    def sequences(self) -> list[list[int]]:
        """Each row's prompt followed by its new tokens."""
        return [prompt + new for prompt, new in zip(self.prompts, self.tokens)]

    def padded(self, pad: int = 0) -> Tensor:
        """The new tokens as a LongTensor [B, the longest row's count], rows that stopped early padded with `pad`."""
        width = max(map(len, self.tokens))
        return torch.tensor([row + [pad] * (width - len(row)) for row in self.tokens], dtype=torch.long).reshape(
            len(self.tokens), width)


# ---------------------------------------------------------------- the sampling filters (transformers' warpers)
def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """`logits` with every score below the k-th largest of its row set to -inf (ties with the k-th are kept), as
    transformers' TopKLogitsWarper."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """`logits` with -inf outside each row's nucleus: the most likely tokens whose probabilities sum to at least `p`,
    and never fewer than one, as transformers' TopPLogitsWarper."""
    ascending, order = torch.sort(logits, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p  # the least likely tokens whose total stays within 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)


def warp(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """The scores sampling draws from, softmax(warp(...)): divided by `temperature`, then top-k, then top-p, in
    transformers' order."""
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k is not None and top_k < logits.shape[-1]:
        scores = top_k_filter(scores, top_k)
    if top_p is not None and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    return scores


# ---------------------------------------------------------------- generate
def generate(model: nn.Module | Decoder, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | torch.Generator | None = None, stop: int | Sequence[int] | None = None,
             lengths: Sequence[int] | Tensor | None = None, padding: str = "left", input: str | None = None,
             output: str | None = None, context: dict[str, Tensor] | None = None,
             progress: Callable[[int, int], None] | None = None) -> Generation:
    """Up to `max_new_tokens` new tokens after each prompt, from a model compiled by gatedsl.compile (or its Decoder).

    The model takes token ids int[B, T] (`input` names them when it has several inputs; `context` gives the others,
    which must not run along T, by name: a row per prompt where they have the batch dim B) and returns next-token
    scores [B, T, V] (`output` picks one of several outputs); it must be causal along T (Decoder raises a SpecError
    at the construct that is not). `prompts` is a list of prompts, each a list of token ids, or a LongTensor [B, L]
    whose rows hold `lengths` tokens each (all L if not given), padded on the `padding` side ("left", as transformers
    pads for generation, or "right"). Temperature 0 takes the most likely token (greedy); above 0 each token is drawn
    from softmax(logits / temperature) after keeping the `top_k` most likely and the nucleus of probability `top_p`,
    with `seed` (an int, or a torch.Generator on the model's device) making the draws repeatable. A row that emits
    one of the `stop` tokens stops there (the token is its last); the others go on. `progress(done, total)` is called
    after each new token. The model runs in eval mode under torch.no_grad(); its training flag is restored after.
    """
    plan = plan_generation(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop=stop, lengths=lengths, padding=padding, input=input, output=output,
                           context=context)
    return plan.run(progress)


@dataclass(frozen=True)
class GenerationPlan:
    """A checked call of `generate`, ready to run: the decoder, the prompts, and how each new token is chosen."""

    decoder: Decoder
    token_input: str
    context: dict[str, Tensor]  # the model's other inputs
    per_row: frozenset[str]  # those of them with a row per prompt
    prompts: list[list[int]]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None
    stops: frozenset[int]
    picked: int | None  # which of the decoder's outputs holds the scores, when it has several

    def run(self, progress: Callable[[int, int], None] | None = None) -> Generation:
        """Decode, calling `progress(done, total)` after each new token; the model is in eval mode meanwhile."""
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a function of (done, total), got {type(progress).__name__}")
        module = self.decoder.model
        training = module.training
        module.eval()
        try:
            with torch.no_grad():
                tokens, finished = self._decode(progress)
        finally:
            module.train(training)
        return Generation(self.prompts, tokens, finished)

    def _decode(self, progress: Callable[[int, int], None] | None) -> tuple[list[list[int]], list[str]]:
        """The new tokens of every row and why each stopped: prefill per prompt length, then step the unfinished
        rows together."""
        rows, total = self.prompts, self.max_new_tokens
        tokens: list[list[int]] = [[] for _ in rows]
        finished = ["length"] * len(rows)
        if total == 0:
            return tokens, finished
        device = _device(self.decoder.model)
        by_length: dict[int, list[int]] = {}
        for row, prompt in enumerate(rows):
            by_length.setdefault(len(prompt), []).append(row)
        active: list[int] = []  # the prompt index of each row of `state`, in its order
        states, scores = [], []
        for members in by_length.values():
            ids = torch.tensor([rows[r] for r in members], dtype=torch.long, device=device)
            outputs, state = self.decoder.prefill(**self._inputs(ids, members))
            active += members
            states.append(state)
            scores.append(self._last_scores(outputs))
        state = DecodeState.cat(states) if len(states) > 1 else states[0]
        logits = torch.cat(scores)

        for done in range(1, total + 1):
            chosen = self._choose(logits)
            for row, token in zip(active, chosen.tolist()):
                tokens[row].append(token)
                if token in self.stops:
                    finished[row] = "stop"
            if progress is not None:
                progress(done, total)
            going = [i for i, row in enumerate(active) if finished[row] != "stop"]
            if not going or done == total:
                break
            if len(going) < len(active):  # the rows that stopped leave the batch
                kept = torch.tensor(going, dtype=torch.long, device=device)
                state, chosen = state.select(kept), chosen[kept]
                active = [active[i] for i in going]
            outputs, state = self.decoder.step(**self._inputs(chosen[:, None], active), state=state)
            logits = self._last_scores(outputs)
        return tokens, finished

    def _inputs(self, ids: Tensor, rows: list[int]) -> dict[str, Tensor]:
        """The model's inputs by name for the given prompts' rows: their token ids and their rows of the context."""
        index = torch.tensor(rows, dtype=torch.long)
        return {self.token_input: ids} | {name: value[index.to(value.device)] if name in self.per_row else value
                                           for name, value in self.context.items()}

    def _last_scores(self, outputs: Any) -> Tensor:
        return (outputs if self.picked is None else outputs[self.picked])[:, -1]

    def _choose(self, logits: Tensor) -> Tensor:
        """One token per row: the most likely (temperature 0) or a draw from the warped distribution."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probabilities = warp(logits, self.temperature, self.top_k, self.top_p).softmax(dim=-1)
        return torch.multinomial(probabilities, 1, generator=self.generator).squeeze(1)


def plan_generation(model: nn.Module | Decoder, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | torch.Generator | None = None, stop: int | Sequence[int] | None = None,
                    lengths: Sequence[int] | Tensor | None = None, padding: str = "left", input: str | None = None,
                    output: str | None = None, context: dict[str, Tensor] | None = None) -> GenerationPlan:
    """`generate`'s arguments checked, before anything runs: ValueError or TypeError for a bad one, SpecError for
    a model that cannot generate (its input is not token ids, its output not scores, or it is not causal)."""
    _check_options(max_new_tokens, temperature, top_k, top_p, seed)
    decoder = model if isinstance(model, Decoder) else None
    module = decoder.model if decoder is not None else model
    token_input, scores_output, vocab, seq = token_interface(module, input, output)
    rows = prompt_rows(prompts, lengths, padding, vocab)
    stops = _stop_tokens(stop, vocab)
    device = _device(module)
    given, per_row = context_inputs(module, token_input, context, len(rows), device)
    if decoder is None:
        decoder = Decoder(module, seq=seq)
    elif decoder.seq != seq:
        raise ValueError(f"the decoder runs along {decoder.seq}, but the model's token ids {token_input} run "
                         f"along {seq}")
    picked = decoder.outputs.index(scores_output) if len(decoder.outputs) > 1 else None
    generator = torch.Generator(device=device).manual_seed(int(seed)) if _is_int(seed) else seed
    return GenerationPlan(decoder, token_input, given, per_row, rows, int(max_new_tokens), float(temperature),
                          None if top_k is None else int(top_k), None if top_p is None else float(top_p), generator,
                          frozenset(stops), picked)


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------- checking what generate is given
def token_interface(module: nn.Module, input: str | None, output: str | None) -> tuple[str, str, int, str]:
    """The model's token input, its next-token scores output, the vocabulary size V and the sequence axis T; a
    SpecError at the declaration when the model's input is not token ids int[B, T] or its output not scores
    [B, T, V]."""
    graph = getattr(module, "_ir", None)
    if graph is None:
        raise TypeError(f"generate takes a model compiled by gatedsl.compile (or a gatedsl.Decoder of one), "
                        f"got {type(module).__name__}")
    inputs = dict(graph.inputs)
    if input is None:
        if len(inputs) > 1:
            raise ValueError(f"the model has {len(inputs)} inputs ({', '.join(inputs)}): name its token ids "
                             f"with input= (and give the others with context=)")
        input = next(iter(inputs))
    elif input not in inputs:
        raise ValueError(f"input={input!r}: the model's inputs are {', '.join(inputs)}")
    node = graph.node(inputs[input])
    ids = node["attrs"].type
    if ids.dtype != "int" or len(ids.shape) != 2 or not all(isinstance(d, Sym) for d in ids.shape):
        raise SpecError(f"cannot generate from input {input}: {_type(ids)} is not token ids int[B, T]",
                        node["span"], help="generate feeds a model token ids int[B, T] and reads its next-token "
                                           "scores [B, T, V]")

    outputs = dict(graph.outputs)
    if output is None:
        if len(outputs) > 1:
            raise ValueError(f"the model has {len(outputs)} outputs ({', '.join(outputs)}): pick its next-token "
                             f"scores with output=")
        output = next(iter(outputs))
    elif output not in outputs:
        raise ValueError(f"output={output!r}: the model's outputs are {', '.join(outputs)}")
    scores = graph.type_of(outputs[output])
    if len(scores.shape) != 3 or tuple(scores.shape[:2]) != tuple(ids.shape) or not isinstance(scores.shape[2], int) \
            or scores.dtype != "float":
        b, t = ids.shape
        raise SpecError(f"cannot generate from output {output}: {_type(scores)} is not next-token scores "
                        f"[{b}, {t}, V]", graph.node(outputs[output][0])["span"],
                        help=f"generate reads scores over the vocabulary for every position of {input}")
    return input, output, scores.shape[2], str(ids.shape[1])


def context_inputs(module: nn.Module, token_input: str, context: dict[str, Tensor] | None, batch: int,
                   device: torch.device) -> tuple[dict[str, Tensor], frozenset[str]]:
    """The model's inputs other than its token ids, from `context`, on the model's device, and which of them have a
    row per prompt (their first dim is the token ids' batch dim B); ValueError for one missing, one not the model's,
    one that runs along T (generate feeds only token ids along it) or one with a row count other than the prompts'."""
    graph = module._ir
    declared = {name: graph.node(node)["attrs"].type for name, node in graph.inputs if name != token_input}
    context = {} if context is None else context
    if not isinstance(context, dict) or not all(isinstance(v, Tensor) for v in context.values()):
        raise TypeError("context must be a dict of the model's other inputs by name, each a tensor")
    unknown = [name for name in context if name not in declared]
    if unknown:
        raise ValueError(f"context names {unknown[0]!r}, which is not an input of the model other than its token ids"
                         + (f" (those are: {', '.join(declared)})" if declared else " (it has none)"))
    missing = [name for name in declared if name not in context]
    if missing:
        raise ValueError(f"the model's input{'s' * (len(missing) > 1)} {', '.join(missing)} must be given with "
                         f"context=")
    b, t = graph.node(dict(graph.inputs)[token_input])["attrs"].type.shape
    per_row = []
    for name, type_ in declared.items():
        if t in type_.shape:
            raise ValueError(f"the model's input {name} runs along {t}, but generate feeds along {t} only the "
                             f"token ids")
        if type_.shape and type_.shape[0] == b:
            per_row.append(name)
            if context[name].dim() == 0 or context[name].shape[0] != batch:
                raise ValueError(f"context {name} needs a row for each of the {batch} prompts, got shape "
                                 f"{list(context[name].shape)}")
    return {name: value.to(device) for name, value in context.items()}, frozenset(per_row)


def _type(t) -> str:
    shape = ", ".join(str(d) for d in t.shape)
    return f"[{shape}]" if t.dtype == "float" else f"{t.dtype}[{shape}]"


def _check_options(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int of at least 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number of at least 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an int of at least 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p filter what is sampled, and temperature 0 samples nothing (it takes the "
                         "most likely token): give a temperature above 0")
    if seed is not None and not _is_int(seed) and not isinstance(seed, torch.Generator):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")


def _is_int(value: Any) -> bool:
    """An integer (numpy's too), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def prompt_rows(prompts: Sequence[Sequence[int]] | Tensor, lengths: Sequence[int] | Tensor | None, padding: str,
                vocab: int) -> list[list[int]]:
    """Each prompt's token ids, checked: at least one prompt, each of at least one id in 0..vocab-1."""
    if padding not in PADDING:
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    if isinstance(prompts, Tensor):
        rows = _tensor_rows(prompts, lengths, padding)
    else:
        if lengths is not None:
            raise ValueError("lengths goes with a padded tensor of prompts; a list of prompts gives each its length")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or \
                any(isinstance(p, (str, bytes)) or not isinstance(p, (Sequence, Tensor)) or
                    isinstance(p, Tensor) and p.dim() != 1 for p in prompts):
            raise TypeError("prompts must be a list of prompts, each a list of token ids (one prompt: [[1, 2, 3]]), "
                            "or a LongTensor [B, L]")
        rows = [p.tolist() if isinstance(p, Tensor) else list(p) for p in prompts]
    if not rows:
        raise ValueError("no prompts: give at least one")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: the model needs at least one token to go on from")
        bad = [t for t in row if not _is_int(t) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds {bad[0]!r}: token ids are ints from 0 to {vocab - 1} "
                             f"(the model scores {vocab} tokens)")
    return [[int(t) for t in row] for row in rows]


def _tensor_rows(prompts: Tensor, lengths: Sequence[int] | Tensor | None, padding: str) -> list[list[int]]:
    if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype.is_complex or prompts.dtype == torch.bool:
        raise ValueError(f"a tensor of prompts is token ids [B, L], got {prompts.dtype} {list(prompts.shape)}")
    batch, width = prompts.shape
    table = prompts.tolist()
    if lengths is None:
        return table
    counts = lengths.tolist() if isinstance(lengths, Tensor) else list(lengths)
    if len(counts) != batch or not all(_is_int(n) and 1 <= n <= width for n in counts):
        raise ValueError(f"lengths must give each of the {batch} prompts a length from 1 to {width}, got {counts}")
    return [row[width - n:] if padding == "left" else row[:n] for row, n in zip(table, counts)]


def _stop_tokens(stop: int | Sequence[int] | None, vocab: int) -> set[int]:
    if stop is None:
        return set()
    stops = [stop] if _is_int(stop) else list(stop) if isinstance(stop, (Sequence, Tensor)) and \
        not isinstance(stop, (str, bytes)) else None
    if stops is None:
        raise TypeError(f"stop must be a token id or a list of them, got {type(stop).__name__}")
    stops = [t.item() if isinstance(t, Tensor) else t for t in stops]
    bad = [t for t in stops if not _is_int(t) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop token {bad[0]!r} is not a token id: they are ints from 0 to {vocab - 1}")
    return {int(t) for t in stops}
