"""Shared fixtures: a throwaway PostgreSQL server on the loopback address, for the search's many-workers tests;
and whether a process has ended, for the tests that kill one."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    # Debian and Ubuntu keep each major version's programs off PATH, under /usr/lib/postgresql/VERSION/bin.
    versions = [p for p in glob.glob("/usr/lib/postgresql/*/bin/initdb") if p.split("/")[4].isdigit()]
    return Path(max(versions, key=lambda p: int(p.split("/")[4]))).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie, ended but not yet reaped, has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, seconds: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `seconds` (a generous bound, never a timing test)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def postgres_server():
    """The URL of a PostgreSQL server: GATEDSL_TEST_POSTGRES_URL's, or one started here for the session.

    Skips where PostgreSQL is not installed, unless GATEDSL_REQUIRE_POSTGRES=1 (as .ci/run sets) makes that a failure.
    """
    given = os.environ.get("GATEDSL_TEST_POSTGRES_URL")
    if given:
        yield given
        return

    def unavailable(reason: str):
        if os.environ.get("GATEDSL_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)

    bindir = _postgres_bin()
    if bindir is None:
        unavailable("PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql); .ci/run installs it")
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no 'postgres' user to run the server as")
        if shutil.which("runuser") is None:
            unavailable("running as root and there is no runuser to start the server as 'postgres'")
        prefix = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="gatedsl-pg-"))  # in /tmp: the postgres user cannot enter pytest's tmp dirs
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", _free_port()
    stop = [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
    # The server is stopped by a process of its own that waits for this one to end, however it ends: teardown,
    # SIGTERM, SIGKILL, or an xdist worker's os._exit (each worker that asks for the fixture starts its own).
    reaper = subprocess.Popen([sys.executable, "-c", _REAPER, str(root), *stop], stdin=subprocess.PIPE,
                              start_new_session=True)  # not in pytest's process group: a Ctrl-C does not stop it
    try:
        def run(*cmd: str) -> None:
            done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
                unavailable(f"{Path(cmd[0]).name} failed: {done.stderr.strip() or done.stdout.strip()} {log}".strip())

        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        # A test server: no fsync (the tests check concurrency, not crash safety), sockets on loopback and in root.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        reaper.stdin.close()
        reaper.wait(timeout=120)


# Reads its stdin to the end, which comes when the process holding the other end (the fixture's) has ended;
# then runs the stop command in argv[2:] and removes the directory argv[1].
_REAPER = """
import shutil, subprocess, sys
sys.stdin.buffer.read()
subprocess.run(sys.argv[2:], capture_output=True, timeout=60)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    name = f"gatedsl_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.rsplit("/", 1)[0] + "/" + name
