"""`gatedsl compile -o`: every shipped spec with a model, exported and run with torch alone, equals the compiled module.

The exported file's code comes from torch.fx, which names a value after its op (`fill`, `prod`, `one_hot`, ...);
those are also the names of the helpers the file defines, so the test runs every file, not just imports it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.api import load
from gatedsl.backend.export import export_standalone, render
from gatedsl.cli.main import main

ROOT = Path(__file__).resolve().parent.parent

# Small sizes where a spec has them; a variant also picks the choices its defaults leave out.
PARAMS = {
    "specs/forecaster.gate": [{"d": 32, "layers": 1, "heads": 2}, {"cell": "LSTM", "d": 32, "layers": 2, "attention": False}],
    "specs/gru.gate": [{"hidden": 8}, {"hidden": 8, "layers": 2, "bidirectional": True, "initial_state": True}],
    "specs/lstm.gate": [{"hidden": 8}, {"hidden": 8, "layers": 2, "bidirectional": True, "initial_state": True}],
    "specs/swiglu.gate": [{"d": 16}],
    "examples/deconstruct_ablation.gate": [{}, {"cell": "RHN", "gating": "input", "attention": True}],
    "examples/gated_attention_transformer.gate": [{"vocab": 11, "context": 5, "d": 16, "layers": 1, "heads": 2}],
    "examples/moe_transformer.gate": [{"vocab": 11, "context": 5, "d": 16, "layers": 1, "heads": 2, "hidden": 8}],
    "examples/swiglu_transformer.gate": [{"vocab": 11, "context": 5, "d": 16, "layers": 1, "heads": 2}],
    "examples/gla_lm.gate": [{"vocab": 11, "d": 16, "layers": 1}],
    "examples/lstm_char_lm.gate": [{"vocab": 11, "d": 16}, {"vocab": 11, "d": 16, "cell": "RHN"}],
    "examples/mamba_model.gate": [{"vocab": 11, "d": 16, "layers": 1, "state_size": 4}],
    "examples/hornet_images.gate": [{"size": 8, "d": 16, "depth": 1}],
    "examples/rhn_hybrid.gate": [{"d": 16}],
    "examples/search/tokens.gate": [{"vocab": 11, "d": 16}],
}
DIMS = {"B": 3, "T": 5}
TOLERANCE = {"rtol": 1e-9, "atol": 1e-12}  # float64: the same function, at most summed in another order


def _specs_with_a_model() -> list[str]:
    files = sorted(p.relative_to(ROOT).as_posix() for folder in ("specs", "examples")
                   for p in (ROOT / folder).rglob("*.gate"))
    return [f for f in files if any(d.kind == "model" for d in load(ROOT / f).main.definitions)]


def test_every_spec_with_a_model_is_covered():
    specs = _specs_with_a_model()
    assert len(specs) >= 16 and "examples/mamba_model.gate" in specs and "specs/gru.gate" in specs
    assert set(PARAMS) <= set(specs)  # a renamed spec must not drop out of the table silently


def test_exports_run_without_gatedsl_and_equal_the_compiled_modules(tmp_path):
    cases = []  # (module name, spec, params, inputs)
    for spec in _specs_with_a_model():
        for i, params in enumerate(PARAMS.get(spec, [{}])):
            name = f"m{len(cases)}_{Path(spec).stem}"
            exported = gatedsl.compile(ROOT / spec, params, standalone=True)  # what `gatedsl compile -o` exports
            export_standalone(exported, tmp_path / f"{name}.py", spec)
            rep = exported.meta["gatedsl_report"]
            inputs = gatedsl.example_inputs(rep, DIMS, seed=i, dtype=torch.float64, vocab=params.get("vocab", 2))
            cases.append((name, spec, params, inputs))
    torch.save({name: inputs for name, _, _, inputs in cases}, tmp_path / "inputs.pt")

    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""\
        import importlib, sys
        sys.modules["gatedsl"] = None  # from here on, `import gatedsl` (or any part of it) fails
        try:
            import gatedsl.backend.runtime
        except ImportError:
            pass
        else:
            raise SystemExit("gatedsl is importable")
        import torch

        sys.path.insert(0, {str(tmp_path)!r})
        outputs = {{}}
        for name, inputs in torch.load("inputs.pt").items():
            module = importlib.import_module(name)
            model = module.load().double().eval()
            with torch.no_grad():
                outputs[name] = model(*inputs)
        torch.save(outputs, "outputs.pt")
        print("ran", len(outputs), "exported modules")
    """))
    done = subprocess.run([sys.executable, "-I", str(probe)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ran {len(cases)} exported modules\n"

    outputs = torch.load(tmp_path / "outputs.pt")
    for name, spec, params, inputs in cases:
        compiled = gatedsl.compile(ROOT / spec, params)  # every optimisation, fused kernels included
        compiled.load_state_dict(torch.load(tmp_path / f"{name}.pt"))
        with torch.no_grad():
            expected = compiled.double().eval()(*inputs)
        torch.testing.assert_close(outputs[name], expected, **TOLERANCE, msg=lambda m: f"{spec} {params}: {m}")


NAMED_LIKE_THE_FILE = """\
model M() {
  input x: [B, 4]
  fill = x + ones([4])
  load = fill * 2.0
  WEIGHTS = load + zeros([4])
  self = WEIGHTS - 1.0
  torch = prod(self, dim=-1)
  output y = torch + 1.0
}
"""


def test_values_named_like_the_files_own_names_do_not_hide_them(tmp_path):
    # fx names locals after their ops and the spec's names; the file's helpers, imports and `load`
    # keep theirs, and the locals step aside (`fill_1`).
    gm = gatedsl.compile(NAMED_LIKE_THE_FILE)
    code = render(gm, "m.gate", "m.pt")
    body = code[code.index("class M(nn.Module)"):]
    assert "fill_1 = fill([4], 1.0, x, 'float')" in body
    assert "torch_1 = prod(self_, [-1], False)" in body
    for local in ("fill", "load", "WEIGHTS", "self", "torch"):
        assert f"    {local} = " not in body
    namespace = {"__file__": str(tmp_path / "m.py")}
    exec(compile(code, "m.py", "exec"), namespace)
    x = torch.randn(2, 4)
    expected = torch.prod((x + 1) * 2 - 1, dim=-1) + 1
    torch.testing.assert_close(namespace["M"]()(x), expected)
