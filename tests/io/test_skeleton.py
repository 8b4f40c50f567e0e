"""What a ``.sft`` skeleton represents (:mod:`lightning_utils.io.skeleton`): loading a ``.sft`` gives
the same object as ``torch.load`` of the ``.pt`` of the same data, bit for bit; what it cannot
represent is refused naming the key path; a damaged skeleton is a ``CheckpointFormatError``."""

from __future__ import annotations

import collections
import enum
import json
import math
import pathlib
import struct

import numpy as np
import pytest
import torch
from helpers.checkpoints import assert_same, roundtrip, save_both
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_utils.io import CheckpointFormatError, load_state, save_state
from lightning_utils.io.state import SKELETON_KEY


def _raw_sft(path: pathlib.Path, header: dict, data: bytes = b"") -> pathlib.Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _listing(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class ObjectEnum(enum.Enum):
    """Enums are stored as their value (tests/io/test_hparams_types.py); this value cannot be."""

    A = object()


class Opaque:
    """A class the skeleton refuses (a numpy object array holds one below)."""


def test_scalars_containers_and_order(tmp_path):
    obj = {
        "z": 1, "a": 2.5, "m": True, "n": None, "s": "text", "big": 2**70, "neg0": -0.0,
        "nan": math.nan, "inf": math.inf, "ninf": -math.inf,
        "tuple": (1, [2, (3,)]), "list": [1, "x", None], "od": collections.OrderedDict(b=1, a=2),
        3: "int key", (1, 2): "tuple key", 1.5: "float key", None: "none key",
        "path": pathlib.PosixPath("/a/b"), "pure": pathlib.PureWindowsPath("C:/x"),
        "bytes": b"\x00\xff", "dtype": torch.bfloat16, "device": torch.device("cpu"),
        "size": torch.Size([2, 3]), "complex": 1 + 2j, "set": {1, 2}, "empty": {}, "elist": [],
    }  # fmt: skip
    out = roundtrip(obj, tmp_path)
    assert list(out) == list(obj)
    assert type(out["od"]) is collections.OrderedDict and type(out["tuple"]) is tuple


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
    sft, pt = save_both(obj, tmp_path)
    assert_same(sft, pt)
    assert math.copysign(1.0, sft["misc"][2].imag) == -1.0
    assert list(sft["keys"]) == list(obj["keys"]) and type(list(sft["keys"])[3]) is bool


def test_sets_and_frozensets_round_trip(tmp_path):
    save_state({"s": {1, "a", (2, 3)}, "f": frozenset({4.5})}, tmp_path / "s.sft")
    out = load_state(tmp_path / "s.sft")
    assert out == {"s": {1, "a", (2, 3)}, "f": frozenset({4.5})} and type(out["f"]) is frozenset


@pytest.mark.parametrize(
    "obj",
    [{"k\ud800": 1}, {"k": "v\udc80"}, {"state_dict": {"w\udcff": torch.ones(2)}}],
    ids=["key", "value", "tensor-key"],
)
def test_lone_surrogates_round_trip_like_pt(tmp_path, obj):
    """Strings with lone surrogates (which ``torch.save`` keeps) round-trip: the skeleton escapes
    them (``ensure_ascii=True``) and entry names escape them with backslashes."""
    sft, pt = save_both(obj, tmp_path)
    assert_same(sft, pt)


def test_huge_int_round_trips_or_names_its_key_path(tmp_path):
    """An int above Python's 4300-digit str limit (which ``torch.save`` stores) round-trips (as a
    hex ``int`` node) or is refused naming its key path, never a bare ValueError."""
    big = 10**5000
    try:
        save_state({"hp": {"big": big}}, tmp_path / "x.sft")
    except TypeError as exc:
        assert "checkpoint['hp']['big']" in str(exc)
        assert not (tmp_path / "x.sft").exists()
        return
    assert load_state(tmp_path / "x.sft")["hp"]["big"] == big


def test_state_dict_version_metadata_is_kept(tmp_path):
    """``module.state_dict()`` is an OrderedDict carrying ``_metadata`` (the per-module ``version``
    that ``_load_from_state_dict`` uses to migrate old layouts); a .pt load keeps it and so does
    a .sft load (the ``meta`` of an ``odict`` node)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    sd = model.state_dict()
    sft, pt = save_both({"state_dict": sd}, tmp_path)
    assert pt["state_dict"]._metadata == sd._metadata
    assert getattr(sft["state_dict"], "_metadata", None) == sd._metadata


def test_repeated_containers_keep_their_identity_like_pt(tmp_path):
    """The same list/dict object reached twice is one object after a .pt load (pickle's memo) and
    after a .sft load (``id`` and ``ref`` nodes)."""
    shared = [1, 2]
    cfg = {"lr": 0.1}
    sft, pt = save_both({"a": shared, "b": shared, "c": cfg, "d": [cfg]}, tmp_path)
    assert pt["a"] is pt["b"] and pt["c"] is pt["d"][0]
    assert sft["a"] is sft["b"] and sft["c"] is sft["d"][0]


def test_zero_dim_tensor_vs_python_scalar(tmp_path):
    out = roundtrip({"t": torch.tensor(3.0), "f": 3.0, "i": torch.tensor(7), "n": 7}, tmp_path)
    assert isinstance(out["t"], torch.Tensor) and out["t"].dim() == 0
    assert type(out["f"]) is float and type(out["n"]) is int


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
     torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
     torch.uint32, torch.uint64, torch.complex64],
)  # fmt: skip
def test_every_dtype_bit_for_bit(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (6 * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    t = (raw % 2).to(torch.bool) if dtype == torch.bool else raw.view(dtype).reshape(2, 3)
    out = roundtrip({"t": t, "zero": torch.empty(0, 4, dtype=dtype), "scalar": t.reshape(-1)[0].clone()}, tmp_path)
    assert out["t"].dtype == dtype


def test_bool_tensor_with_non_canonical_bytes_loads_back(tmp_path):
    """A bool tensor whose bytes are not 0/1 (``uint8.view(torch.bool)``, numpy or ctypes data) is
    stored as 0/1, so the reader (which rejects other BOOL bytes) loads our own file back, with
    the truth values a .pt keeps."""
    raw = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    save_state({"mask": raw.view(torch.bool)}, tmp_path / "b.sft")
    out = load_state(tmp_path / "b.sft")["mask"]
    assert out.dtype == torch.bool and torch.equal(out.view(torch.uint8) != 0, raw != 0)


def test_parameters_and_requires_grad(tmp_path):
    p = torch.nn.Parameter(torch.randn(2, 2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    leaf = torch.randn(3, requires_grad=True)
    out = roundtrip({"p": p, "frozen": frozen, "leaf": leaf}, tmp_path)
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].requires_grad
    assert not out["frozen"].requires_grad and out["leaf"].requires_grad


def test_tensor_python_attributes_are_not_silently_dropped(tmp_path):
    """``torch.save`` keeps Python attributes set on a tensor or Parameter (``p.no_decay = True``);
    a .sft keeps them too (the ``attrs`` field) or raises TypeError naming the key path:
    nothing is silently dropped."""
    p = torch.nn.Parameter(torch.ones(2))
    p.no_decay = True
    target = tmp_path / "attrs.sft"
    try:
        save_state({"params": [p]}, target)
    except TypeError as exc:
        assert "checkpoint['params'][0]" in str(exc) and not target.exists()
        return
    assert load_state(target)["params"][0].no_decay is True


def test_tied_weights_stored_once_and_share_storage(tmp_path):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    sd = model.state_dict()
    out = roundtrip({"state_dict": sd}, tmp_path)["state_dict"]
    assert out["emb.weight"].data_ptr() == out["head.weight"].data_ptr()
    with safe_open(tmp_path / "x.sft", "pt") as f:
        assert len(list(f.keys())) == 1  # stored once
    fresh = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False)})
    fresh.load_state_dict(out, strict=True)


def test_same_object_twice_comes_back_as_one_object(tmp_path):
    t = torch.randn(3)
    out = roundtrip({"a": t, "b": [t]}, tmp_path)
    assert out["a"] is out["b"][0]


def test_views_and_non_contiguous_keep_sharing_and_strides(tmp_path):
    base = torch.arange(24.0)
    obj = {"first": base[:8], "second": base[8:], "grid": base.view(4, 6).t(), "strided": base[::3], "base": base}
    out = roundtrip(obj, tmp_path)
    ptr = out["base"].untyped_storage().data_ptr()
    assert all(out[k].untyped_storage().data_ptr() == ptr for k in obj)
    out["base"][0] = 100.0
    assert out["grid"][0, 0] == 100.0  # really the same memory
    assert out["grid"].stride() == (1, 6)


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
    sft, pt = save_both(obj, tmp_path)
    assert_same(sft, pt)
    ptrs = {
        sft[k].untyped_storage().data_ptr()
        for k in ("view_first", "base", "overlap_a", "overlap_b", "scalar_view", "reshaped")
    }
    assert len(ptrs) == 1
    assert sft["scalar_view"].dim() == 0 and sft["expanded"].stride() == (1, 0)
    sft["base"][7] = -1.0
    assert sft["scalar_view"].item() == -1.0 and sft["overlap_b"][1].item() == -1.0


def test_mixed_dtype_views_of_one_storage(tmp_path):
    # torch.save refuses this ("view the same data as different types"); .sft keeps it.
    base = torch.arange(8, dtype=torch.int32)
    obj = {"i": base, "f": base.view(torch.float32), "bytes": base.view(torch.uint8)[3:9]}
    save_state(obj, tmp_path / "x.sft")
    out = load_state(tmp_path / "x.sft")
    for k in obj:
        assert out[k].dtype == obj[k].dtype and out[k].stride() == obj[k].stride()
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), obj[k].reshape(-1).view(torch.uint8))
    assert len({out[k].untyped_storage().data_ptr() for k in out}) == 1


def test_distinct_storages_at_the_same_address_both_survive(tmp_path):
    """Two distinct storages that start at the same address (``torch.frombuffer`` / ``from_numpy`` /
    DLPack views of one buffer) are grouped by overlapping memory, so the widest is stored
    and both load back with their values."""
    buf = bytearray(40)
    whole = torch.frombuffer(buf, dtype=torch.float32)
    head = torch.frombuffer(buf, dtype=torch.float32, count=4)  # same address, smaller storage
    whole.copy_(torch.arange(10.0))
    obj = {"head": head, "whole": whole}
    save_state(obj, tmp_path / "x.sft")
    out = load_state(tmp_path / "x.sft")
    assert torch.equal(out["whole"], torch.arange(10.0)) and torch.equal(out["head"], torch.arange(4.0))


@pytest.mark.parametrize("make", ["slice_conj", "conj_imag_neg", "neg_view_slice"])
def test_conj_and_neg_views_keep_their_values(tmp_path, make):
    """A lazily conjugated/negated view that is not its whole storage is stored with its
    conj/neg bit, so it loads with the right values."""
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


def test_whole_conj_tensor_keeps_conj_bit_and_sharing_like_pt(tmp_path):
    """``{"c": c, "cc": c.conj()}`` loads from .pt as one storage with ``cc.is_conj()``; from .sft
    too."""
    c = torch.randn(4, dtype=torch.complex64)
    sft, pt = save_both({"c": c, "cc": c.conj()}, tmp_path)
    assert pt["cc"].is_conj() and pt["cc"].untyped_storage().data_ptr() == pt["c"].untyped_storage().data_ptr()
    assert sft["cc"].is_conj() == pt["cc"].is_conj()
    assert sft["cc"].untyped_storage().data_ptr() == sft["c"].untyped_storage().data_ptr()


def test_non_contiguous_state_dict_weights_read_with_their_shape_by_other_tools(tmp_path):
    """A state_dict weight that is transposed or channels_last and alone on its storage is stored
    as its contiguous logical value (re-strided on load), so safetensors/HF readers get ``w`` of
    shape (4, 3), not its raw 1-D storage."""
    w = torch.randn(3, 4).t()
    conv = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    ckpt = {"state_dict": {"w": w, "conv.weight": conv}, "epoch": 0}
    save_state(ckpt, tmp_path / "c.sft")
    flat = load_file(tmp_path / "c.sft")
    assert flat["w"].shape == (4, 3) and torch.equal(flat["w"], w)
    assert flat["conv.weight"].shape == (2, 3, 4, 4) and torch.equal(flat["conv.weight"], conv)
    out = load_state(tmp_path / "c.sft")["state_dict"]  # and parity with .pt still holds
    assert out["w"].stride() == w.stride() and out["conv.weight"].stride() == conv.stride()


def test_very_long_and_colliding_key_paths(tmp_path):
    long_key = "k" * 20_000
    obj = {
        "state_dict": {long_key: torch.ones(2), "a.b": torch.zeros(1), "tensor": torch.full((1,), 3.0)},
        "a": {"b": torch.full((1,), 7.0)},  # "a.b" again, outside state_dict
        "a.b": torch.full((1,), 8.0),
        "": torch.full((1,), 9.0),  # the empty path name
        "__metadata__": torch.full((1,), 10.0),  # may not be an entry name
    }
    sft, pt = save_both(obj, tmp_path)
    assert_same(sft, pt)
    with safe_open(tmp_path / "x.sft", "pt") as f:
        names = list(f.keys())
    assert len(names) == len(set(names)) == 7 and "__metadata__" not in names


def test_real_optimizer_and_scheduler_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step(1.0)
    obj = {
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
    }
    out = roundtrip(obj, tmp_path)
    assert out["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert out["lr_schedulers"][0]["best"] == sched.state_dict()["best"]  # inf or a float
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(out["optimizer_states"][0])


def test_non_str_keyed_optimizer_state_and_nested_params(tmp_path):
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}, 1: {"step": torch.tensor(3.0)}}
    groups = [{"params": [0, 1], "betas": (0.9, 0.99), "lr": torch.tensor(0.01), "initial_lr": 0.01, "foreach": None}]
    sft, pt = save_both({"optimizer_states": [{"state": state, "param_groups": groups}]}, tmp_path)
    assert_same(sft, pt)
    assert list(sft["optimizer_states"][0]["state"]) == [0, 1]


@pytest.mark.parametrize(
    ("bad", "where"),
    [({"hp": {"fn": lambda x: x}}, "['hp']['fn']"), ({"cls": [int]}, "['cls'][0]"), ({"o": object()}, "['o']"),
     ({"dd": collections.defaultdict(list)}, "['dd']"), ({"sparse": torch.eye(2).to_sparse()}, "['sparse']"),
     ({"enum": [ObjectEnum.A]}, "['enum'][0]"), ({"np": {"x": 1, "y": np.array([Opaque()])}}, "['np']['y']")],
)  # fmt: skip
def test_unrepresentable_values_raise_naming_the_key_path(tmp_path, bad, where):
    target = tmp_path / "x.sft"
    save_state({"ok": 1}, target)
    before = target.read_bytes()
    with pytest.raises(TypeError) as info:
        save_state(bad, target)
    assert where in str(info.value)
    assert target.read_bytes() == before  # the existing file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.sft"]  # no temp file left


def test_cycle_raises_type_error_naming_the_key_path(tmp_path):
    """A self-referencing container raises TypeError naming the key path (not RecursionError) and
    leaves the existing file untouched."""
    loop: list = []
    loop.append(loop)
    save_state({"ok": 1}, tmp_path / "x.sft")
    before = (tmp_path / "x.sft").read_bytes()
    with pytest.raises(TypeError, match=r"checkpoint\['l'\]"):
        save_state({"l": loop}, tmp_path / "x.sft")
    assert (tmp_path / "x.sft").read_bytes() == before and _listing(tmp_path) == ["x.sft"]


def test_what_save_state_writes_load_state_reads_deep_nesting(tmp_path):
    """The decoder refuses nesting deeper than 200 levels, so the encoder refuses it too, naming
    the key path and writing nothing: what save_state writes, load_state reads."""
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


def test_corrupted_skeleton_is_a_format_error(tmp_path):
    meta = {"format": "pt", SKELETON_KEY: '{"version": 1, "root": {"$": "tensor", "e": "missing"}}'}
    save_file({"w": torch.ones(1)}, tmp_path / "bad.sft", metadata=meta)
    with pytest.raises(CheckpointFormatError, match="bad.sft"):
        load_state(tmp_path / "bad.sft")


@pytest.mark.parametrize("devices", [["w"], {"w": "nonsense"}, {"w": 5}], ids=["list", "bad-name", "not-str"])
def test_crafted_skeleton_devices_raise_checkpoint_format_error(tmp_path, devices):
    """The skeleton's ``devices`` map is validated: a list, a bad device string or a non-string
    value is a CheckpointFormatError naming the file."""
    skeleton = {"version": 1, "root": {"$": "tensor", "e": "w"}, "devices": devices}
    header = {
        "__metadata__": {SKELETON_KEY: json.dumps(skeleton)},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    p = _raw_sft(tmp_path / "dev.sft", header, b"\0" * 4)
    with pytest.raises(CheckpointFormatError, match="dev.sft"):
        load_state(p)
