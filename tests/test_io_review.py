"""Adversarial review of the checkpoint I/O (lightning_utils.io, the .sft ModelCheckpoint, the CLI).

Two kinds of tests live here:

* tests of behaviour the review found broken (they state the *correct* behaviour; each names the
  finding it covers in its docstring), and
* tests of important behaviour that was correct but not covered elsewhere (copy-on-write mmap
  loads, re-saving a loaded checkpoint over its own file, odd containers, view layouts, interop).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from test_io_roundtrip import assert_same

from lightning_utils.cli import main
from lightning_utils.io import CheckpointFormatError, UnsafeCheckpointError, load_state, save_state, save_weights
from lightning_utils.io import safetensors_file as sft_file
from lightning_utils.io.state import SKELETON_KEY, load_structure
from lightning_utils.plugins import AsyncCheckpointIO, SafetensorsCheckpointIO


class Custom:
    """An arbitrary class: weights_only=True refuses it, .sft cannot represent it."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.v == self.v


def _both(obj, tmp_path, name="x"):
    """Save ``obj`` as .sft and .pt; return (sft, pt) loads."""
    save_state(obj, tmp_path / f"{name}.sft")
    save_state(obj, tmp_path / f"{name}.pt")
    return load_state(tmp_path / f"{name}.sft"), load_state(tmp_path / f"{name}.pt", weights_only=False)


def _raw_sft(path: pathlib.Path, header: dict, data: bytes = b"") -> pathlib.Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _listing(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ================================================================================================
# Findings (fail on the reviewed code)
# ================================================================================================


@pytest.mark.parametrize("make", ["slice_conj", "conj_imag_neg", "neg_view_slice"])
def test_conj_and_neg_views_keep_their_values(tmp_path, make):
    """Finding 1: a lazily conjugated/negated view that is not its whole storage is saved
    without its conj/neg bit, so it silently loads with the wrong values."""
    c = torch.tensor([1 + 2j, 3 - 4j, -5 + 6j, 7 + 8j], dtype=torch.complex64)
    t = {
        "slice_conj": lambda: c[1:].conj(),
        "conj_imag_neg": lambda: c.conj().imag,  # a float view with the negative bit set
        "neg_view_slice": lambda: torch.arange(6.0)._neg_view()[2:],
    }[make]()
    expected = t.resolve_conj().resolve_neg().clone()
    save_state({"t": t}, tmp_path / "x.sft")
    out = load_state(tmp_path / "x.sft")["t"]
    assert torch.equal(out.resolve_conj().resolve_neg(), expected)


def test_distinct_storages_at_the_same_address_both_survive(tmp_path):
    """Finding 2: storages are grouped by data_ptr alone; two distinct storages that start at
    the same address (torch.frombuffer / from_numpy / DLPack views of one buffer) are merged,
    only the first (smaller) one is written and the file cannot be loaded back."""
    buf = bytearray(40)
    whole = torch.frombuffer(buf, dtype=torch.float32)
    head = torch.frombuffer(buf, dtype=torch.float32, count=4)  # same address, smaller storage
    whole.copy_(torch.arange(10.0))
    obj = {"head": head, "whole": whole}
    save_state(obj, tmp_path / "x.sft")
    out = load_state(tmp_path / "x.sft")
    assert torch.equal(out["whole"], torch.arange(10.0)) and torch.equal(out["head"], torch.arange(4.0))


def test_async_checkpoint_io_keeps_tied_weights_and_views_shared(tmp_path):
    """Finding 5: our AsyncCheckpointIO inherits Lightning's per-tensor clone, so tied weights
    and views are written as separate copies (a tied LM embedding is stored twice and comes back
    untied) and one object reached twice becomes two objects."""
    w = torch.randn(6, 4)
    ckpt = {"state_dict": {"emb.weight": w, "head.weight": w, "half": w[:3]}, "again": [w]}
    io = AsyncCheckpointIO(SafetensorsCheckpointIO())
    io.save_checkpoint(ckpt, tmp_path / "a.sft")
    snapshot = w.clone()
    w.add_(1.0)  # the save must still see the values at the time of the call
    io.teardown()
    out = load_state(tmp_path / "a.sft")
    sd = out["state_dict"]
    assert torch.equal(sd["emb.weight"], snapshot)
    assert sd["emb.weight"].untyped_storage().data_ptr() == sd["head.weight"].untyped_storage().data_ptr()
    assert sd["half"].untyped_storage().data_ptr() == sd["emb.weight"].untyped_storage().data_ptr()
    with safe_open(tmp_path / "a.sft", "pt") as f:
        assert len(list(f.keys())) == 1  # stored once, as the synchronous plugin does


def test_lightning_async_wrapper_under_sft_model_checkpoint_has_no_remove_race(tmp_path, monkeypatch):
    """Finding 6: with Lightning's own ``AsyncCheckpointIO`` (what Lightning's docs show),
    ``ensure_safetensors_checkpoint_io`` (run by SafetensorsModelCheckpoint.setup) swaps only the
    base plugin and keeps Lightning's wrapper, whose synchronous remove_checkpoint runs before a
    queued save of the same file starts (#14035): a top-k "removed" checkpoint reappears."""
    import threading
    import types

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.plugins.io import AsyncCheckpointIO as LightningAsyncCheckpointIO

    import lightning_utils.plugins.checkpoint_io as module
    from lightning_utils.plugins import ensure_safetensors_checkpoint_io

    gate = threading.Event()
    real = module.save_state

    def gated_save_state(obj, path):
        if pathlib.Path(path).name == "busy.sft":
            assert gate.wait(10)
        real(obj, path)

    monkeypatch.setattr(module, "save_state", gated_save_state)
    strategy = types.SimpleNamespace(checkpoint_io=LightningAsyncCheckpointIO(TorchCheckpointIO()))
    ensure_safetensors_checkpoint_io(strategy)
    io = strategy.checkpoint_io
    io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "busy.sft")  # occupies the single worker
    io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "old.sft")  # queued behind it
    io.remove_checkpoint(tmp_path / "old.sft")  # top-k drops it
    gate.set()
    io.teardown()
    assert _listing(tmp_path) == ["busy.sft"]


def test_state_dict_version_metadata_is_kept(tmp_path):
    """Finding 3: ``module.state_dict()`` is an OrderedDict carrying ``_metadata`` (per-module
    ``version``, which ``_load_from_state_dict`` uses to migrate old layouts). A .pt load keeps
    it; the .sft "odict" node silently drops it, so every module loads as "version None"."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    sd = model.state_dict()
    sft, pt = _both({"state_dict": sd}, tmp_path)
    assert pt["state_dict"]._metadata == sd._metadata
    assert getattr(sft["state_dict"], "_metadata", None) == sd._metadata


def test_tensor_python_attributes_are_not_silently_dropped(tmp_path):
    """Finding 8b: torch.save keeps Python attributes set on a tensor or Parameter
    (``p.no_decay = True``); .sft drops them without a word. Keep them (JSON values) or raise
    TypeError naming the key path: "nothing is ever silently dropped"."""
    p = torch.nn.Parameter(torch.ones(2))
    p.no_decay = True
    target = tmp_path / "attrs.sft"
    try:
        save_state({"params": [p]}, target)
    except TypeError as exc:
        assert "checkpoint['params'][0]" in str(exc) and not target.exists()
        return
    assert load_state(target)["params"][0].no_decay is True


def test_cycle_raises_type_error_naming_the_key_path(tmp_path):
    """Finding 11a: a self-referencing container makes save_state die with RecursionError
    instead of the documented TypeError naming the key path."""
    loop: list = []
    loop.append(loop)
    save_state({"ok": 1}, tmp_path / "x.sft")
    before = (tmp_path / "x.sft").read_bytes()
    with pytest.raises(TypeError, match=r"checkpoint\['l'\]"):
        save_state({"l": loop}, tmp_path / "x.sft")
    assert (tmp_path / "x.sft").read_bytes() == before and _listing(tmp_path) == ["x.sft"]


def test_what_save_state_writes_load_state_reads_deep_nesting(tmp_path):
    """Finding 7a: the encoder has no depth limit but the decoder refuses depth > 200, so a
    250-deep list is saved without complaint and the file can never be loaded (data loss).
    Either refuse at save time (naming the key path, writing nothing) or load it."""
    obj: object = 1
    for _ in range(250):
        obj = [obj]
    target = tmp_path / "deep.sft"
    try:
        save_state({"x": obj}, target)
    except (TypeError, ValueError) as exc:
        assert "checkpoint['x']" in str(exc)
        assert not target.exists()
        return
    assert load_state(target) == {"x": obj}


@pytest.mark.parametrize(
    "obj",
    [{"k\ud800": 1}, {"k": "v\udc80"}, {"state_dict": {"w\udcff": torch.ones(2)}}],
    ids=["key", "value", "tensor-key"],
)
def test_lone_surrogates_round_trip_like_pt(tmp_path, obj):
    """Finding 11b: strings with lone surrogates (torch.save keeps them) make save_state fail with
    UnicodeEncodeError from the header encoder (ensure_ascii=False), not a TypeError naming the
    key path. The skeleton can escape them (ensure_ascii=True) and entry names can be sanitised."""
    sft, pt = _both(obj, tmp_path)
    assert_same(sft, pt)


def test_huge_int_round_trips_or_names_its_key_path(tmp_path):
    """Finding 11c: an int above Python's 4300-digit str limit raises a bare ValueError from
    json.dumps with no key path (torch.save stores it fine)."""
    big = 10**5000
    try:
        save_state({"hp": {"big": big}}, tmp_path / "x.sft")
    except TypeError as exc:
        assert "checkpoint['hp']['big']" in str(exc)
        assert not (tmp_path / "x.sft").exists()
        return
    assert load_state(tmp_path / "x.sft")["hp"]["big"] == big


def _zero_size_overflow_header(path):
    return _raw_sft(path, {"x": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}})


@pytest.mark.parametrize(
    "shape", [[0, 2**64], [0, 2**62, 2**62], [2**63]], ids=["overflow-int64", "overflow-strides", "int64-max-plus"]
)
def test_crafted_shapes_raise_checkpoint_format_error(tmp_path, shape):
    """Finding 9a: a header whose shape has a zero dimension passes the size check
    (prod == 0) but holds dims torch cannot represent; load_state/load_structure then raise a
    raw TypeError/RuntimeError from torch.empty instead of CheckpointFormatError naming the file."""
    nbytes = 0 if 0 in shape else 4 * math.prod(shape)
    p = _raw_sft(tmp_path / "crafted.sft", {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}})
    for load in (load_state, load_structure):
        with pytest.raises(CheckpointFormatError, match="crafted.sft"):
            load(p)


def test_inspect_of_a_crafted_file_exits_1_with_a_message(tmp_path, capsys):
    """Finding 9a (CLI): ``inspect`` crashes with a traceback on the same file."""
    p = _zero_size_overflow_header(tmp_path / "crafted.sft")
    assert main(["inspect", str(p)]) == 1
    assert "crafted.sft" in capsys.readouterr().err


@pytest.mark.parametrize("devices", [["w"], {"w": "nonsense"}, {"w": 5}], ids=["list", "bad-name", "not-str"])
def test_crafted_skeleton_devices_raise_checkpoint_format_error(tmp_path, devices):
    """Finding 9b: the skeleton's "devices" map is not validated: a list gives AttributeError,
    a bad device string RuntimeError (both escape decode's error mapping through _EntryFailure)."""
    skeleton = {"version": 1, "root": {"$": "tensor", "e": "w"}, "devices": devices}
    header = {
        "__metadata__": {SKELETON_KEY: json.dumps(skeleton)},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    p = _raw_sft(tmp_path / "dev.sft", header, b"\0" * 4)
    with pytest.raises(CheckpointFormatError, match="dev.sft"):
        load_state(p)


def test_garbage_pickle_is_a_format_error_not_unsafe(tmp_path):
    """Finding 10: every weights-only UnpicklingError is reported as UnsafeCheckpointError
    ("pass weights_only=False if you trust the file"), even for a damaged pickle that holds no
    globals at all; that tells users to unpickle garbage. Only "Unsupported global" is unsafe."""
    p = tmp_path / "bad.pt"
    p.write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00a\xff")  # a dict, then an invalid opcode
    with pytest.raises(CheckpointFormatError, match="bad.pt"):
        load_state(p)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": Custom(1)}, unsafe)  # a real disallowed global
    with pytest.raises(UnsafeCheckpointError):
        load_state(unsafe)


def test_torch_load_keeps_the_users_own_safe_globals(tmp_path):
    """Finding 4: load_torch wraps torch.load in ``safe_globals(SAFE_GLOBALS)``, whose exit
    *removes* those classes from torch's process-wide allowlist, including ones the user had
    registered with ``add_safe_globals`` before. After one load_state of a .pt, the user's own
    ``torch.load`` of a checkpoint with paths fails (and two threads loading race the same way).
    Only add what is not already allowed, or check per call without mutating global state."""
    original = torch.serialization.get_safe_globals()
    try:
        torch.serialization.add_safe_globals([pathlib.PosixPath])
        p = tmp_path / "paths.pt"
        torch.save({"root": pathlib.PosixPath("/data")}, p)
        assert load_state(p)["root"] == pathlib.PosixPath("/data")
        assert pathlib.PosixPath in torch.serialization.get_safe_globals()
        assert torch.load(p)["root"] == pathlib.PosixPath("/data")
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(original)


@pytest.mark.parametrize("suffix", [".pt", ".sft"])
def test_bad_map_location_is_not_blamed_on_the_file(tmp_path, suffix):
    """Finding 11e: for torch files, a bad map_location (``3``, ``"nonsense"``) is reported as
    CheckpointFormatError "not a valid torch checkpoint" (the file is fine), while the same
    argument on a .sft gives TypeError/RuntimeError. The argument should be checked for both."""
    p = tmp_path / f"ok{suffix}"
    save_state({"a": torch.ones(1)}, p)
    with pytest.raises(TypeError, match="map_location"):
        load_state(p, map_location=3)
    with pytest.raises(Exception) as info:
        load_state(p, map_location="nonsense")
    assert not isinstance(info.value, CheckpointFormatError)


def test_convert_to_ckpt_of_what_torch_cannot_pickle_exits_1(tmp_path, capsys):
    """Finding 11f: ``convert`` documents exit 1 with a message for "an object the destination
    format cannot hold", but a .sft holding one storage viewed as two dtypes (which .sft keeps
    and torch.save refuses) escapes as a RuntimeError traceback."""
    base = torch.arange(8, dtype=torch.int32)
    save_state({"i": base, "f": base.view(torch.float32)}, tmp_path / "mixed.sft")
    assert main(["convert", str(tmp_path / "mixed.sft"), str(tmp_path / "mixed.ckpt")]) == 1
    assert "mixed.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "mixed.ckpt").exists()


def test_convert_onto_a_directory_exits_with_a_message(tmp_path, capsys):
    """Finding 11g: ``convert SRC DST --overwrite`` with DST an existing directory escapes as an
    IsADirectoryError traceback (any OSError from the write does) instead of exit 1/2 + message."""
    save_state({"a": torch.ones(1)}, tmp_path / "src.ckpt")
    (tmp_path / "dst.sft").mkdir()
    assert main(["convert", str(tmp_path / "src.ckpt"), str(tmp_path / "dst.sft"), "--overwrite"]) in (1, 2)
    assert "dst.sft" in capsys.readouterr().err


def test_bool_tensor_with_non_canonical_bytes_loads_back(tmp_path):
    """Finding 7b: a bool tensor whose bytes are not 0/1 (``uint8.view(torch.bool)``, numpy or
    ctypes data) is written as is; the reader then rejects our own file ("BOOL but holds bytes
    other than 0 and 1", wrapped as "corrupted lightning-utils skeleton"). .pt round-trips it.
    Canonicalise bool entries when writing (or accept them when reading)."""
    raw = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    save_state({"mask": raw.view(torch.bool)}, tmp_path / "b.sft")
    out = load_state(tmp_path / "b.sft")["mask"]
    assert out.dtype == torch.bool and torch.equal(out.view(torch.uint8) != 0, raw != 0)


def test_save_model_files_load_with_aliases_retied(tmp_path):
    """Finding 12: a file from safetensors.torch.save_model with tied weights records the
    dropped alias in metadata ({"head.weight": "emb.weight"}); load_state returns
    {"module": {...}, "head.weight": "emb.weight"} so the tied key is missing and a string sits
    where a tensor should be. It should come back as the full flat state dict, aliases re-tied."""
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    save_model(model, str(tmp_path / "m.safetensors"))
    out = load_state(tmp_path / "m.safetensors")
    assert set(out) == {"emb.weight", "head.weight"}
    assert out["emb.weight"].untyped_storage().data_ptr() == out["head.weight"].untyped_storage().data_ptr()
    model.load_state_dict(out, strict=True)


def test_save_weights_metadata_named_module_does_not_drop_the_tensors(tmp_path):
    """Finding 8a: save_weights(metadata={"module": ...}) is written fine, but load_state then
    overwrites the tensor dict with the metadata value: the weights silently vanish."""
    target = tmp_path / "w.sft"
    try:
        save_weights({"w": torch.ones(2)}, target, metadata={"module": "resnet"})
    except (TypeError, ValueError) as exc:  # refusing the reserved key is a fine fix too
        assert "module" in str(exc) and not target.exists()
        return
    out = load_state(target)
    assert isinstance(out["module"], dict) and torch.equal(out["module"]["w"], torch.ones(2))


def test_save_weights_refuses_a_tensor_named_metadata(tmp_path):
    """Finding 7c: a tensor named "__metadata__" replaces the header's metadata object, so
    save_weights writes a file that load_state rejects as invalid."""
    target = tmp_path / "w.sft"
    with pytest.raises((TypeError, ValueError), match="__metadata__"):
        save_weights({"__metadata__": torch.ones(1)}, target)
    assert not target.exists()


def test_save_weights_string_metadata_comes_back_as_strings(tmp_path):
    """Finding 15: save_weights stores str values "as they are" and documents that load_state
    returns them, but load_state json-decodes every value, so "123" comes back as int 123,
    "null" as None and "NaN" as float nan. (Needs a marker of which keys save_weights
    JSON-encoded; foreign files can keep the heuristic decoding.)"""
    meta = {"name": "123", "kind": "null", "tag": "NaN", "stats": {"step": 5}}
    save_weights({"w": torch.ones(1)}, tmp_path / "w.sft", metadata=meta)
    out = load_state(tmp_path / "w.sft")
    assert out["name"] == "123" and out["kind"] == "null" and out["tag"] == "NaN"
    assert out["stats"] == {"step": 5}


def test_header_too_large_error_names_the_file(tmp_path, monkeypatch):
    """Finding 11d: an over-limit skeleton (e.g. a long per-step history a callback keeps)
    raises ValueError "safetensors header would be N bytes" without naming the file."""
    monkeypatch.setattr(sft_file, "MAX_HEADER_BYTES", 600)
    target = tmp_path / "big-header.sft"
    with pytest.raises(ValueError, match="big-header.sft"):
        save_state({"history": list(range(500))}, target)
    assert _listing(tmp_path) == []


def test_long_file_names_can_be_saved(tmp_path):
    """Finding 16: the staged temp name adds 21 characters to the file name, so any name of
    235-255 bytes (valid for open()) fails with ENAMETOOLONG in atomic_write."""
    target = tmp_path / ("c" * 246 + ".sft")
    with open(tmp_path / ("d" * 246 + ".sft"), "wb"):
        pass  # the filesystem takes such a name
    save_state({"a": torch.ones(1)}, target)
    assert torch.equal(load_state(target)["a"], torch.ones(1))


def test_non_contiguous_state_dict_weights_read_with_their_shape_by_other_tools(tmp_path):
    """Finding 13: a state_dict weight that is transposed or channels_last is stored as its raw
    1-D storage under its own name, so safetensors/HF readers get e.g. ``w`` of shape (12,)
    instead of (4, 3). A tensor that is alone on its storage can be stored as its contiguous
    logical value (and re-strided on load) so its name means what other tools expect."""
    w = torch.randn(3, 4).t()
    conv = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    ckpt = {"state_dict": {"w": w, "conv.weight": conv}, "epoch": 0}
    save_state(ckpt, tmp_path / "c.sft")
    flat = load_file(tmp_path / "c.sft")
    assert flat["w"].shape == (4, 3) and torch.equal(flat["w"], w)
    assert flat["conv.weight"].shape == (2, 3, 4, 4) and torch.equal(flat["conv.weight"], conv)
    out = load_state(tmp_path / "c.sft")["state_dict"]  # and parity with .pt still holds
    assert out["w"].stride() == w.stride() and out["conv.weight"].stride() == conv.stride()


def test_whole_conj_tensor_keeps_conj_bit_and_sharing_like_pt(tmp_path):
    """Finding 17a (parity): ``{"c": c, "cc": c.conj()}`` loads from .pt as one storage with
    ``cc.is_conj()``; from .sft as two storages without the bit (values are right)."""
    c = torch.randn(4, dtype=torch.complex64)
    sft, pt = _both({"c": c, "cc": c.conj()}, tmp_path)
    assert pt["cc"].is_conj() and pt["cc"].untyped_storage().data_ptr() == pt["c"].untyped_storage().data_ptr()
    assert sft["cc"].is_conj() == pt["cc"].is_conj()
    assert sft["cc"].untyped_storage().data_ptr() == sft["c"].untyped_storage().data_ptr()


def test_repeated_containers_keep_their_identity_like_pt(tmp_path):
    """Finding 17b (parity): the same list/dict object reached twice is one object after a .pt
    load (pickle memo) but two after a .sft load (only tensors get "ref" nodes)."""
    shared = [1, 2]
    cfg = {"lr": 0.1}
    sft, pt = _both({"a": shared, "b": shared, "c": cfg, "d": [cfg]}, tmp_path)
    assert pt["a"] is pt["b"] and pt["c"] is pt["d"][0]
    assert sft["a"] is sft["b"] and sft["c"] is sft["d"][0]


# ================================================================================================
# Correct behaviour that was not covered (pass on the reviewed code)
# ================================================================================================


def test_mmap_loads_are_copy_on_write(tmp_path):
    w = torch.randn(64)
    target = tmp_path / "m.sft"
    save_state({"w": w, "tied": w, "view": w[8:16]}, target)
    before = target.read_bytes()
    out = load_state(target)
    out["w"].add_(1.0)  # in place, on a zero-copy view of the file
    assert torch.equal(out["view"], w[8:16] + 1.0)  # sharing is real
    assert target.read_bytes() == before  # ...and private to this process
    assert torch.equal(load_state(target)["w"], w)


def test_mmap_tensors_survive_the_file_being_replaced_or_deleted(tmp_path):
    target = tmp_path / "m.sft"
    w = torch.randn(1000)
    save_state({"w": w}, target)
    old = load_state(target)
    save_state({"w": torch.zeros(1000)}, target)  # rename over it
    assert torch.equal(old["w"], w) and torch.equal(load_state(target)["w"], torch.zeros(1000))
    mid = load_state(target)["w"][10:20]  # keep only a view; the dict and base tensor go away
    target.unlink()
    import gc

    gc.collect()
    assert torch.equal(mid, torch.zeros(10)) and torch.equal(old["w"], w)


def test_resave_a_loaded_checkpoint_over_its_own_file(tmp_path):
    """Resume from last.sft, train, save last.sft again: the writer reads the old mapping."""
    target = tmp_path / "last.sft"
    w = torch.randn(32, 4)
    save_state({"state_dict": {"a": w, "b": w, "v": w[2:5]}, "step": 1}, target)
    ckpt = load_state(target)
    ckpt["state_dict"]["a"].mul_(2.0)
    ckpt["step"] = 2
    save_state(ckpt, target)
    again = load_state(target)
    sd = again["state_dict"]
    assert again["step"] == 2 and torch.equal(sd["a"], w * 2) and torch.equal(sd["v"], (w * 2)[2:5])
    assert (
        sd["a"].untyped_storage().data_ptr()
        == sd["b"].untyped_storage().data_ptr()
        == sd["v"].untyped_storage().data_ptr()
    )
    assert _listing(tmp_path) == ["last.sft"]


def test_mmap_false_gives_private_memory(tmp_path):
    base = torch.ones(8)
    save_state({"w": base, "v": base[2:]}, tmp_path / "m.sft")
    out = load_state(tmp_path / "m.sft", mmap=False)
    out["w"].add_(1)
    assert torch.equal(out["v"], torch.full((6,), 2.0))
    assert torch.equal(load_state(tmp_path / "m.sft")["w"], torch.ones(8))


def test_view_before_base_overlap_expand_and_offset_scalars(tmp_path):
    base = torch.arange(24.0)
    obj = {
        "view_first": base[4:10],
        "base": base,
        "overlap_a": base[0:12],
        "overlap_b": base[6:18],
        "scalar_view": base[7],
        "expanded": torch.ones(3, 1).expand(3, 5),
        "empty_view": base[5:5],
        "reshaped": base.view(2, 3, 4).permute(2, 0, 1),
    }
    sft, pt = _both(obj, tmp_path)
    assert_same(sft, pt)
    ptrs = {
        sft[k].untyped_storage().data_ptr()
        for k in ("view_first", "base", "overlap_a", "overlap_b", "scalar_view", "reshaped")
    }
    assert len(ptrs) == 1
    assert sft["scalar_view"].dim() == 0 and sft["expanded"].stride() == (1, 0)
    sft["base"][7] = -1.0
    assert sft["scalar_view"].item() == -1.0 and sft["overlap_b"][1].item() == -1.0


def test_odd_containers_and_scalars_match_pt(tmp_path):
    obj = collections.OrderedDict(
        [
            ("empty", [{}, [], (), collections.OrderedDict(), {1: {}}]),
            ("keys", {0: "int", 1.5: "float", None: "none", True: "bool", (1, "a"): "tuple", "": "empty-str"}),
            ("floats", [-0.0, math.inf, -math.inf, 1e308, 5e-324, 0.1]),
            ("ints", [2**63, -(2**63) - 1, 2**200]),
            ("torch", [torch.Size([2, 0]), torch.float8_e4m3fn, torch.device("cpu"), torch.bfloat16]),
            ("misc", [b"\x00\xff", 1 + 2j, complex(math.inf, -0.0), pathlib.PurePosixPath("/a/b")]),
            ("nested_tuple", ((1,), ((2,),), ())),
            ("unicode", {"ключ": "значение", "emoji": "\U0001f600", "nul": "a\x00b"}),
        ]
    )
    sft, pt = _both(obj, tmp_path)
    assert_same(sft, pt)
    assert math.copysign(1.0, sft["misc"][2].imag) == -1.0
    assert list(sft["keys"]) == list(obj["keys"]) and type(list(sft["keys"])[3]) is bool


def test_sets_and_frozensets_round_trip(tmp_path):
    save_state({"s": {1, "a", (2, 3)}, "f": frozenset({4.5})}, tmp_path / "s.sft")
    out = load_state(tmp_path / "s.sft")
    assert out == {"s": {1, "a", (2, 3)}, "f": frozenset({4.5})} and type(out["f"]) is frozenset


def test_very_long_and_colliding_key_paths(tmp_path):
    long_key = "k" * 20_000
    obj = {
        "state_dict": {long_key: torch.ones(2), "a.b": torch.zeros(1), "tensor": torch.full((1,), 3.0)},
        "a": {"b": torch.full((1,), 7.0)},  # "a.b" again, outside state_dict
        "a.b": torch.full((1,), 8.0),
        "": torch.full((1,), 9.0),  # the empty path name
        "__metadata__": torch.full((1,), 10.0),  # may not be an entry name
    }
    sft, pt = _both(obj, tmp_path)
    assert_same(sft, pt)
    with safe_open(tmp_path / "x.sft", "pt") as f:
        names = list(f.keys())
    assert len(names) == len(set(names)) == 7 and "__metadata__" not in names


def test_non_str_keyed_optimizer_state_and_nested_params(tmp_path):
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}, 1: {"step": torch.tensor(3.0)}}
    groups = [{"params": [0, 1], "betas": (0.9, 0.99), "lr": torch.tensor(0.01), "initial_lr": 0.01, "foreach": None}]
    sft, pt = _both({"optimizer_states": [{"state": state, "param_groups": groups}]}, tmp_path)
    assert_same(sft, pt)
    assert list(sft["optimizer_states"][0]["state"]) == [0, 1]


def test_files_from_safetensors_every_dtype_and_ours_read_back_by_safetensors(tmp_path):
    tensors = {
        "f64": torch.randn(2, dtype=torch.float64), "bf16": torch.randn(3).bfloat16(), "f16": torch.randn(1).half(),
        "i8": torch.tensor([-1, 2], dtype=torch.int8), "u8": torch.tensor([255], dtype=torch.uint8),
        "b": torch.tensor([True, False]), "e4m3": torch.randn(4).to(torch.float8_e4m3fn),
        "c64": torch.randn(2, dtype=torch.complex64), "empty": torch.empty(0, 3), "scalar": torch.tensor(7),
    }  # fmt: skip
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours = load_state(tmp_path / "theirs.safetensors")
    assert set(ours) == set(tensors)
    for k, t in tensors.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    save_weights(ours, tmp_path / "ours.safetensors", metadata={"stats": {"step": 1}})
    back = load_file(tmp_path / "ours.safetensors")
    for k, t in tensors.items():
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


def test_plugin_load_keeps_cpu_and_forwards_weights_only(tmp_path):
    io = SafetensorsCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "root": pathlib.PosixPath("/x")}, tmp_path / "c.ckpt")
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "c.sft")
    for name in ("c.ckpt", "c.sft"):
        out = io.load_checkpoint(tmp_path / name, weights_only=True)
        assert out["state_dict"]["w"].device.type == "cpu"
    io.save_checkpoint({"obj": Custom(3)}, tmp_path / "u.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        io.load_checkpoint(tmp_path / "u.ckpt", weights_only=True)
    assert io.load_checkpoint(tmp_path / "u.ckpt", weights_only=False)["obj"] == Custom(3)


def test_failed_save_keeps_previous_file_for_both_formats(tmp_path):
    for suffix in (".sft", ".ckpt"):
        target = tmp_path / f"keep{suffix}"
        save_state({"v": 1}, target)
        before = target.read_bytes()
        bad = {"deep": {0: [{"x": lambda: None}]}}
        with pytest.raises((TypeError, AttributeError, pickle.PicklingError)) as info:
            save_state(bad, target)
        if suffix == ".sft":
            assert "checkpoint['deep'][0][0]['x']" in str(info.value)
        assert target.read_bytes() == before
    assert _listing(tmp_path) == ["keep.ckpt", "keep.sft"]


def test_unaligned_foreign_entries_are_read_correctly(tmp_path):
    """A foreign file whose entries are not aligned to their dtype (older writers) falls back
    from the zero-copy mmap path to a read; values must be right either way."""
    a, b = torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([1.5, -2.25], dtype=torch.float32)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    p = _raw_sft(tmp_path / "u.safetensors", header, a.numpy().tobytes() + b.numpy().tobytes())
    for mm in (True, False):
        out = load_state(p, mmap=mm)
        assert torch.equal(out["a"], a) and torch.equal(out["b"], b)


def test_load_from_checkpoint_follows_lightning_for_hparams_file_and_overrides(tmp_path):
    """Finding 14: ``load_from_checkpoint`` skips two steps of Lightning's
    ``_load_from_checkpoint``: ``hparams_file=`` is swallowed by ``**kwargs`` and silently
    ignored (Lightning replaces the saved hparams with the file), and keyword overrides are not
    merged into ``checkpoint["hyper_parameters"]`` before ``on_load_checkpoint`` sees it."""
    from helpers.models import TinyModule

    from lightning_utils.plugins import load_from_checkpoint

    class Recording(TinyModule):
        def on_load_checkpoint(self, checkpoint):
            self.seen_lr = checkpoint["hyper_parameters"]["lr"]

    model = TinyModule(hidden=8)
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "2.6.6",
    }
    save_state(ckpt, tmp_path / "m.sft")
    (tmp_path / "h.yaml").write_text("hidden: 8\nlr: 0.5\n")
    loaded = load_from_checkpoint(TinyModule, tmp_path / "m.sft", hparams_file=tmp_path / "h.yaml")
    assert loaded.hparams.lr == 0.5  # what TinyModule.load_from_checkpoint gives for a .ckpt
    rec = load_from_checkpoint(Recording, tmp_path / "m.sft", lr=0.7)
    assert rec.hparams.lr == 0.7 and rec.seen_lr == 0.7


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["ENOSPC", "Ctrl-C"])
def test_write_failure_mid_data_keeps_previous_file_and_no_temp(tmp_path, monkeypatch, exc):
    import lightning_utils.io.atomic as atomic

    target = tmp_path / "ckpt.sft"
    save_state({"w": torch.zeros(4)}, target)
    before = target.read_bytes()
    calls = {"n": 0}
    real_write = os.write

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the first tensor went out, the second fails
            raise exc
        return real_write(fd, data)

    monkeypatch.setattr(atomic.os, "write", failing_write)
    with pytest.raises(type(exc)):
        save_state({"a": torch.ones(1000), "b": torch.ones(1000, dtype=torch.float16)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before and _listing(tmp_path) == ["ckpt.sft"]
