"""Point a ``last`` checkpoint name at a newer checkpoint file, atomically.

``Trainer.fit(ckpt_path="last")`` restores the newest ``last*`` file of the ``ModelCheckpoint``
folders. When something else writes a newer checkpoint there (``TrainingControl``'s ``save``,
``quit``, periodic and final saves), that ``last`` must follow it, or a resume silently goes
back to an older step. Two ways, as ``ModelCheckpoint(save_last=...)`` offers them:

- :func:`link_last` (``save_last="link"``): a relative symlink, made under a temporary name and
  renamed over ``last``, so ``last`` always exists and names either the old or the new file;
- :func:`copy_last` (``save_last=True``): a copy staged next to ``last``, fsynced and renamed
  over it (a hard link would be cheaper, but a writer that truncates ``last`` in place, as
  fsspec's cross-filesystem commit does, would then change the checkpoint it links to).

This module must never write the checkpoint itself, never leave ``last`` missing or partial, and
never import ``lightning``.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from lightning_utils.io.atomic import TEMP_PREFIX, atomic_write, fsync_directory

__all__ = ["copy_last", "link_last"]


def link_last(target: str | os.PathLike[str], last: str | os.PathLike[str]) -> None:
    """Make ``last`` a symlink to ``target`` (relative to ``last``'s folder), replacing what was there."""
    target, last = Path(target), Path(last)
    last.parent.mkdir(parents=True, exist_ok=True)
    if last.exists() and last.resolve() == target.resolve() and last.is_symlink():
        return
    staged = last.parent / f"{TEMP_PREFIX}{last.name}.{secrets.token_hex(4)}"
    os.symlink(os.path.relpath(target, last.parent), staged)
    try:
        if last.is_dir() and not last.is_symlink():
            # A sharded checkpoint folder saved as 'last' earlier: a rename cannot replace a folder.
            shutil.rmtree(last)
        os.replace(staged, last)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync_directory(last.parent)


def copy_last(target: str | os.PathLike[str], last: str | os.PathLike[str]) -> None:
    """Make ``last`` a copy of the file ``target``, replacing what was there in one rename."""
    target, last = Path(target), Path(last)
    if not target.is_file():
        raise ValueError(f"copy_last: {target} is not a file (a sharded checkpoint folder cannot be copied here)")
    if last.is_dir():  # a folder (or a link to one) from a sharded save: a rename cannot replace it
        if last.is_symlink():
            last.unlink()
        else:
            shutil.rmtree(last)
    # The rename replaces a symlink at `last` itself, never the file it points to.
    with open(target, "rb") as src, atomic_write(last) as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
