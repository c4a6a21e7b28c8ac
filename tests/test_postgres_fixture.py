"""The postgres_server fixture's server ends with the test run that started it, however that run ends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import _postgres_bin, process_running, wait_for

ROOT = Path(__file__).resolve().parents[1]

HOLDS_THE_SERVER = textwrap.dedent("""\
    import os, time
    from pathlib import Path

    import psycopg


    def test_holds_the_server(postgres_server):
        with psycopg.connect(postgres_server) as conn:
            data = conn.execute("SHOW data_directory").fetchone()[0]
        Path(os.environ["GATEDSL_TEST_DATA_DIR_FILE"]).write_text(data)
        time.sleep(600)  # the test run is killed here
""")


@pytest.mark.skipif(_postgres_bin() is None and os.environ.get("GATEDSL_REQUIRE_POSTGRES") != "1",
                    reason="PostgreSQL is not installed")
@pytest.mark.parametrize("xdist", [[], ["-n", "1"]], ids=["plain", "xdist"])
def test_sigterm_of_the_test_run_stops_its_postgres_server(tmp_path, xdist):
    # A test run of its own, with this repository's fixtures, holding the server when it gets SIGTERM.
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_holds.py").write_text(HOLDS_THE_SERVER)
    told = tmp_path / "data_dir.txt"
    env = {**os.environ, "GATEDSL_TEST_DATA_DIR_FILE": str(told)}
    env.pop("GATEDSL_TEST_POSTGRES_URL", None)
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, "test_holds.py"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: told.exists() or run.poll() is not None, 180, "the server to start")
        assert run.poll() is None, run.communicate()[0]
        data = Path(told.read_text())
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        assert process_running(postmaster)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
        wait_for(lambda: not process_running(postmaster), 60, f"the postmaster (pid {postmaster}) to stop")
        wait_for(lambda: not data.parent.exists(), 30, f"{data.parent} to be removed")
    finally:
        run.kill()
        run.wait()
