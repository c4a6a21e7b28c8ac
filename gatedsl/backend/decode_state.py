"""The state a decoding model carries from one call to the next: plain tensors per stateful op, and each row's position."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch


@dataclass(frozen=True)
class Entry:
    """One op's carried tensors. `batch_dims` gives the dim of the batch's rows in each (-1: unknown, so rows of
    this state cannot be selected or joined); a KV cache (`kind` "kv_cache") holds keys, values [*, L, d] and
    which of its L slots hold a real position, per row ([B, L] bool): rows joined from prompts of different
    lengths are left-padded, and the padding is masked."""

    kind: str
    tensors: tuple[torch.Tensor, ...]
    batch_dims: tuple[int, ...]

    def map(self, fn) -> "Entry":
        return Entry(self.kind, tuple(fn(t) for t in self.tensors), self.batch_dims)


@dataclass(frozen=True)
class DecodeState:
    """What a decoder has read so far: `position` [B], the positions each row has consumed, and each stateful op's
    tensors by its key. Immutable: a call returns a new state and the old one stays valid, so a state can be
    kept, copied (`clone`), moved (`to`), and its rows picked (`select`) or joined with another's (`cat`)."""

    position: torch.Tensor
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.position.shape[0])

    @property
    def device(self) -> torch.device:
        return self.position.device

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device=None, dtype=None) -> "DecodeState":
        """On `device`; float tensors (not positions, token counts or masks) in `dtype`, where given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return DecodeState(self.position.to(device), {k: e.map(move) for k, e in self.entries.items()})

    def clone(self) -> "DecodeState":
        return DecodeState(self.position.clone(), {k: e.map(torch.clone) for k, e in self.entries.items()})

    def detach(self) -> "DecodeState":
        return DecodeState(self.position, {k: e.map(torch.Tensor.detach) for k, e in self.entries.items()})

    def select(self, rows: Sequence[int] | torch.Tensor) -> "DecodeState":
        """The state of the given rows, in that order (a beam search's reordering, or dropping finished rows)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if index.dim() != 1:
            raise ValueError(f"select takes a list of row numbers, got a tensor of shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < -self.batch_size or int(index.max()) >= self.batch_size):
            raise IndexError(f"rows {index.tolist()} out of range for a state of {self.batch_size} rows")
        entries = {}
        for key, e in self.entries.items():
            _rows_known(key, e)
            entries[key] = Entry(e.kind, tuple(t.index_select(d, index.to(t.device)) for t, d in
                                               zip(e.tensors, e.batch_dims)), e.batch_dims)
        return DecodeState(self.position.index_select(0, index), entries)

    @staticmethod
    def cat(states: Iterable["DecodeState"]) -> "DecodeState":
        """The rows of several states, in order, as one state: recurrent states are joined, and KV caches of
        different lengths are left-padded to the longest with the padding masked, so every row decodes exactly
        as it would alone."""
        states = list(states)
        if not states:
            raise ValueError("DecodeState.cat needs at least one state")
        keys = list(states[0].entries)
        for s in states[1:]:
            if list(s.entries) != keys:
                raise ValueError("DecodeState.cat joins states of one decoder: these carry different ops")
        entries = {}
        for key in keys:
            parts = [s.entries[key] for s in states]
            first = parts[0]
            _rows_known(key, first)
            if first.kind == "kv_cache":
                parts = _left_padded(parts)
            tensors = tuple(torch.cat([p.tensors[i] for p in parts], dim=d) for i, d in enumerate(first.batch_dims))
            entries[key] = Entry(first.kind, tensors, first.batch_dims)
        return DecodeState(torch.cat([s.position for s in states]), entries)


def _rows_known(key: str, e: Entry) -> None:
    if any(d < 0 for d in e.batch_dims):
        raise ValueError(f"the state of {key} has no dim of the batch's symbolic size, so its rows cannot be "
                         f"picked or joined")


def _left_padded(parts: list[Entry]) -> list[Entry]:
    longest = max(p.tensors[0].shape[-2] for p in parts)
    out = []
    for p in parts:
        k, v, keep = p.tensors
        missing = longest - k.shape[-2]
        if missing:
            k = torch.cat([k.new_zeros(*k.shape[:-2], missing, k.shape[-1]), k], dim=-2)
            v = torch.cat([v.new_zeros(*v.shape[:-2], missing, v.shape[-1]), v], dim=-2)
            keep = torch.cat([keep.new_zeros(keep.shape[0], missing), keep], dim=-1)
        out.append(Entry(p.kind, (k, v, keep), p.batch_dims))
    return out
