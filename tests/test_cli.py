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
