"""`gatedsl bench` from an installation that is not a checkout: the package as pyproject.toml builds its wheel (the
gatedsl/ folder plus the force-included data), with no benchmarks/ or specs/ folder beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wheel_tree(into: Path) -> Path:
    """The files the wheel holds, laid out as it installs them under `into` (site-packages)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    for package in config["packages"]:
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    for source, target in config["force-include"].items():
        (into / target).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copyfile
        copy(ROOT / source, into / target)
    return into


def test_bench_runs_from_the_wheel_alone(tmp_path):
    site = wheel_tree(tmp_path / "site")
    work = tmp_path / "elsewhere"  # not the checkout: nothing of it on the path or in the working directory
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    build_every_case = ("import gatedsl, gatedsl.bench as bench; print(gatedsl.__file__); "
                        "[bench.build_case(name, quick=True) for name in bench.CASES]")
    done = subprocess.run([sys.executable, "-c", build_every_case], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(site / "gatedsl" / "__init__.py")
    done = subprocess.run([sys.executable, "-m", "gatedsl", "bench", "--quick", "--repeats", "1", "--case", "mgu"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "mgu/fwd+bwd" in done.stdout
