"""Atomic, durable file replacement.

``atomic_write(path)`` stages the new content in a temporary file *in the destination directory*
(so the final rename never crosses a filesystem), fsyncs it, renames it over ``path`` with
``os.replace`` and fsyncs the directory so the rename itself survives a power loss. A crash or a
kill at any moment leaves either the previous file or the new one under ``path``, never a partial
one. This module must never write to the final path directly and never stage in ``$TMPDIR``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Prefix of staged files; a file with this prefix left in a directory is the remains of a writer
# that was killed before its rename and is safe to delete once no save is running (this module
# never deletes them itself: on a shared filesystem another host may be writing one).
TEMP_PREFIX = ".lu-tmp-"


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a directory entry change (a rename or an unlink) to stable storage."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # pragma: no cover - platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_all(fd: int, data: memoryview) -> None:
    """Write every byte of ``data`` to ``fd``: ``os.write`` may write less than asked."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    total = len(view)
    done = 0
    chunk = 1 << 30  # Linux writes at most ~2 GiB per call; stay well below.
    while done < total:
        done += os.write(fd, view[done : done + chunk])


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` atomically and durably when the block exits.

    If the block raises, the staged file is removed and ``path`` is untouched. Parent
    directories are created (and made durable). A new file gets the usual permissions
    (``0o666`` less the umask); a replaced file keeps its own.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, cannot write a checkpoint file there")
    directory = path.parent
    if not directory.is_dir():
        missing = directory
        while not missing.parent.exists():
            missing = missing.parent
        directory.mkdir(parents=True, exist_ok=True)
        fsync_directory(missing.parent)  # the new directories themselves must survive a crash
    # The temp name keeps the target's name for readability, cut so it fits NAME_MAX (255 bytes).
    stem = path.name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    tmp = directory / f"{TEMP_PREFIX}{secrets.token_hex(6)}.{stem}"
    try:
        mode = path.stat().st_mode & 0o777  # replacing a file keeps its permissions
    except FileNotFoundError:
        mode = None
    # os.open with an explicit mode lets the umask apply (mkstemp would force 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    if mode is not None:
        os.fchmod(fd, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)
