"""Writing output files whole or not at all, so a failure never leaves half a file or clobbers the user's."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


class CannotWrite(Exception):
    """An output path that cannot be written (read-only, a directory in the way, a full disk): the user's to fix."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def check_writable(path: Path | str) -> None:
    """Raise CannotWrite now if `path` could not be written later: before a long run, not after it."""
    path = Path(path)
    if path.is_dir():
        raise CannotWrite(path, "it is a directory")
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise CannotWrite(path, f"{parent} is not a directory")
    try:  # the only test that also sees a read-only filesystem and the caller's real rights
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    except OSError as err:
        raise CannotWrite(path, _reason(err)) from None
    os.close(fd)
    os.unlink(probe)


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def new_file_mode(path: Path) -> int:
    """The mode `path` should get: its current one when it exists, else what the umask leaves of 0o666."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it over `path`; OSErrors become CannotWrite."""
    path = Path(path)
    if path.is_dir():
        raise CannotWrite(path, "it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise CannotWrite(path, _reason(err)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), new_file_mode(path))  # mkstemp makes 0600 files; the umask decides, as for any file
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in _USER_ERRNOS:
            raise CannotWrite(path, _reason(err)) from None
        raise


# The errors of writing a file that are the user's environment, not gatedsl: no room, no right, a dir in the way.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                errno.EFBIG, errno.EIO, errno.ENAMETOOLONG, errno.ENOENT}
