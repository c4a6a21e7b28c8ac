"""Running a test file's Triton comparisons in Triton's interpreter on the CPU.

Triton reads TRITON_INTERPRET as it loads, so a test file's comparisons (marked `interpreted`) run in a
child pytest with it set, started by the file's own launcher test (`run_in_the_interpreter`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in a child process with TRITON_INTERPRET=1 "
                                                         "(test_triton_kernels_in_the_interpreter)")


def run_in_the_interpreter(test_file: str, expected_passed: int) -> None:
    """Run `test_file` under TRITON_INTERPRET=1 and require exactly `expected_passed` tests to pass there."""
    if INTERPRETED:
        pytest.skip("this is the child process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"{expected_passed} passed" in run.stdout, run.stdout[-2000:]
