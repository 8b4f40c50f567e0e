"""``lightning-utils inspect PATH``: print a checkpoint's tree with tensor shapes, dtypes and sizes.

Works for ``.sft`` (reads only the header: instant on any size, also from an fsspec URL such as
``s3://bucket/run/last.sft``), sharded ``.sft`` directories, local or at a URL (reads only the
index; shapes are the global ones) and ``.ckpt``/``.pt`` (loaded onto the meta device, so no tensor data is copied).
Pickle files are opened with ``weights_only=True`` unless ``--unsafe`` is given. Exit codes: 0
success, 1 unreadable or missing file, 2 bad arguments (a negative ``--depth`` or
``--max-items``). This command never writes anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        help="a .sft/.safetensors or .ckpt/.pt/.pth/.bin file, a sharded .sft directory, or an fsspec URL (s3://...)",
    )
    parser.add_argument("--depth", type=int, default=None, help="show at most this many levels")
    parser.add_argument(
        "--max-items", type=int, default=50, help="show at most this many children per container (default 50)"
    )
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="allow arbitrary pickled objects in .ckpt/.pt files (runs code from the file)",
    )


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        kind = "Parameter" if isinstance(value, torch.nn.Parameter) else "tensor"
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{kind} {dtype} {list(value.shape)} {_human(value.numel() * value.element_size())}"
    if isinstance(value, dict):
        return f"{type(value).__name__} ({len(value)} items)"
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return f"{type(value).__name__} ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _children(value: Any) -> list[tuple[str, Any]] | None:
    if isinstance(value, dict):
        return [(str(k) if isinstance(k, str) else repr(k), v) for k, v in value.items()]
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return [(f"[{i}]", v) for i, v in enumerate(value)]
    return None


def render_tree(obj: Any, depth: int | None = None, max_items: int = 50) -> Iterator[str]:
    """Lines of a box-drawing tree of ``obj``."""

    def walk(value: Any, prefix: str, level: int) -> Iterator[str]:
        kids = _children(value)
        if kids is None or (depth is not None and level >= depth):
            return
        shown = kids[:max_items]
        for i, (label, child) in enumerate(shown):
            last = i == len(shown) - 1 and len(kids) <= max_items
            yield f"{prefix}{'└─ ' if last else '├─ '}{label}: {_describe(child)}"
            yield from walk(child, prefix + ("   " if last else "│  "), level + 1)
        if len(kids) > max_items:
            yield f"{prefix}└─ ... {len(kids) - max_items} more"

    yield _describe(obj)
    yield from walk(obj, "", 0)


def _tensor_bytes(obj: Any) -> tuple[int, int]:
    count = total = 0
    seen: set[int] = set()
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                count += 1
                total += v.numel() * v.element_size()
        else:
            kids = _children(v)
            if kids:
                stack.extend(c for _, c in kids)
    return count, total


def _sharded_description(path: str) -> str:
    from lightning_utils.io.sharded import ShardedCheckpoint

    with ShardedCheckpoint(path) as checkpoint:
        files = len(checkpoint.index.files)
    return f"sharded safetensors, {files} files, global shapes"


def run(args: argparse.Namespace) -> int:
    from lightning_utils.io import storage
    from lightning_utils.io.errors import CheckpointFormatError, UnsafeCheckpointError
    from lightning_utils.io.state import checkpoint_format, load_structure

    prog = "lightning-utils inspect"
    for flag, value in (("--depth", args.depth), ("--max-items", args.max_items)):
        if value is not None and value < 0:
            print(f"{prog}: error: argument {flag}: must be 0 or more, got {value}", file=sys.stderr)
            return 2
    try:
        fmt = _sharded_description(args.path) if storage.is_dir(args.path) else checkpoint_format(args.path)
        obj = load_structure(args.path, weights_only=False if args.unsafe else None)
    except UnsafeCheckpointError as exc:
        print(f"{prog}: error: {exc}\n(re-run with --unsafe only if you trust {args.path})", file=sys.stderr)
        return 1
    except (FileNotFoundError, CheckpointFormatError, ValueError, ImportError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    count, total = _tensor_bytes(obj)
    print(f"{args.path} ({fmt}; {count} tensors, {_human(total)} of tensor data)")
    for line in render_tree(obj, depth=args.depth, max_items=args.max_items):
        print(line)
    return 0
