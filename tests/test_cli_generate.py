"""`gatedsl generate`: the tokens gatedsl.generate gives, one line per prompt (or JSON), weights from a torch.save'd
state dict, a progress bar on a terminal's stderr only, usage errors (exit 2) for bad options and the spec's
SpecError (exit 1) for a model that cannot decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
GLA_LM = ROOT / "examples" / "gla_lm.gate"
PARAMS = {"vocab": 17, "d": 16, "layers": 1, "heads": 2}
OPTIONS = [f"-p{name}={value}" for name, value in PARAMS.items()]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A model of examples/gla_lm.gate and its weights, saved as `gatedsl compile -o` saves them."""
    torch.manual_seed(1)
    model = gatedsl.compile(GLA_LM, PARAMS)
    path = tmp_path_factory.mktemp("weights") / "gla.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_prints_the_tokens_generate_gives_one_line_per_prompt(weights, capsys):
    path, model = weights
    argv = ["generate", str(GLA_LM), *OPTIONS, "--weights", str(path), "--prompt", "1 2 3", "--prompt", "4,5", "-n", "6"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    expected = gatedsl.generate(model, [[1, 2, 3], [4, 5]], 6).tokens
    assert out.splitlines() == [" ".join(map(str, row)) for row in expected]
    assert err == ""  # no bar off a terminal, no note with --weights

    sampled = ["--temperature", "0.9", "--top-k", "5", "--top-p", "0.9", "--seed", "4", "--stop", "3", "--json"]
    assert main(argv + sampled) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = gatedsl.generate(model, [[1, 2, 3], [4, 5]], 6, temperature=0.9, top_k=5, top_p=0.9, seed=4, stop=3)
    assert rows == [{"prompt": p, "tokens": t, "finished": f}
                    for p, t, f in zip(expected.prompts, expected.tokens, expected.finished)]


def test_without_weights_the_initialisation_follows_the_seed(capsys):
    argv = ["generate", str(GLA_LM), *OPTIONS, "--prompt", "1 2", "-n", "5", "-O0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "note: no --weights, so the model has its random initialisation" in err
    torch.manual_seed(0)  # --seed's default
    model = gatedsl.compile(GLA_LM, PARAMS, opt_level=0)
    assert out.split() == [str(t) for t in gatedsl.generate(model, [[1, 2]], 5).tokens[0]]
    assert main(argv + ["--quiet"]) == 0
    again, err = capsys.readouterr()
    assert again == out and err == ""
    assert main(argv + ["--seed", "1", "-q"]) == 0
    assert capsys.readouterr().out != out  # other weights


def test_a_terminal_sees_the_progress_bar_on_stderr(weights, monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich's switch: treat the output as a terminal
    argv = ["generate", str(GLA_LM), *OPTIONS, "--weights", str(weights[0]), "--prompt", "1", "-n", "3"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "generate" in err and "3/3" in err and "tokens" in err and len(out.split()) == 3
    assert main(argv + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_the_command_runs_as_a_program(weights):
    done = subprocess.run([sys.executable, "-m", "gatedsl", "generate", str(GLA_LM), *OPTIONS, "--weights",
                           str(weights[0]), "--prompt", "7 8", "--prompt", "9", "-n", "4"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line.split() for line in done.stdout.splitlines()] == \
        [[str(t) for t in row] for row in gatedsl.generate(weights[1], [[7, 8], [9]], 4).tokens]
    assert done.stderr == ""


@pytest.mark.parametrize("options, message", [
    (["--prompt", "1 x"], "argument --prompt: a token id is an integer of at least 0, got 'x'"),
    (["--prompt", " "], "argument --prompt: a prompt needs at least one token id"),
    (["--prompt", "1", "-n", "-2"], "argument -n/--max-new-tokens: needs an integer of at least 0"),
    (["--prompt", "1", "--top-p", "1.5", "--temperature", "1"], "argument --top-p: needs a number above 0"),
    (["--prompt", "1", "--top-k", "0", "--temperature", "1"], "argument --top-k: needs a positive integer"),
    (["--prompt", "1", "--temperature", "-1"], "argument --temperature: needs a number of at least 0"),
    (["--prompt", "1", "--stop", "-1"], "argument --stop: a token id is an integer of at least 0"),
    (["--prompt", "1", "--top-k", "3"], "--top-k and --top-p shape sampling"),
    (["--prompt", "1 17"], "prompt 0 holds 17: token ids are ints from 0 to 16"),
    (["--prompt", "1", "--stop", "40"], "stop token 40 is not a token id"),
    (["--prompt", "1", "--input", "ids"], "input='ids': the model's inputs are chars"),
    (["--prompt", "1", "--weights", "missing.pt"], "--weights: no such file: missing.pt"),
    (["--prompt", "1", "-p", "dd=3"], "-p dd=3"),
    ([], "the following arguments are required: --prompt"),
])
def test_bad_options_are_usage_errors(options, message, capsys):
    assert main(["generate", str(GLA_LM), *OPTIONS, *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_weights_that_are_not_this_models_are_usage_errors(weights, tmp_path, capsys):
    other = ["generate", str(GLA_LM), "-p", "vocab=17", "-p", "d=8", "--prompt", "1", "--weights", str(weights[0])]
    assert main(other) == 2
    assert "does not fit this model (check -p and --model): " in capsys.readouterr().err
    fewer = ["generate", str(GLA_LM), *OPTIONS[:-2], "-p", "layers=2", "--prompt", "1", "--weights", str(weights[0])]
    assert main(fewer) == 2
    assert "missing layers.1." in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("not a pickle")
    assert main(["generate", str(GLA_LM), "--prompt", "1", "--weights", str(junk)]) == 2
    assert f"--weights {junk}: not a state dict saved with torch.save" in capsys.readouterr().err
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    assert main(["generate", str(GLA_LM), "--prompt", "1", "--weights", str(not_a_dict)]) == 2
    assert "not a state dict (a dict of tensors) but a list" in capsys.readouterr().err


def test_a_spec_that_cannot_decode_shows_its_spec_error(tmp_path, capsys):
    pooled = tmp_path / "pooled.gate"
    pooled.write_text(textwrap.dedent("""\
        model Pooled(vocab: int = 11) {
          input ids: int[B, T]
          h = embedding(ids, vocab, 8)
          h = h + mean(h, dim=1, keepdim=true)   # every position sees the later ones
          output logits = linear(h, vocab)
        }
    """))
    assert main(["generate", str(pooled), "--prompt", "1 2"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"{pooled}:4:11: error: cannot decode along T")
    assert lines[1].rstrip().endswith("h = h + mean(h, dim=1, keepdim=true)   # every position sees the later ones")

    floats = tmp_path / "floats.gate"
    floats.write_text("model F() {\n  input x: [B, T, 3]\n  output y = linear(x, 5)\n}\n")
    assert main(["generate", str(floats), "--prompt", "1"]) == 1
    assert capsys.readouterr().err.startswith(
        f"{floats}:2:3: error: cannot generate from input x: [B, T, 3] is not token ids int[B, T]")
