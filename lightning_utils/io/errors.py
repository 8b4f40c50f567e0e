"""The error types of :mod:`lightning_utils.io`.

Reading: every file that cannot be read as a checkpoint raises :class:`CheckpointFormatError`,
whatever went wrong inside (garbage bytes, truncation, a corrupted or lying header), and its
message names the file. It and :class:`UnsafeCheckpointError` subclass :class:`ValueError` so
that callers who already catch ``ValueError`` for bad input keep working.

Writing: a save that could not complete raises :class:`CheckpointWriteError` (an ``OSError``)
naming the path or URL; when the cause is a lack of room (a full disk, a quota, a file-size
limit: ``ENOSPC``, ``EDQUOT``, ``EFBIG``) it is the subclass :class:`DiskFullError`, which also
says how many bytes the checkpoint needs. Our writers are atomic, so in both cases nothing
partial is left under the final name. This module only defines the errors: it never touches
files, and it must never grow one error type per failure cause (callers catch one type).
"""

from __future__ import annotations

import errno
import os

# The errno values that mean "no room for these bytes", whichever limit was hit.
DISK_FULL_ERRNOS: frozenset[int] = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code is not None
)


class CheckpointFormatError(ValueError):
    """The file is not a valid checkpoint of the format its suffix names (or is damaged)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsafeCheckpointError(ValueError):
    """A pickle checkpoint holds objects that ``weights_only=True`` refuses to load."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; nothing partial was left under ``path``.

    ``errno`` is the cause's when it had one (``None`` for, e.g., a failed upload); the cause is
    chained as ``__cause__``.
    """

    def __init__(self, path: str | os.PathLike, reason: str, code: int | None = None) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self._code = code
        if code is None:
            super().__init__(f"{self.path}: {reason}")
        else:
            super().__init__(code, f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, int | None]]:  # pickles across processes
        return type(self), (self.path, self.reason, self._code)


class DiskFullError(CheckpointWriteError):
    """No room for the checkpoint: a full disk (``ENOSPC``), a quota (``EDQUOT``) or a file-size limit
    (``EFBIG``). ``needed`` is the size in bytes of the complete file."""

    def __init__(self, path: str | os.PathLike, needed: int, code: int) -> None:
        self.needed = needed
        super().__init__(
            path,
            f"no room to write this checkpoint: it needs {needed:,} bytes ({_human(needed)}) and the disk, "
            f"quota or file-size limit allows fewer ({os.strerror(code)}); the file already at this path, if "
            "any, is unchanged and nothing was left beside it",
            code,
        )
        self._code = code

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:  # type: ignore[override]
        return type(self), (self.path, self.needed, self._code or 0)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``OSError`` that means "no room" (``ENOSPC``, ``EDQUOT``, ``EFBIG``)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"
