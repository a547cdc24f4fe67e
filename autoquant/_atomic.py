"""Writes that never lose the old file: every file autoquant writes goes through here.

A file is written to a temporary name in its own folder, flushed and fsynced, renamed over the
target, and the folder fsynced: at every instant the target is either the old file or the new
one, whole -- whatever kills the process (kill -9, power) or fills the disk. A failed write
removes its temporary and leaves the old file as it was.

A folder (a saved pipeline) is written complete beside the old one, then the two are swapped in
one step with Linux's ``renameat2(RENAME_EXCHANGE)``, and only then is the old one deleted: at
every instant a complete folder sits at the target path. Where the exchange is not available
(another OS, a filesystem without it) the old folder is renamed aside first, and
:func:`recover_folder` (called by readers) puts it back if a crash came between the two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

#: suffix of an old folder renamed aside by the fallback swap (never seen after a clean swap)
ASIDE = ".autoquant-old"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp/mkdtemp make private (0600/0700) entries; what is written gets the usual modes
FILE_MODE, _DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


def _fsync_file(path: Path) -> None:
    """Flush a written file to the disk (where a full disk or quota finally says so)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: folders cannot be opened; rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (by any library); on a clean exit it is
    fsynced and renamed over ``path``; on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, FILE_MODE)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module's docstring)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


# -- folders ----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the OS or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def recover_folder(directory: str | Path) -> None:
    """Put back an old folder the fallback swap renamed aside when a crash left no folder at
    ``directory`` (a no-op in every other case)."""
    directory = Path(directory)
    aside = directory.with_name(directory.name + ASIDE)
    if aside.is_dir() and not directory.exists():
        os.rename(aside, directory)


def _fsync_tree(folder: Path) -> None:
    for item in folder.iterdir():
        if item.is_file():
            _fsync_file(item)
    _fsync_dir(folder)


def replace_folder(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(new)`` to fill an empty folder beside ``directory``, then make it
    ``directory`` in one step and delete the old one. If ``write`` raises (a full disk), the
    partial folder is removed and ``directory`` is untouched."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_folder(directory)
    new = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".new", dir=parent))
    try:
        os.chmod(new, _DIR_MODE)
        write(new)
        _fsync_tree(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if not directory.exists():
        os.rename(new, directory)
    elif _exchange(new, directory):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old folder
    else:
        aside = directory.with_name(directory.name + ASIDE)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(directory, aside)
        os.rename(new, directory)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(parent)
    return directory


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures (a full disk) raised as the
    ``OSError`` they are (safetensors wraps them in its own error type)."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
