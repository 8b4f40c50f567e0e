"""One small storage API over local paths and fsspec URLs, for every checkpoint writer and reader.

What it is for: ``save_state``/``load_state``, the CheckpointIO plugin, the CLI and any writer of
several files (a sharded checkpoint) call these functions and never care where the bytes go.
A local path goes to :mod:`lightning_utils.io.atomic` and ``os``; a URL (``s3://``, ``gs://``,
``az://``, ``memory://``, any fsspec URL; ``file://`` counts as local) goes to
:mod:`lightning_utils.io.remote`, which imports the back end only then.

* :func:`atomic_writer`: a binary writer whose content replaces ``path`` whole when the block
  exits, or not at all if it raises (a local temp file renamed over it; an upload committed
  or aborted). Stream into it: nothing is buffered beyond a few part buffers.
* :func:`read_range`, :func:`read_into` (parallel ranged reads into your buffers),
  :func:`read_bytes` (a small file whole), :func:`file_size`, :func:`open_read`.
* :func:`exists`, :func:`is_file`, :func:`is_dir`, :func:`listdir` (names), :func:`make_dirs`,
  :func:`remove` (a file or a whole directory/prefix; nothing there is fine; a sharded
  checkpoint's index goes first), :func:`remove_shadowed` (on object storage, the object or
  the prefix of one name that was not just written), :func:`move`, :func:`join`,
  :func:`path_or_url` (a ``Path`` for a local path, the string for a URL).

Errors name the path or URL: ``FileNotFoundError`` for a missing file, ``CheckpointWriteError``
for a failed upload. This module must never write to a final path directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lightning_utils.io import remote
from lightning_utils.io.atomic import atomic_write

is_url = remote.is_url
log = logging.getLogger(__name__)

StorageOptions = dict[str, Any] | None


def local_path(path: str | os.PathLike) -> str:
    """A local path as a plain path (``file:///x`` -> ``/x``); leave URLs alone."""
    text = os.fspath(path)
    return text[len("file://") :] if isinstance(text, str) and text.startswith("file://") else text


_local = local_path


def path_key(path: str | os.PathLike) -> str:
    """A string that is the same for every spelling of one location (for locks and comparisons)."""
    return os.fspath(path) if is_url(path) else os.path.abspath(_local(path))


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` for a directory path or a URL prefix."""
    if is_url(base):
        return posixpath.join(os.fspath(base).rstrip("/"), *names)
    return os.path.join(_local(base), *names)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, storage_options: StorageOptions = None) -> Iterator[BinaryIO]:
    """``with atomic_writer(path) as f: f.write(...)``: ``path`` gets the new content whole when the
    block exits, or keeps its old content if the block raises (or the process dies).

    On object storage a name can be an object and a prefix at once: once the upload has landed,
    whatever lies under the prefix ``path/`` (a sharded checkpoint saved under that name before,
    its index first) is deleted, so that ``path`` names one thing, as a local path does.
    """
    if is_url(path):
        with remote.atomic_upload(os.fspath(path), storage_options) as upload:
            yield upload  # type: ignore[misc]
        try:
            remove_shadowed(path, "file", storage_options)
        except Exception as exc:  # noqa: BLE001 - the file is written: the save succeeded
            log.warning("%s: written, but the directory of the same name could not be removed (%s)", path, exc)
    else:
        with atomic_write(_local(path)) as f:
            yield f


def file_size(path: str | os.PathLike, storage_options: StorageOptions = None) -> int:
    """Size in bytes of the file or object; ``FileNotFoundError`` naming it if there is none."""
    if is_url(path):
        return remote.size(os.fspath(path), storage_options)
    local = _local(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{os.fspath(path)}: no such checkpoint file")
    return os.path.getsize(local)


def read_range(path: str | os.PathLike, start: int, end: int, storage_options: StorageOptions = None) -> bytes:
    """Bytes ``[start, end)`` (fewer if the file is shorter)."""
    if is_url(path):
        return remote.read_range(os.fspath(path), start, end, storage_options)
    with open(_local(path), "rb") as f:
        f.seek(start)
        return f.read(max(0, end - start))


def read_into(
    path: str | os.PathLike, pieces: Sequence[tuple[int, memoryview]], storage_options: StorageOptions = None
) -> None:
    """Fill each ``(offset, buffer)`` of ``pieces`` with the file's bytes from ``offset``, in parallel
    for a URL. ``EOFError`` naming the file if it is shorter than that."""
    if is_url(path):
        remote.read_into(os.fspath(path), pieces, storage_options)
        return
    with open(_local(path), "rb", buffering=0) as f:
        for offset, buf in pieces:
            f.seek(offset)
            done = 0
            while done < len(buf):
                got = f.readinto(buf[done:])
                if not got:
                    raise EOFError(f"{os.fspath(path)}: expected {len(buf)} bytes at offset {offset}, got {done}")
                done += got


def open_read(path: str | os.PathLike, storage_options: StorageOptions = None) -> BinaryIO:
    """A seekable binary file for reading (an fsspec buffered file for a URL)."""
    if is_url(path):
        return remote.open_read(os.fspath(path), storage_options)
    return open(_local(path), "rb")


def read_bytes(path: str | os.PathLike, storage_options: StorageOptions = None) -> bytes:
    """The whole content of a (small) file; ``FileNotFoundError`` naming it if there is none."""
    if is_url(path):
        return remote.read_all(os.fspath(path), storage_options)
    with open(_local(path), "rb") as f:
        return f.read()


def exists(path: str | os.PathLike, storage_options: StorageOptions = None) -> bool:
    if is_url(path):
        return remote.exists(os.fspath(path), storage_options)
    return os.path.lexists(_local(path))


def is_file(path: str | os.PathLike, storage_options: StorageOptions = None) -> bool:
    """Whether ``path`` is a file (an object, for a URL)."""
    if is_url(path):
        return remote.kind(os.fspath(path), storage_options) == "file"
    return os.path.isfile(_local(path))


def is_dir(path: str | os.PathLike, storage_options: StorageOptions = None) -> bool:
    """Whether ``path`` is a directory (for a URL on object storage: a prefix with objects under it)."""
    if is_url(path):
        return remote.kind(os.fspath(path), storage_options) == "directory"
    return os.path.isdir(_local(path))


def make_dirs(path: str | os.PathLike, storage_options: StorageOptions = None) -> None:
    """Create the directory ``path`` and its parents (nothing to do on object storage)."""
    if is_url(path):
        remote.makedirs(os.fspath(path), storage_options)
    else:
        os.makedirs(_local(path), exist_ok=True)


def listdir(path: str | os.PathLike, storage_options: StorageOptions = None) -> list[str]:
    """The names directly under a directory or URL prefix, sorted; empty if there is nothing."""
    if is_url(path):
        return remote.listdir(os.fspath(path), storage_options)
    try:
        return sorted(os.listdir(_local(path)))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove(path: str | os.PathLike, storage_options: StorageOptions = None) -> None:
    """Remove a file, a link or a whole directory (prefix); nothing there is not an error.

    A prefix on object storage is not removed in one step: its ``index.json`` (the commit marker
    of a sharded checkpoint) is deleted first, so a reader never takes a half-deleted checkpoint
    for a complete one.
    """
    if is_url(path):
        from lightning_utils.io.sharded.layout import INDEX_NAME  # here: the sharded package imports this module

        remote.remove(os.fspath(path), storage_options, first=(INDEX_NAME,))
        return
    p = Path(_local(path))
    if p.is_symlink() or p.is_file():
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=False)


def remove_shadowed(path: str | os.PathLike, keep: str, storage_options: StorageOptions = None) -> None:
    """After writing a file (``keep="file"``) or a directory (``"directory"``) at the URL ``path``,
    delete the other one that object storage lets share its name (a directory's index first).
    Nothing to do for a local path."""
    if is_url(path):
        from lightning_utils.io.sharded.layout import INDEX_NAME  # here: the sharded package imports this module

        remote.remove_shadowed(os.fspath(path), keep, storage_options, first=(INDEX_NAME,))


def path_or_url(path: str | os.PathLike) -> Any:
    """A ``Path`` for a local path, the string itself for a URL (``Path("s3://b/x")`` would be
    ``s3:/b/x``)."""
    return os.fspath(path) if is_url(path) else Path(path)


def move(src: str | os.PathLike, dst: str | os.PathLike, storage_options: StorageOptions = None) -> None:
    """Move ``src`` over ``dst`` on the same filesystem (a rename locally; copy-then-delete on object
    stores, where ``dst`` still appears whole)."""
    if is_url(src) != is_url(dst):
        raise ValueError(f"cannot move {os.fspath(src)} to {os.fspath(dst)}: one is local, the other a URL")
    if is_url(src):
        remote.move(os.fspath(src), os.fspath(dst), storage_options)
    else:
        os.replace(_local(src), _local(dst))
