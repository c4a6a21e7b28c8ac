"""Move weights between another implementation's state dict and a compiled spec, by rules declared once per block.

A `Mapping` is a list of rules, each relating some keys of the reference's state dict (fla's, transformers', torch's)
to some parameters of the compiled spec, with a conversion each way: a rename, a fused tensor split into several of
ours, or any other change of layout. A std block declares its mapping once, relative to the block instance on each
side (`q_proj.weight` ↔ `q.x_proj.weight`); `under` places it at an instance of a whole model
(`model.layers.3.attn.` ↔ `layers.3.GLA.`), and `+` composes the blocks' mappings into the model's.

Loading is all or nothing: every rule is converted and every shape compared before anything is written, so a state
dict that does not fit the spec is a `MappingError` naming the key and both shapes, and the module keeps its
weights. Reference keys that no rule reads, and parameters that no rule fills, are errors too (unless the mapping
`ignore`s those keys, or the load is `partial`), so nothing is dropped or left at its initial value by accident.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping as MappingType, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class MappingError(ValueError):
    """A state dict that does not fit a compiled spec through a mapping, or a mapping that does not fit either."""


Convert = Callable[[list[Tensor]], list[Tensor]]


@dataclass(frozen=True)
class Rule:
    """Reference keys `ref` become our keys `ours` through `to_ours`, and back through `to_ref`."""

    ref: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Convert
    to_ref: Convert
    what: str  # how the rule reads in an error message: "split along dim 0"
    fill: float | None = None  # for a rule with no reference keys: the value our tensors take (the reference has none)
    # Where the reference's shape follows from ours (a rename, a split), the shape it must have, so that a mismatch
    # is told as one: "q_proj.weight is [32, 16], but the spec's q.x_proj.weight is [8, 16]".
    ref_shape: Callable[[list[tuple[int, ...]]], tuple[int, ...] | None] | None = None

    def under(self, ours_prefix: str, ref_prefix: str) -> Rule:
        return Rule(tuple(_join(ref_prefix, k) for k in self.ref), tuple(_join(ours_prefix, k) for k in self.ours),
                    self.to_ours, self.to_ref, self.what, self.fill, self.ref_shape)


def _join(prefix: str, key: str) -> str:
    return f"{prefix.rstrip('.')}.{key}" if prefix else key


def rename(ref: str, ours: str) -> Rule:
    """The same tensor under another name."""
    return Rule((ref,), (ours,), lambda t: t, lambda t: t, "rename", ref_shape=lambda shapes: shapes[0])


def split(ref: str, ours: Sequence[str], dim: int = 0, sizes: Sequence[int] | None = None) -> Rule:
    """One fused reference tensor that is our tensors concatenated along `dim` (equal parts unless `sizes`)."""
    ours = tuple(ours)
    if sizes is not None and len(sizes) != len(ours):
        raise MappingError(f"split of {ref!r}: {len(sizes)} sizes for {len(ours)} keys")

    def to_ours(tensors: list[Tensor]) -> list[Tensor]:
        (fused,) = tensors
        parts = list(sizes) if sizes is not None else None
        if parts is None:
            if fused.shape[dim] % len(ours):
                raise MappingError(f"{ref!r} is {_shape(fused)}: its dim {dim} does not split in {len(ours)} equal "
                                   f"parts")
            parts = [fused.shape[dim] // len(ours)] * len(ours)
        if sum(parts) != fused.shape[dim]:
            raise MappingError(f"{ref!r} is {_shape(fused)}, but its parts along dim {dim} add up to {sum(parts)}")
        return list(torch.split(fused, parts, dim=dim))

    def ref_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        if len({len(shape) for shape in shapes}) != 1:
            return None  # our parts differ in rank: the conversion's own check reports it
        joined = list(shapes[0])
        joined[dim] = sum(shape[dim] for shape in shapes)
        return tuple(joined)

    return Rule((ref,), ours, to_ours, lambda tensors: [torch.cat(tensors, dim=dim)],
                f"split along dim {dim}" + (f" in {list(sizes)}" if sizes is not None else ""), ref_shape=ref_shape)


def transform(ref: str | Sequence[str], ours: str | Sequence[str], to_ours: Convert, to_ref: Convert,
              what: str = "transform") -> Rule:
    """Any other change of layout: `to_ours` takes the reference tensors (in the order of `ref`) and returns ours
    (in the order of `ours`); `to_ref` is its inverse."""
    ref = (ref,) if isinstance(ref, str) else tuple(ref)
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    return Rule(ref, ours, to_ours, to_ref, what)


def tie(ref: Sequence[str], ours: str) -> Rule:
    """Reference keys that hold one tensor (tied weights: an embedding table that is also the output head) and one
    parameter of ours: loading refuses them unless they are equal, exporting writes it under every key."""
    ref = tuple(ref)

    def to_ours(tensors: list[Tensor]) -> list[Tensor]:
        first = tensors[0]
        for key, tensor in zip(ref[1:], tensors[1:]):
            if not (tensor is first or (tensor.shape == first.shape and tensor.equal(first))):
                raise MappingError(f"{key} differs from {ref[0]}: the checkpoint is not tied (compile the spec "
                                   f"untied)")
        return [first]

    return Rule(ref, (ours,), to_ours, lambda tensors: tensors * len(ref), "tied", ref_shape=lambda shapes: shapes[0])


def fill(ours: str | Sequence[str], value: float = 0.0) -> Rule:
    """Parameters of ours that the reference lacks (a bias it was built without): loading sets them to `value`, and
    exporting refuses them unless they still hold it, since the reference could not represent anything else."""
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    return Rule((), ours, lambda t: t, lambda t: [], f"fill with {value:g}", fill=value)


def ignore(*ref: str) -> Rule:
    """Reference entries with no counterpart in the spec (a buffer it recomputes, such as rotary frequencies):
    loading accepts and drops them, exporting leaves them out."""
    return Rule(tuple(ref), (), lambda t: [], lambda t: [], "ignored")


@dataclass(frozen=True)
class Mapping:
    """A block's or a model's rules, keys relative to the instance each side is placed at."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def __init__(self, rules: Iterable[Rule] = ()):
        object.__setattr__(self, "rules", tuple(rules))

    def under(self, ours_prefix: str, ref_prefix: str) -> Mapping:
        """The same rules with our keys under `ours_prefix` and the reference's under `ref_prefix`."""
        return Mapping(rule.under(ours_prefix, ref_prefix) for rule in self.rules)

    def __add__(self, other: Mapping) -> Mapping:
        return Mapping(self.rules + other.rules)

    @property
    def ref_keys(self) -> list[str]:
        return [k for rule in self.rules for k in rule.ref]

    @property
    def our_keys(self) -> list[str]:
        return [k for rule in self.rules for k in rule.ours]

    def check(self) -> None:
        """No key read or filled by two rules."""
        for side, keys in (("reference key", self.ref_keys), ("parameter", self.our_keys)):
            seen = set()
            for key in keys:
                if key in seen:
                    raise MappingError(f"the mapping names {side} {key} in two rules")
                seen.add(key)


def load_state_dict(module: nn.Module, state: MappingType[str, Tensor] | nn.Module, mapping: Mapping, *,
                    partial: bool = False) -> list[str]:
    """Write a reference state dict (or a reference module's) into `module` through `mapping`; returns our keys written.

    Everything is checked before anything is written: a missing reference key, one that no rule reads, a parameter
    of `module` that no rule fills (unless `partial`), or a tensor whose converted shape is not the parameter's
    raises MappingError, and `module` is left as it was.
    """
    if isinstance(state, nn.Module):
        state = state.state_dict()
    mapping.check()
    ours = module.state_dict(keep_vars=True)
    read, filled = set(mapping.ref_keys), set(mapping.our_keys)
    missing = [k for k in mapping.ref_keys if k not in state]
    if missing:
        raise MappingError(f"the state dict lacks {_listing(missing)}{_closest(missing[0], state)}")
    unread = [k for k in state if k not in read]
    if unread:
        raise MappingError(f"no rule of the mapping reads {_listing(unread)} (the spec has nothing to put it in; "
                           f"`ignore` it in the mapping if it is meant to be dropped)")
    _check_ours_exist(mapping, ours, "fills")
    if not partial:
        unfilled = [k for k in ours if k not in filled]
        if unfilled:
            raise MappingError(f"no rule of the mapping fills {_listing(unfilled)}, which would keep its initial value")

    converted: list[tuple[str, Tensor]] = []
    for rule in mapping.rules:
        if not rule.ours:
            continue
        if rule.fill is not None:
            converted += [(k, torch.full_like(ours[k], rule.fill)) for k in rule.ours]
            continue
        inputs = [state[k] for k in rule.ref]
        if rule.ref_shape is not None:
            wanted = rule.ref_shape([tuple(ours[k].shape) for k in rule.ours])
            if wanted is not None and tuple(inputs[0].shape) != wanted:
                theirs = rule.ours[0] if len(rule.ours) == 1 else f"{_listing(rule.ours)} joined ({rule.what})"
                raise MappingError(f"{rule.ref[0]} is {_shape(inputs[0])}, but the spec's {theirs} "
                                   f"{'is' if len(rule.ours) == 1 else 'make'} {list(wanted)}")
        try:
            outputs = rule.to_ours(inputs)
        except MappingError:
            raise
        except Exception as exc:
            wanted = _described(rule.ours, [ours[k] for k in rule.ours])
            raise MappingError(f"cannot convert {_described(rule.ref, inputs)} to {wanted} ({rule.what}): "
                               f"{exc}") from None
        if len(outputs) != len(rule.ours):
            raise MappingError(f"the {rule.what} rule for {_listing(rule.ref)} made {len(outputs)} tensors for "
                               f"{len(rule.ours)} keys")
        for key, tensor in zip(rule.ours, outputs):
            if tuple(tensor.shape) != tuple(ours[key].shape):
                raise MappingError(f"{_described(rule.ref, inputs)} gives {key} a {_shape(tensor)} tensor "
                                   f"({rule.what}), but the spec's {key} is {_shape(ours[key])}")
            converted.append((key, tensor))
    with torch.no_grad():
        for key, tensor in converted:
            ours[key].copy_(tensor)
    return [key for key, _ in converted]


def export_state_dict(module: nn.Module, mapping: Mapping, *, partial: bool = False) -> dict[str, Tensor]:
    """`module`'s weights in the reference's layout, for its `load_state_dict(strict=True)`.

    Every parameter of `module` must be read by a rule (unless `partial`), and a `fill`ed one must still hold its
    value, so that nothing the model learned is dropped without a word.
    """
    mapping.check()
    ours = {k: v.detach() for k, v in module.state_dict().items()}
    _check_ours_exist(mapping, ours, "reads")
    if not partial:
        exported_keys = set(mapping.our_keys)
        unread = [k for k in ours if k not in exported_keys]
        if unread:
            raise MappingError(f"no rule of the mapping exports {_listing(unread)}: the reference has no place for it")
    exported: dict[str, Tensor] = {}
    for rule in mapping.rules:
        if not rule.ref:
            changed = [k for k in rule.ours if rule.fill is not None and not bool((ours[k] == rule.fill).all())]
            if changed:
                raise MappingError(f"{_listing(changed)} no longer holds {rule.fill:g}, and the reference has no "
                                   f"place for another value")
            continue
        if not rule.ours:
            continue
        outputs = rule.to_ref([ours[k] for k in rule.ours])
        exported.update((key, tensor.clone().contiguous()) for key, tensor in zip(rule.ref, outputs))
    return exported


def _check_ours_exist(mapping: Mapping, ours: MappingType[str, Tensor], verb: str) -> None:
    unknown = [k for k in mapping.our_keys if k not in ours]
    if unknown:
        raise MappingError(f"the mapping {verb} {_listing(unknown)}, which the compiled spec lacks"
                           f"{_closest(unknown[0], ours)}")


def _shape(tensor: Tensor) -> str:
    return str(list(tensor.shape))


def _described(keys: Sequence[str], tensors: Sequence[Tensor]) -> str:
    return ", ".join(f"{k} {_shape(t)}" for k, t in zip(keys, tensors))


def _listing(keys: Sequence[str], most: int = 6) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _closest(key: str, candidates: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
    return f" (closest: {', '.join(near)})" if near else ""
