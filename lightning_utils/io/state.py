"""``save_state`` / ``load_state`` / ``save_weights``: one format-neutral API, picked by suffix.

* ``.sft``, ``.safetensors``, ``.safetensor`` -> safetensors. ``save_state`` stores the *whole*
  object (a Lightning checkpoint with optimizer, schedulers, loops, callbacks, hparams) in one
  file: tensors as entries, the rest as a JSON skeleton in the header metadata
  (:mod:`lightning_utils.io.skeleton`). No pickle, no sidecar file.
* ``.ckpt``, ``.pt``, ``.pth``, ``.bin`` -> ``torch.save``/``torch.load``
  (:mod:`lightning_utils.io.torch_file`).

Paths may be fsspec URLs (``s3://bucket/run/last.sft``, ``gs://``, ``az://``, ``memory://``...):
:mod:`lightning_utils.io.storage` streams saves into an upload that appears whole or not at all
and loads a ``.sft`` with its header first, then parallel ranged reads. Every write is atomic
(and durable, locally); a write that runs out of room raises
:class:`~lightning_utils.io.errors.DiskFullError` naming the path and the bytes needed. Nothing
here ever unpickles a safetensors file. ``load_state`` of a ``.sft`` written by ``save_state``
gives the same object as ``torch.load`` of the ``.pt`` of the same data. Plain safetensors files from other tools load as a flat tensor dict, or as
``{"module": tensors, **metadata}`` with JSON metadata decoded when they carry metadata beyond
``format`` (a weights export with its config or training stats beside it).
"""

from __future__ import annotations

import json
import mmap as mmap_module
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_utils.io import safetensors_file as sft
from lightning_utils.io import storage
from lightning_utils.io.errors import CheckpointFormatError, DiskFullError, is_disk_full
from lightning_utils.io.jsonio import json_dumps
from lightning_utils.io.map_location import check_map_location, place
from lightning_utils.io.skeleton import SkeletonError, decode, encode
from lightning_utils.io.torch_file import load_torch, save_torch

SAFETENSORS_SUFFIXES = (".sft", ".safetensors", ".safetensor")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SKELETON_KEY = "lightning_utils.skeleton"
# save_weights lists here the metadata keys whose values it JSON-encoded, so load_state decodes
# exactly those (a plain string such as "123" stays a string).
JSON_KEYS_KEY = "lightning_utils.json_keys"
# Metadata keys a weights file keeps for itself ("format" may only be "pt").
RESERVED_METADATA = ("format", "module", SKELETON_KEY, JSON_KEYS_KEY)

Format = Literal["safetensors", "torch"]
# A .sft load from a URL asks for this many bytes first: the header of most checkpoints fits.
_FIRST_READ = 1 << 20


def checkpoint_format(path: str | os.PathLike) -> Format:
    """The format the suffix of ``path`` selects; ``ValueError`` for any other suffix."""
    suffix = Path(os.fspath(path).rstrip("/")).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise ValueError(
        f"{os.fspath(path)}: cannot tell the checkpoint format from the suffix {suffix or '(none)'!r}; "
        f"use one of {', '.join(SAFETENSORS_SUFFIXES)} (safetensors) or {', '.join(TORCH_SUFFIXES)} (torch)"
    )


def save_state(obj: Any, path: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> None:
    """Save ``obj`` to ``path`` (a local path or an fsspec URL) in the format its suffix names.

    The write is atomic: the file or object appears whole or not at all, and the previous one
    stays intact if the save fails. For safetensors, a value that cannot be represented without
    pickle raises ``TypeError`` naming its key path, before anything is written. No room
    (``ENOSPC``, ``EDQUOT``, ``EFBIG``) raises :class:`~lightning_utils.io.errors.DiskFullError`.
    ``storage_options`` go to the fsspec filesystem of a URL (credentials, endpoint).
    """
    if checkpoint_format(path) == "torch":
        save_torch(obj, path, storage_options=storage_options)
        return
    entries, skeleton = encode(obj)
    # ensure_ascii: lone surrogates (which torch.save keeps) survive as escapes
    metadata = {
        "format": "pt",
        SKELETON_KEY: json.dumps(skeleton, separators=(",", ":"), allow_nan=False, ensure_ascii=True),
    }
    _write_safetensors(path, list(entries.items()), metadata, storage_options)


def _write_safetensors(
    path: str | os.PathLike,
    items: list[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    storage_options: dict[str, Any] | None = None,
) -> None:
    try:
        plan = sft.plan_file(items, metadata)
    except ValueError as exc:  # e.g. a header over the size limit: say which file
        raise ValueError(f"{os.fspath(path)}: {exc}") from None
    try:
        with storage.atomic_writer(path, storage_options) as f:
            sft.write_plan(f, plan)
    except OSError as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(path, plan.size, exc.errno) from exc  # type: ignore[arg-type]
        raise


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Safetensors metadata (strings only) for a weights file: ``"format": "pt"`` (what Hugging Face
    loaders look for), strings as they are, ``None`` dropped, anything else as JSON with its key
    listed under ``JSON_KEYS_KEY``, so that :func:`load_state` gives back exactly these values (a
    string ``"123"`` stays a string). ``ValueError`` for a reserved key (``format`` may only be ``"pt"``).

    :func:`save_weights` and the streamed weight exports (:mod:`lightning_utils.io.weights`) both
    encode their metadata here.
    """
    meta = {"format": "pt"}
    encoded: list[str] = []
    for key, value in (metadata or {}).items():
        if key == "format" and value == "pt":
            continue  # the HF convention, which we write anyway
        if key in RESERVED_METADATA:
            raise ValueError(f"metadata key {key!r} is reserved ({', '.join(RESERVED_METADATA)})")
        if value is None:
            continue
        if isinstance(value, str):
            meta[str(key)] = value
        else:
            meta[str(key)] = json_dumps(value)
            encoded.append(str(key))
    if encoded:
        meta[JSON_KEYS_KEY] = json_dumps(encoded)
    return meta


def save_weights(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write a plain safetensors weights file that any safetensors/HF tool loads (a path or a URL).

    ``metadata`` values that are ``str`` are stored as they are, ``None`` values are dropped and
    anything else is stored as JSON. ``load_state`` returns ``{"module": tensors, **metadata}``.
    """
    if checkpoint_format(path) != "safetensors":
        raise ValueError(
            f"{os.fspath(path)}: save_weights writes safetensors; use a {'/'.join(SAFETENSORS_SUFFIXES)} suffix"
        )
    items: list[tuple[str, torch.Tensor]] = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"save_weights needs a mapping of str to tensors; got {name!r}: {type(t).__qualname__}")
        items.append((name, t.detach().cpu().contiguous()))
    try:
        meta = encode_metadata(metadata)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None
    _write_safetensors(path, items, meta, storage_options)


def load_state(
    path: str | os.PathLike,
    map_location: Any = None,
    weights_only: bool | None = None,
    *,
    mmap: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load what :func:`save_state` saved (or any ``.pt``/safetensors file), from a path or a URL.

    ``map_location`` takes every form ``torch.load`` accepts. ``weights_only`` applies to torch
    files (see :mod:`lightning_utils.io.torch_file`); safetensors files never unpickle anything,
    so it has no effect there. A damaged file raises :class:`CheckpointFormatError`.

    ``mmap=True`` (safetensors only): CPU tensors are copy-on-write views of a memory map of the
    file, so loading copies nothing and pages are read on first touch; in-place updates stay
    private to the process. The file may be replaced or deleted meanwhile (our writers rename),
    but must not be truncated in place. ``mmap=False`` reads every tensor into fresh memory.

    A URL (``s3://...``): a ``.sft`` is read header first, then every tensor with parallel ranged
    reads straight into its own memory (no local copy of the file; ``mmap`` does not apply); a
    ``.ckpt``/``.pt`` is read by ``torch.load`` through fsspec, as Lightning does.

    A sharded checkpoint directory (:mod:`lightning_utils.io.sharded`), local or at a URL, loads
    as the whole object, each sharded tensor assembled.
    """
    if _is_directory(path):
        from lightning_utils.io.sharded import load_sharded

        return load_sharded(path, map_location, mmap=mmap)
    fmt = checkpoint_format(path)
    check_map_location(map_location)
    if storage.is_url(path):
        url = os.fspath(path)
        if fmt == "torch":
            return load_torch(
                url, map_location=map_location, weights_only=weights_only, storage_options=storage_options
            )
        try:
            header = remote_header(url, storage_options)
        except IsADirectoryError:  # a prefix: a sharded checkpoint directory on object storage
            from lightning_utils.io.sharded import load_sharded

            return load_sharded(url, map_location, storage_options=storage_options)
        return _load_safetensors_remote(url, header, map_location, storage_options)
    path = storage.local_path(path)
    _existing_checkpoint(path)
    if fmt == "torch":
        return load_torch(path, map_location=map_location, weights_only=weights_only)
    return _load_safetensors(path, map_location, use_mmap=mmap)


def _is_directory(path: str | os.PathLike) -> bool:
    """A local directory (a sharded checkpoint); a URL never is one here."""
    return not storage.is_url(path) and os.path.isdir(storage.local_path(path))


def _existing_checkpoint(path: str | os.PathLike) -> Format:
    """The format of ``path``, which must be a local file that exists."""
    fmt = checkpoint_format(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such checkpoint file")
    return fmt


def _load_safetensors(path: str, map_location: Any, use_mmap: bool) -> Any:
    with open(path, "rb", buffering=0) as f:
        header = sft.read_header(f, path)
        has_data = any(e.nbytes for e in header.entries)
        mapped = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_COPY) if use_mmap and has_data else None
        return _assemble(
            path, header, lambda e, location: place(sft.read_entry(f, header, e, path, mapped), location, map_location)
        )


def remote_header(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    size: int | None = None,
    first_read: int = _FIRST_READ,
) -> sft.Header:
    """The validated header of the safetensors object at ``url`` (of ``size`` bytes, asked for when
    not given): one ranged read of ``first_read`` bytes, and a second one when the header is longer."""
    if size is None:
        size = storage.file_size(url, storage_options)
    head = storage.read_range(url, 0, min(size, max(8, first_read)), storage_options)
    n = sft.header_length(head[:8], size, url)
    raw = head[8 : 8 + n]
    if len(raw) < n:
        raw += storage.read_range(url, len(head), 8 + n, storage_options)
    if len(raw) != n:
        raise CheckpointFormatError(url, "not a valid safetensors file: object shrank while reading the header")
    return sft.parse_header(raw, size, url)


def _load_safetensors_remote(
    url: str, header: sft.Header, map_location: Any, storage_options: dict[str, Any] | None
) -> Any:
    buffers = {e.name: torch.empty(e.nbytes, dtype=torch.uint8) for e in header.entries}
    pieces = [(header.data_start + e.begin, buffers[e.name].numpy().data.cast("B")) for e in header.entries if e.nbytes]
    try:
        storage.read_into(url, pieces, storage_options)
    except EOFError as exc:
        raise CheckpointFormatError(url, f"not a valid safetensors file: {exc}") from None

    def tensor(e: sft.Entry, location: str) -> torch.Tensor:
        buf = buffers[e.name]
        sft.check_bool_entry(buf, e, url)
        return place(
            buf.view(e.dtype).reshape(e.shape) if e.nbytes else torch.empty(e.shape, dtype=e.dtype),
            location,
            map_location,
        )

    return _assemble(url, header, tensor)


def _assemble(path: str, header: sft.Header, tensor: Callable[[sft.Entry, str], torch.Tensor]) -> Any:
    """The object a safetensors file holds, with ``tensor(entry, saved_location)`` giving each tensor.

    Files with our skeleton decode to the saved object; other files are plain weights files.
    """
    by_name = {e.name: e for e in header.entries}
    metadata = header.metadata or {}

    def entry(name: str, location: str) -> torch.Tensor:
        if name not in by_name:
            raise SkeletonError(f"skeleton refers to missing tensor entry {name!r}")
        return tensor(by_name[name], location)

    if SKELETON_KEY not in metadata:
        return _plain_file_object({e.name: entry(e.name, "cpu") for e in header.entries}, metadata)
    try:
        return decode(json.loads(metadata[SKELETON_KEY]), entry)
    except CheckpointFormatError:
        raise  # e.g. a damaged tensor entry: already names the file and the problem
    except (SkeletonError, ValueError, RecursionError) as exc:
        raise CheckpointFormatError(path, f"corrupted lightning-utils skeleton: {exc}") from None


def _plain_file_object(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Any:
    """A safetensors file without our skeleton: flat tensors, or wrapped with decoded metadata.

    ``safetensors.torch.save_model`` drops tied duplicates and records ``{dropped: kept}`` in the
    metadata; those are re-tied here, so the flat dict is the model's whole state dict again.
    """
    extra = {k: v for k, v in metadata.items() if k != "format"}
    for alias, target in list(extra.items()):
        if alias not in tensors and target in tensors:
            tensors[alias] = tensors[target]
            del extra[alias]
    if not extra:
        return tensors
    json_keys: set[str] | None = None
    if JSON_KEYS_KEY in extra:  # written by save_weights: decode exactly the keys it encoded
        try:
            json_keys = set(json.loads(extra.pop(JSON_KEYS_KEY)))
        except (ValueError, TypeError):
            json_keys = None
    out: dict[str, Any] = {"module": tensors}
    for k, v in extra.items():
        if json_keys is not None and k not in json_keys:
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v  # a plain string (e.g. a name), kept as it is
    return out


def read_safetensors_header(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> sft.Header:
    """The validated header of a safetensors file or object (for inspection tools)."""
    if storage.is_url(path):
        return remote_header(os.fspath(path), storage_options)
    with open(storage.local_path(path), "rb", buffering=0) as f:
        return sft.read_header(f, os.fspath(path))


def load_structure(
    path: str | os.PathLike, weights_only: bool | None = None, storage_options: dict[str, Any] | None = None
) -> Any:
    """The object :func:`load_state` would return, with every tensor on the ``meta`` device.

    For safetensors files no tensor data is read (only the header, also from a URL), so
    inspecting a huge checkpoint is instant. Torch files are loaded with their tensors on the
    meta device. Sharded checkpoint directories give their global shapes (only the index is read).
    """
    if _is_directory(path):
        from lightning_utils.io.sharded import load_sharded_structure

        return load_sharded_structure(path)
    fmt = checkpoint_format(path)
    if not storage.is_url(path):
        path = storage.local_path(path)
        _existing_checkpoint(path)
    if fmt == "torch":
        return load_torch(path, map_location="meta", weights_only=weights_only, storage_options=storage_options)
    try:
        header = read_safetensors_header(path, storage_options)
    except IsADirectoryError:  # a prefix on object storage: a sharded checkpoint directory
        from lightning_utils.io.sharded import load_sharded_structure

        return load_sharded_structure(path, storage_options=storage_options)
    return _assemble(os.fspath(path), header, lambda e, location: torch.empty(e.shape, dtype=e.dtype, device="meta"))
