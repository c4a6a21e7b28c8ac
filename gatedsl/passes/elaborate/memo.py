"""The call memo: calls of blocks and cells elaborated once, recorded, and replayed at another instance path with the same result."""

from __future__ import annotations

import itertools
from typing import Any, Callable

from gatedsl.errors import Span
from gatedsl.frontend import ast
from gatedsl.frontend.loader import Program
from gatedsl.ir.elaboration import Elaborating, Names
from gatedsl.ir.graph import NODE_KEYS, GateMark, Graph, ModuleSpec, ParamSpec, Port
from gatedsl.ir.types import Dim, Sym, TensorType
from gatedsl.ir.values import Builtin, Tensor
from gatedsl.passes.elaborate.signature import names_in

# Attribute fields that hold instance paths, per op: a call replayed at another path gets these re-pathed. A
# recorded node with any other string under the call's path, or holding a graph other than a scan's body (a
# cascade's stage graphs are named after their path), leaves the call un-memoisable.
_PATH_FIELDS = {"param": ("path",), "linear": ("weight", "bias"), "norm": ("weight", "bias"),
                "conv": ("weight", "bias"), "embedding": ("weight",), "dropout": ("module",),
                "noise": ("module",), "scan": ("path",)}
OVER_LIMIT = object()  # a replay that would cross max_nodes or max_params
_UNBOUND = object()  # a name a callee's parameter domain reads that the caller has not bound


class _NotMemoisable(Exception):
    """The call reads or leaves something a replay would not reproduce: it is elaborated afresh each time."""


class CallMemo:
    """Calls of blocks and cells (and scans of cells) elaborated once and replayed: the nodes, learned tensors and
    names a call added, keyed by everything its elaboration reads (the call site, the callee, the arguments'
    values, and the tensors' types, origins and aliasing, the calling stack and statement), re-pathed to the
    instance it is replayed at.

    Screening many candidates of one spec (gatedsl.search.Space) elaborates the same cell or block with the same
    arguments at every layer and in many candidates. A replay adds the nodes, learned tensors, shapes and names
    that elaborating the call would add, in the same order; a call whose elaboration fails is never recorded, so
    errors are raised by elaborating.

    A call's record serves the rest of the elaboration that made it (the model's other layers); the memo keeps
    it for later elaborations only if the call was seen in an earlier one too: a record kept is an object the
    garbage collector walks at every full collection from then on, which costs about what replaying it once
    saves (BENCHMARKS.md). The least recently used records go beyond `max_entries` (a forecaster layer's scan
    or attention block takes about 30 kB).
    """

    def __init__(self, program: Program, max_entries: int = 2048, max_seen: int = 1 << 16):
        self.program = program
        self.max_entries = max_entries
        self.max_seen = max_seen
        self._templates: dict[tuple, Template | None] = {}  # None: the call is not memoisable
        self._seen: set[int] = set()  # hashes of the keys of the calls recorded and not kept
        self._domain_names: dict[int, tuple[str, ...]] = {}
        self.hits = 0  # calls replayed
        self.misses = 0  # calls elaborated (and recorded, where they can be)

    def __contains__(self, key: tuple) -> bool:
        return key in self._templates

    def __len__(self) -> int:
        return len(self._templates)

    def key(self, el: Elaborating, site: tuple, callee: ast.Definition, args: list,
            kwargs: dict[str, tuple[Any, Span]]) -> tuple[tuple | None, list[Port] | None]:
        """The call as a memo key, and the ports of the tensors among its arguments, in key order."""
        frame = el.frame
        slots: dict[Port, int] = {}
        # A scanned cell reads placeholders of its arguments' types (their origins and names only ever reach an
        # error message); a block reads the argument tensors themselves, and may return them.
        whole = site[0] != "scan"
        try:
            bound = (_key_of(args, slots, whole),
                     tuple((name, _key_of(value, slots, whole)) for name, (value, _) in kwargs.items()))
            # bind_signature checks an explicit argument against its parameter's domain evaluated where the call
            # stands: the names that domain reads are read from the caller.
            caller = tuple((name, _key_of(frame.env.get(name, _UNBOUND), slots, True))
                           for name in self._names_in_domains(callee))
        except _NotMemoisable:
            return None, None
        stack = tuple(id(f.definition) for f in el.stack)
        return (site, id(callee), stack, frame.graph is el.stack[0].graph, caller, bound), list(slots)

    def _names_in_domains(self, callee: ast.Definition) -> tuple[str, ...]:
        names = self._domain_names.get(id(callee))  # the memo holds the program: ids stay their definitions'
        if names is None:
            found: set[str] = set()
            for p in callee.params:
                vt = p.value_type
                if vt is not None:
                    for expr in [vt.low, vt.high] + list(vt.choices or []):
                        if expr is not None:
                            found |= {n.id for n in names_in(expr)}
            names = self._domain_names[id(callee)] = tuple(sorted(found))
        return names

    def get(self, key: tuple, calls: dict[tuple, Template | None]) -> tuple[bool, Template | None]:
        """(whether the call is known, its record: None where it is not memoisable), from `calls`, the records of
        the current elaboration, or the memo's."""
        if key in calls:
            found, template = True, calls[key]
        else:
            found, template = key in self._templates, self._templates.get(key)
            if found:
                self._templates[key] = self._templates.pop(key)  # most recently used last
        if template is not None:
            self.hits += 1
        else:
            self.misses += 1
        return found, template

    def put(self, key: tuple, template: Template | None, calls: dict[tuple, Template | None]) -> None:
        """Record a call for the current elaboration (`calls`), and keep it if it was seen in an earlier one."""
        calls[key] = template
        seen = hash(key)
        if seen not in self._seen:
            if len(self._seen) >= self.max_seen:
                self._seen.clear()
            self._seen.add(seen)
            return
        self._seen.discard(seen)
        self._templates.pop(key, None)
        if len(self._templates) >= self.max_entries:
            del self._templates[next(iter(self._templates))]
        self._templates[key] = template


def _key_of(value: Any, slots: dict[Port, int], whole: bool) -> Any:
    """A bound value as part of a memo key: statics by type and value, tensors by their slot (one per port, so
    that aliasing counts), type, and where `whole`, origin and label; anything else is not memoisable."""
    kind = type(value)
    if kind is Tensor:
        slot = slots.setdefault(value.port, len(slots))
        # Plain tuples, not the dataclasses: a key is hashed at every lookup, and theirs hash in Python.
        ttype = (_shape_key(value.type.shape), value.type.dtype)
        if not whole:
            return Tensor, slot, ttype
        origin = value.origin
        return (Tensor, slot, ttype, value.label,
                (origin.file, origin.line, origin.column, origin.end_line, origin.end_column))
    if kind is float:
        return float, value.hex()  # 0.0 and -0.0 apart, and 1.0 apart from 1 and true
    if kind is Sym:
        return kind, value.factors, value.coeff
    if kind is TensorType:
        return kind, _shape_key(value.shape), value.dtype
    if kind in (int, bool, str, Builtin) or value is None or value is _UNBOUND:
        return kind, value
    if kind is ast.Definition:
        return kind, id(value)  # the memo holds the program, so the id stays its own
    if kind in (list, tuple):
        return kind, tuple(_key_of(v, slots, whole) for v in value)
    raise _NotMemoisable


def _shape_key(shape: tuple[Dim, ...]) -> tuple:
    return tuple(d if type(d) is int else (d.factors, d.coeff) for d in shape)


class Recording:
    """Where the state stood when a memoised call started: what it adds is read off after it, as the template."""

    def __init__(self, el: Elaborating):
        frame = el.frame
        self.graph = frame.graph
        self.start = frame.graph._next
        self.memoisable = True
        top = el.stack[0].graph
        self.counts = (el.budget, el.param_total, len(el.declared_params), len(frame.graph.params),
                       len(frame.graph.modules), len(top.aux), len(el.shapes), len(el.used_names),
                       len(frame.graph.inputs), len(frame.graph.outputs))

    def template(self, el: Elaborating, path: str, ports: list[Port], result: Any) -> Template | None:
        graph, top = self.graph, el.stack[0].graph
        budget, param_total, declared, params, modules, aux, shapes, used, inputs, outputs = self.counts
        if not self.memoisable or (len(graph.inputs), len(graph.outputs)) != (inputs, outputs) \
                or (len(top.aux) != aux and graph is not top):
            return None
        base = path[:-1]  # every path the call makes is this one, or under it
        start = self.start
        slot = {port: i for i, port in enumerate(ports)}

        def ref(port: Port) -> tuple[bool, int, int]:
            if port[0] >= start:
                return True, port[0] - start, port[1]
            if port not in slot:
                raise _NotMemoisable  # a tensor that reached the call by another way than its arguments
            return False, slot[port], 0

        try:
            nodes = [_node_template(graph.node(n), start, slot, base) for n in range(start, graph._next)]
            new_params = graph.params[params:]
            recorded = {id(p) for p in new_params}
            for node in nodes:
                recorded |= node.param_ids()
            new_declared = el.declared_params[declared:]
            if any(id(p) not in recorded for p in new_declared):
                return None
            return Template(
                ticks=el.budget - budget, numel=el.param_total - param_total, nodes=nodes,
                params=[_param_template(p, base) for p in new_params],
                modules=[_module_template(m, base) for m in graph.modules[modules:]],
                aux=[(_relative(name, base), ref(port)) for name, port in top.aux[aux:]],
                declared=[id(p) for p in new_declared],
                shapes=tuple(zip(*[(_relative(k, base), v)
                                   for k, v in _tail(el.shapes, len(el.shapes) - shapes)])) or ((), ()),
                used_names=tuple((_relative(k, base), tuple(v))
                                 for k, v in _tail(el.used_names, len(el.used_names) - used)),
                result=_pack(result, ref))
        except _NotMemoisable:
            return None


class _NodeTemplate:
    """One recorded node: its inputs as (made by the call, node offset or argument's slot, output index), its
    attributes (or, where they hold paths or a body, their class and other fields), its paths made relative, a
    scan's body as a graph template."""

    __slots__ = ("op", "attrs", "paths", "body", "inputs", "types", "span", "name", "gate", "extras")

    def __init__(self, op, attrs, paths, body, inputs, types, span, name, gate, extras):
        self.op, self.attrs, self.paths, self.body, self.inputs = op, attrs, paths, body, inputs
        self.types, self.span, self.name, self.gate, self.extras = types, span, name, gate, extras

    def param_ids(self) -> set[int]:
        return set() if self.body is None else self.body.param_ids()


def _node_template(data: dict[str, Any], start: int, slot: dict[Port, int], base: str) -> _NodeTemplate:
    """Node `data` as made by a call at path `base` whose nodes start at `start` and whose tensor arguments are
    the ports in `slot`."""
    op, attrs = data["op"], data["attrs"]
    path_fields = _PATH_FIELDS.get(op, ())
    paths, body = None, None
    for field_name, value in attrs.__dict__.items():
        kind = type(value)
        if field_name in path_fields:
            paths = paths or {}
            paths[field_name] = None if value is None else _relative(value, base)
        elif kind is str or kind is tuple:
            if _mentions(value, base):
                raise _NotMemoisable
        elif kind is Graph:
            if op != "scan" or field_name != "body":
                raise _NotMemoisable
            body = _GraphTemplate(value, base)
    if op == "scan" and attrs.weights:
        raise _NotMemoisable  # set by native_rnn, after elaboration
    if paths is not None or body is not None:
        # Its class and other fields: replays build it anew (and the recorded body graph may go).
        attrs = (type(attrs), {k: v for k, v in attrs.__dict__.items() if k not in path_fields and k != "body"})
    try:
        inputs = tuple((True, n - start, i) if n >= start else (False, slot[(n, i)], 0) for n, i in data["inputs"])
    except KeyError:
        raise _NotMemoisable from None  # a tensor that reached the call by another way than its arguments
    gate = data["gate"]
    if gate is not None:
        gate = (gate.kind, _relative(gate.name, base), gate.line, gate.file)
    extras = None
    if len(data) > len(NODE_KEYS):
        # Copied: the caller may yet rename the node (`a, b = ...` sets out_names after the call).
        extras = {k: dict(v) if type(v) is dict else v for k, v in data.items() if k not in NODE_KEYS}
        if any(not isinstance(v, (dict, str, int)) for v in extras.values()):
            raise _NotMemoisable
    return _NodeTemplate(op, attrs, paths, body, inputs, tuple(data["types"]), data["span"], data["name"], gate,
                         extras)


class _GraphTemplate:
    """A whole graph a recorded call made (a scan's body), relative to the call's path."""

    def __init__(self, graph: Graph, base: str):
        if graph.order() != list(range(graph._next)):  # elaboration never removes a node: ids 0, 1, ...
            raise _NotMemoisable
        self.name = graph.name
        self.nodes = [_node_template(graph.node(n), 0, {}, base) for n in range(graph._next)]
        self.params = [_param_template(p, base) for p in graph.params]
        self.modules = [_module_template(m, base) for m in graph.modules]
        self.inputs, self.outputs = list(graph.inputs), list(graph.outputs)
        self.aux = [(_relative(name, base), port) for name, port in graph.aux]

    def param_ids(self) -> set[int]:
        ids = {t[0] for t in self.params}
        for node in self.nodes:
            ids |= node.param_ids()
        return ids

    def build(self, base: str, specs: dict[int, ParamSpec]) -> Graph:
        graph = Graph(self.name)
        _add_nodes(graph, self.nodes, 0, (), base, specs)
        graph.params = [_new_param(t, base, specs) for t in self.params]
        graph.modules = [ModuleSpec(base + rel, kind, dict(args)) for rel, kind, args in self.modules]
        graph.inputs, graph.outputs = list(self.inputs), list(self.outputs)
        graph.aux = [(base + rel, port) for rel, port in self.aux]
        return graph


class Template:
    """What a call added, relative to its instance path; `replay` adds it again at another one."""

    def __init__(self, *, ticks, numel, nodes, params, modules, aux, declared, shapes, used_names, result):
        self.ticks, self.numel, self.nodes = ticks, numel, nodes
        self.params, self.modules, self.aux, self.declared = params, modules, aux, declared
        self.shapes, self.used_names, self.result = shapes, used_names, result

    def replay(self, el: Elaborating, path: str, ports: list[Port]) -> tuple[Any] | object:
        """Add the call at instance `path` of the current frame, reading its tensor arguments at `ports`: (the
        call's value,), or OVER_LIMIT where elaborating it would stop at a limit (the counts only grow)."""
        if el.budget + self.ticks > el.limits.max_nodes or el.param_total + self.numel > el.limits.max_params:
            return OVER_LIMIT
        graph, base = el.frame.graph, path[:-1]
        start = graph._next
        specs: dict[int, ParamSpec] = {}
        _add_nodes(graph, self.nodes, start, ports, base, specs)
        graph.params.extend(_new_param(t, base, specs) for t in self.params)
        graph.modules.extend(ModuleSpec(base + rel, kind, dict(args)) for rel, kind, args in self.modules)
        el.stack[0].graph.aux.extend((base + rel, _port(ref, start, ports)) for rel, ref in self.aux)
        el.budget += self.ticks
        el.param_total += self.numel
        el.declared_params.extend(specs[i] for i in self.declared)
        shapes, used_names = el.shapes, el.used_names
        for rel, ttype in zip(*self.shapes):
            shapes[base + rel] = ttype
        for rel, names in self.used_names:
            used_names[base + rel] = Names(names)
        return (_unpack(self.result, start, ports),)


def _port(ref: tuple[bool, int, int], start: int, ports: list[Port] | tuple) -> Port:
    made, n, i = ref
    return (start + n, i) if made else ports[n]


def _add_nodes(graph: Graph, nodes: list[_NodeTemplate], start: int, ports: list[Port] | tuple, base: str,
               specs: dict[int, ParamSpec]) -> None:
    for t in nodes:
        attrs = t.attrs
        if t.paths is not None or t.body is not None:
            cls, fields = attrs
            fields = {**fields, **{k: None if rel is None else base + rel for k, rel in (t.paths or {}).items()}}
            if t.body is not None:
                fields["body"] = t.body.build(base, specs)
            attrs = cls(**fields)  # validated anew: as fast as a pydantic model_copy
        gate = None if t.gate is None else GateMark(kind=t.gate[0], name=base + t.gate[1], line=t.gate[2],
                                                    file=t.gate[3])
        inputs = [(start + n, i) if made else ports[n] for made, n, i in t.inputs]
        node = graph.add(t.op, attrs, inputs, t.types, t.span, t.name, gate)
        if t.extras:
            data = graph.node(node)
            for k, v in t.extras.items():
                data[k] = dict(v) if isinstance(v, dict) else v


def _param_template(p: ParamSpec, base: str) -> tuple:
    return id(p), _relative(p.path, base), p.shape, p.init, p.span, _relative(p.block, base)


def _new_param(t: tuple, base: str, specs: dict[int, ParamSpec]) -> ParamSpec:
    old, rel, shape, init, span, block = t
    spec = specs[old] = ParamSpec(base + rel, shape, init, span, base + block)
    return spec


def _module_template(m: ModuleSpec, base: str) -> tuple:
    if any(_mentions(v, base) for v in m.args.values()):
        raise _NotMemoisable
    return _relative(m.path, base), m.kind, dict(m.args)


def _relative(name: str, base: str) -> str:
    """`name`, the call's path `base` or a path under it, without that prefix."""
    if name.startswith(base) and (len(name) == len(base) or name[len(base)] == "."):
        return name[len(base):]
    raise _NotMemoisable


def _mentions(value: Any, base: str) -> bool:
    kind = type(value)
    if kind is str:
        return value.startswith(base) and (len(value) == len(base) or value[len(base)] == ".")
    if kind is tuple or kind is list:
        return any(_mentions(v, base) for v in value)
    return False


def _tail(d: dict, n: int) -> list[tuple[Any, Any]]:
    """The last n items of a dict, in insertion order."""
    return list(itertools.islice(reversed(d.items()), n))[::-1]


def _pack(value: Any, ref: Callable[[Port], tuple]) -> Any:
    if type(value) is Tensor:
        return Tensor, ref(value.port), value.type, value.origin, value.label
    if isinstance(value, (list, tuple)):
        return type(value), [_pack(v, ref) for v in value]
    if isinstance(value, (int, float, str, Sym, TensorType, Builtin, ast.Definition)) or value is None:
        return None, value
    raise _NotMemoisable


def _unpack(packed: tuple, start: int, ports: list[Port]) -> Any:
    kind = packed[0]
    if kind is Tensor:
        _, ref, ttype, origin, label = packed
        return Tensor(_port(ref, start, ports), ttype, origin, label)
    if kind is None:
        return packed[1]
    return kind([_unpack(v, start, ports) for v in packed[1]])
