"""The `gatedsl` command line: exit codes, diagnostics, --json, -o export, graph drawing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gatedsl.cli.main import main

SPEC = textwrap.dedent("""\
    cell MGU(x: [*, D], state h: [*, H]) {          # Zhou et al. 2016
      gate f = sigmoid(linear(x, H) + linear(h, H, bias=false))
      n = tanh(linear(x, H) + linear(f * h, H, bias=false))
      h = (1 - f) * h + f * n
    }

    model Tiny(d: int in 4..64 = 8, drop: float = 0.0) {
      input x: [B, T, 3]
      h = dropout(linear(x, d), drop)
      h = scan MGU(h, H=d) over T
      output y = linear(h, 2)
      output last = h[:, -1]
    }
""")

BAD = textwrap.dedent("""\
    model Bad() {
      input x: [B, 4]
      a = linear(x, 8)
      b = linear(x, 6)
      output y = a + b
    }
""")


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gate"
    path.write_text(SPEC)
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.gate"
    path.write_text(BAD)
    return path


def test_check_ok_and_spec_error_exit_codes(spec, bad, capsys):
    assert main(["check", str(spec)]) == 0
    assert "ok: model Tiny" in capsys.readouterr().out
    assert main(["check", str(spec), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_spec_error_is_rendered_with_location_caret_and_notes(bad, capsys):
    assert main(["check", str(bad)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"{bad}:5:14: error: cannot broadcast [B, 8] with [B, 6]"
    assert lines[1].rstrip().endswith("output y = a + b")
    caret_line = lines[2]
    # The caret sits under column 14 of the quoted line ("   5 | " gutter + 13 spaces).
    assert caret_line.index("^") == lines[1].index("a + b")
    assert f"{bad}:3:7: note: a is [B, 8]" in lines
    assert f"{bad}:4:7: note: b is [B, 6]" in lines


def test_usage_errors_exit_2(spec, capsys):
    assert main([]) == 2
    assert main(["check"]) == 2
    assert main(["nonsense", str(spec)]) == 2
    assert main(["check", "/no/such/file.gate"]) == 2
    assert main(["compile", str(spec), "-p", "d"]) == 2
    assert main(["compile", str(spec), "-o", "out.txt"]) == 2
    assert main(["graph", str(spec), "-o", "x.pdf"]) == 2
    capsys.readouterr()


def test_parameter_override_and_domain_error(spec, capsys):
    assert main(["compile", str(spec), "-p", "d=16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"]["d"] == 16
    # A -p the declaration refuses is a usage error (exit 2) naming the option, with a note at the declaration.
    assert main(["compile", str(spec), "-p", "d=1000"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gatedsl: error: -p d=1000: d is an int in 4..64, got 1000",
        f"{spec}:7:12: note: 'd' is declared here",
        "   7 | model Tiny(d: int in 4..64 = 8, drop: float = 0.0) {",
        "     |            ^~~~~~~~~~~~~~~~~~~",
    ]
    assert main(["compile", str(spec), "-p", "nope=3"]) == 2
    assert capsys.readouterr().err.splitlines()[:2] == [
        "gatedsl: error: -p nope=3: model Tiny has no parameter 'nope'; its parameters are: d, drop",
        f"{spec}:7:1: note: model Tiny is declared here",
    ]


def test_compile_json_contract(spec, capsys):
    assert main(["compile", str(spec), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    d = 8
    expected_params = (3 * d + d) + (d * d + d + d * d) + (d * d + d + d * d) + (d * 2 + 2)
    assert out["params"] == expected_params
    assert isinstance(out["flops"], int) and out["flops"] > 0
    assert out["inputs"] == {"x": ["B", "T", 3]}
    assert out["outputs"] == {"y": ["B", "T", 2], "last": ["B", d]}
    assert out["gates"] == [{"name": "MGU.f", "kind": "sigmoid", "file": str(spec), "line": 2}]
    assert out["sizes"] == {"B": 1, "T": 1}


def test_compile_summary_table(spec, capsys):
    assert main(["compile", str(spec)]) == 0
    out = capsys.readouterr().out
    for text in ("model Tiny", "[B, T, 3]", "MGU", "sigmoid", "FLOPs", "total"):
        assert text in out


def test_standalone_export_runs_without_gatedsl(spec, tmp_path, capsys):
    out = tmp_path / "export" / "tiny_model.py"
    assert main(["compile", str(spec), "-o", str(out)]) == 0
    assert out.exists() and out.with_suffix(".pt").exists()
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""\
        import sys
        sys.modules["gatedsl"] = None  # importing gatedsl now fails: the module must not need it
        sys.path.insert(0, {str(out.parent)!r})
        import torch, tiny_model
        m = tiny_model.load().eval()
        torch.manual_seed(0)
        x = torch.randn(2, 5, 3)
        y, last = m(x)
        torch.save((x, y, last), {str(tmp_path / 'probe.pt')!r})
    """))
    subprocess.run([sys.executable, str(probe)], check=True, env={**os.environ, "PYTHONPATH": ""})
    x, y, last = torch.load(tmp_path / "probe.pt")
    import gatedsl

    gm = gatedsl.compile(spec).eval()
    gm.load_state_dict(torch.load(out.with_suffix(".pt")))
    y_ref, last_ref = gm(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)


def test_export_failure_leaves_existing_file_untouched(spec, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.py"
    out.write_text("# the user's own file\n")
    import gatedsl.backend.export as export

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export.torch, "save", boom)
    assert main(["compile", str(spec), "-o", str(out)]) == 3
    assert out.read_text() == "# the user's own file\n"
    assert not out.with_suffix(".pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py", "tiny.gate"]  # no temp files left


def test_internal_error_exits_3_with_one_line_and_debug_traceback(spec, monkeypatch, capsys):
    import gatedsl.passes as passes

    def broken(unit):
        raise RuntimeError("boom")

    monkeypatch.setattr(passes, "PIPELINE", [broken])
    assert main(["check", str(spec)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" in err and "report" in err and "Traceback" not in err
    assert main(["--debug", "check", str(spec)]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_python_dash_m_entry_point(spec):
    done = subprocess.run([sys.executable, "-m", "gatedsl", "check", str(spec)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "gatedsl", "check", str(spec) + "x"], capture_output=True, text=True)
    assert done.returncode == 2


def test_graph_dot_has_shapes_and_highlighted_gates(spec, tmp_path, capsys):
    out = tmp_path / "g.dot"
    assert main(["graph", str(spec), "-o", str(out)]) == 0
    text = out.read_text()
    assert "[B, T, 3]" in text  # a shape on an edge
    assert "gate MGU.f (sigmoid)" in text
    assert "#f4a261" in text  # the gate colour
    assert "cluster" in text  # the scanned cell drawn as a cluster


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".png", b"\x89PNG")])
def test_graph_renders_with_graphviz(spec, tmp_path, suffix, magic, capsys):
    out = tmp_path / f"g{suffix}"
    assert main(["graph", str(spec), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(magic)


def test_check_library_file_without_model(tmp_path, capsys):
    lib = tmp_path / "lib.gate"
    lib.write_text("block Twice(x: [*, D]) {\n  return 2 * x\n}\n")
    assert main(["check", str(lib)]) == 0
    assert "library with 1 block" in capsys.readouterr().out
    lib.write_text("block Twice(x: [*, D]) {\n  return 2 * \n}\n")
    assert main(["check", str(lib)]) == 1
    assert f"{lib}:2:" in capsys.readouterr().err


def test_export_of_a_model_named_like_a_helper(tmp_path, capsys):
    spec = tmp_path / "s.gate"
    spec.write_text("cell C(x: [*, D], state h: [*, H]) {\n  h = tanh(linear(x, H) + linear(h, H))\n}\n"
                    "model scan() {\n  input x: [B, T, 3]\n  output y = scan C(x, H=4) over T\n}\n")
    out = tmp_path / "m.py"
    assert main(["compile", str(spec), "-o", str(out)]) == 0
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import torch, m; print(m.load()(torch.randn(2, 3, 3)).shape)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([2, 3, 4])" in done.stdout


# ------------------------------------------------------------------------------------------- -d sizes
@pytest.mark.parametrize("command", ["check", "compile", "graph"])
@pytest.mark.parametrize("option, message", [
    ("B=-5", "-d B=-5: a size must be a positive integer"),
    ("B=0", "-d B=0: a size must be a positive integer"),
    ("B=x", "-d B=x: a size must be a positive integer"),
    ("t=64", "-d t=64: model Tiny has no symbolic size 't'; its sizes are: B, T"),
])
def test_a_size_must_be_a_positive_int_naming_a_size_of_the_model(spec, tmp_path, capsys, command, option, message):
    extra = ["-o", str(tmp_path / "g.dot")] if command == "graph" else []
    assert main([command, str(spec), "-d", option, *extra]) == 2
    assert capsys.readouterr().err == f"gatedsl: error: {message}\n"
    assert not (tmp_path / "g.dot").exists()


def test_sizes_in_python_are_checked_with_the_same_function(spec):
    import gatedsl
    from gatedsl.api import check_dims
    from gatedsl.errors import SizeError

    with pytest.raises(SizeError, match="^B=-5: a size must be a positive integer$"):
        gatedsl.check(spec, dims={"B": -5})
    # One dict may size several models, so `check` ignores a name this one lacks; check_dims, as the CLI calls it
    # (and `gatedsl search -d` may), does not.
    rep = gatedsl.check(spec, dims={"B": 4, "N": 3})
    assert rep.sizes == {"B": 4, "T": 1} and rep.flops == 4 * gatedsl.check(spec).flops
    with pytest.raises(SizeError, match="^N=3: model Tiny has no symbolic size 'N'; its sizes are: B, T$"):
        check_dims({"B": 4, "N": 3}, list(rep.sizes), rep.model)


def test_the_flops_line_says_at_which_sizes_and_how_to_give_them(spec, capsys):
    def flops_line(*options: str) -> str:
        assert main(["compile", str(spec), *options]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("FLOPs"))

    assert flops_line() == ("FLOPs per forward: 664·B·T = 664 at B=1, T=1 (no size was given, so each is 1: "
                            "give them with -d, e.g. -d T=1024)")
    assert flops_line("-d", "B=32") == "FLOPs per forward: 664·B·T = 21,248 at B=32, T=1 (T not given, so 1: e.g. -d T=1024)"
    assert flops_line("-d", "B=32", "-d", "T=100000") == \
        "FLOPs per forward: 664·B·T = 2,124,800,000 (2.12 G) at B=32, T=100000"


def test_counts_are_written_for_people():
    from gatedsl.cli.summary import count
    from gatedsl.ir.types import Poly

    # A unit letter in the polynomial would read as a size (T for tera beside the size T), and rounding to 3
    # digits gave "1e+03T": coefficients are exact, in thousands.
    assert str(Poly({("B", "T"): 999_600_000_000_000, ("B",): 1_000, (): 7})) == "999,600,000,000,000·B·T + 1,000·B + 7"
    assert [count(n) for n in (729_600, 999_999_999, 2_123_456_789, 10**21)] == [
        "729,600", "999,999,999 (1 G)", "2,123,456,789 (2.12 G)", "1,000,000,000,000,000,000,000 (1,000 E)"]


# ------------------------------------------------------------------------------------------ -p values
def test_a_bad_p_value_is_a_usage_error_with_a_note_at_the_declaration(spec, capsys):
    assert main(["check", str(spec), "-p", "d=1.5"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gatedsl: error: -p d=1.5: d is an int in 4..64, got 1.5",  # no help about integer division
        f"{spec}:7:12: note: 'd' is declared here",
        "   7 | model Tiny(d: int in 4..64 = 8, drop: float = 0.0) {",
        "     |            ^~~~~~~~~~~~~~~~~~~",
    ]
    assert main(["compile", str(spec), "-p", "drop=lots"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "gatedsl: error: -p drop=lots: drop is a float, got lots"


def test_a_bad_override_in_python_is_still_a_spec_error_at_the_declaration(spec):
    import gatedsl
    from gatedsl.errors import OverrideError

    with pytest.raises(OverrideError) as info:
        gatedsl.check(spec, params={"d": 1.5})
    err = info.value
    assert isinstance(err, gatedsl.SpecError) and (err.line, err.column) == (7, 12) and err.help is None
    assert err.message == "'d' must be a static int, got the float 1.5"
    assert (err.option, err.reason) == ("d=1.5", "d is an int in 4..64, got 1.5")


CHOICES = textwrap.dedent("""\
    model M(form: {"plain", "fancy"} = "fancy", act: {relu, gelu} = gelu, name: str = "x", k = 2) {
      input x: [B, 4]
      output y = act(x)
    }
""")


@pytest.mark.parametrize("option, parameters", [
    ('form="plain"', {"form": "plain"}), ("form=plain", {"form": "plain"}),
    ('name="a b"', {"name": "a b"}), ("name=ab", {"name": "ab"}), ('k="text"', {"k": "text"}),
    ("act=relu", {"act": "relu"}),
])
def test_a_string_may_be_given_quoted_as_in_a_spec(tmp_path, capsys, option, parameters):
    path = tmp_path / "choices.gate"
    path.write_text(CHOICES)
    assert main(["compile", str(path), "-p", option, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["parameters"]
    assert got == {"form": "fancy", "act": "gelu", "name": "x", "k": 2, **parameters}


def test_a_choice_names_its_values(tmp_path, capsys):
    path = tmp_path / "choices.gate"
    path.write_text(CHOICES)
    assert main(["check", str(path), "-p", "form=odd"]) == 2
    assert capsys.readouterr().err.splitlines()[:2] == [
        'gatedsl: error: -p form=odd: form is one of {"plain", "fancy"}, got odd',
        f"{path}:1:9: note: 'form' is declared here"]


# ---------------------------------------------------------------------------------------- the summary
def test_json_gates_name_their_file(tmp_path, capsys):
    import gatedsl.resources

    path = tmp_path / "g.gate"
    path.write_text("import std.cells\nmodel M() {\n  input x: [B, T, 3]\n  gate g = sigmoid(x)\n"
                    "  output y = scan GRU(x * g, H=4) over T\n}\n")
    assert main(["compile", str(path), "--json"]) == 0
    gates = json.loads(capsys.readouterr().out)["gates"]
    std = str(gatedsl.resources.stdlib_dir() / "cells.gate")
    assert {(g["name"], g["file"]) for g in gates} == {("g", str(path)), ("GRU.z", std), ("GRU.r", std)}


def test_the_summary_cuts_a_long_value(tmp_path, capsys):
    path = tmp_path / "long.gate"
    path.write_text('model M(name: str = "' + "n" * 1_000_000 + '") {\n  input x: [B, 4]\n  output y = x\n}\n')
    assert main(["compile", str(path)]) == 0
    out = capsys.readouterr().out
    assert len(out) < 2_000
    assert out.splitlines()[0] == f"model M ({path})  name={'n' * 30}… (1,000,000 characters)"


def test_the_summary_shows_the_specs_text_as_written_not_as_markup(tmp_path, capsys):
    path = tmp_path / "text.gate"
    path.write_text('model M(name: str = "[/red]") {\n  input x: [batch, 4]\n  output y = x\n}\n')
    assert main(["compile", str(path)]) == 0  # was an internal error: rich read "[/red]" as a closing tag
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"model M ({path})  name=[/red]"
    assert "│ [batch, 4]" in out  # was an empty cell: "[batch, 4]" read as a style


@pytest.mark.parametrize("columns", [80, 200])
def test_explain_fits_the_terminal_and_names_every_kernel_whole(columns, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(columns))
    spec = Path(__file__).resolve().parent.parent / "benchmarks" / "specs" / "gru_extra_gate.gate"
    assert main(["compile", str(spec), "--explain", "--json"]) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    assert main(["compile", str(spec), "--explain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("kernels (")):]
    assert max(len(line) for line in lines) <= columns
    for choice in kernels:
        header = next(line for line in lines if line.startswith(choice["node"]))
        assert f": {choice['kernel']}," in header
        for candidate in choice["candidates"]:
            mark = "+" if candidate["applies"] else "-"
            assert any(line.startswith(f"  {mark} {candidate['kernel']}  ") for line in lines), candidate["kernel"]
    if columns == 200:  # wide enough: every candidate on one line
        assert sum(1 for line in lines if line.startswith(("  + ", "  - "))) == \
            sum(len(c["candidates"]) for c in kernels)


# ------------------------------------------------------------------------------------ what is read
def test_a_file_that_is_not_a_spec_is_a_usage_error_and_never_read(tmp_path, capsys):
    secret = tmp_path / "shadow"
    secret.write_text("root:TOPSECRET:0:0\n")
    for command in (["check"], ["compile"], ["graph", "-o", str(tmp_path / "g.dot")]):
        assert main([*command[:1], str(secret), *command[1:]]) == 2
        assert capsys.readouterr().err == f"gatedsl: error: {secret} is not a spec: gatedsl reads .gate files\n"


def test_max_file_size_option(spec, capsys):
    size = spec.stat().st_size
    assert main(["check", str(spec), "--max-file-size", str(size)]) == 0
    capsys.readouterr()
    assert main(["compile", str(spec), "--max-file-size", str(size - 1)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == \
        f"{spec}:1:1: error: {spec} is {size} bytes, more than {size - 1}, the limit for a spec file"
    assert main(["check", str(spec), "--max-file-size", "0"]) == 2
    assert "--max-file-size: needs a positive integer, got '0'" in capsys.readouterr().err


def test_max_ops_sets_the_expansion_limit(tmp_path, capsys):
    """--max-ops (max_ops= in Python) moves the limit on how far a spec may expand: a model the default refuses
    checks with it raised, and a small one is refused with it lowered, the error saying how to raise it."""
    spec = tmp_path / "wide.gate"
    spec.write_text("model M() {\n  input x: [B, 4]\n  h = x\n  repeat 120000 { h = h + x }\n  output y = h\n}\n")
    assert main(["check", str(spec), "-O0"]) == 1
    out = capsys.readouterr().err
    assert "the model expands to more than 200000 operations" in out and "--max-ops" in out
    assert main(["check", str(spec), "-O0", "--max-ops", "300000"]) == 0
    capsys.readouterr()
    assert main(["check", str(Path(__file__).resolve().parents[1] / "specs" / "forecaster.gate"), "--max-ops", "10"]) == 1
    assert "the model expands to more than 10 operations" in capsys.readouterr().err
    assert main(["check", str(spec), "--max-ops", "0"]) == 2
