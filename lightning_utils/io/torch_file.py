"""``.pt``/``.ckpt`` files: ``torch.save`` made atomic, ``torch.load`` made safe and explicit.

Loads honour ``weights_only`` exactly as ``torch.load`` does (``None`` lets torch pick its default,
``True`` since torch 2.6, and lets ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` /
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` apply), with an explicit allowlist of the harmless types that
Lightning checkpoints hold (``pathlib`` paths). A checkpoint that
needs more gets :class:`UnsafeCheckpointError` naming the offending globals. This module never
turns ``weights_only`` off on its own.
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

from lightning_utils.io.atomic import atomic_write
from lightning_utils.io.errors import CheckpointFormatError, UnsafeCheckpointError

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


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def load_torch(path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> Any:
    """``torch.load`` with the allowlist above and errors that name the file."""
    path = os.fspath(path)
    try:
        # safe_globals() removes on exit exactly what it added: add only what the process does
        # not allow already (so a user's own allowlist is never taken away), one load at a time.
        with _ALLOWLIST_LOCK:
            allowed = set(torch.serialization.get_safe_globals())
            with torch.serialization.safe_globals([g for g in SAFE_GLOBALS if g not in allowed]):
                return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if _refused_as_unsafe(path, str(exc)):
            raise UnsafeCheckpointError(path, _unsafe_reason(path)) from None
        raise CheckpointFormatError(path, f"not a valid torch checkpoint ({str(exc)[:300]})") from None
    except _PARSE_ERRORS as exc:
        text = str(exc)
        if "deserialize object on" in text or ("CUDA" in text and "available" in text):
            raise  # a map_location/device problem, not a damaged file
        raise CheckpointFormatError(
            path, f"not a valid torch checkpoint ({type(exc).__name__}: {text[:300]})"
        ) from None


def _refused_as_unsafe(path: str, message: str) -> bool:
    """A weights-only refusal of a *well-formed* pickle (not a damaged file)."""
    if "Unsupported global" in message or ("Can only" in message and "for" in message):
        return True
    try:
        return bool(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - an unreadable file is a format error, not an unsafe one
        return False


def _unsafe_reason(path: str) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
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
