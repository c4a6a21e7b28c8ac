"""Property-based robustness of the front end: mutated specs either build and run, or fail with a located SpecError.

Every mutant of a valid seed spec (tokens and lines deleted, duplicated, swapped; numbers replaced by 0, negative,
huge and non-integer values; identifiers renamed to other names in the spec, keywords, fresh names and names that
collide with torch.nn.Module attributes) must either

* raise `gatedsl.SpecError` with a file, a line and column >= 1, a message, and a working `render()`; or
* check clean, compile, and run a forward pass on `example_inputs` whose outputs have the shapes the report gives.

Anything else (another exception, a hang, a huge allocation) is a bug in gatedsl. A model that checks clean but
fails at run time is a bug too: the static checker should have caught it. The only allowance is for what a
symbolic size hides: when a run with small symbolic sizes fails, the same spec with those sizes written into its
`input` declarations must then be rejected statically, or compile and run (int inputs are all 0, so every index is
valid; integer division by such a tensor is the one data-dependent failure allowed).
"""

from __future__ import annotations

import contextlib
import re
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gatedsl
from gatedsl.api import analyse
from gatedsl.ir.graph import Graph

MAX_PARAMS = 10**6
DIMS = {"B": 2, "T": 3, "N": 3}  # symbolic sizes for the forward pass; any other symbol is 2
OTHER_DIM = 2
MAX_ELEMENTS = 200_000  # skip the forward pass (never the checks) of a valid model with tensors larger than this
# Run-time failures no static check can rule out: integer division by a tensor that holds a zero (int inputs are 0).
DATA_DEPENDENT = re.compile(r"ZeroDivisionError")
CASE_SECONDS = 20  # a single case running longer than this is a hang

# ------------------------------------------------------------------------------------------- seed specs
# Together they exercise most of the language: cells with one and two states, scan with reverse / last / initial
# states / an integer axis / constants, repeat with an index and `as`, if / else, require, blocks passed as
# parameters and choices, gates of every spelling, static helpers, slicing, reductions, convs, MoE routing.
SEEDS = {
    "rnn": """
cell GRU(x: [*, D], state h: [*, H]) {
  gate z = sigmoid(linear(x, H) + linear(h, H, bias=false))
  gate r = sigmoid(linear(x, H) + linear(h, H, bias=false))
  n = tanh(linear(x, H) + r * linear(h, H))
  h = (1 - z) * n + z * h
}

cell LSTM(x: [*, D], state h: [*, H], state c: [*, H]) {
  gate i = sigmoid(linear(x, H) + linear(h, H))
  gate f = sigmoid(linear(x, H) + linear(h, H))
  c = f * c + i * tanh(linear(x, H))
  h = tanh(c) * f
}

block GatedAttn(x: [*, T, D], heads: int = 2) {
  require D % heads == 0, "heads must divide D"
  q = split_heads(linear(x, D), heads)
  k = split_heads(linear(x, D), heads)
  v = split_heads(x, heads)
  a = merge_heads(attention(q, k, v, causal=true), heads)
  gate g = sigmoid(linear(x, D))
  return g * a
}

model Forecaster(
  cell: {GRU, LSTM} = LSTM,
  d: int in 2..512 = 4,
  layers: int in 1..4 = 2,
  attention: bool = true,
) {
  input x: [B, T, 3]
  h = linear(x, d)
  repeat i in layers as stack {
    h = scan cell(h, H=d) over T
    if attention and i > 0 {
      h = h + GatedAttn(h, heads=2)
    } else {
      h = layer_norm(h)
    }
  }
  y2, hT, cT = scan LSTM(h, H=d) over T reverse
  last = scan GRU(h, h=hT) over T last
  output y = linear(h, 3) + linear(y2, 3)
  output z = linear(last, 2)
}
""",
    "mlp": """
block SwiGLU(x: [*, D], hidden: int = 8 * D // 3) {
  gate silu g = silu(linear(x, hidden, bias=false))
  u = linear(x, hidden, bias=false)
  return linear(g * u, D, bias=false)
}

block GeGLU(x: [*, D], hidden: int = 2 * D) {
  gate g = gelu(linear(x, hidden))
  return linear(g * linear(x, hidden), D)
}

block Highway(x: [*, D], f: block = SwiGLU) {
  gate t = sigmoid(linear(x, D, init=zeros, bias_init=constant(-1.0)))
  return t * f(x) + (1 - t) * x
}

model Mixer(
  ffn: block = SwiGLU,
  d: int in 4..64 = 6,
  depth: int in 1..8 = 3,
  act: {relu, gelu, silu} = gelu,
  p: float in 0.0..0.5 = 0.1,
  scale = 2,
) {
  input x: [B, N, 4]
  input m: bool[B, N]
  h = linear(x, d * scale)
  h = linear(act(h), d)
  repeat k in depth as blocks {
    if k % 2 == 0 {
      h = rms_norm(h + Highway(h, f=ffn))
    } else {
      h = h + dropout(GeGLU(h), p)
    }
  }
  w = learned([d], init=normal(0.02))
  s = where(m, sum(h * w, -1), 0.0)
  gate softmax a = softmax(s, dim=-1)
  pooled = sum(h * unsqueeze(a, -1), 1)
  output y = linear(pooled, 2)
  output e = exp(mean(h, dim=[1, 2]))
}
""",
    "moe": """
block Expert(x: [*, D], hidden: int) {
  return linear(relu(linear(x, hidden)), D)
}

block MoE(x: [*, D], experts: int = 4, k: int = 2) {
  require k <= experts
  gate topk w = topk_softmax(linear(x, experts), k)
  y = zeros_like(x)
  repeat e in experts as expert {
    y = y + w[..., e:e + 1] * Expert(x, hidden=2 * D)
  }
  return y
}

model Router(n: int in 1..4 = 1, d: int = 4) {
  input tokens: int[B, T]
  input x: [B, T, 4]
  h = embedding(tokens, 10, d) + linear(x, d)
  repeat n as layer {
    h = h + MoE(h, experts=3, k=2)
    c = conv1d(h, d, 3, causal=true)
    h = h + depthwise_conv1d(c, 3) * sigmoid(c)
  }
  a, b = chunk(h, 2)
  v, idx = topk(h, 2)
  gate binary e = binary(sigmoid(mean(h, -1, keepdim=true)))
  g = concat([a * b, a], dim=-1)
  q = einsum("btd,bsd->bts", h, h)
  r = reshape(h, [size(h, 0), size(h, 1), 2, -1])
  output y = linear(g, 3) * e + sum(q, -1, keepdim=true)
  output last = h[:, -1] + size(h, -1) + to_float(idx)[:, 0, :1]
  output rr = flatten(r, 2) + transpose(cumsum(transpose(h, 1, 2), 2, reverse=true), 1, 2) ** 2
}
""",
    "glr": """
cell GLR(x: [*, D], state s: [*, H], decay: float = 0.9) {
  gate a = sigmoid(linear(x, H))
  s = a * s * decay + (1 - a) * tanh(linear(x, H))
  return linear(s, H) * 2
}

cell Pair(x: [*, D], ctx: [*, C], state h: [*, H]) {
  gate sigmoid z = sigmoid(linear(concat([x, ctx]), H))
  h = z * h + (1 - z) * linear(x, H)
}

model Exit(h: int = 4, exits: int in 1..3 = 2, threshold: float = 0.5) {
  input x: [B, T, 5]
  input c: [B, 3]
  s0 = ones([size(x, 0), h])
  y = scan GLR(x, H=h, decay=0.5) over T
  y, sT = scan GLR(x, s=s0) over 1
  p = scan Pair(x, c, H=h) over T last
  out = y
  repeat j in exits {
    gate e = sigmoid(linear(out, 1))
    out = out + e * linear(out, h)
  }
  g = max(1, h // 2)
  if g > 1 {
    output o = linear(out, g) + unsqueeze(sT, 1)[..., :g]
  } else {
    output o = linear(out, g)
  }
  require threshold < 1.0 or not true, "bad threshold"
  output q = maximum(p, 0.0) + clamp(sT, min=-1.0, max=1.0) * (abs(sT) > threshold)
}
""",
    "conv": """
block Stem(x: [*, H, W, C], out: int, k: int = 3) {
  y = conv2d(x, out, k, padding=1)
  return max_pool2d(relu(y), 2)
}

model Vision(width: int in 2..16 = 4, classes: int = 3, norm: str = "layer") {
  input img: [B, 8, 8, 2]
  h = Stem(img, width)
  h = h + depthwise_conv2d(h, 3)
  if norm == "layer" {
    h = layer_norm(h)
  } else {
    h = group_norm(h, 2)
  }
  f = flatten(h, 1)
  gate g = sigmoid(linear(f, classes))
  logits = linear(f, classes) * g
  output probs = log_softmax(logits)
  output pooled = avg_pool1d(reshape(h, [size(h, 0), 16, width]), 4)
}
""",
    "prims": """
model Prims(k: int = 2, eps: float = 0.001) {
  input x: [B, 6, 4]
  input idx: int[B, 6, 2]
  input m: bool[B, 6]
  p = permute(x, [0, 2, 1])
  s1, s2 = split(x, [1, 3])
  q = stack([s1, s1], dim=1)
  g = gather(x, idx, dim=-1)
  o = one_hot(idx[:, :, 0], 5)
  w = where(unsqueeze(m, -1), x, -1.5)
  z = squeeze(q[:, :1], 1)
  f = flip(cumprod(softplus(x), 1), -1)
  r = logsumexp(x, -1) + unsqueeze(prod(sigmoid(x), [1, 2], keepdim=false), -1) * 0 + min(x, 2)
  c = max_pool1d(x, 2) + avg_pool1d(x, 2, stride=2)
  e = einsum("bld,bmd->blm", x, x) @ x
  n = group_norm(x, 2, eps=eps) + elu(x) * abs(x) - square(sign(x)) + sqrt(exp(x)) * rsqrt(exp(x) + 1)
  gate relu a = relu(linear(x, 4))
  h = n * a + to_float(idx)[..., :1] + maximum(c[:, :1], 0.5) + sum(o, -1, keepdim=true)
  output out = h + e + w + logsigmoid(f) + z[:, :1] + g[..., :1] + transpose(p, 1, 2) + cos(sin(x)) / 2
  output r2 = reshape(r, [-1]) // k + full([k], 2.0)[0]
}
""",
    "exits": """
block Spread(x: [B, D], w: float = 0.1) {
  aux spread = w * mean(x * x)
  return x + noise_like(x)
}

model Exits(stages: int = 3, tau: float = 0.6, classes: int = 3) {
  input x: [B, 5]
  h = Spread(linear(x, 8))
  parts = []
  repeat i in 2 {
    parts = parts + [h * (i + 1)]
  }
  a, b = parts
  y, exit_at, ys, gs = cascade l in stages as stage {
    h = h + relu(linear(h, 8))
    logits = linear(h, classes)
    gate g = sigmoid(linear(h, 1))
    exit logits when g > tau + 0.1 * l
  }
  aux exits = mean(to_float(exit_at))
  output out = y + to_float(unsqueeze(exit_at, -1)) + a[:, :classes] - b[:, :classes]
  output gates = gs
}
""",
}

# --------------------------------------------------------------------------------------- tokens, lines
_TOKEN = re.compile(
    r'"[^"\n]*"'  # a string
    r"|#[^\n]*"  # a comment
    r"|\d[\d_]*\.\d[\d_]*(?:[eE][+-]?\d+)?|\d[\d_]*[eE][+-]?\d+"  # a float
    r"|\d[\d_]*"  # an int
    r"|[A-Za-z_]\w*"  # a name
    r"|\*\*|//|==|!=|<=|>=|\.\.\.|\.\."  # long operators
    r"|\n"
    r"|[ \t]+"
    r"|."
)
_NAME = re.compile(r"[A-Za-z_]\w*\Z")
_NUMBER = re.compile(r"\d")

KEYWORDS = ["import", "block", "cell", "model", "state", "int", "float", "bool", "str", "in", "log", "gate",
            "input", "output", "return", "repeat", "as", "if", "else", "require", "scan", "over", "reverse",
            "last", "or", "and", "not", "true", "false"]
# Attributes of torch.nn.Module / fx.GraphModule, Python keywords and names that generated code uses.
COLLIDING = ["training", "forward", "state_dict", "_x", "_modules", "_parameters", "eval", "to", "cuda", "cpu",
             "type", "float_", "parameters", "modules", "children", "graph", "code", "meta", "train", "half",
             "register_buffer", "apply", "__init__", "__class__", "_", "__", "self", "lambda", "None", "True",
             "class", "def", "pass", "yield", "import_", "torch", "getattr", "operator", "print", "len", "F",
             "nn", "math", "fx", "x_1", "h_1", "out", "out_1"]
FRESH = ["zz", "fresh", "a1", "B", "T", "N", "D", "H", "sigmoid", "linear", "none", "zeros", "size"]
NUMBERS = ["0", "-1", "-7", "1", "2", "3", "5", "8", "16", "-0", "0.5", "1_0", "3e2", "2 ** 62", "2 ** 63", "1000000000", "1000000000000000000000000000000", "10 ** 30", "10**9",
           "2.5", "-2.5", "1e308", "1e-9", "0.0", "2 ** 10 ** 10", "(0 - 1)", "7 // 0", "1 / 0"]


def tokens_of(text: str) -> list[str]:
    pieces = _TOKEN.findall(text)
    assert "".join(pieces) == text
    return pieces


def _significant(pieces: list[str]) -> list[int]:
    return [i for i, p in enumerate(pieces) if p.strip() and not p.startswith("#")]


def _names(pieces: list[str]) -> list[int]:
    return [i for i, p in enumerate(pieces) if _NAME.match(p)]


def _numbers(pieces: list[str]) -> list[int]:
    return [i for i, p in enumerate(pieces) if _NUMBER.match(p)]


# ---------------------------------------------------------------------------------------------- mutations
def _pick(draw, seq):
    return seq[draw(st.integers(0, len(seq) - 1))]


def m_token_delete(draw, text):
    pieces = tokens_of(text)
    pieces[_pick(draw, _significant(pieces))] = ""
    return "".join(pieces)


def m_token_duplicate(draw, text):
    pieces = tokens_of(text)
    i = _pick(draw, _significant(pieces))
    pieces[i] = pieces[i] + " " + pieces[i]
    return "".join(pieces)


def m_token_swap(draw, text):
    pieces = tokens_of(text)
    sig = _significant(pieces)
    i = draw(st.integers(0, len(sig) - 1))
    # Mostly neighbours (a plausible typo), sometimes anywhere.
    j = draw(st.one_of(st.just(min(i + 1, len(sig) - 1)), st.integers(0, len(sig) - 1)))
    a, b = sig[i], sig[j]
    pieces[a], pieces[b] = pieces[b], pieces[a]
    return "".join(pieces)


def m_token_move(draw, text):
    pieces = tokens_of(text)
    sig = _significant(pieces)
    a, b = _pick(draw, sig), _pick(draw, sig)
    moved, pieces[a] = pieces[a], ""
    pieces[b] = pieces[b] + " " + moved
    return "".join(pieces)


VOCABULARY = KEYWORDS + ["(", ")", "[", "]", "{", "}", ",", ":", "=", "+", "-", "*", "/", "//", "%", "@", "**",
                         "==", "!=", "<", "<=", ">", ">=", "...", "..", ".", "\n", "*", "x", "h", "B", "T", "1",
                         "-1", "0", "2.5", '"s"', "sigmoid", "linear", "scan", "repeat"]


def m_token_replace(draw, text):
    """A token becomes another: one from the spec, or any token of the language."""
    pieces = tokens_of(text)
    sig = _significant(pieces)
    i = _pick(draw, sig)
    pieces[i] = draw(st.one_of(st.sampled_from(VOCABULARY), st.sampled_from([pieces[j] for j in sig])))
    return "".join(pieces)


def m_token_insert(draw, text):
    pieces = tokens_of(text)
    i = _pick(draw, _significant(pieces))
    pieces[i] = pieces[i] + " " + draw(st.sampled_from(VOCABULARY))
    return "".join(pieces)


def m_line_delete(draw, text):
    lines = text.split("\n")
    del lines[draw(st.integers(0, len(lines) - 1))]
    return "\n".join(lines)


def m_line_duplicate(draw, text):
    lines = text.split("\n")
    i = draw(st.integers(0, len(lines) - 1))
    lines.insert(i, lines[i])
    return "\n".join(lines)


def m_line_swap(draw, text):
    lines = text.split("\n")
    i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def m_line_transplant(draw, text):
    """A line of another seed spec lands somewhere in this one: features meet that no seed combines."""
    donor = SEEDS[draw(st.sampled_from(sorted(SEEDS)))].split("\n")
    lines = text.split("\n")
    lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(donor)))
    return "\n".join(lines)


def m_number(draw, text):
    pieces = tokens_of(text)
    nums = _numbers(pieces)
    if not nums:
        return text
    pieces[_pick(draw, nums)] = draw(st.sampled_from(NUMBERS))
    return "".join(pieces)


def _rename_target(draw, pieces):
    names = sorted({pieces[i] for i in _names(pieces)} - set(KEYWORDS))
    return draw(st.one_of(
        st.sampled_from(names),
        st.sampled_from(KEYWORDS),
        st.sampled_from(COLLIDING),
        st.sampled_from(FRESH),
    ))


def m_rename_one(draw, text):
    """One occurrence of a name becomes another name: mostly an error, sometimes a different valid model."""
    pieces = tokens_of(text)
    i = _pick(draw, _names(pieces))
    pieces[i] = _rename_target(draw, pieces)
    return "".join(pieces)


def m_rename_all(draw, text):
    """Every occurrence of a name becomes another: mostly a valid model whose names differ (`training`, `_x`)."""
    pieces = tokens_of(text)
    old = pieces[_pick(draw, _names(pieces))]
    new = _rename_target(draw, pieces)
    return "".join(new if p == old else p for p in pieces)


TOKEN_MUTATIONS = [m_token_delete, m_token_duplicate, m_token_swap, m_token_move, m_token_replace, m_token_insert]
LINE_MUTATIONS = [m_line_delete, m_line_duplicate, m_line_swap, m_line_transplant]
NAME_MUTATIONS = [m_rename_one, m_rename_all]
ALL_MUTATIONS = TOKEN_MUTATIONS + LINE_MUTATIONS + [m_number] + NAME_MUTATIONS


@st.composite
def mutants(draw, mutations, max_steps=3):
    text = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    for _ in range(draw(st.integers(1, max_steps))):
        mutate = draw(st.sampled_from(mutations))
        text = mutate(draw, text)
    return text


# ------------------------------------------------------------------------------------------- the oracle
class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"a single case ran past {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_located(err: gatedsl.SpecError, text: str) -> None:
    n_lines = text.count("\n") + 1
    assert err.file == "<string>", err.render()
    assert isinstance(err.line, int) and 1 <= err.line <= n_lines + 1, (err.line, err.render())
    assert isinstance(err.column, int) and err.column >= 1, (err.column, err.render())
    assert isinstance(err.message, str) and err.message.strip(), repr(err.message)
    rendered = err.render()
    assert rendered.startswith(f"<string>:{err.line}:{err.column}: error: {err.message}"), rendered
    for note in err.notes:
        assert note.message.strip()
        if note.span is not None:
            assert note.span.line >= 1 and note.span.column >= 1, rendered


def _size(d, dims: dict[str, int]) -> int:
    if isinstance(d, int):
        return d
    value = 1
    for factor in str(d).split("*"):
        value *= int(factor) if factor.isdigit() else dims.get(factor, OTHER_DIM)
    return value


def _largest_tensor(graph: Graph, dims: dict[str, int]) -> int:
    largest = 0
    for g in [graph] + graph.subgraphs():
        for n in g.order():
            for t in g.node(n)["types"]:
                numel = 1
                for d in t.shape:
                    numel *= _size(d, dims)
                largest = max(largest, numel)
    return largest


def _concretize(text: str, report, dims: dict[str, int]) -> str:
    """The spec with each symbolic input size replaced by the number it runs with."""
    symbols = {d for shape in report.inputs.values() for d in shape if isinstance(d, str)}
    out = []
    for line in text.split("\n"):
        m = re.match(r"(\s*input\s+\w+\s*:)(.*)", line)
        if m:
            tail = m.group(2)
            for s in symbols:
                tail = re.sub(rf"\b{re.escape(s)}\b", str(_size(s, dims)), tail)
            line = m.group(1) + tail
        out.append(line)
    return "\n".join(out)


def _run(text: str, report, dims: dict[str, int]):
    """Compile and run one forward pass; the output shapes must be the report's. Returns an error or None."""
    model = gatedsl.compile(text, max_params=MAX_PARAMS)  # a model that checks clean must compile
    assert isinstance(model, torch.nn.Module)
    inputs = gatedsl.example_inputs(report, dims=dims, vocab=1)  # int inputs are 0: always a valid index
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as err:  # noqa: BLE001 - the caller decides whether this is a bug
        return err
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(report.outputs)
    for (name, shape), value in zip(report.outputs.items(), outs):
        expected = [_size(d, dims) for d in shape]
        if list(value.shape) != expected:
            return AssertionError(f"output {name} is {list(value.shape)}, the report says {shape} = {expected}")
    return None


def outcome(text: str) -> str:
    """Check a mutant; on success compile and run it. Returns what happened; raises on any bug."""
    with time_limit(CASE_SECONDS):
        try:
            report = gatedsl.check(text, max_params=MAX_PARAMS)
        except gatedsl.SpecError as err:
            assert_located(err, text)
            return "error"
        unit = analyse(text, max_params=MAX_PARAMS)
        if _largest_tensor(unit.graph, DIMS) > MAX_ELEMENTS:
            gatedsl.compile(text, max_params=MAX_PARAMS)
            return "valid-large"
        failure = _run(text, report, DIMS)
        if failure is None:
            return "ran"
        # Only a symbolic size can hide a problem from the checker: with the sizes written in, it must see it.
        concrete = _concretize(text, report, DIMS)
        try:
            concrete_report = gatedsl.check(concrete, max_params=MAX_PARAMS)
        except gatedsl.SpecError as err:
            assert_located(err, concrete)
            return "size-dependent"
        again = _run(concrete, concrete_report, DIMS)
        if again is not None and DATA_DEPENDENT.search(repr(again)):
            return "data-dependent"
        if again is not None:
            raise AssertionError(f"a spec that checks clean fails at run time: {again!r}\n--- spec:\n{concrete}") \
                from again
        return "size-dependent"


FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


# -------------------------------------------------------------------------------------------------- tests
def test_seeds_are_valid_and_run():
    for name, text in SEEDS.items():
        assert outcome(text) == "ran", name


def test_mutations_apply():
    text = SEEDS["rnn"]
    assert "".join(tokens_of(text)) == text
    names = {tokens_of(text)[i] for i in _names(tokens_of(text))}
    assert {"GRU", "LSTM", "scan", "h"} <= names


@settings(FUZZ, max_examples=1200)
@given(mutants(TOKEN_MUTATIONS))
def test_token_mutations(text):
    outcome(text)


@settings(FUZZ, max_examples=600)
@given(mutants(LINE_MUTATIONS, max_steps=2))
def test_line_mutations(text):
    outcome(text)


@settings(FUZZ, max_examples=1200)
@given(mutants([m_number], max_steps=2))
def test_number_mutations(text):
    outcome(text)


@settings(FUZZ, max_examples=1200)
@given(mutants(NAME_MUTATIONS, max_steps=2))
def test_identifier_mutations(text):
    outcome(text)


@settings(FUZZ, max_examples=600)
@given(mutants(ALL_MUTATIONS, max_steps=4))
def test_mixed_mutations(text):
    outcome(text)


@pytest.mark.parametrize("name", ["training", "forward", "eval", "to", "cuda", "state_dict", "_modules", "_x",
                                  "__init__", "type", "half", "code", "graph", "meta", "lambda", "self", "_"])
def test_statement_names_colliding_with_module_attributes(name):
    spec = f"""
block Blk(x: [*, D]) {{
  {name} = linear(x, D)
  return {name}
}}
model M() {{
  input x: [B, 3]
  {name} = linear(x, 2)
  w = learned([2])
  repeat 2 as {name} {{ x = x + Blk(x) }}
  output y = {name} + w + linear(x, 2)
}}
"""
    assert outcome(spec) == "ran"
    model = gatedsl.compile(spec)
    paths = [n for n, _ in model.named_parameters()]
    assert all(not part.startswith("_") for p in paths for part in p.split(".")), paths
    assert len(paths) == len(set(paths))


@pytest.mark.parametrize("name", ["self", "torch", "def", "lambda", "None", "getattr", "print", "inf", "device",
                                  "torch_", "x"])
def test_input_and_cell_parameter_names_colliding_with_generated_code(name):
    """Inputs become arguments of the generated forward(): `def forward(self, torch)` would shadow the torch module."""
    other = "torch_" if name != "torch_" else "torch"
    spec = f"""
cell C({name}: [*, D], state h: [*, D]) {{
  h = tanh({name} + h)
}}
model M() {{
  input {name}: [B, T, 3]
  input {other}: [B, T, 3]
  a = sigmoid({name}) * {other}
  output y = scan C(a, h={other}[:, 0]) over T
}}
"""
    assert outcome(spec) == "ran"


def test_reserved_names_cover_torch_module_attributes():
    import keyword

    from gatedsl.ir.reserved_names import RESERVED, is_reserved, safe_attribute_name

    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    attributes = set(dir(torch.nn.Module)) | set(dir(torch.fx.GraphModule)) | set(dir(torch.nn.Module())) | set(dir(gm))
    missing = sorted(a for a in attributes if not is_reserved(a))
    assert not missing, f"add these to gatedsl/ir/reserved_names.py: {missing}"
    assert set(keyword.kwlist) <= RESERVED
    for name in sorted(attributes | set(keyword.kwlist)) + ["_", "__", "_0", "x"]:
        safe = safe_attribute_name(name)
        assert safe.isidentifier() and not is_reserved(safe), (name, safe)
        assert not hasattr(gm, safe) or safe == name == "x"
    assert safe_attribute_name("h") == "h"  # ordinary names are kept as written


def test_argument_names_avoid_what_fx_generated_code_reads():
    from gatedsl.ir.reserved_names import ARGUMENT_RESERVED, safe_argument_name

    illegal = set(getattr(torch.fx.graph, "_illegal_names", {}))  # keywords, builtins, torch, inf, ... in fx
    assert "torch" in illegal and "getattr" in illegal
    missing = sorted(illegal - ARGUMENT_RESERVED)
    assert not missing, f"add these to FX_GLOBALS in gatedsl/ir/reserved_names.py: {missing}"
    assert safe_argument_name("torch") == "torch_" and safe_argument_name("x") == "x"
    assert safe_argument_name("torch", {"torch_"}) == "torch__"


def test_check_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, gatedsl\n"
            "gatedsl.check('model M() {\\n input x: [B, 3]\\n training = linear(x, 3)\\n output y = training\\n}')\n"
            "assert 'torch' not in sys.modules, 'gatedsl.check imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fuzz_oracle_catches_crashes():
    """The oracle itself: a located SpecError passes, an unlocated or foreign exception does not."""
    assert outcome("model M() {\n  input x: [B, 3]\n  output y = nope(x)\n}") == "error"
    with pytest.raises(AssertionError):
        assert_located(gatedsl.SpecError("", None), "x")
    started = time.monotonic()
    with pytest.raises(Hang):
        with time_limit(0.2):
            while True:
                pass
    assert time.monotonic() - started < 5
