"""Splitting a nested Python state into safetensors entries plus a JSON skeleton, and back.

A Lightning checkpoint is a tree of dicts, lists and scalars with tensors at the leaves (model
weights, optimizer moments, callback state). :func:`encode` walks that tree and returns

* the tensors to store, one safetensors entry per distinct (group of overlapping) storage, and
* a JSON "skeleton": the same tree in which every non-JSON value is a small tagged object
  (``{"$": "tuple", ...}``, ``{"$": "tensor", ...}``) recording exactly what ``torch.load`` of a
  ``.pt`` would give back: ``dict`` vs ``OrderedDict`` (with its ``_metadata``), ``tuple`` vs
  ``list``, non-string keys, NaN and infinities, paths, 0-dim tensors vs Python scalars,
  ``Parameter`` and tensor attributes, strides, views, conjugate/negative bits.

It also stores the values users put in hyperparameters (format version 2): numpy scalars and
arrays and ``argparse.Namespace`` come back as themselves (as from a ``.pt``); enums, dataclasses
and ``transformers`` configs are stored as data, because rebuilding them would mean importing a
class the file names. An enum comes back as its value, a dataclass as a dict of its fields, a
``transformers`` config as the same config class only when transformers' own registry maps the
saved ``model_type`` to that class (as ``AutoConfig`` does for ``config.json``), else as its
``to_dict()`` data. numpy and transformers values are recognised only when those modules are
already imported; this module imports numpy only to decode numpy values and transformers only
to rebuild a config.

:func:`decode` rebuilds the identical object. Tensors that share memory (tied weights, views)
are stored once and come back sharing storage; the same object (tensor or container) reached
twice comes back as one object, as with pickle's memo. A value the skeleton cannot represent (an
arbitrary object, a class, a lambda, a container that contains itself) raises ``TypeError``
naming its key path: nothing is silently dropped, nothing is pickled; :func:`check_storable` runs
the same checks without building anything. This module must never pickle or execute anything,
never import a class or module named in a file, and never import Lightning (Lightning's hparams
``AttributeDict`` is recognised by its import path). The on-disk format is written down in
``docs/sft-format.md``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import enum
import importlib
import math
import pathlib
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_utils.io.safetensors_file import NAME_FROM_DTYPE

FORMAT_VERSION = 2  # the newest version this module reads and writes
# The tags version 2 added; a skeleton that uses none of them is written as version 1, so that
# version-1 readers still read it.
V2_TAGS = frozenset({"ndarray", "npscalar", "namespace", "dataclass", "enum", "hfconfig"})
MAX_DEPTH = 200  # nesting the decoder accepts; the encoder refuses deeper trees
_BIG_INT_BITS = 8192  # above this, ints are stored as hex (json refuses > 4300 decimal digits)
# Top-level keys whose tensor leaves are named by their bare key, so a checkpoint's weights read
# as ordinary safetensors names ("layer.weight") to other tools.
_BARE_NAME_ROOTS = ("state_dict", "module")

_DICT_TAGS: dict[type, str] = {dict: "dict", OrderedDict: "odict"}
# Lightning's hparams container, a plain dict subclass. It is recognised by its import path so
# that this module never imports Lightning; decoding one imports it from there (a file holding
# one was written where Lightning is installed).
_ATTRDICT_PATH = ("lightning.fabric.utilities.data", "AttributeDict")


def dict_tag(t: type) -> str | None:
    """The skeleton tag of an exact dict type a checkpoint may hold, else None."""
    tag = _DICT_TAGS.get(t)
    if tag is None and issubclass(t, dict) and (t.__module__, t.__qualname__) == _ATTRDICT_PATH:
        return "attrdict"
    return tag


def _dict_class(tag: str) -> type | None:
    if tag == "attrdict":
        return getattr(importlib.import_module(_ATTRDICT_PATH[0]), _ATTRDICT_PATH[1])
    return _DICT_CLASSES.get(tag)


_DICT_CLASSES = {v: k for k, v in _DICT_TAGS.items()}
_PATH_TYPES = {
    c.__name__: c for c in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_CONTAINERS = (dict, list, tuple, set, frozenset)
_SCALARS = frozenset({type(None), bool, int, float, str, bytes, complex})
# numpy scalar types stored as their Python value (exact for each of these), and array dtypes
# that both torch.from_numpy and safetensors take.
_NP_SCALAR_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"float16", "float32", "float64", "complex64", "complex128"}
)
_NP_ARRAY_DTYPES = _NP_SCALAR_DTYPES - {"complex128"}


def _numpy_kind(obj: Any) -> str | None:
    """``"ndarray"``/``"npscalar"`` for a numpy array/scalar (numpy already imported), else None."""
    np = sys.modules.get("numpy")
    if np is None or not type(obj).__module__.startswith("numpy"):
        return None
    if type(obj) is np.ndarray:
        return "ndarray"
    if isinstance(obj, np.generic):
        return "npscalar"
    return None


def _hf_config_base() -> type | None:
    """transformers' config base class, if transformers' config module is already imported."""
    module = sys.modules.get("transformers.configuration_utils")
    base = getattr(module, "PreTrainedConfig", None) or getattr(module, "PretrainedConfig", None)
    return base if isinstance(base, type) else None


def _qualified_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _record_kind(obj: Any) -> str | None:
    """The tag of an object stored with named members (``namespace``, ``hfconfig``, ``dataclass``)."""
    t = type(obj)
    if t is argparse.Namespace:
        return "namespace"
    base = _hf_config_base()
    if base is not None and isinstance(obj, base):
        return "hfconfig"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return "dataclass"
    return None


def format_key_path(path: tuple[Any, ...]) -> str:
    """``("optimizer_states", 0, "state")`` -> ``checkpoint['optimizer_states'][0]['state']``."""
    return "checkpoint" + "".join(f"[{k!r}]" for k in path)


def _float_node(x: float) -> Any:
    if math.isfinite(x):
        return x
    return {"$": "float", "v": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Encoder:
    def __init__(self) -> None:
        self.entries: dict[str, torch.Tensor] = {}  # entry name -> contiguous CPU tensor
        self.devices: dict[str, str] = {}  # entry name -> the device it was saved from, when not CPU
        self._tensors: list[tuple[torch.Tensor, dict[str, Any], tuple[Any, ...]]] = []  # (raw view, node, path)
        self._tensor_nodes: dict[int, dict[str, Any]] = {}  # id(tensor object) -> its node
        self._repeated: set[int] = set()  # ids of containers reached more than once
        self._container_nodes: dict[int, dict[str, Any]] = {}  # id(container) -> its node
        self._names: set[str] = set()
        self._next_id = 0
        self.version = 1  # raised to 2 by the first version-2 tag
        self._records: dict[int, dict[str, Any]] = {}  # id(record) -> its members (kept alive: ids stay unique)
        self._arrays: list[torch.Tensor] = []  # tensors over ndarrays' memory (kept alive: their ids stay unique)

    def members(self, obj: Any, kind: str) -> dict[str, Any]:
        """The named members a record (Namespace, transformers config, dataclass) is stored with."""
        key = id(obj)
        if key not in self._records:
            if kind == "namespace":
                members = dict(vars(obj))
            elif kind == "hfconfig":
                members = obj.to_dict()  # transformers' own serialisation (what config.json holds)
            else:
                members = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            self._records[key] = members
        return self._records[key]

    # -- pre-pass: shared containers, cycles, depth -----------------------------------------
    def scan(self, root: Any, prefix: tuple[Any, ...] = ()) -> None:
        seen: set[int] = set()
        active: set[int] = set()

        def walk(obj: Any, path: tuple[Any, ...]) -> None:
            if len(path) > MAX_DEPTH:
                raise TypeError(
                    f"{format_key_path(path[:3])}...: nesting deeper than {MAX_DEPTH} levels cannot be stored"
                )
            if type(obj) in _SCALARS:
                return
            if isinstance(obj, torch.Tensor):
                if obj.__dict__:
                    walk(obj.__dict__, path + ("<attributes>",))
                return
            plain = dict_tag(type(obj)) is not None or type(obj) in _CONTAINERS
            kind = None if plain else _record_kind(obj)
            if not plain and kind is None:
                if _numpy_kind(obj) == "ndarray":  # a leaf, but the same array twice is one array
                    if id(obj) in seen:
                        self._repeated.add(id(obj))
                    seen.add(id(obj))
                return
            key = id(obj)
            if key in active:
                raise TypeError(
                    f"{format_key_path(path)} contains itself; a cycle cannot be stored in a safetensors checkpoint"
                )
            if key in seen:
                self._repeated.add(key)
                return
            seen.add(key)
            active.add(key)
            if kind is not None:
                for k, v in self.members(obj, kind).items():
                    walk(v, path + (k,))
            elif isinstance(obj, dict):
                meta = getattr(obj, "_metadata", None) if type(obj) is OrderedDict else None
                if meta is not None:
                    walk(meta, path + ("_metadata",))
                for k, v in obj.items():
                    walk(k, path + (f"<key {k!r}>",))
                    walk(v, path + (k,))
            else:
                for i, v in enumerate(obj):
                    walk(v, path + (i,))
            active.discard(key)

        walk(root, prefix)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # -- tree walk -------------------------------------------------------------------------
    def node(self, obj: Any, path: tuple[Any, ...]) -> Any:
        t = type(obj)
        # Exact types only: a str/int subclass (an Enum, say) would come back as its base type.
        if obj is None or t is bool or t is str:
            return obj
        if t is int:
            return obj if obj.bit_length() <= _BIG_INT_BITS else {"$": "int", "v": format(obj, "x")}
        if t is float:
            return _float_node(obj)
        if isinstance(obj, torch.Tensor):
            return self.tensor_node(obj, path)
        plain = dict_tag(t) is not None or t in _CONTAINERS
        kind = None if plain else _record_kind(obj) or _numpy_kind(obj)
        if plain or kind in ("namespace", "hfconfig", "dataclass", "ndarray"):
            key = id(obj)
            if key in self._container_nodes:  # the same object again (pickle's memo, in .pt terms)
                return {"$": "ref", "id": self._container_nodes[key]["id"]}
            node = self.container_node(obj, path) if kind is None else self.v2_node(obj, kind, path)
            if key in self._repeated:
                if not isinstance(node, dict):  # a list: tag it so it can carry an id
                    node = {"$": "list", "v": node}
                node["id"] = self._new_id()
                self._container_nodes[key] = node
            return node
        if t is torch.Size:
            return {"$": "size", "v": list(obj)}
        if t is torch.dtype:
            return {"$": "dtype", "v": _dtype_name(obj)}
        if t is torch.device:
            return {"$": "device", "v": str(obj)}
        if t.__name__ in _PATH_TYPES and _PATH_TYPES[t.__name__] is t:
            return {"$": "path", "cls": t.__name__, "v": str(obj)}
        if t is bytes:
            return {"$": "bytes", "v": base64.b64encode(obj).decode("ascii")}
        if t is complex:
            return {"$": "complex", "re": _float_node(obj.real), "im": _float_node(obj.imag)}
        if kind == "npscalar" or isinstance(obj, enum.Enum):
            return self.v2_node(obj, kind or "enum", path)
        raise TypeError(
            f"{format_key_path(path)} holds a {t.__module__}.{t.__qualname__}, which a safetensors "
            "checkpoint cannot represent without pickle (supported: tensors, dict/OrderedDict, "
            "list/tuple/set, str/int/float/bool/None, bytes, paths, torch dtype/device/Size, numpy "
            "scalars and arrays, argparse.Namespace, enums, dataclasses, transformers configs); "
            "convert it to one of these or save this checkpoint as .ckpt"
        )

    def v2_node(self, obj: Any, kind: str, path: tuple[Any, ...]) -> dict[str, Any]:
        """The node of a value stored with a version-2 tag (``kind``)."""
        self.version = 2
        t = type(obj)
        if kind == "npscalar":
            name = obj.dtype.name
            if name not in _NP_SCALAR_DTYPES or t is not obj.dtype.type:
                raise TypeError(
                    f"{format_key_path(path)} is a numpy {name} scalar; only bool, int, uint, float16/32/64 "
                    "and complex64/128 scalars can be stored"
                )
            value = obj.item()
            v: Any = (
                {"$": "complex", "re": _float_node(value.real), "im": _float_node(value.imag)}
                if isinstance(value, complex)
                else _float_node(value)
                if isinstance(value, float)
                else value
            )
            return {"$": "npscalar", "dtype": name, "v": v}
        if kind == "ndarray":
            return {"$": "ndarray", "v": self.tensor_node(self.array_tensor(obj, path), path)}
        if kind == "enum":
            node: dict[str, Any] = {"$": "enum", "cls": _qualified_name(t)}
            if isinstance(obj.name, str):
                node["name"] = obj.name
            node["v"] = self.node(obj.value, path + ("<value>",))
            return node
        members = self.members(obj, kind)
        if not all(type(k) is str for k in members):
            raise TypeError(
                f"{format_key_path(path)}: a {t.__qualname__} with non-str attribute names cannot be stored"
            )
        body = {"$": "dict", "v": {k: self.node(v, path + (k,)) for k, v in members.items()}}
        if kind == "namespace":
            return {"$": "namespace", "v": body["v"]}
        if kind == "dataclass":
            return {"$": "dataclass", "cls": _qualified_name(t), "v": body["v"]}
        return {"$": "hfconfig", "cls": _qualified_name(t), "type": str(getattr(obj, "model_type", "")), "v": body}

    def array_tensor(self, arr: Any, path: tuple[Any, ...]) -> torch.Tensor:
        """A tensor over the memory of numpy array ``arr`` (a copy only where torch cannot view it)."""
        name = arr.dtype.name
        if name not in _NP_ARRAY_DTYPES:
            raise TypeError(
                f"{format_key_path(path)} is a numpy array of dtype {arr.dtype}; only bool, int, uint, "
                "float16/32/64 and complex64 arrays can be stored (safetensors has no other dtype)"
            )
        np = sys.modules["numpy"]
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if not arr.flags.writeable:  # torch.from_numpy warns about read-only memory: copy it
            arr = arr.copy()
        try:
            t = torch.from_numpy(arr)
        except (ValueError, TypeError, RuntimeError):  # negative strides, misaligned data
            t = torch.from_numpy(np.ascontiguousarray(arr))
        self._arrays.append(t)
        return t

    def container_node(self, obj: Any, path: tuple[Any, ...]) -> Any:
        t = type(obj)
        if t is list:
            return [self.node(v, path + (i,)) for i, v in enumerate(obj)]
        if t in (tuple, set, frozenset):
            return {"$": t.__name__, "v": [self.node(v, path + (i,)) for i, v in enumerate(obj)]}
        tag = dict_tag(t)
        if all(type(k) is str for k in obj):
            node: dict[str, Any] = {"$": tag, "v": {k: self.node(v, path + (k,)) for k, v in obj.items()}}
        else:
            node = {
                "$": tag,
                "kv": [[self.node(k, path + (f"<key {k!r}>",)), self.node(v, path + (k,))] for k, v in obj.items()],
            }
        meta = getattr(obj, "_metadata", None) if t is OrderedDict else None
        if meta is not None:  # Module.state_dict() records per-module versions here
            node["meta"] = self.node(meta, path + ("_metadata",))
        return node

    def tensor_node(self, t: torch.Tensor, path: tuple[Any, ...]) -> dict[str, Any]:
        seen = self._tensor_nodes.get(id(t))
        if seen is not None:  # the same tensor object again
            if "id" not in seen:
                seen["id"] = self._new_id()
            return {"$": "ref", "id": seen["id"]}
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(
                f"{format_key_path(path)} is a tensor subclass {type(t).__qualname__}; materialise it to a plain tensor first"
            )
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
        # Lazily conjugated/negated views share memory with their base: store the raw view and
        # the bits, so values, sharing and the bits themselves all come back.
        raw = t.detach()
        if raw.is_conj():
            node["conj"] = True
            raw = raw.conj()
        if raw.is_neg():
            node["neg"] = True
            raw = raw._neg_view()
        self._tensor_nodes[id(t)] = node
        self._tensors.append((raw, node, path))
        if t.__dict__:  # Python attributes set on a tensor or Parameter survive .pt; keep them too
            node["attrs"] = self.node(t.__dict__, path + ("<attributes>",))
        return node

    # -- storages -> entries ---------------------------------------------------------------
    def _name_for(self, path: tuple[Any, ...]) -> str:
        parts = [str(k) for k in path]
        if len(parts) >= 2 and parts[0] in _BARE_NAME_ROOTS:
            parts = parts[1:]
        # entry names go into the UTF-8 header: escape lone surrogates instead of failing
        base = (".".join(parts) or "tensor").encode("utf-8", "backslashreplace").decode("utf-8")
        name, n = base, 1
        while name in self._names or name == "__metadata__":
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        return name

    def assign_entries(self) -> None:
        # Group tensors whose storages overlap in memory (same device), not merely those whose
        # storages start at the same address: frombuffer/from_numpy views can nest.
        by_device: dict[torch.device, list[tuple[int, int, int]]] = {}
        for i, (raw, _, _) in enumerate(self._tensors):
            storage = raw.untyped_storage()
            if storage.nbytes() == 0:
                self._store_group([i])
                continue
            start = storage.data_ptr()
            by_device.setdefault(raw.device, []).append((start, start + storage.nbytes(), i))
        for spans in by_device.values():
            spans.sort()
            group: list[int] = []
            end = -1
            for start, stop, i in spans:
                if group and start >= end:
                    self._store_group(group)
                    group = []
                group.append(i)
                end = max(end, stop)
            if group:
                self._store_group(group)

    def _store_group(self, members: list[int]) -> None:
        items = [self._tensors[i] for i in members]
        first, _, first_path = items[0]
        name = self._name_for(first_path)
        device = first.device
        if device.type != "cpu":
            self.devices[name] = str(device)
        storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t, _, _ in items}
        if len(storages) == 1:
            if all(_covers_storage(t) and t.dtype == first.dtype and t.shape == first.shape for t, _, _ in items):
                # A tensor that is its whole storage (the common case: weights, moments). Tied
                # copies of it point at the same entry.
                self.entries[name] = _canonical(first.cpu())
                for _, node, _ in items:
                    node["e"] = name
                return
            if len(items) == 1 and _dense_permutation(first):
                # Transposed / channels_last and alone on its storage: store the logical value
                # (so other tools read the right shape) and the strides to rebuild it with.
                self.entries[name] = _canonical(first.contiguous().cpu())
                items[0][1].update(e=name, st=list(first.stride()))
                return
        # Views into shared memory: store the widest storage once, each tensor as a view of it.
        widest = max((t.untyped_storage() for t, _, _ in items), key=lambda s: s.nbytes())
        base_ptr, base_end = widest.data_ptr(), widest.data_ptr() + widest.nbytes()
        dtypes = {t.dtype for t, _, _ in items}
        entry_dtype = dtypes.pop() if len(dtypes) == 1 else torch.uint8
        itemsize = entry_dtype.itemsize
        if widest.nbytes() % itemsize:
            entry_dtype, itemsize = torch.uint8, 1
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(widest)
        stored = False
        for t, node, path in items:
            storage = t.untyped_storage()
            byte_offset = storage.data_ptr() - base_ptr + t.storage_offset() * t.element_size()
            if (
                storage.data_ptr() < base_ptr
                or storage.data_ptr() + storage.nbytes() > base_end
                or byte_offset % t.element_size()
            ):
                # Partly overlapping foreign buffers (or misaligned views): keep the values,
                # give up the sharing for this tensor alone.
                own = self._name_for(path)
                if device.type != "cpu":
                    self.devices[own] = str(device)
                self.entries[own] = _canonical(t.contiguous().cpu())
                node["e"] = own
                if not t.is_contiguous():
                    node["st"] = list(t.stride())
                continue
            stored = True
            node.update(e=name, off=byte_offset // t.element_size(), sh=list(t.shape), st=list(t.stride()))
            if t.dtype != entry_dtype:
                node["dt"] = _dtype_name(t.dtype)
        if stored:
            self.entries[name] = _canonical(raw.view(entry_dtype).detach().cpu().contiguous())
        else:
            self._names.discard(name)
            self.devices.pop(name, None)


def _covers_storage(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


def _dense_permutation(t: torch.Tensor) -> bool:
    """True for a non-overlapping, dense tensor that is exactly its storage in another order."""
    if t.storage_offset() != 0 or t.numel() * t.element_size() != t.untyped_storage().nbytes() or t.numel() == 0:
        return False
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """Bool tensors may hold bytes other than 0/1 (views of uint8 data); store them as 0/1."""
    if t.dtype == torch.bool and t.numel() and bool((t.view(torch.uint8) > 1).any()):
        return t.view(torch.uint8).ne(0)
    return t


def encode(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``obj`` into ``(entries, skeleton)``; see the module docstring."""
    enc = _Encoder()
    enc.scan(obj)
    root = enc.node(obj, ())
    enc.assign_entries()
    skeleton: dict[str, Any] = {"version": enc.version, "root": root}
    if enc.devices:
        skeleton["devices"] = enc.devices
    return enc.entries, skeleton


def check_storable(obj: Any, path_prefix: Sequence[Any] = ()) -> None:
    """Raise the ``TypeError`` that saving ``obj`` to a ``.sft`` would raise, without saving.

    ``path_prefix`` is where ``obj`` sits in the checkpoint (``("hyper_parameters",)``), so the
    error names the full key path (``checkpoint['hyper_parameters']['loss_fn']``) and the depth
    limit counts the levels above it. Runs the encoder's checks on every value and tensor but
    copies no tensor data, so it is cheap enough to call when a run starts.
    """
    enc = _Encoder()
    prefix = tuple(path_prefix)
    enc.scan(obj, prefix)
    enc.node(obj, prefix)


class SkeletonError(ValueError):
    """The skeleton is malformed (raised by :func:`decode`; callers add the file name)."""


class _EntryError(Exception):
    """Carries an exception raised by the ``entry`` callback through decode's own error mapping."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _devices(skeleton: dict[str, Any]) -> dict[str, str]:
    devices = skeleton.get("devices") or {}
    if not isinstance(devices, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in devices.items()):
        raise SkeletonError("'devices' must map entry names to device strings")
    for name, dev in devices.items():
        try:
            torch.device(dev)
        except (RuntimeError, ValueError):
            raise SkeletonError(f"entry {name!r} has an invalid device {dev!r}") from None
    return devices


class _Decoder:
    """The inverse of :class:`_Encoder`: one method per node kind, the shared state as attributes."""

    def __init__(self, devices: dict[str, str], entry: Callable[[str, str], torch.Tensor], version: int = 1) -> None:
        self._version = version
        self._devices = devices  # entry name -> the device it was saved from, when not CPU
        self._entry = entry
        self._bases: dict[str, torch.Tensor] = {}  # entry name -> its tensor (each entry is read once)
        self._objects: dict[Any, Any] = {}  # node "id" -> the object rebuilt for it, for "ref" nodes

    # -- tree walk -------------------------------------------------------------------------
    def node(self, n: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise SkeletonError("skeleton nesting is too deep")
        if n is None or isinstance(n, (bool, int, float, str)):
            return n
        if isinstance(n, list):
            return [self.node(v, depth + 1) for v in n]
        if not isinstance(n, dict):
            raise SkeletonError(f"unexpected skeleton node {n!r}")
        tag = n.get("$")
        if not isinstance(tag, str):
            raise SkeletonError(f"unknown skeleton tag {tag!r}")
        cls = _dict_class(tag)
        if cls is not None:
            return self.dict_node(n, cls, depth)
        method = _NODE_METHODS.get(tag)
        if method is None:
            raise SkeletonError(f"unknown skeleton tag {tag!r}")
        if tag in V2_TAGS and self._version < 2:
            raise SkeletonError(f"unknown skeleton tag {tag!r} in a version {self._version} skeleton")
        return method(self, n, depth)

    def _remember(self, n: dict[str, Any], value: Any) -> Any:
        """Record ``value`` under the node's ``id`` (if any) for later ``ref`` nodes."""
        if "id" in n:
            self._objects[n["id"]] = value
        return value

    # -- containers ------------------------------------------------------------------------
    def dict_node(self, n: dict[str, Any], cls: type, depth: int) -> Any:
        if "v" in n and isinstance(n["v"], dict):
            out = cls((k, self.node(v, depth + 1)) for k, v in n["v"].items())
        elif "kv" in n and isinstance(n["kv"], list):
            out = cls((self.node(k, depth + 1), self.node(v, depth + 1)) for k, v in n["kv"])
        else:
            raise SkeletonError(f"malformed {n['$']} node")
        if "meta" in n and cls is OrderedDict:
            out._metadata = self.node(n["meta"], depth + 1)
        return self._remember(n, out)

    def list_node(self, n: dict[str, Any], depth: int) -> list[Any]:
        return self._remember(n, [self.node(v, depth + 1) for v in n["v"]])

    def tuple_node(self, n: dict[str, Any], depth: int) -> tuple[Any, ...]:
        return self._remember(n, tuple(self.node(v, depth + 1) for v in n["v"]))

    def set_node(self, n: dict[str, Any], depth: int) -> set[Any]:
        return self._remember(n, {self.node(v, depth + 1) for v in n["v"]})

    def frozenset_node(self, n: dict[str, Any], depth: int) -> frozenset[Any]:
        return self._remember(n, frozenset(self.node(v, depth + 1) for v in n["v"]))

    def ref_node(self, n: dict[str, Any], depth: int) -> Any:
        if n.get("id") not in self._objects:
            raise SkeletonError(f"reference to unknown object id {n.get('id')!r}")
        return self._objects[n["id"]]

    # -- tensors ---------------------------------------------------------------------------
    def _base(self, name: Any) -> torch.Tensor:
        """The tensor stored under entry ``name``, read (and placed) on first use."""
        if not isinstance(name, str):
            raise SkeletonError(f"tensor entry name {name!r} is not a string")
        if name not in self._bases:
            try:
                self._bases[name] = self._entry(name, self._devices.get(name, "cpu"))
            except SkeletonError:
                raise
            except Exception as exc:  # reading/placing data failed: not a skeleton problem
                raise _EntryError(exc) from exc
        return self._bases[name]

    def tensor_node(self, n: dict[str, Any], depth: int) -> torch.Tensor:
        b = self._base(n.get("e"))
        try:
            if "off" in n:
                dtype = getattr(torch, n["dt"]) if "dt" in n else b.dtype
                if not isinstance(dtype, torch.dtype):
                    raise SkeletonError(f"unknown dtype {n['dt']!r}")
                t = torch.empty(0, dtype=dtype, device=b.device).set_(b.untyped_storage(), n["off"], n["sh"], n["st"])
            elif "st" in n:
                t = torch.empty_strided(b.shape, n["st"], dtype=b.dtype, device=b.device).copy_(b)
            else:
                t = b.detach()  # a new tensor object over the same storage
            if n.get("neg"):
                t = t._neg_view()
            if n.get("conj"):
                t = t.conj()
        except (RuntimeError, TypeError, AttributeError, ValueError, IndexError, OverflowError) as exc:
            if isinstance(exc, SkeletonError):
                raise
            raise SkeletonError(f"invalid view of entry {n.get('e')!r}: {exc}") from None
        if n.get("param"):
            t = torch.nn.Parameter(t, requires_grad=bool(n.get("rg")))
        elif n.get("rg"):
            t.requires_grad_(True)
        self._remember(n, t)  # before the attributes, which may refer back to the tensor
        if "attrs" in n:
            attrs = self.node(n["attrs"], depth + 1)
            if not isinstance(attrs, dict):
                raise SkeletonError("tensor attributes must be a dict")
            t.__dict__.update(attrs)
        return t

    # -- scalars and torch values ----------------------------------------------------------
    def float_node(self, n: dict[str, Any], depth: int) -> float:
        return _NONFINITE[n["v"]]

    def int_node(self, n: dict[str, Any], depth: int) -> int:
        return int(n["v"], 16)

    def complex_node(self, n: dict[str, Any], depth: int) -> complex:
        return complex(self.node(n["re"], depth + 1), self.node(n["im"], depth + 1))

    def bytes_node(self, n: dict[str, Any], depth: int) -> bytes:
        return base64.b64decode(n["v"], validate=True)

    def path_node(self, n: dict[str, Any], depth: int) -> pathlib.PurePath:
        return _PATH_TYPES[n["cls"]](n["v"])

    def size_node(self, n: dict[str, Any], depth: int) -> torch.Size:
        return torch.Size(n["v"])

    def dtype_node(self, n: dict[str, Any], depth: int) -> torch.dtype:
        dtype = getattr(torch, n["v"], None)
        if not isinstance(dtype, torch.dtype):
            raise SkeletonError(f"unknown dtype {n['v']!r}")
        return dtype

    def device_node(self, n: dict[str, Any], depth: int) -> torch.device:
        return torch.device(n["v"])

    # -- version 2: values users put in hyperparameters ----------------------------------------
    def _members(self, n: dict[str, Any], depth: int) -> dict[str, Any]:
        if not isinstance(n.get("v"), dict):
            raise SkeletonError(f"malformed {n['$']} node")
        return {k: self.node(v, depth + 1) for k, v in n["v"].items()}

    def namespace_node(self, n: dict[str, Any], depth: int) -> argparse.Namespace:
        return self._remember(n, argparse.Namespace(**self._members(n, depth)))

    def dataclass_node(self, n: dict[str, Any], depth: int) -> dict[str, Any]:
        return self._remember(n, self._members(n, depth))  # data: the class is never imported

    def enum_node(self, n: dict[str, Any], depth: int) -> Any:
        return self.node(n["v"], depth + 1)  # the member's value: the class is never imported

    def hfconfig_node(self, n: dict[str, Any], depth: int) -> Any:
        data = self.node(n["v"], depth + 1)
        if not isinstance(data, dict):
            raise SkeletonError("malformed hfconfig node")
        return self._remember(n, _transformers_config(n.get("cls"), n.get("type"), data))

    def npscalar_node(self, n: dict[str, Any], depth: int) -> Any:
        name = n.get("dtype")
        if name not in _NP_SCALAR_DTYPES:
            raise SkeletonError(f"unsupported numpy scalar dtype {name!r}")
        value = self.node(n["v"], depth + 1)
        expected = (
            bool
            if name == "bool"
            else complex
            if name.startswith("complex")
            else float
            if name.startswith("float")
            else int
        )
        if type(value) is not expected and not (expected is complex and type(value) in (int, float)):
            raise SkeletonError(f"numpy {name} scalar holds a {type(value).__name__}")
        return _numpy().dtype(name).type(value)

    def ndarray_node(self, n: dict[str, Any], depth: int) -> Any:
        t = self.node(n.get("v"), depth + 1)
        if not isinstance(t, torch.Tensor):
            raise SkeletonError("an ndarray node must hold a tensor node")
        if t.device.type == "meta":  # a structure-only load (no data read): keep the placeholder
            return self._remember(n, t)
        arr = t.detach().resolve_conj().resolve_neg().cpu().numpy()
        return self._remember(n, arr)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ModuleNotFoundError("this checkpoint holds numpy values; install numpy to load it") from None
    return numpy


def _transformers_config(cls_name: Any, model_type: Any, data: dict[str, Any]) -> Any:
    """The transformers config the data was saved from, or the data itself.

    The class is looked up in transformers' own registry (``CONFIG_MAPPING``, what ``AutoConfig``
    uses for ``config.json``) by ``model_type``, never imported from the name in the file; the
    name only has to agree with it. Without transformers, or when the registry has no such class
    (a user's own config class), the ``to_dict()`` data comes back.
    """
    try:
        import transformers
    except ImportError:
        return data
    base = _hf_config_base()
    cls: Any = None
    if base is not None and cls_name == _qualified_name(base):
        cls = base
    elif isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING:
        cls = transformers.CONFIG_MAPPING[model_type]
    if cls is None or _qualified_name(cls) != cls_name:
        return data
    try:
        return cls.from_dict(data)
    except Exception as exc:  # noqa: BLE001 - whatever the config's validation raises
        raise SkeletonError(
            f"transformers could not rebuild the {cls_name} saved here ({type(exc).__name__}: {exc})"
        ) from None


# Every tag other than the dict tags (see dict_tag), and the method that decodes it.
_NODE_METHODS: dict[str, Callable[[_Decoder, dict[str, Any], int], Any]] = {
    "tensor": _Decoder.tensor_node,
    "ref": _Decoder.ref_node,
    "list": _Decoder.list_node,
    "tuple": _Decoder.tuple_node,
    "set": _Decoder.set_node,
    "frozenset": _Decoder.frozenset_node,
    "float": _Decoder.float_node,
    "int": _Decoder.int_node,
    "complex": _Decoder.complex_node,
    "bytes": _Decoder.bytes_node,
    "path": _Decoder.path_node,
    "size": _Decoder.size_node,
    "dtype": _Decoder.dtype_node,
    "device": _Decoder.device_node,
    "ndarray": _Decoder.ndarray_node,
    "npscalar": _Decoder.npscalar_node,
    "namespace": _Decoder.namespace_node,
    "dataclass": _Decoder.dataclass_node,
    "enum": _Decoder.enum_node,
    "hfconfig": _Decoder.hfconfig_node,
}
# Every tag a skeleton may hold.
TAGS = frozenset(_NODE_METHODS) | {"dict", "odict", "attrdict"}


def decode(skeleton: Any, entry: Callable[[str, str], torch.Tensor]) -> Any:
    """Rebuild the object described by ``skeleton``.

    ``entry(name, saved_device)`` returns the (already device-mapped) tensor stored under
    ``name``; it is called once per name.
    """
    version = skeleton.get("version") if isinstance(skeleton, dict) else None
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION or "root" not in skeleton:
        raise SkeletonError(f"unsupported skeleton (expected version 1 to {FORMAT_VERSION})")
    decoder = _Decoder(_devices(skeleton), entry, version)
    try:
        return decoder.node(skeleton["root"])
    except _EntryError as failure:
        raise failure.exc from None
    except (
        KeyError,
        TypeError,
        ValueError,
        RuntimeError,
        IndexError,
        AttributeError,
        OverflowError,
        RecursionError,
    ) as exc:
        if isinstance(exc, SkeletonError):
            raise
        raise SkeletonError(f"malformed skeleton ({type(exc).__name__}: {exc})") from None
