"""JSON helpers: ``json_read``, ``json_write`` and ``json_dumps``.

The standard library does the work; orjson is used for speed when it is installed (the ``json``
extra) and the data is within what it supports, with identical output. ``truncate=True`` rounds
floats written with 8 or more decimals to 4 (compact metrics files), leaving shorter ones
alone. Writes are atomic (see :mod:`lightning_utils.io.atomic`). This module never
evaluates anything it reads.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from lightning_utils.io.atomic import atomic_write

_ORJSON: list[ModuleType | None] = []  # orjson once looked for (None: not installed)


def _orjson() -> ModuleType | None:
    """orjson, an optional accelerator imported at the first JSON call, never at import."""
    if not _ORJSON:
        try:
            import orjson
        except ImportError:  # pragma: no cover - depends on the environment
            _ORJSON.append(None)
        else:
            _ORJSON.append(orjson)
    return _ORJSON[0]


_LONG_DECIMALS = re.compile(r"(\d+\.\d{8,})")


def _truncate_float(x: float) -> float:
    if not math.isfinite(x):
        return x
    text = repr(x)
    if not _LONG_DECIMALS.search(text):
        return x
    return float(_LONG_DECIMALS.sub(lambda m: f"{float(m.group(1)):.4f}", text))


def _truncated(data: Any) -> Any:
    if isinstance(data, float):
        return _truncate_float(data)
    if isinstance(data, dict):
        return {k: _truncated(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_truncated(v) for v in data]
    return data


def json_dumps(data: Any, *, truncate: bool = False, pretty: bool = False) -> str:
    """Serialise ``data`` to a JSON ``str``: compact by default, 2-space indented if ``pretty``."""
    if truncate:
        data = _truncated(data)
    orjson = _orjson()
    if orjson is not None:
        try:
            return orjson.dumps(data, option=orjson.OPT_INDENT_2 if pretty else 0).decode()
        except TypeError:
            pass  # e.g. non-str keys or big ints: the standard library handles these
    if pretty:
        return json.dumps(data, indent=2, ensure_ascii=False)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def json_read(path: str | os.PathLike, default: Any = None) -> Any:
    """Parse the JSON file at ``path``; return ``default`` if it does not exist.

    A file that exists but is not valid JSON raises ``ValueError`` naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default
    try:
        orjson = _orjson()
        return orjson.loads(raw) if orjson is not None else json.loads(raw)
    except ValueError as exc:  # json.JSONDecodeError and orjson.JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def json_write(data: Any, path: str | os.PathLike, *, truncate: bool = False, pretty: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically (parent directories are created)."""
    text = json_dumps(data, truncate=truncate, pretty=pretty)
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))
