"""Fuse projections: linear ops that read the same tensor become one projection_group op (one product on their weights concatenated, or one product each, as the kernel registry's cost rule picks), in a step-by-step scan body on weights concatenated once per call before the loop.

Where. In the top-level graph (SwiGLU's two projections, attention's q, k, v and output
gate, the input projections lower_recurrences hoisted out of scans), in early-exit stages,
and in every step-by-step scan body, recursively. A group is the linear ops that read one
value: projections of different values are never fused.

In a scan body. The state projections of one value (a GRU's three, an LSTM's four) become one
product per step on weights (and biases, zero where a projection has none) concatenated before
the loop and passed to the scan as constants, also transposed (row-major, which multiplies few
rows faster where no gradient flows): nothing is copied per step. Where a state projection is
added to a sequence the scan precomputes as a projection of its input (`linear(x) +
linear(h)`, the input projection hoisted by lower_recurrences), the sum is folded in as well,
even for a projection alone: those input projections become one product over the whole
sequence, biased by the sum of both sides' biases, and each step adds its slice inside the
state product (addmm) instead of one add per projection.

What stays. Learned tensors keep their paths and Parameter objects (the concatenations are
computed from them each call, so gradients flow back to them): the state_dict is the unfused
compile's and checkpoints load both ways. A projection marked as a gate is read through an
`index [...]` view (no copy) that carries its mark, so the report lists the same gates in the
same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gatedsl.errors import Span
from gatedsl.ir.graph import Graph, Port, copy_node
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import (
    BinaryAttrs,
    FillAttrs,
    IndexAttrs,
    InputAttrs,
    JoinAttrs,
    ParamAttrs,
    PermuteAttrs,
    ProjectionGroupAttrs,
    ScanAttrs,
)
from gatedsl.ir.types import TensorType


def fuse_projections(unit: ModelIR) -> ModelIR:
    unit.graph = _Rewrite(unit.graph).run().graph
    return unit


# ------------------------------------------------------------------ plans
@dataclass(frozen=True)
class Pack:
    """A tensor computed from learned tensors alone: its parts concatenated along dim 0, each part the sum
    of the learned tensors it names, or zeros where it names none."""

    parts: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]  # (paths summed, shape) per part
    transposed: bool = False  # the concatenation transposed: [in, Σ out] for weights [out_j, in], row-major

    @property
    def type(self) -> TensorType:
        first = self.parts[0][1]
        shape = (sum(shape[0] for _, shape in self.parts),) + first[1:]
        return TensorType(shape[::-1] if self.transposed else shape)


@dataclass(frozen=True)
class InputProduct:
    """Input projections a scan body's state group adds, as one product over the whole sequence `source`
    (a port of the graph that runs the scan): a new sequence of the scan."""

    source: Port
    weight: Pack
    bias: Pack | None
    weights: tuple[str, ...]
    span: Span | None
    name: str


@dataclass
class Group:
    members: list[int]  # linear nodes reading `source`, in output order
    source: Port
    folded: list[int] = field(default_factory=list)  # in a scan body: per member, its add of a precomputed sequence
    product: InputProduct | None = None  # ... and those sequences as one product


@dataclass(frozen=True)
class Extra:
    """An input a rewritten scan body takes after its original ones (those it still reads)."""

    role: str  # "const": a Pack; "seq": an InputProduct
    value: Pack | InputProduct
    axis: int | None = None
    type: TensorType | None = None  # what the body reads: the Pack, or one step of the product


@dataclass
class Rewritten:
    graph: Graph
    extras: list[Extra]
    dropped: set[int]  # positions of original inputs the body no longer reads


def _name(names: list[str]) -> str:
    """One name for several, their common start and end kept once: y_r_x_proj, y_z_x_proj -> y_r_z_x_proj."""
    split = [n.split("_") for n in names]
    shortest = min(len(s) for s in split)
    start = 0
    while start < shortest - 1 and len({s[start] for s in split}) == 1:
        start += 1
    end = 0
    while start + end < shortest - 1 and len({s[-1 - end] for s in split}) == 1:
        end += 1
    middles = ["_".join(s[start:len(s) - end]) for s in split]
    return "_".join(split[0][:start] + list(dict.fromkeys(m for m in middles if m)) + split[0][len(split[0]) - end:])


def _other(add: dict, member: int) -> Port:
    """What `add` adds to the projection `member`."""
    (other,) = [p for p in add["inputs"] if p != (member, 0)]
    return other


def _reads_learned(data: dict) -> bool:
    """Whether the backend reads a learned tensor or a sub-module for this node (by its path in the attributes)."""
    if data["op"] == "param":
        return True
    fields = data["attrs"].__dict__
    return any(fields.get(key) for key in ("weight", "bias", "module", "path"))


class _Rewrite:
    """One graph's rewrite; `loop`: the attrs of the scan (node `scan` of `outer`) running it step by step, if any."""

    def __init__(self, graph: Graph, loop: ScanAttrs | None = None, outer: Graph | None = None, scan: int = -1):
        self.graph = graph
        self.loop = loop
        self.outer = outer
        self.scan = scan
        self.outer_inputs = outer.node(scan)["inputs"] if outer is not None else []
        self.readers: dict[int, list[int]] = {n: [] for n in graph.order()}
        for n in graph.order():
            for src, _ in graph.node(n)["inputs"]:
                self.readers[src].append(n)
        self.results = {node for _, (node, _) in graph.outputs + graph.aux}

    def run(self) -> Rewritten:
        g = self.graph
        self.scans: dict[int, Rewritten] = {}
        self.bodies: dict[int, object] = {}
        for n in g.order():
            data = g.node(n)
            a = data["attrs"]
            if data["op"] == "scan" and a.kernel == "loop":
                self.scans[n] = _Rewrite(a.body, a, g, n).run()
            elif data["op"] in ("cascade", "cascade_stage"):
                body = _Rewrite(a.body).run().graph
                if body is not a.body:
                    self.bodies[n] = a.model_copy(update={"body": body})
        self.dead = self._dead()
        self.groups = self._groups()
        unchanged = all(r.graph is g.node(n)["attrs"].body and not r.extras for n, r in self.scans.items())
        if not self.groups and unchanged and not self.bodies:
            return Rewritten(g, [], set())
        return self._build()

    # ------------------------------------------------------------ planning
    def _dead(self) -> set[int]:
        """Linear nodes read only as sequences that rewritten scans no longer read (folded into their products)."""
        g = self.graph
        dead = set()
        for n in g.order():
            if g.node(n)["op"] != "linear" or n in self.results or not self.readers[n]:
                continue
            if all(r in self.scans and all(i in self.scans[r].dropped
                                           for i, p in enumerate(g.node(r)["inputs"]) if p == (n, 0))
                   for r in self.readers[n]):
                dead.add(n)
        return dead

    def _groups(self) -> list[Group]:
        g = self.graph
        by_source: dict[Port, list[int]] = {}
        for n in g.order():
            if g.node(n)["op"] == "linear" and n not in self.dead:
                by_source.setdefault(g.node(n)["inputs"][0], []).append(n)
        groups = []
        for source, members in by_source.items():
            if self.loop is None:
                groups += [Group(run, source) for run in self._runs(members) if len(run) >= 2]
                continue
            folded = self._foldable(members)
            rest = members
            if folded:  # even one: an addmm on row-major weights instead of a product and an add
                groups.append(self._folded_group(source, folded))
                rest = [m for m in members if m not in folded]
            if len(rest) >= 2:
                groups.append(Group(rest, source))
        return sorted(groups, key=lambda grp: grp.members[0])

    def _runs(self, members: list[int]) -> list[list[int]]:
        """`members` cut wherever a node between two of them reads a learned tensor or module: the group reads its
        members' weights where the first of them stood, and nothing else may be read first in between, so that
        the compiled module builds its sub-modules, and so its state_dict, in the unfused order."""
        g = self.graph
        runs = [[members[0]]]
        for before, after in zip(members, members[1:]):
            if any(_reads_learned(g.node(n)) for n in range(before + 1, after) if n in g.g):
                runs.append([])
            runs[-1].append(after)
        return runs

    def _foldable(self, members: list[int]) -> dict[int, int]:
        """{member: its add}, for the state projections whose one reader adds a sequence the scan reads there alone,
        precomputed as a projection of the same sequence (and stepped along the same axis) for all of them."""
        g, loop = self.graph, self.loop
        roles = {node: role for (_, node), role in zip(g.inputs, loop.roles)}
        position = {node: i for i, (_, node) in enumerate(g.inputs)}
        seq_axes = iter(loop.axes)
        axis_of = {node: next(seq_axes) for _, node in g.inputs if roles[node] == "seq"}
        found: dict[int, int] = {}
        common = None
        for m in members:
            readers = self.readers[m]
            if len(readers) != 1 or m in self.results or g.node(m)["gate"] is not None:
                continue
            add = g.node(readers[0])
            a = add["attrs"]
            if add["op"] != "binary" or a.fn != "add" or a.left_scalar is not None or a.right_scalar is not None \
                    or add["gate"] is not None or add["inputs"][0] == add["inputs"][1]:
                continue
            seq = _other(add, m)
            if roles.get(seq[0]) != "seq" or position[seq[0]] == 0 or g.type_of(seq) != g.type_of((m, 0)) \
                    or len(self.readers[seq[0]]) != 1:
                continue  # the first sequence stays: the scan's length and output shape are read off it
            produced = self.outer_inputs[position[seq[0]]]
            producer = self.outer.node(produced[0])
            if producer["op"] != "linear" or producer["gate"] is not None or self.outer_inputs.count(produced) != 1 \
                    or set(self.outer.g.successors(produced[0])) != {self.scan} \
                    or produced in [port for _, port in self.outer.outputs + self.outer.aux] \
                    or axis_of[seq[0]] == self.outer.type_of(produced).rank - 1:
                continue  # the input projection must be read by this step alone, or it would be computed twice
            key = (producer["inputs"][0], axis_of[seq[0]])
            common = common or key
            if key == common:
                found[m] = readers[0]
        return found

    def _folded_group(self, source: Port, folded: dict[int, int]) -> Group:
        """The group of state projections `folded` adds to input projections, and the product of those."""
        g = self.graph
        members = list(folded)
        position = {node: i for i, (_, node) in enumerate(g.inputs)}
        producers = []
        for m in members:
            seq = _other(g.node(folded[m]), m)
            producers.append(self.outer.node(self.outer_inputs[position[seq[0]]][0]))
        state = [g.node(m)["attrs"] for m in members]
        inputs = [p["attrs"] for p in producers]
        weight = Pack(tuple(((a.weight,), (a.out_features, a.in_features)) for a in inputs))
        bias_parts = tuple((tuple(b for b in (x.bias, h.bias) if b is not None), (h.out_features,))
                           for x, h in zip(inputs, state))
        bias = Pack(bias_parts) if any(paths for paths, _ in bias_parts) else None
        product = InputProduct(producers[0]["inputs"][0], weight, bias, tuple(a.weight for a in inputs),
                               producers[0]["span"], _name([p["name"] for p in producers]))
        return Group(members, source, [folded[m] for m in members], product)

    # ------------------------------------------------------------ building
    def _build(self) -> Rewritten:
        g = self.graph
        out = self.out = Graph(g.name, params=g.params, modules=g.modules)
        self.ports: dict[Port, Port] = {}
        self.built: dict[Pack, Port] = {}
        member_of = {m: (grp, j) for grp in self.groups for j, m in enumerate(grp.members)}
        folded = {add: (grp, j) for grp in self.groups for j, add in enumerate(grp.folded)}
        dropped = set()
        for add, (grp, j) in folded.items():
            seq = _other(g.node(add), grp.members[j])
            dropped.add(next(i for i, (_, node) in enumerate(g.inputs) if node == seq[0]))
        kept = [(i, name, node) for i, (name, node) in enumerate(g.inputs) if i not in dropped]
        for _, _, node in kept:
            self.ports[(node, 0)] = (copy_node(out, g.node(node), g.node(node)["attrs"], []), 0)
        extras = self._extras() if self.loop is not None else []
        # In a loop, what is computed once per call comes in as inputs, after the original ones.
        taken = {name for name, _ in g.inputs}
        self.inputs_for: dict[Pack | InputProduct, Port] = {}
        new_inputs = []
        for extra in extras:
            is_product = isinstance(extra.value, InputProduct)
            name = base = f"{extra.value.name}_all" if is_product else self._pack_name(extra.value)
            while name in taken:
                name = f"{base}_{len(taken)}"
            taken.add(name)
            node = out.add("input", InputAttrs(name=name, type=extra.type), [], [extra.type], None, name)
            new_inputs.append((name, node))
            self.inputs_for[extra.value] = (node, 0)
        inputs = {node for _, node in g.inputs}
        for n in g.order():
            data = g.node(n)
            if n in inputs or n in self.dead:
                continue
            if n in member_of:
                grp, j = member_of[n]
                if n == grp.members[0]:
                    self._add_group(grp)
                if data["gate"] is not None:  # the mark stays where the spec put it, on a view
                    view = out.add("index", IndexAttrs(items=(("ellipsis",),)), [self.ports[(n, 0)]],
                                   data["types"], data["span"], data["name"], data["gate"])
                    self.ports[(n, 0)] = (view, 0)
            elif n in folded:
                grp, j = folded[n]
                self.ports[(n, 0)] = self.ports[(grp.members[j], 0)]
            elif n in self.scans:
                self._add_scan(n)
            else:
                new = copy_node(out, data, self.bodies.get(n, data["attrs"]), [self.ports[p] for p in data["inputs"]])
                for i in range(len(data["types"])):
                    self.ports[(n, i)] = (new, i)
        out.inputs = [(name, self.ports[(node, 0)][0]) for _, name, node in kept] + new_inputs
        out.outputs = [(name, self.ports[p]) for name, p in g.outputs]
        out.aux = [(name, self.ports[p]) for name, p in g.aux]
        return Rewritten(out, extras, dropped)

    def _extras(self) -> list[Extra]:
        """The inputs this loop body needs made outside it: its groups' weights and input products, and what the scans
        it runs need made outside their loops (the learned tensors they concatenate), each once."""
        g = self.graph
        extras: dict[Pack | InputProduct, Extra] = {}

        def const(pack: Pack | None) -> None:
            if pack is not None and pack not in extras:
                extras[pack] = Extra("const", pack, type=pack.type)

        for grp in self.groups:
            if grp.product is not None:
                member = g.type_of((grp.members[0], 0))
                width = sum(g.node(m)["attrs"].out_features for m in grp.members)
                seq = _other(g.node(grp.folded[0]), grp.members[0])
                axis = self.loop.axes[[node for (_, node), role in zip(g.inputs, self.loop.roles)
                                       if role == "seq"].index(seq[0])]
                extras[grp.product] = Extra("seq", grp.product, axis, TensorType(member.shape[:-1] + (width,)))
            const(self._weight_pack(grp))
            const(self._weight_pack(grp, transposed=True))
            const(self._bias_pack(grp))
        for rewritten in self.scans.values():
            for extra in rewritten.extras:
                if isinstance(extra.value, Pack):
                    const(extra.value)
                else:
                    const(extra.value.weight)
                    const(extra.value.bias)
        return list(extras.values())

    def _weight_pack(self, grp: Group, transposed: bool = False) -> Pack:
        return Pack(tuple(((a.weight,), (a.out_features, a.in_features))
                          for a in (self.graph.node(m)["attrs"] for m in grp.members)), transposed)

    def _bias_pack(self, grp: Group) -> Pack | None:
        attrs = [self.graph.node(m)["attrs"] for m in grp.members]
        if grp.product is not None or all(a.bias is None for a in attrs):
            return None  # folded into the input product's bias, or none at all
        return Pack(tuple(((a.bias,) if a.bias else (), (a.out_features,)) for a in attrs))

    def _pack_name(self, pack: Pack) -> str:
        """RHN_micro_0_hl_t_s_proj_weight for the weights at RHN.micro.0.hl.s_proj and RHN.micro.0.t.s_proj."""
        return _name([paths[0].replace(".", "_") for paths, _ in pack.parts if paths]) + "_t" * pack.transposed

    def _value(self, value: Pack | None) -> Port | None:
        """The port of a Pack: an input of this loop body, or built here (once) where this graph is not a loop."""
        if value is None:
            return None
        if self.loop is not None:
            return self.inputs_for[value]
        if value not in self.built:
            out = self.out
            ports = []
            for paths, shape in value.parts:
                if value.transposed:  # a weight's transposed view, made row-major by the join below
                    ports.append((out.add("permute", PermuteAttrs(dims=(1, 0)), [self._param(paths[0], shape)],
                                          [TensorType(shape[::-1])], None, paths[0].replace(".", "_") + "_t"), 0))
                elif not paths:
                    ports.append((out.add("fill", FillAttrs(value=0.0, shape=shape), [], [TensorType(shape)], None,
                                          "zeros"), 0))
                else:
                    port = self._param(paths[0], shape)
                    for path in paths[1:]:
                        port = (out.add("binary", BinaryAttrs(fn="add"), [port, self._param(path, shape)],
                                        [TensorType(shape)], None, "bias"), 0)
                    ports.append(port)
            if len(ports) > 1 or value.transposed:
                ports = [(out.add("join", JoinAttrs(dim=1 if value.transposed else 0), ports, [value.type], None,
                                  self._pack_name(value)), 0)]
            self.built[value] = ports[0]
        return self.built[value]

    def _add_group(self, grp: Group) -> None:
        g, out = self.graph, self.out
        nodes = [g.node(m) for m in grp.members]
        attrs = [d["attrs"] for d in nodes]
        source = self.ports[grp.source]
        if self.loop is None:  # loose: the learned tensors themselves, concatenated per call if the kernel wants
            tensors = [self._param(a.weight, (a.out_features, a.in_features)) for a in attrs]
            tensors += [self._param(a.bias, (a.out_features,)) for a in attrs if a.bias is not None]
        else:
            tensors = [self._value(self._weight_pack(grp)), self._value(self._weight_pack(grp, transposed=True))]
            bias = self._value(self._bias_pack(grp))
            tensors += [bias] if bias is not None else []
            if grp.product is not None:
                tensors.append(self.inputs_for[grp.product])
        config = ProjectionGroupAttrs(
            in_features=attrs[0].in_features, out_features=tuple(a.out_features for a in attrs),
            biases=tuple(a.bias is not None and grp.product is None for a in attrs),
            weights=tuple(a.weight for a in attrs), packed=self.loop is not None, transposed=self.loop is not None,
            addend=grp.product is not None)
        node = out.add("projection_group", config, [source] + tensors, [d["types"][0] for d in nodes],
                       nodes[0]["span"], _name([d["name"] for d in nodes]))
        for j, m in enumerate(grp.members):
            self.ports[(m, 0)] = (node, j)

    def _param(self, path: str, shape: tuple[int, ...]) -> Port:
        return (self.out.add("param", ParamAttrs(path=path, shape=shape), [], [TensorType(shape)], None,
                             path.replace(".", "_")), 0)

    def _add_scan(self, n: int) -> None:
        g, out = self.graph, self.out
        data = g.node(n)
        a: ScanAttrs = data["attrs"]
        rewritten = self.scans[n]
        inputs, roles, axes = [], [], []
        seq_axes = iter(a.axes)
        for i, (port, role) in enumerate(zip(data["inputs"], a.roles)):
            axis = next(seq_axes) if role == "seq" else None
            if i in rewritten.dropped:
                continue
            inputs.append(self.ports[port])
            roles.append(role)
            if role == "seq":
                axes.append(axis)
        for extra in rewritten.extras:
            if isinstance(extra.value, Pack):
                inputs.append(self._value(extra.value))
            else:
                inputs.append(self._input_product(extra.value))
                axes.append(extra.axis)
            roles.append(extra.role)
        attrs = a.model_copy(update={"body": rewritten.graph, "roles": tuple(roles), "axes": tuple(axes)})
        new = copy_node(out, data, attrs, inputs)
        for i in range(len(data["types"])):
            self.ports[(n, i)] = (new, i)

    def _input_product(self, product: InputProduct) -> Port:
        source = self.ports[product.source]
        weight = self._value(product.weight)
        bias = self._value(product.bias)
        width = product.weight.type.shape[0]
        config = ProjectionGroupAttrs(in_features=product.weight.type.shape[1], out_features=(width,),
                                      biases=(bias is not None,), weights=(",".join(product.weights),), packed=True)
        t = self.out.type_of(source)
        node = self.out.add("projection_group", config, [source, weight] + ([bias] if bias is not None else []),
                            [TensorType(t.shape[:-1] + (width,))], product.span, product.name)
        return (node, 0)
