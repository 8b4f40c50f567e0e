"""``.pt``/``.ckpt`` files: ``torch.save`` made atomic, ``torch.load`` made safe and explicit.

Loads honour ``weights_only`` exactly as ``torch.load`` does (``None`` lets torch pick its default,
``True`` since torch 2.6, and lets ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` /
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` apply), with an explicit allowlist of the harmless types that
Lightning checkpoints hold (``pathlib`` paths). A checkpoint that
needs more gets :class:`UnsafeCheckpointError` naming the offending globals. This module never
turns ``weights_only`` off on its own.

Saves stream ``torch.save`` into :func:`lightning_utils.io.storage.atomic_writer` (a local temp
file renamed into place, or an upload committed whole); a save that runs out of room raises
:class:`DiskFullError` with the exact size the file needs, where torch itself would raise an
opaque ``RuntimeError`` from its zip writer. Paths may be fsspec URLs; loads from a URL go
through fsspec's file object, as Lightning's do.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import struct
import threading
import zipfile
from typing import Any

import torch

from lightning_utils.io import storage
from lightning_utils.io.errors import CheckpointFormatError, DiskFullError, UnsafeCheckpointError, is_disk_full

# Lightning stores hparams as a plain dict (``dict(model.hparams)``), so paths are the only extra
# type its checkpoints need. (torch's restricted unpickler cannot rebuild dict subclasses such as
# Lightning's AttributeDict at all, so allowlisting those would not help.)
SAFE_GLOBALS: list[Any] = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
_ALLOWLIST_LOCK = threading.Lock()

# Exceptions torch.load raises on a damaged or foreign file.
_PARSE_ERRORS = (
    pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, AttributeError,
    struct.error, zipfile.BadZipFile, UnicodeDecodeError, OverflowError, MemoryError, TypeError, ImportError,
)  # fmt: skip


class _Sink:
    """What ``torch.save`` writes to: every byte reaches ``f`` (or nothing does), and the first
    error of ``f`` is kept, since torch's zip writer reports a failed write as its own
    ``RuntimeError`` ("unexpected pos ...") or not at all."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                n = self._f.write(view[done:])
                done += len(view) - done if n is None else n  # None: a non-raw writer took it all
        except BaseException as exc:
            self.error = self.error or exc
            raise
        return done

    def flush(self) -> None:
        try:
            self._f.flush()
        except BaseException as exc:
            self.error = self.error or exc
            raise


class _Counter:
    """A ``torch.save`` target that only counts the bytes."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def torch_save_size(obj: Any) -> int:
    """The exact size of the file ``torch.save(obj, f)`` writes to a file object (nothing is stored)."""
    counter = _Counter()
    torch.save(obj, counter)  # type: ignore[arg-type]
    return counter.size


def save_torch(obj: Any, path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """``torch.save(obj)`` to ``path`` (a path or a URL) through :func:`storage.atomic_writer`."""
    try:
        with storage.atomic_writer(path, storage_options) as f:
            sink = _Sink(f)
            try:
                torch.save(obj, sink)  # type: ignore[arg-type]
            except BaseException:
                if sink.error is not None:  # the write that failed, not torch's rewording of it
                    raise sink.error from None
                raise
    except OSError as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(path, torch_save_size(obj), exc.errno) from exc  # type: ignore[arg-type]
        raise


def load_torch(
    path: str | os.PathLike,
    map_location: Any = None,
    weights_only: bool | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """``torch.load`` with the allowlist above and errors that name the file (a path or a URL)."""
    path = os.fspath(path)
    if storage.is_url(path):
        storage.file_size(path, storage_options)  # FileNotFoundError naming the URL
    try:
        # safe_globals() removes on exit exactly what it added: add only what the process does
        # not allow already (so a user's own allowlist is never taken away), one load at a time.
        with _ALLOWLIST_LOCK:
            allowed = set(torch.serialization.get_safe_globals())
            with torch.serialization.safe_globals([g for g in SAFE_GLOBALS if g not in allowed]):
                if not storage.is_url(path):
                    return torch.load(path, map_location=map_location, weights_only=weights_only)
                with storage.open_read(path, storage_options) as f:
                    return torch.load(f, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if _refused_as_unsafe(path, str(exc), storage_options):
            raise UnsafeCheckpointError(path, _unsafe_reason(path, storage_options)) from None
        raise CheckpointFormatError(path, f"not a valid torch checkpoint ({str(exc)[:300]})") from None
    except _PARSE_ERRORS as exc:
        text = str(exc)
        if "deserialize object on" in text or ("CUDA" in text and "available" in text):
            raise  # a map_location/device problem, not a damaged file
        raise CheckpointFormatError(
            path, f"not a valid torch checkpoint ({type(exc).__name__}: {text[:300]})"
        ) from None


def _unsafe_globals(path: str, storage_options: dict[str, Any] | None) -> list[str]:
    if not storage.is_url(path):
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with storage.open_read(path, storage_options) as f:
        return torch.serialization.get_unsafe_globals_in_checkpoint(f)


def _refused_as_unsafe(path: str, message: str, storage_options: dict[str, Any] | None = None) -> bool:
    """A weights-only refusal of a *well-formed* pickle (not a damaged file)."""
    if "Unsupported global" in message or ("Can only" in message and "for" in message):
        return True
    try:
        return bool(_unsafe_globals(path, storage_options))
    except Exception:  # noqa: BLE001 - an unreadable file is a format error, not an unsafe one
        return False


def _unsafe_reason(path: str, storage_options: dict[str, Any] | None = None) -> str:
    try:
        names = _unsafe_globals(path, storage_options)
    except Exception:  # noqa: BLE001 - diagnostics only
        names = []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    names = [n for n in names if n not in allowed]
    listed = f" ({', '.join(names)})" if names else ""
    return (
        f"this checkpoint holds objects that weights_only=True refuses to unpickle{listed}. "
        "Pass weights_only=False only if you trust the file: unpickling can run arbitrary code. "
        "Or allowlist the types with torch.serialization.add_safe_globals."
    )
