"""``lightning-utils convert SRC DST``: convert a checkpoint between ``.ckpt``/``.pt`` and ``.sft``.

The suffix of each path names its format; either may be an fsspec URL (``s3://bucket/run/last.sft``).
Pickle sources are read with ``weights_only=True`` unless ``--unsafe`` is given (only for files you
trust). A sharded checkpoint directory as SRC is consolidated into one file, one tensor in memory at
a time (a directory at a URL too, read with ranged reads). An existing DST is kept unless
``--overwrite``; the write is atomic either way. Exit codes: 0 success, 1 unreadable source or
an object the destination format cannot hold, 2 bad arguments. It never leaves a partial DST
and never replaces one without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="checkpoint to read (.ckpt/.pt/.pth/.bin or .sft/.safetensors, or a sharded .sft directory)"
    )
    parser.add_argument("dst", help="checkpoint to write; its suffix picks the format")
    parser.add_argument(
        "--unsafe", action="store_true", help="allow arbitrary pickled objects in SRC (runs code from the file)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    from lightning_utils.io import storage
    from lightning_utils.io.errors import CheckpointFormatError, UnsafeCheckpointError
    from lightning_utils.io.state import checkpoint_format, load_state, save_state

    prog = "lightning-utils convert"
    try:
        sharded = storage.is_dir(args.src)  # a sharded checkpoint directory (or a prefix at a URL)
    except ImportError as exc:  # a URL whose back end is not installed
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    try:
        if not sharded:
            checkpoint_format(args.src)
        checkpoint_format(args.dst)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        dst_exists = storage.exists(args.dst)
    except ImportError as exc:  # a URL whose back end is not installed
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    if dst_exists and not args.overwrite:
        print(f"{prog}: error: {args.dst} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if storage.path_key(args.src) == storage.path_key(args.dst):
        print(f"{prog}: error: SRC and DST are the same file", file=sys.stderr)
        return 2
    if sharded:
        return _consolidate(prog, args.src, args.dst)
    try:
        obj = load_state(args.src, map_location="cpu", weights_only=False if args.unsafe else None)
    except UnsafeCheckpointError as exc:
        print(f"{prog}: error: {exc}\n(re-run with --unsafe only if you trust {args.src})", file=sys.stderr)
        return 1
    except (OSError, CheckpointFormatError, ImportError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    try:
        save_state(obj, args.dst)
    except (TypeError, ValueError, RuntimeError, OSError, ImportError) as exc:
        # TypeError: a value .sft cannot hold; RuntimeError: what torch.save refuses (e.g. one
        # storage viewed as two dtypes); OSError: the destination cannot be written.
        print(f"{prog}: error: cannot write {args.dst}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({storage.file_size(args.dst)} bytes) from {args.src}")
    return 0


def _consolidate(prog: str, src: str, dst: str) -> int:
    from lightning_utils.io import storage
    from lightning_utils.io.errors import CheckpointFormatError
    from lightning_utils.io.sharded import consolidate

    try:
        consolidate(src, dst)
    except (OSError, CheckpointFormatError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except (TypeError, ValueError, RuntimeError) as exc:
        print(f"{prog}: error: cannot write {dst}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {dst} ({storage.file_size(dst)} bytes) from the sharded checkpoint {src}")
    return 0
