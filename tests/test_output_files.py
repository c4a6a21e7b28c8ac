"""Files gatedsl writes (`compile -o`: OUT.py and OUT.pt; `graph -o`): all of them or none, whatever fails.

A read-only directory or filesystem, a directory in the way or a full disk is the user's to fix: one line,
`gatedsl: error: cannot write PATH: reason`, exit 1, and the folder exactly as it was, the old files
byte for byte. New files get the mode the umask gives (a replaced one keeps its own).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from gatedsl.cli.main import main

# Its weights (64 x 256 floats, 65 kB) outgrow the module's text (13 kB): a disk can fill in the second file.
SPEC = "model Wide() {\n  input x: [B, 64]\n  output y = linear(x, 256)\n}\n"
GRAPHS = ["g.dot"] + (["g.svg", "g.png"] if shutil.which("dot") else [])


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "wide.gate"
    path.write_text(SPEC)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """The user's folder, holding an earlier export and drawing: what any failure must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.py").write_bytes(b"# the earlier export\n")
    (out / "m.pt").write_bytes(b"the earlier weights")
    for name in GRAPHS:
        (out / name).write_bytes(b"the earlier drawing")
    return out


def _contents(folder: Path) -> dict[str, bytes | None]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


def _fails(argv: list[str], capsys, path: Path, reason: str) -> None:
    assert main(argv) == 1
    assert capsys.readouterr().err == f"gatedsl: error: cannot write {path}: {reason}\n"


class _FullDisk:
    """A file with `room` bytes left: a write past them writes what fits, then fails as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_weights_that_fill_the_disk_leave_both_old_files(spec, folder, monkeypatch, capsys):
    # The module's temporary is complete when the weights' write fails halfway: neither is renamed in.
    before = _contents(folder)
    raised = []
    real_save = torch.save

    def save_on_a_full_disk(obj, f):
        try:
            real_save(obj, _FullDisk(f, room=4096))
        except Exception as err:
            raised.append(err)
            raise

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    _fails(["compile", str(spec), "-o", str(folder / "m.py")], capsys, folder / "m.pt", "No space left on device")
    assert isinstance(raised[0], RuntimeError)  # torch re-raises the OSError as its own: still the user's to fix
    assert _contents(folder) == before


def test_a_full_disk_leaves_no_new_file_nor_folder(spec, tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def fsync_on_a_full_disk(fd):  # where a filesystem that allocates late reports it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    out = tmp_path / "new" / "sub" / "m.py"
    _fails(["compile", str(spec), "-o", str(out)], capsys, out, "No space left on device")
    for name in GRAPHS:
        _fails(["graph", str(spec), "-o", str(out.with_name(name))], capsys, out.with_name(name), "No space left on device")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.gate"]


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_rename_that_fails_puts_back_the_files_renamed_before_it(spec, folder, monkeypatch, capsys, hard_links):
    # m.py is renamed over the old one first; when m.pt's rename fails, the old m.py must come back.
    before = _contents(folder)
    real_replace = os.replace

    renamed_in = []

    def replace(src, dst):  # the second rename of a file into place (from a hidden name beside it) fails
        if Path(src).name.startswith(f".{Path(dst).name}."):
            renamed_in.append(dst)
            if len(renamed_in) == 2:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_replace(src, dst)

    def no_link(*args, **kwargs):  # as on FAT: the old file is moved aside instead
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "replace", replace)
    if not hard_links:
        monkeypatch.setattr(os, "link", no_link)
    _fails(["compile", str(spec), "-o", str(folder / "m.py")], capsys, folder / "m.pt", "Permission denied")
    assert _contents(folder) == before
    (folder / "m.py").unlink()
    (folder / "m.pt").unlink()
    renamed_in.clear()
    _fails(["compile", str(spec), "-o", str(folder / "m.py")], capsys, folder / "m.pt", "Permission denied")
    assert "m.py" not in _contents(folder)  # renamed in, then taken out again: there was no old one


@pytest.mark.parametrize("in_the_way", ["m.py", "m.pt"])
def test_an_export_with_a_directory_in_the_way_writes_nothing(spec, folder, capsys, in_the_way):
    (folder / in_the_way).unlink()
    (folder / in_the_way).mkdir()
    before = _contents(folder)
    _fails(["compile", str(spec), "-o", str(folder / "m.py")], capsys, folder / in_the_way, "it is a directory")
    assert _contents(folder) == before  # no orphan m.pt beside the directory m.py


@pytest.mark.parametrize("name", GRAPHS)
def test_a_graph_with_a_directory_in_the_way(spec, folder, capsys, name):
    (folder / name).unlink()
    (folder / name).mkdir()
    before = _contents(folder)
    _fails(["graph", str(spec), "-o", str(folder / name)], capsys, folder / name, "it is a directory")
    assert _contents(folder) == before


def test_a_file_where_a_folder_should_be(spec, folder, capsys):
    before = _contents(folder)
    for out in (folder / "m.pt" / "m.py", folder / "m.pt" / "deeper" / "g.dot"):
        command = "compile" if out.suffix == ".py" else "graph"
        _fails([command, str(spec), "-o", str(out)], capsys, out, f"{folder / 'm.pt'} is not a directory")
    assert _contents(folder) == before


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")])
def test_a_read_only_filesystem_or_directory(spec, folder, monkeypatch, capsys, code, reason):
    # Tests run as root, which writes to read-only directories: the refusal is simulated where it
    # happens, at the first file made (see the next test for the real thing, where it can run).
    before = _contents(folder)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _fails(["compile", str(spec), "-o", str(folder / "m.py")], capsys, folder / "m.py", reason)
    for name in GRAPHS:
        _fails(["graph", str(spec), "-o", str(folder / name)], capsys, folder / name, reason)
    assert _contents(folder) == before


def _without_root_privileges() -> list[str]:
    """A command prefix that makes a process obey file permissions, even as root; skips the test if none works."""
    if os.geteuid() != 0:
        return []
    command = ["setpriv", "--bounding-set", "-dac_override"]  # root without the right to ignore permissions
    if shutil.which("setpriv") is None or subprocess.run([*command, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop CAP_DAC_OVERRIDE here")
    return command


def _run_cli(commands: list[list[str]], prefix: list[str] = (), **options) -> list[str]:
    """Each command's exit status and stderr, run by gatedsl's main in one fresh interpreter."""
    code = textwrap.dedent(f"""\
        import contextlib, io
        from gatedsl.cli.main import main
        for argv in {commands!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = main(argv)
            print(status, err.getvalue(), end="")
    """)
    done = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, **options)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_read_only_directory_for_real(spec, folder):
    prefix = _without_root_privileges()
    before = _contents(folder)
    folder.chmod(0o555)
    try:
        lines = _run_cli([["compile", str(spec), "-o", str(folder / "m.py")], ["graph", str(spec), "-o", str(folder / "g.dot")],
                          ["compile", str(spec), "-o", str(folder / "new" / "m.py")]], prefix)
    finally:
        folder.chmod(0o755)
    assert lines == [f"1 gatedsl: error: cannot write {folder / 'm.py'}: Permission denied",
                     f"1 gatedsl: error: cannot write {folder / 'g.dot'}: Permission denied",
                     f"1 gatedsl: error: cannot write {folder / 'new' / 'm.py'}: Permission denied"]
    assert _contents(folder) == before


def test_a_write_past_the_file_size_limit_for_real(spec, folder):
    # The kernel stops each write at RLIMIT_FSIZE, as a full disk stops it at the free space: the
    # module (13 kB) fits under 32 kB, the weights (65 kB) do not.
    before = _contents(folder)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, 32_000))

    lines = _run_cli([["compile", str(spec), "-o", str(folder / "m.py")]], preexec_fn=limit_file_size)
    assert lines == [f"1 gatedsl: error: cannot write {folder / 'm.pt'}: File too large"]
    assert _contents(folder) == before


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_rendering_needs_no_temporary_directory(spec, tmp_path, monkeypatch, capsys):
    import pydot.core

    for module in {tempfile, pydot.core.tempfile}:  # pydot 3 and later carry their own copy of tempfile
        monkeypatch.setattr(module, "tempdir", str(tmp_path / "no-such-folder"))  # as a full or read-only $TMPDIR
    for name, magic in (("g.svg", b"<?xml"), ("g.png", b"\x89PNG")):
        assert main(["graph", str(spec), "-o", str(tmp_path / name)]) == 0, capsys.readouterr().err
        assert (tmp_path / name).read_bytes().startswith(magic)


def test_written_files_take_the_umask_and_a_replaced_file_keeps_its_mode(spec, tmp_path, capsys):
    files = [tmp_path / "m.py", tmp_path / "m.pt", tmp_path / "g.dot"]

    def write_all():
        assert main(["compile", str(spec), "-o", str(files[0])]) == 0
        assert main(["graph", str(spec), "-o", str(files[2])]) == 0

    umask = os.umask(0o027)
    try:
        write_all()
        assert [f.stat().st_mode & 0o777 for f in files] == [0o640, 0o640, 0o640]
        files[0].chmod(0o604)
        files[2].chmod(0o600)
        os.umask(0o022)
        write_all()
        assert [f.stat().st_mode & 0o777 for f in files] == [0o604, 0o640, 0o600]
    finally:
        os.umask(umask)
