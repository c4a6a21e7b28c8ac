"""Writing output files whole or not at all, so a failure never leaves half a file or clobbers the user's."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Mapping


class CannotWrite(Exception):
    """An output path that cannot be written (read-only, a directory in the way, a full disk): the user's to fix."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# The errors of writing a file that are the user's environment, not gatedsl: no room, no right, a dir in the way.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                errno.EFBIG, errno.EIO, errno.ENAMETOOLONG, errno.ENOENT}


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _environment_error(err: BaseException) -> OSError | None:
    """The OSError of the user's environment behind `err`, also where a writer (torch.save) re-raised it as another error."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _USER_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def _existing_parent(path: Path) -> Path:
    """The nearest folder above `path` that exists: where its missing folders, then the file, would be made."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CannotWrite(path, f"{parent} is not a directory")
    return parent


def check_writable(path: Path | str) -> None:
    """Raise CannotWrite now if `path` could not be written later: before a long run, not after it."""
    path = Path(path)
    if path.is_dir():
        raise CannotWrite(path, "it is a directory")
    parent = _existing_parent(path)
    try:  # the only test that also sees a read-only filesystem and the caller's real rights
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    except OSError as err:
        raise CannotWrite(path, _reason(err)) from None
    os.close(fd)
    os.unlink(probe)


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
    atomic_write_files({path: write})


def atomic_write_files(files: Mapping[Path, Callable[[BinaryIO], object]]) -> None:
    """Write several files as one: every new file, or after any failure every old one as it was and nothing new.

    Each `write` fills a temporary file beside its path; only when all are complete are they renamed
    into place, in order, and a rename that fails puts back the files renamed before it. The user's
    OSErrors (no room, no right, a directory in the way) become CannotWrite.
    """
    files = {Path(path): write for path, write in files.items()}
    for path in files:  # every file's place, before anything is written
        if path.is_dir():
            raise CannotWrite(path, "it is a directory")
        _existing_parent(path)
    made: list[Path] = []  # directories created for the files, removed again if the files are not written
    temporaries: dict[Path, Path] = {}
    try:
        for path, write in files.items():
            made += _make_parents(path)
            temporaries[path] = _write_temporary(path, write)
        _rename_all(temporaries)
    except BaseException:
        for temporary in temporaries.values():
            _remove(temporary)
        for directory in reversed(made):
            try:
                directory.rmdir()
            except OSError:
                pass  # not empty after all: someone else put a file there meanwhile
        raise


def _make_parents(path: Path) -> list[Path]:
    """Create the folders missing above `path`, outermost first, and return them in that order."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.insert(0, parent)
        parent = parent.parent
    for directory in missing:
        try:
            directory.mkdir()
        except OSError as err:
            raise CannotWrite(path, _reason(err)) from None
    return missing


def _write_temporary(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise CannotWrite(path, _reason(err)) from None
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), new_file_mode(path))  # mkstemp makes 0600 files; the umask decides, as for any file
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        os.unlink(temporary)
        cause = _environment_error(err)
        if cause is None:
            raise
        raise CannotWrite(path, _reason(cause)) from None
    return temporary


def _rename_all(temporaries: dict[Path, Path]) -> None:
    """Rename each temporary over its path; if one fails, put every file renamed before it back as it was."""
    placed: list[tuple[Path, Path | None]] = []  # each path renamed into place, with its old file set aside
    last = len(temporaries) - 1
    try:
        for i, (path, temporary) in enumerate(temporaries.items()):
            # Nothing can fail after the last rename, so its old file need not be kept.
            aside = _set_aside(path, Path(f"{temporary}.old")) if i < last else None
            try:
                os.replace(temporary, path)
            except BaseException:
                if aside is not None:
                    _put_back(aside, path)
                raise
            placed.append((path, aside))
    except BaseException as err:
        for done, aside in reversed(placed):
            if aside is None:
                _remove(done)
            else:
                _put_back(aside, done)
        cause = _environment_error(err)
        if cause is None:
            raise
        raise CannotWrite(path, _reason(cause)) from None
    for _, aside in placed:
        if aside is not None:
            _remove(aside)


def _set_aside(path: Path, aside: Path) -> Path | None:
    """Give `path`'s old file a second name, `aside`, to put it back by; None when there is no old file."""
    try:
        os.link(path, aside, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError:  # a filesystem without hard links: the old file moves aside until the new one takes its place
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return None
    return aside


def _put_back(aside: Path, path: Path) -> None:
    os.replace(aside, path)
    _remove(aside)  # renaming a hard link over the same file leaves both names


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
