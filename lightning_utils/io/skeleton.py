"""Splitting a nested Python state into safetensors entries plus a JSON skeleton, and back.

A Lightning checkpoint is a tree of dicts, lists and scalars with tensors at the leaves (model
weights, optimizer moments, callback state). :func:`encode` walks that tree and returns

* the tensors to store, one safetensors entry per distinct *storage*, and
* a JSON "skeleton": the same tree in which every non-JSON value is a small tagged object
  (``{"$": "tuple", ...}``, ``{"$": "tensor", ...}``) recording exactly what ``torch.load`` of a
  ``.pt`` would give back: ``dict`` vs ``OrderedDict``, ``tuple`` vs ``list``, non-string keys,
  NaN and infinities, paths, 0-dim tensors vs Python scalars, ``Parameter``, strides and views.

:func:`decode` rebuilds the identical object. Tensors that share memory (tied weights, views)
are stored once and come back sharing storage; the same tensor object reached twice comes back
as one object. A value the skeleton cannot represent (an arbitrary object, a class, a lambda)
raises ``TypeError`` naming its key path: nothing is silently dropped, nothing is pickled.
"""

from __future__ import annotations

import base64
import math
import pathlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from lightning_utils.io.safetensors_file import NAME_FROM_DTYPE

FORMAT_VERSION = 1
# Top-level keys whose tensor leaves are named by their bare key, so a checkpoint's weights read
# as ordinary safetensors names ("layer.weight") to other tools.
_BARE_NAME_ROOTS = ("state_dict", "module")

try:  # Lightning's hparams container; optional only so this module imports without Lightning
    from lightning.fabric.utilities.data import AttributeDict as _AttributeDict
except ImportError:  # pragma: no cover
    _AttributeDict = None

_DICT_TAGS: dict[type, str] = {dict: "dict", OrderedDict: "odict"}
if _AttributeDict is not None:
    _DICT_TAGS[_AttributeDict] = "attrdict"
_DICT_TYPES = {v: k for k, v in _DICT_TAGS.items()}
_PATH_TYPES = {c.__name__: c for c in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def format_key_path(path: tuple[Any, ...]) -> str:
    """``("optimizer_states", 0, "state")`` -> ``checkpoint['optimizer_states'][0]['state']``."""
    return "checkpoint" + "".join(f"[{k!r}]" for k in path)


def _float_node(x: float) -> Any:
    if math.isfinite(x):
        return x
    return {"$": "float", "v": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


class _Encoder:
    def __init__(self) -> None:
        self.entries: dict[str, torch.Tensor] = {}  # entry name -> contiguous CPU tensor
        self.devices: dict[str, str] = {}  # entry name -> original device, when not CPU
        self._tensors: list[tuple[torch.Tensor, dict[str, Any], tuple[Any, ...]]] = []
        self._by_id: dict[int, dict[str, Any]] = {}  # id(tensor object) -> its node
        self._keepalive: list[torch.Tensor] = []  # keeps ids stable while encoding
        self._names: set[str] = set()
        self._next_id = 0

    # -- tree walk -------------------------------------------------------------------------
    def node(self, obj: Any, path: tuple[Any, ...]) -> Any:
        t = type(obj)
        # Exact types only: a str/int subclass (an Enum, say) would come back as its base type.
        if obj is None or t is bool or t is str or t is int:
            return obj
        if t is float:
            return _float_node(obj)
        if t is list:
            return [self.node(v, path + (i,)) for i, v in enumerate(obj)]
        if t in _DICT_TAGS:
            return self.dict_node(obj, _DICT_TAGS[t], path)
        if t is tuple:
            return {"$": "tuple", "v": [self.node(v, path + (i,)) for i, v in enumerate(obj)]}
        if isinstance(obj, torch.Tensor):
            return self.tensor_node(obj, path)
        if t is torch.Size:
            return {"$": "size", "v": list(obj)}
        if t is torch.dtype:
            return {"$": "dtype", "v": str(obj).removeprefix("torch.")}
        if t is torch.device:
            return {"$": "device", "v": str(obj)}
        if t.__name__ in _PATH_TYPES and _PATH_TYPES[t.__name__] is t:
            return {"$": "path", "cls": t.__name__, "v": str(obj)}
        if t is bytes:
            return {"$": "bytes", "v": base64.b64encode(obj).decode("ascii")}
        if t is complex:
            return {"$": "complex", "re": _float_node(obj.real), "im": _float_node(obj.imag)}
        if t in (set, frozenset):
            return {"$": t.__name__, "v": [self.node(v, path + (i,)) for i, v in enumerate(obj)]}
        raise TypeError(
            f"{format_key_path(path)} holds a {t.__module__}.{t.__qualname__}, which a safetensors "
            "checkpoint cannot represent without pickle (supported: tensors, dict/OrderedDict, "
            "list/tuple, str/int/float/bool/None, bytes, paths, torch dtype/device/Size); "
            "convert it to one of these or save this checkpoint as .ckpt"
        )

    def dict_node(self, obj: dict, tag: str, path: tuple[Any, ...]) -> dict[str, Any]:
        if all(type(k) is str for k in obj):
            return {"$": tag, "v": {k: self.node(v, path + (k,)) for k, v in obj.items()}}
        return {"$": tag, "kv": [[self.node(k, path + (f"<key {k!r}>",)), self.node(v, path + (k,))] for k, v in obj.items()]}

    def tensor_node(self, t: torch.Tensor, path: tuple[Any, ...]) -> dict[str, Any]:
        seen = self._by_id.get(id(t))
        if seen is not None:  # the same object again (a pickle memo hit, in .pt terms)
            if "id" not in seen:
                seen["id"] = self._next_id
                self._next_id += 1
            return {"$": "ref", "id": seen["id"]}
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{format_key_path(path)} is a tensor subclass {type(t).__qualname__}; materialise it to a plain tensor first")
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise TypeError(f"{format_key_path(path)} is a {t.layout} tensor; only dense strided tensors can be stored")
        if t.device.type == "meta":
            raise TypeError(f"{format_key_path(path)} is a meta tensor and has no data to store")
        if t.dtype not in NAME_FROM_DTYPE:
            raise TypeError(f"{format_key_path(path)} has dtype {t.dtype}, which safetensors cannot store")
        node: dict[str, Any] = {"$": "tensor"}
        if isinstance(t, torch.nn.Parameter):
            node["param"] = True
        if t.requires_grad:
            node["rg"] = True
        self._by_id[id(t)] = node
        self._keepalive.append(t)
        self._tensors.append((t, node, path))
        return node

    # -- storages -> entries ---------------------------------------------------------------
    def _name_for(self, path: tuple[Any, ...]) -> str:
        parts = [str(k) for k in path]
        if len(parts) >= 2 and parts[0] in _BARE_NAME_ROOTS:
            parts = parts[1:]
        base = ".".join(parts) or "tensor"
        name, n = base, 1
        while name in self._names or name == "__metadata__":
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        return name

    def assign_entries(self) -> None:
        groups: dict[Any, list[tuple[torch.Tensor, dict[str, Any], tuple[Any, ...]]]] = {}
        for item in self._tensors:
            t = item[0]
            if t.is_conj() or t.is_neg():  # lazily-negated/conjugated views: store materialised
                key: Any = ("own", id(t))
            else:
                storage = t.untyped_storage()
                key = ("own", id(t)) if storage.nbytes() == 0 else (t.device, storage.data_ptr())
            groups.setdefault(key, []).append(item)
        for items in groups.values():
            self._store_group(items)

    def _store_group(self, items: list[tuple[torch.Tensor, dict[str, Any], tuple[Any, ...]]]) -> None:
        first, _, first_path = items[0]
        name = self._name_for(first_path)
        device = first.device
        if device.type != "cpu":
            self.devices[name] = str(device)
        whole = all(_covers_storage(t) and t.dtype == first.dtype and t.shape == first.shape for t, _, _ in items)
        if whole:
            # A tensor that is its whole storage (the common case: weights, moments). Tied
            # copies of it point at the same entry.
            data = first.detach()
            if data.is_conj() or data.is_neg():
                data = data.resolve_conj().resolve_neg()
            self.entries[name] = data.cpu().contiguous()
            for _, node, _ in items:
                node["e"] = name
            return
        # Views into a shared storage: store the storage once, each tensor as (offset, shape, stride).
        dtypes = {t.dtype for t, _, _ in items}
        storage = first.untyped_storage()
        entry_dtype = dtypes.pop() if len(dtypes) == 1 else torch.uint8
        itemsize = torch.empty((), dtype=entry_dtype).element_size()
        if storage.nbytes() % itemsize:
            entry_dtype, itemsize = torch.uint8, 1
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        self.entries[name] = raw.view(entry_dtype).detach().cpu().contiguous()
        for t, node, _ in items:
            node.update(e=name, off=t.storage_offset(), sh=list(t.shape), st=list(t.stride()))
            if t.dtype != entry_dtype:
                node["dt"] = str(t.dtype).removeprefix("torch.")


def _covers_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()


def encode(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``obj`` into ``(entries, skeleton)``; see the module docstring."""
    enc = _Encoder()
    root = enc.node(obj, ())
    enc.assign_entries()
    skeleton: dict[str, Any] = {"version": FORMAT_VERSION, "root": root}
    if enc.devices:
        skeleton["devices"] = enc.devices
    return enc.entries, skeleton


class SkeletonError(ValueError):
    """The skeleton is malformed (raised by :func:`decode`; callers add the file name)."""


class _EntryFailure(Exception):
    """Carries an exception raised by the ``entry`` callback through decode's own error mapping."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def decode(skeleton: Any, entry: Callable[[str, str], torch.Tensor]) -> Any:
    """Rebuild the object described by ``skeleton``.

    ``entry(name, original_device)`` returns the (already device-mapped) tensor stored under
    ``name``; it is called once per name.
    """
    if not isinstance(skeleton, dict) or skeleton.get("version") != FORMAT_VERSION or "root" not in skeleton:
        raise SkeletonError(f"unsupported skeleton (expected version {FORMAT_VERSION})")
    devices = skeleton.get("devices") or {}
    bases: dict[str, torch.Tensor] = {}
    objects: dict[int, torch.Tensor] = {}

    def base(name: Any) -> torch.Tensor:
        if not isinstance(name, str):
            raise SkeletonError(f"tensor entry name {name!r} is not a string")
        if name not in bases:
            try:
                bases[name] = entry(name, devices.get(name, "cpu"))
            except SkeletonError:
                raise
            except Exception as exc:  # reading/placing data failed: not a skeleton problem
                raise _EntryFailure(exc) from None
        return bases[name]

    def tensor(n: dict[str, Any]) -> torch.Tensor:
        b = base(n.get("e"))
        if "off" in n:
            try:
                src = b.view(getattr(torch, n["dt"])) if "dt" in n else b
                t = src.as_strided(n["sh"], n["st"], n["off"])
            except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
                raise SkeletonError(f"invalid view of entry {n.get('e')!r}: {exc}") from None
        else:
            t = b.detach()  # a new tensor object over the same storage
        if n.get("param"):
            t = torch.nn.Parameter(t, requires_grad=bool(n.get("rg")))
        elif n.get("rg"):
            t.requires_grad_(True)
        if "id" in n:
            objects[n["id"]] = t
        return t

    def node(n: Any, depth: int = 0) -> Any:
        if depth > 200:
            raise SkeletonError("skeleton nesting is too deep")
        if n is None or isinstance(n, (bool, int, float, str)):
            return n
        if isinstance(n, list):
            return [node(v, depth + 1) for v in n]
        if not isinstance(n, dict):
            raise SkeletonError(f"unexpected skeleton node {n!r}")
        tag = n.get("$")
        if tag in _DICT_TYPES:
            cls = _DICT_TYPES[tag]
            if "v" in n and isinstance(n["v"], dict):
                return cls((k, node(v, depth + 1)) for k, v in n["v"].items())
            if "kv" in n and isinstance(n["kv"], list):
                return cls((node(k, depth + 1), node(v, depth + 1)) for k, v in n["kv"])
            raise SkeletonError(f"malformed {tag} node")
        if tag == "tensor":
            return tensor(n)
        if tag == "ref":
            if n.get("id") not in objects:
                raise SkeletonError(f"reference to unknown tensor id {n.get('id')!r}")
            return objects[n["id"]]
        if tag == "tuple":
            return tuple(node(v, depth + 1) for v in n["v"])
        if tag == "float":
            return _NONFINITE[n["v"]]
        if tag == "size":
            return torch.Size(n["v"])
        if tag == "dtype":
            dtype = getattr(torch, n["v"], None)
            if not isinstance(dtype, torch.dtype):
                raise SkeletonError(f"unknown dtype {n['v']!r}")
            return dtype
        if tag == "device":
            return torch.device(n["v"])
        if tag == "path":
            return _PATH_TYPES[n["cls"]](n["v"])
        if tag == "bytes":
            return base64.b64decode(n["v"], validate=True)
        if tag == "complex":
            return complex(node(n["re"]), node(n["im"]))
        if tag in ("set", "frozenset"):
            return (set if tag == "set" else frozenset)(node(v, depth + 1) for v in n["v"])
        raise SkeletonError(f"unknown skeleton tag {tag!r}")

    try:
        return node(skeleton["root"])
    except _EntryFailure as failure:
        raise failure.exc from None
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        if isinstance(exc, SkeletonError):
            raise
        raise SkeletonError(f"malformed skeleton ({type(exc).__name__}: {exc})") from None
