"""The storage operations of sharded checkpoints: write a file, read one, list, publish and remove.

Every access the sharded writer and reader make to storage is one small function here, for a
local directory or an fsspec URL (``s3://bucket/run/step=100.sft``); the URL cases go through
:mod:`lightning_utils.io.storage`. The local implementation is what the local guarantees rest on:

* :func:`write_file` creates a new file (never an existing one), writes it, flushes and fsyncs
  it before returning: a file reported written is durable.
* :func:`publish` moves a finished staging file or directory to its final name in one step (an
  atomic exchange where Linux offers ``renameat2(RENAME_EXCHANGE)``, a plain rename when nothing
  is there yet), removes what it replaced, and fsyncs the parent directory. Readers therefore see
  the previous checkpoint or the new one, never a mixture.
* Staging names start with ``.lu-tmp-`` (as single-file writes do): a directory or file with that
  prefix is what a killed save left behind; it is never read as a checkpoint and can be deleted
  once no save is running.

At a URL there is no rename: :func:`write_file` uploads the file whole or not at all (a streamed
multipart upload on S3) straight under its final name, and the writer names each save's files
uniquely and writes the index last (see :mod:`lightning_utils.io.sharded.writer`). Reads of a
URL are ranged reads (:func:`read_into`). This module never decides what to write and never
interprets file contents.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lightning_utils.io import storage as _io
from lightning_utils.io.atomic import TEMP_PREFIX, fsync_directory

is_url = _io.is_url
path_or_url = _io.path_or_url  # a Path, or a URL string
remove_shadowed = _io.remove_shadowed  # a URL's object and prefix of one name: keep one
Options = dict[str, Any] | None  # fsspec storage options of a URL (credentials, endpoint)


def new_token() -> str:
    """A fresh random token naming one save's staging area (chosen by one rank, shared with the rest)."""
    return secrets.token_hex(6)


def staging_path(final: str | os.PathLike, token: str) -> Path:
    """Where a save of ``final`` is staged: beside it, under a name Lightning never takes for a checkpoint."""
    final = Path(final)
    return final.parent / f"{TEMP_PREFIX}{token}"


def join(directory: str | os.PathLike, name: str) -> Any:
    """The path of ``name`` in ``directory``: a ``Path`` for a local directory, a URL string for a URL."""
    if is_url(directory):
        return _io.join(directory, name)
    return Path(directory) / name


def make_dir(path: str | os.PathLike, *, durable: bool = True, storage_options: Options = None) -> None:
    """Create the directory ``path`` (and missing parents); the directories it creates are made
    durable, ``path`` itself only with ``durable=True``.

    A staging directory (``durable=False``) only matters once it is published, and
    :func:`publish` fsyncs the parent after the rename. At a URL: nothing to do on object
    storage, ``makedirs`` elsewhere.
    """
    if is_url(path):
        _io.make_dirs(path, storage_options)
        return
    path = Path(path)
    highest_missing = None
    probe = path if durable else path.parent
    while not probe.exists() and probe.parent != probe:
        highest_missing, probe = probe, probe.parent
    path.mkdir(parents=True, exist_ok=True)
    if highest_missing is not None:
        fsync_directory(highest_missing.parent)


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], Any], storage_options: Options = None) -> int:
    """Create the new file ``path``, let ``write(f)`` fill it, fsync it; return its size in bytes.

    ``f`` is unbuffered (its ``fileno()`` may be written to directly). If ``write`` raises, the
    partial file is removed. At a URL ``f`` is an upload stream with no ``fileno`` (an object
    appearing whole when ``write`` returns, or never: the upload is aborted if it raises).
    """
    if is_url(path):
        with _io.atomic_writer(path, storage_options) as upload:
            write(upload)
            return int(upload.tell())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            write(f)
            size = f.seek(0, os.SEEK_END)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return size


def read_file(path: str | os.PathLike, storage_options: Options = None) -> bytes:
    if is_url(path):
        return _io.read_bytes(path, storage_options)
    with open(path, "rb") as f:
        return f.read()


def read_into(
    path: str | os.PathLike, pieces: Sequence[tuple[int, memoryview]], storage_options: Options = None
) -> None:
    """Fill each ``(offset, buffer)`` from the file (parallel ranged reads at a URL); ``EOFError`` if it is shorter."""
    _io.read_into(path, pieces, storage_options)


def file_size(path: str | os.PathLike, storage_options: Options = None) -> int:
    if is_url(path):
        return _io.file_size(path, storage_options)
    return os.stat(path).st_size


def is_dir(path: str | os.PathLike, storage_options: Options = None) -> bool:
    """A directory (at a URL on object storage: a prefix with objects under it)."""
    if is_url(path):
        return _io.is_dir(path, storage_options)
    return os.path.isdir(path)


def is_file(path: str | os.PathLike, storage_options: Options = None) -> bool:
    if is_url(path):
        return _io.is_file(path, storage_options)
    return os.path.isfile(path)


def exists(path: str | os.PathLike, storage_options: Options = None) -> bool:
    if is_url(path):
        return _io.exists(path, storage_options)
    return os.path.lexists(path)


def list_dir(path: str | os.PathLike, storage_options: Options = None) -> list[str]:
    if is_url(path):
        return _io.listdir(path, storage_options)
    return sorted(os.listdir(path))


def sync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` durable (after its files were written); nothing to do at a URL."""
    if not is_url(path):
        fsync_directory(path)


def remove(path: str | os.PathLike, storage_options: Options = None) -> None:
    """Remove a file or a directory tree; a missing path is fine."""
    if is_url(path):
        _io.remove(path, storage_options)
        return
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically (Linux ``renameat2``); False where that is not available."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28 or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # pragma: no cover - a file system without it
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def publish(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Give the finished ``staged`` file or directory the name ``final``, replacing what is there.

    Where an atomic exchange is not available and ``final`` exists, the old one is first renamed
    aside (``.lu-tmp-*``), so a crash between the two renames leaves it there, not lost.
    """
    staged, final = Path(staged), Path(final)
    if not os.path.lexists(final):
        os.rename(staged, final)
    elif os.path.isfile(final) and os.path.isfile(staged):
        os.replace(staged, final)
    elif _exchange(staged, final):
        remove(staged)  # it now holds the replaced checkpoint
    else:  # pragma: no cover - platforms without renameat2
        aside = final.parent / f"{TEMP_PREFIX}{new_token()}"
        os.rename(final, aside)
        os.rename(staged, final)
        remove(aside)
    fsync_directory(final.parent)
