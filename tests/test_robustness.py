"""The front end stays in control of hostile or mistaken specs: limits before allocation, cycles, recursion,
runaway expansion and arithmetic, no evaluation of spec text, and diagnostics that point at the right place."""

from __future__ import annotations

import ast as pyast
import re
import resource
import time
from pathlib import Path

import pytest

import gatedsl
from gatedsl.errors import LimitError, NameResolutionError, ParseError, SpecError, SpecImportError, SpecTypeError

PACKAGE = Path(gatedsl.__file__).resolve().parent


def spec_error(spec, **kwargs) -> SpecError:
    """The SpecError that checking `spec` raises; any other outcome fails the test."""
    with pytest.raises(SpecError) as info:
        gatedsl.check(spec, **kwargs)
    err = info.value
    assert err.line >= 1 and err.column >= 1 and err.message
    return err


# A guard against runaway expansion, not a speed target: rejecting takes well under a second
# on an idle machine, a runaway would take hours, and CI machines may be busy.
HANG_GUARD_S = 60.0


def timed_error(spec, **kwargs) -> SpecError:
    started = time.perf_counter()
    err = spec_error(spec, **kwargs)
    elapsed = time.perf_counter() - started
    assert elapsed < HANG_GUARD_S, f"took {elapsed:.2f}s to reject: {err}"
    return err


def model(*body: str, params: str = "") -> str:
    return f"model M({params}) {{\n" + "\n".join("  " + line for line in body) + "\n}\n"


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), 1) if needle in line)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------- parameter limit
HUGE = model("input x: [B, 1000]", "h = x", "repeat 4 {", "  h = linear(h, 1000000)", "  h = linear(h, 1000)", "}",
             "output y = h")  # 4 * 2 * 10**9 weights: 32 GB in float32


def test_default_parameter_limit_rejects_before_allocating():
    rss = peak_rss_mib()
    started = time.perf_counter()
    with pytest.raises(LimitError) as info:
        gatedsl.compile(HUGE)
    elapsed = time.perf_counter() - started
    assert elapsed < HANG_GUARD_S, elapsed
    assert peak_rss_mib() - rss < 500  # nothing near 8 GB (one layer's weight) was allocated
    err = info.value
    assert isinstance(err, SpecError)
    assert "2,147,483,648" in err.message  # the default limit, 2**31 elements
    # The first weight past 2**31: the second repetition's first (1000 * 10**6 + 10**6 + 10**6 * 1000 + 1000 before).
    assert err.line == line_of(HUGE, "linear(h, 1000000)")
    assert "repeat.1." in err.message
    rendered = err.render()
    assert re.search(r"note: \S+\.weight has 1,000,000,000 elements \[1000000, 1000\]", rendered), rendered


def test_parameter_limit_is_settable():
    spec = model("input x: [B, 4]", "h = x", "repeat 3 { h = linear(h, 1000000) }", "output y = h")
    started = time.perf_counter()
    with pytest.raises(LimitError) as info:
        gatedsl.compile(spec, max_params=10**6)
    assert time.perf_counter() - started < HANG_GUARD_S
    assert "1,000,000 parameters" in info.value.message
    # The same model fits a larger limit, and checking it allocates nothing.
    rss = peak_rss_mib()
    report = gatedsl.check(spec, max_params=10**13)
    assert report.params == (4 * 10**6 + 10**6) + 2 * (10**12 + 10**6)
    assert peak_rss_mib() - rss < 200
    # Just at the limit is allowed, one element over is not.
    small = model("input x: [B, 4]", "output y = linear(x, 3)")  # 12 + 3
    assert gatedsl.check(small, max_params=15).params == 15
    with pytest.raises(LimitError):
        gatedsl.check(small, max_params=14)


def test_parameter_limit_stops_a_long_expansion_early():
    # 20 elements per repetition: 20,000 repetitions reach the limit. Elaboration stays linear in the model size
    # (it was quadratic: each linear() scanned every weight declared before it).
    spec = model("input x: [B, 4]", "h = x", "repeat 1000000000 { h = linear(h, 4) }", "output y = h")
    err = timed_error(spec, max_params=400_000)
    assert isinstance(err, LimitError) and "400,000" in err.message


def test_learned_tensors_count_too():
    spec = model("input x: [B, 4]", "w = learned([1000000000, 1000000000])", "output y = x")
    err = timed_error(spec)
    assert isinstance(err, LimitError) and err.line == 3


# ------------------------------------------------------------------------------------------ imports
def write(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)


def test_import_cycle_is_reported_at_the_import_that_closes_it(tmp_path):
    b = 'import "a.gate"\nblock F(x: [*, D]) { return x }\n'
    write(tmp_path, {"a.gate": 'import "b.gate"\n' + model("input x: [B, 2]", "output y = F(x)"), "b.gate": b})
    err = spec_error(tmp_path / "a.gate")
    assert isinstance(err, SpecImportError)
    assert "import cycle" in err.message and "a.gate -> b.gate -> a.gate" in err.message
    assert Path(err.file).name == "b.gate" and (err.line, err.column) == (1, 1)
    assert err.render().splitlines()[1].endswith('import "a.gate"')


def test_self_import_and_dotted_cycle(tmp_path):
    write(tmp_path, {"a.gate": '\n\nimport "a.gate"\n' + model("input x: [B, 2]", "output y = x")})
    err = spec_error(tmp_path / "a.gate")
    assert isinstance(err, SpecImportError) and err.line == 3
    (tmp_path / "pkg").mkdir()
    write(tmp_path, {"main.gate": "import pkg.one\n" + model("input x: [B, 2]", "output y = x"),
                     "pkg/one.gate": "# one\nimport two\n", "pkg/two.gate": "import one\n"})
    err = spec_error(tmp_path / "main.gate")
    assert isinstance(err, SpecImportError) and "one.gate -> two.gate -> one.gate" in err.message
    assert Path(err.file).name == "two.gate" and err.line == 1


def test_missing_import_is_located(tmp_path):
    write(tmp_path, {"a.gate": "# header\nimport nothing.here\n" + model("input x: [B, 2]", "output y = x")})
    err = spec_error(tmp_path / "a.gate")
    assert isinstance(err, SpecImportError) and err.line == 2 and "nothing.here" in err.message


def test_duplicate_definition_across_files_points_at_the_first(tmp_path):
    lib = "# a library\n\nblock F(x: [*, D]) { return x }\n"
    main = 'import "lib.gate"\nblock F(x: [*, D]) { return x }\n' + model("input x: [B, 2]", "output y = F(x)")
    write(tmp_path, {"lib.gate": lib, "main.gate": main})
    err = spec_error(tmp_path / "main.gate")
    assert isinstance(err, NameResolutionError) and "'F' is defined twice" in err.message
    assert Path(err.file).name == "main.gate" and err.line == 2
    (note,) = err.notes
    assert "first definition" in note.message
    assert Path(note.span.file).name == "lib.gate" and note.span.line == 3
    assert f"{note.span.file}:3:1: note: the first definition is here" in err.render()


def test_duplicate_definition_in_one_file():
    text = "block F(x: [*, D]) { return x }\n\nblock F(x: [*, D]) { return x }\n" + model("input x: [B, 2]",
                                                                                          "output y = F(x)")
    err = spec_error(text)
    assert isinstance(err, NameResolutionError) and err.line == 3 and err.notes[0].span.line == 1


# ----------------------------------------------------------------------------------- names, recursion
def test_unknown_name_suggests_the_closest():
    text = model("input x: [B, 4]", "hidden = linear(x, 8)", "output y = sigmod(hiden)")
    err = spec_error(text)
    assert isinstance(err, NameResolutionError)
    assert err.message == "unknown name 'sigmod'" and (err.line, err.column) == (4, 14)
    assert err.help == "did you mean 'sigmoid'?"
    text = model("input x: [B, 4]", "hidden = linear(x, 8)", "output y = sigmoid(hiden)")
    assert spec_error(text).help == "did you mean 'hidden'?"
    assert "help: did you mean 'hidden'?" in spec_error(text).render()


def test_direct_recursion():
    text = "block A(x: [*, D]) {\n  return A(x) + x\n}\n" + model("input x: [B, 2]", "output y = A(x)")
    err = timed_error(text)
    assert "block A calls itself" in err.message and (err.line, err.column) == (2, 10)
    assert err.notes[0].span.line == 1


def test_mutual_recursion_and_recursion_through_a_block_parameter():
    text = ("block A(x: [*, D]) { return C(x) }\nblock C(x: [*, D]) { return A(x) }\n"
            + model("input x: [B, 2]", "output y = A(x)"))
    err = timed_error(text)
    assert "calls itself" in err.message and err.line == 2
    text = "block A(x: [*, D], f: block) { return f(x, f=f) }\n" + model("input x: [B, 2]", "output y = A(x, f=A)")
    assert "block A calls itself" in timed_error(text).message
    text = ("cell C(x: [*, D], state h: [*, D]) { h = scan C(x) over 0 }\n"
            + model("input x: [B, T, 2]", "output y = scan C(x) over T"))
    assert "cell C calls itself" in timed_error(text).message


def test_deep_block_nesting_is_limited():
    chain = "".join(f"block B{i}(x: [*, D]) {{ return B{i + 1}(x) }}\n" for i in range(100))
    text = chain + "block B100(x: [*, D]) { return x }\n" + model("input x: [B, 2]", "output y = B0(x)")
    err = timed_error(text)
    assert isinstance(err, LimitError) and "nest" in err.message


# ----------------------------------------------------------------------------------- runaway expansion
@pytest.mark.parametrize("body", [
    "repeat 10**9 { }",
    "repeat 1000000000 { }",
    "repeat 100000 { repeat 100000 { repeat 100000 { } } }",
    "repeat i in 2 ** 40 as big { h = h + i }",
    "repeat 10**9 { h = sigmoid(h) }",
])
def test_huge_expansion_is_rejected_quickly(body):
    err = timed_error(model("input x: [B, 4]", "h = x", body, "output y = h"))
    assert isinstance(err, LimitError) and "expands to more than" in err.message
    assert err.line == 4


def test_repeat_count_must_be_a_small_static_int():
    assert isinstance(timed_error(model("input x: [B, 4]", "repeat 10 ** 30 { }", "output y = x")), LimitError)
    assert "negative" in spec_error(model("input x: [B, 4]", "repeat -1 { }", "output y = x")).message
    assert "static int" in spec_error(model("input x: [B, 4]", "repeat 2.5 { }", "output y = x")).message


@pytest.mark.parametrize("expr", [
    "2 ** 10 ** 10", "10 ** 10 ** 10 ** 10", "(2 ** 62) * (2 ** 62) * (2 ** 62)", "2 ** 64 * 4",
    "1.5 ** 100000", "1e300 * 1e300", "int(1e300)", "round(1e300)",
    "9" * 5000,  # beyond Python's own limit on int literals (4300 digits)
])
def test_huge_static_arithmetic_is_rejected_quickly(expr):
    err = timed_error(model("input x: [B, 4]", f"a = {expr}", "output y = x"))
    assert isinstance(err, LimitError) and err.line == 3
    assert len(err.message) < 200  # a huge value is not printed in full


def test_runaway_static_values_are_bounded():
    s = model("input x: [B, 4]", 's = "ab"', "repeat 64 { s = s + s }", "output y = x")
    assert "string longer than" in timed_error(s).message  # not 2**65 characters of memory
    s = model("input x: [B, 4]", "n = size(x, 0)", "repeat 64 { n = n * n }", "output y = zeros([n])")
    assert isinstance(timed_error(s), LimitError)  # not a product of 2**64 symbols
    s = model("input x: [B, 4]", "n = size(x, 0)", "repeat 64 { n = n * 1000 }", "output y = zeros([n])")
    assert isinstance(timed_error(s), LimitError)


def test_deep_nesting_is_a_located_error_not_a_crash():
    for expr in ["-" * 3000 + "1", " + ".join(["1"] * 5000), " ** ".join(["1"] * 3000),
                 "sigmoid(" * 1000 + "x" + ")" * 1000, "[" * 3000 + "]" * 3000]:
        err = timed_error(model("input x: [B, 4]", f"a = {expr}", "output y = x"))
        assert isinstance(err, LimitError) and "nests" in err.message and err.line == 3
    # Moderate nesting is fine.
    gatedsl.check(model("input x: [B, 4]", "a = " + "sigmoid(" * 60 + "x" + ")" * 60, "output y = a"))
    gatedsl.check(model("input x: [B, 4]", "a = x" + " + x" * 150, "output y = a"))


# ------------------------------------------------------------------------------------ division by zero
@pytest.mark.parametrize("expr", ["1 / 0", "1 // 0", "1 % 0", "1.0 / 0.0", "5 % -0.0", "7 // (3 - 3)"])
def test_division_by_zero(expr):
    text = model("input x: [B, 4]", "d = 4", f"a = {expr}", "output y = x")
    err = spec_error(text)
    assert isinstance(err, SpecTypeError) and err.message == "division by zero"
    assert err.line == 4 and err.column == 7


def test_division_by_zero_in_a_parameter_default_and_a_symbolic_size():
    err = spec_error(model("input x: [B, 4]", "output y = linear(x, h)", params="d: int = 4, h: int = d // (d - 4)"))
    assert err.message == "division by zero" and err.line == 1
    err = spec_error(model("input x: [B, 4]", "n = size(x, 0) // 0", "output y = x"))
    assert isinstance(err, SpecTypeError) and err.line == 3


# ---------------------------------------------------------------------------------- no eval of spec text
def _dynamic_code_calls(source: str) -> list[str]:
    found = []
    for node in pyast.walk(pyast.parse(source)):
        if isinstance(node, pyast.Call):
            func = node.func
            name = func.id if isinstance(func, pyast.Name) else func.attr if isinstance(func, pyast.Attribute) \
                and isinstance(func.value, pyast.Name) and func.value.id == "builtins" else None
            if name in ("eval", "exec", "__import__"):
                found.append(f"line {node.lineno}: {name}(...)")
    return found


# Kernel generators: they compile source built from a fixed table of op templates, with the spec's
# numbers written by repr(float) (never spec text), into the fused gate-chain kernels.
CODE_GENERATORS = {"kernels/gate_chain/torch_fused.py", "kernels/gate_chain/triton.py"}


def test_compiler_sources_never_eval_or_exec():
    files = sorted(f for f in PACKAGE.rglob("*.py") if str(f.relative_to(PACKAGE)) not in CODE_GENERATORS)
    assert len(files) > 10
    offenders = {str(f.relative_to(PACKAGE)): calls for f in files if (calls := _dynamic_code_calls(f.read_text()))}
    assert not offenders, offenders
    # The same check by text: a bare eval( / exec( outside comments and strings (Elaborator.eval is a method).
    for f in files:
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            code = re.sub(r'"[^"]*"|\'[^\']*\'', '""', code)
            assert not re.search(r"(?<![\w.])(eval|exec)\s*\(", code) or re.match(r"\s*def eval\(", code), \
                f"{f}:{lineno}: {line.strip()}"
    # The checker itself would notice.
    assert _dynamic_code_calls("x = eval('1')\nexec(y)\nimport builtins\nbuiltins.eval(z)") == \
        ["line 1: eval(...)", "line 2: exec(...)", "line 4: eval(...)"]


@pytest.mark.parametrize("payload", [
    "__import__('os').system('touch {marker}')",
    '__import__("os").system("touch {marker}")',
    "exec(\"open('{marker}', 'w')\")",
    "eval(compile('open(\"{marker}\", \"w\")', 'x', 'exec'))",
])
def test_spec_text_is_never_executed(tmp_path, payload):
    marker = tmp_path / "pwned"
    code = payload.format(marker=marker)
    for text in [model("input x: [B, 4]", f"a = {code}", "output y = x"),
                 code,
                 model("input x: [B, 4]", "output y = x", params=f"a = {code}")]:
        err = spec_error(text)
        assert isinstance(err, (ParseError, NameResolutionError)), err.render()
    # As parameter values (the CLI's -p NAME=VALUE strings), they stay strings.
    with pytest.raises(SpecError):
        gatedsl.check(model("input x: [B, 4]", "output y = linear(x, d)", params="d: int = 2"), params={"d": code})
    assert not marker.exists()


def test_python_syntax_is_a_parse_error():
    err = spec_error(model("input x: [B, 4]", "a = __import__('os').system('true')", "output y = x"))
    assert isinstance(err, ParseError) and err.message == "unexpected character \"'\"" and err.line == 3
    err = spec_error(model("input x: [B, 4]", 'a = __import__("os").system("true")', "output y = x"))
    assert isinstance(err, ParseError) and err.line == 3 and err.column == 23  # the "." of attribute access


# --------------------------------------------------------------------------------------------- rendering
def caret_column(rendered_lines: list[str], index: int) -> int:
    """The source column (from 1) that the caret on line `index` points at, read off the quoted line above it."""
    quoted, caret = rendered_lines[index - 1], rendered_lines[index]
    gutter = quoted.index("| ") + 2
    assert caret.index("| ") + 2 == gutter
    return caret.index("^") - gutter + 1


def test_render_header_source_line_and_caret():
    text = model("input x: [B, 4]", "h = linear(x, 8)", "output y = tanh(h) * nada")  # no name is close to it
    err = spec_error(text)
    assert (err.line, err.column) == (4, 24)
    lines = err.render().splitlines()
    assert lines[0] == "<string>:4:24: error: unknown name 'nada'"
    assert lines[1] == "   4 |   output y = tanh(h) * nada"
    assert lines[2] == "     |                        ^~~~"
    assert caret_column(lines, 2) == err.column
    assert len(lines) == 3  # nothing close to suggest, no notes


def test_render_keeps_tabs_so_the_caret_lines_up():
    text = "model M() {\n\tinput x: [B, 4]\n\toutput y = x @ bogus\n}\n"
    err = spec_error(text)
    lines = err.render().splitlines()
    assert lines[0] == f"<string>:3:{err.column}: error: unknown name 'bogus'"
    assert lines[1].endswith("\toutput y = x @ bogus")
    assert lines[2].split("| ", 1)[1].startswith("\t")
    assert caret_column(lines, 2) == err.column == 17


def test_render_of_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.gate"
    path.write_text(model("input x: [B, 4]", "output y = x +"))
    err = spec_error(path)
    assert isinstance(err, ParseError)
    assert err.render().startswith(f"{path}:{err.line}:{err.column}: error: {err.message}")


def test_shape_mismatch_names_both_shapes_and_where_each_came_from():
    text = model("input x: [B, T, 8]", "a = linear(x, 64)", "b = tanh(linear(x, 32))", "output y = a * b")
    err = spec_error(text)
    assert err.message == "cannot broadcast [B, T, 64] with [B, T, 32]"
    assert (err.line, err.column) == (5, 14)
    rendered = err.render()
    lines = rendered.splitlines()
    assert lines[0] == "<string>:5:14: error: cannot broadcast [B, T, 64] with [B, T, 32]"
    assert caret_column(lines, 2) == 14
    notes = [line for line in lines if ": note: " in line]
    assert notes == ["<string>:3:7: note: a is [B, T, 64]", "<string>:4:7: note: b is [B, T, 32]"], rendered
    # Each note quotes its own source line, caret under the column.
    i = lines.index(notes[0])
    assert lines[i + 1].endswith("a = linear(x, 64)") and caret_column(lines, i + 2) == 7
    i = lines.index(notes[1])
    assert lines[i + 1].endswith("b = tanh(linear(x, 32))") and caret_column(lines, i + 2) == 7


def test_every_error_from_a_bad_spec_is_located():
    """A sample of distinct mistakes: each is a SpecError with a real location and a rendering that quotes it."""
    cases = [
        model("input x: [B, 4]", "output y = linear(x)"),
        model("input x: [B, 4]", "output y = linear(x, 4, bogus=1)"),
        model("input x: [B, 4]", "output y = x[0, 0, 0]"),
        model("input x: [B, 4]", "output y = reshape(x, [3, -1])"),
        model("input x: [B, 4]", "require 1 > 2, \"never\"", "output y = x"),
        model("input x: [B, 4]", "if x { }", "output y = x"),
        model("input x: [B, 4]", "output y = scan nope(x) over B"),
        model("input x: [B, 4]", "y = x"),
        "block F(x: [*, D]) { y = x }\n" + model("input x: [B, 4]", "output y = F(x)"),
        model("input x: [B, 4]", "output y = x", params="d: int in 1..2 = 5"),
        model("input x: [B, 4]", "output y = x", params="d: int in 1..\"z\" = 1"),
    ]
    for text in cases:
        err = spec_error(text)
        lines = err.render().splitlines()
        assert lines[0] == f"{err.file}:{err.line}:{err.column}: error: {err.message}"
        if err.line > 1 or err.column > 1:
            assert lines[1].startswith(f"{err.line:>4} | ") and caret_column(lines, 2) == err.column


# ---------------------------------------------------------------------------------- hostile API values
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10**400, object(), None, {"a": 1}])
def test_hostile_parameter_overrides(value):
    text = model("input x: [B, 4]", "output y = linear(x, d) * f", params="d: int = 2, f: float = 0.5, u = 1")
    for name in ("d", "f", "u"):
        err = spec_error(text, params={name: value})
        assert err.line == 1


def test_constants_beyond_float32_are_rejected_statically():
    for expr in ["full_like(x, 1e300)", "linear(x, 2, init=constant(1e39))", "x * 1e39", "maximum(x, -1e300)"]:
        err = spec_error(model("input x: [B, 4]", f"output y = {expr}"))
        assert isinstance(err, LimitError) and "float32" in err.message and err.line == 3


def test_an_error_quotes_its_own_source_after_other_specs_are_checked():
    first = "model M() {\n  input x: [B, 4]\n  output y = x + linear(x, 3)\n}\n"
    with pytest.raises(gatedsl.SpecError) as err:
        gatedsl.check(first)
    gatedsl.check("model N() {\n  input a: [B, 2]\n  output b = a * 2\n}\n")  # reuses the name <string>
    assert "output y = x + linear(x, 3)" in err.value.render()


# ------------------------------------------------------------------------- lines as the lexer counts them
# str.splitlines() also ends a line at each of these; the lexer ends one only at '\n'.
SPLITLINES_BREAKS = ["\f", "\v", "\r", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", SPLITLINES_BREAKS, ids=[f"U+{ord(c):04X}" for c in SPLITLINES_BREAKS])
def test_a_line_break_only_to_python_in_a_comment_quotes_the_right_line(char):
    text = f"# header{char}more of it\n" + model("input x: [B, 4]", "output y = x + nope")
    err = spec_error(text)
    lines = err.render().splitlines()
    assert (err.line, err.column) == (4, 18)
    assert lines[1:3] == ["   4 |   output y = x + nope", "     |                  ^~~~"]


@pytest.mark.parametrize("char", SPLITLINES_BREAKS, ids=[f"U+{ord(c):04X}" for c in SPLITLINES_BREAKS])
def test_such_a_character_in_the_quoted_line_is_shown_visibly_and_the_caret_stays_under_its_column(char):
    text = model("input x: [B, 4]", f"output y = x  # a{char}b", "output z = x + nope")
    err = spec_error(text)
    assert err.line == 4
    err = spec_error(model("input x: [B, 4]", f"output y = nope  # a{char}b"))
    lines = err.render().splitlines()
    assert lines[1].startswith("   3 |   output y = nope  # a") and lines[1].endswith("b")
    assert all(c == "\t" or c.isprintable() for c in lines[1]), repr(lines[1])  # nothing moves the cursor
    assert caret_column(lines, 2) == err.column == 14


def test_a_long_line_is_quoted_as_a_window_around_the_caret():
    long = "output y = x" + " " * 5_000 + "+ nope  # " + "z" * 5_000
    err = spec_error(model("input x: [B, 4]", long))
    assert (err.line, err.column) == (3, 5_017)
    lines = err.render().splitlines()
    quoted = lines[1].split("| ", 1)[1]
    assert quoted.startswith("…") and quoted.endswith("…") and len(quoted) == 102  # 100 characters and two cuts
    assert "+ nope  # zzz" in quoted
    assert lines[2].index("^") == lines[1].index("nope") and lines[2].endswith("^~~~")
    assert len(err.render()) < 300


def test_the_window_is_cut_only_on_the_side_that_is_long():
    near_start = spec_error(model("input x: [B, 4]", "output y = nope  # " + "z" * 1_000))
    lines = near_start.render().splitlines()
    assert lines[1].startswith("   3 |   output y = nope  # zzz") and lines[1].endswith("z…")
    assert lines[2].index("^") == lines[1].index("nope") and lines[2].endswith("^~~~")
    near_end = spec_error(model("input x: [B, 4]", "output y = x" + " " * 1_000 + "+ nope"))
    lines = near_end.render().splitlines()
    assert lines[1].startswith("   3 | … ") and lines[1].endswith("   + nope")
    assert lines[2].index("^") == lines[1].index("nope") and lines[2].endswith("^~~~")


def test_a_huge_token_is_not_echoed_whole():
    err = spec_error("x" * 1_000_000 + "\n")
    assert isinstance(err, ParseError) and err.message.startswith("unexpected 'xxx")
    assert len(err.render()) < 1_000


def test_a_byte_order_mark_is_not_part_of_the_spec(tmp_path):
    text = model("input x: [B, 4]", "output y = x")
    assert gatedsl.check("\ufeff" + text).outputs == {"y": ["B", 4]}
    path = tmp_path / "bom.gate"
    path.write_text("model M(d: int = nope) {\n  input x: [B, 4]\n  output y = x\n}\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    err = spec_error(path)
    lines = err.render().splitlines()
    assert lines[:2] == [f"{path}:1:18: error: unknown name 'nope'", "   1 | model M(d: int = nope) {"]
    assert caret_column(lines, 2) == 18  # columns as an editor shows them


# ------------------------------------------------------------------------- only specs are read, or quoted
SECRET = "root:TOPSECRET:0:0\n"


def test_an_import_must_name_a_gate_file_and_is_refused_before_it_is_read(tmp_path):
    write(tmp_path, {"secret.txt": SECRET, "main.gate": 'import "secret.txt"\n' + model("input x: [B, 2]",
                                                                                         "output y = x")})
    err = spec_error(tmp_path / "main.gate")
    assert isinstance(err, SpecImportError)
    assert err.message == 'an import names a .gate file, got "secret.txt"'
    assert (err.line, err.column) == (1, 1)
    assert "TOPSECRET" not in err.render()


def test_a_diagnostic_never_reads_a_file_to_quote_it(tmp_path):
    secret = tmp_path / "secret.gate"
    secret.write_text(SECRET)
    rendered = SpecError("somewhere else", gatedsl.errors.Span(str(secret), 1, 1)).render()
    assert rendered == f"{secret}:1:1: error: somewhere else"


def test_the_main_file_must_be_a_gate_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    err = spec_error(secret)
    assert isinstance(err, SpecImportError) and err.message == f"{secret} is not a spec: a spec is a .gate file"
    assert "TOPSECRET" not in err.render()


def test_a_spec_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    import os

    (tmp_path / "zero.gate").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.gate")  # opening it for reading would wait for a writer
    for name in ("zero.gate", "pipe.gate"):
        err = timed_error(tmp_path / name)
        assert isinstance(err, SpecImportError) and err.message == f"cannot read {tmp_path / name}: not a regular file"


# ------------------------------------------------------------------------------------------- file size
def test_a_spec_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    from gatedsl.frontend.loader import MAX_FILE_SIZE

    assert MAX_FILE_SIZE == 4 * 2**20
    path = tmp_path / "huge.gate"
    with open(path, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: reading it would take 64 MiB, and a parse of NULs
    rss = peak_rss_mib()
    err = timed_error(path)
    assert isinstance(err, LimitError)
    assert err.message == f"{path} is 67,108,864 bytes, more than 4,194,304, the limit for a spec file"
    assert "--max-file-size" in err.help
    assert peak_rss_mib() - rss < 32
    assert err.render().count("\n") == 1  # the header and the help: nothing of the file is quoted


def test_the_size_limit_is_settable_and_holds_for_imports_text_and_a_file_that_grows(tmp_path, monkeypatch):
    text = model("input x: [B, 2]", "output y = F(x)")
    write(tmp_path, {"lib.gate": "block F(x: [*, D]) { return x }\n" + "#" * 200 + "\n",
                     "main.gate": '# the model\n  import "lib.gate"\n' + text})
    main, lib = tmp_path / "main.gate", tmp_path / "lib.gate"
    size, lib_size = main.stat().st_size, lib.stat().st_size
    assert size < lib_size
    assert gatedsl.check(main, max_file_size=lib_size).outputs == {"y": ["B", 2]}
    err = spec_error(main, max_file_size=size - 1)
    assert isinstance(err, LimitError) and (err.line, err.column) == (1, 1)
    assert err.message == f"{main} is {size} bytes, more than {size - 1}, the limit for a spec file"
    # An import over the limit is reported where it is imported.
    err = spec_error(main, max_file_size=size)
    assert isinstance(err, LimitError) and (err.file, err.line, err.column) == (str(main), 2, 3)
    assert err.message == f"{lib} is {lib_size} bytes, more than {size}, the limit for a spec file"
    assert err.render().splitlines()[1] == '   2 |   import "lib.gate"'
    # A text spec counts too, in bytes.
    padded = "# é\n" * 60 + "block F(x: [*, D]) { return x }\n" + text
    assert spec_error(padded, max_file_size=len(padded) + 10).message == \
        f"the spec text is larger than {len(padded) + 10} bytes, the limit for a spec"
    # A file that grows after its size was read is still read only up to the limit.
    import gatedsl.frontend.loader as loader

    real_fstat = loader.os.fstat
    monkeypatch.setattr(loader.os, "fstat", lambda fd: os_stat_with_size(real_fstat(fd), 10))
    err = spec_error(main, max_file_size=size - 1)
    assert err.message == f"{main} is more than {size - 1} bytes, the limit for a spec file"
    with pytest.raises(ValueError, match="max_file_size must be a positive int"):
        gatedsl.check(main, max_file_size=0)


def os_stat_with_size(real, size: int):
    import os

    fields = list(real)
    fields[6] = size  # st_size
    return os.stat_result(fields)
