"""The error types of :mod:`lightning_utils.io`.

Every file that cannot be read as a checkpoint raises :class:`CheckpointFormatError`, whatever
went wrong inside (garbage bytes, truncation, a corrupted or lying header), and its message names
the file. Both classes subclass :class:`ValueError` so that callers who already catch
``ValueError`` for bad input keep working. This module only defines the errors: it never reads
files, and it must never grow one error type per failure cause (callers catch one type).
"""

from __future__ import annotations

import os


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
