"""Parity of .sft with .pt: loading either gives the same object, bit for bit."""

from __future__ import annotations

import collections
import enum
import json
import math
import pathlib
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_utils.io import (
    CheckpointFormatError,
    checkpoint_format,
    load_state,
    save_state,
    save_weights,
)
from lightning_utils.io.state import SKELETON_KEY, pick_path


class StrEnum(str, enum.Enum):
    A = "a"


class IntEnum(enum.IntEnum):
    B = 2


def assert_same(a, b, path="root"):
    """Deep equality that also checks container types, key order, dtypes and bits."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), path
        assert a.requires_grad == b.requires_grad, path
        if a.numel():
            assert (
                torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
                if a.is_contiguous()
                else torch.equal(
                    a.detach().contiguous().reshape(-1).view(torch.uint8),
                    b.detach().contiguous().reshape(-1).view(torch.uint8),
                )
            ), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path
        if isinstance(a, float):
            assert math.copysign(1, a) == math.copysign(1, b), path


def roundtrip(obj, tmp_path):
    save_state(obj, tmp_path / "x.sft")
    save_state(obj, tmp_path / "x.pt")
    sft = load_state(tmp_path / "x.sft")
    pt = load_state(tmp_path / "x.pt", weights_only=False)
    assert_same(sft, pt)
    return sft


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


def test_parameters_and_requires_grad(tmp_path):
    p = torch.nn.Parameter(torch.randn(2, 2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    leaf = torch.randn(3, requires_grad=True)
    out = roundtrip({"p": p, "frozen": frozen, "leaf": leaf}, tmp_path)
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].requires_grad
    assert not out["frozen"].requires_grad and out["leaf"].requires_grad


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


@pytest.mark.parametrize(
    ("bad", "where"),
    [({"hp": {"fn": lambda x: x}}, "['hp']['fn']"), ({"cls": [int]}, "['cls'][0]"), ({"o": object()}, "['o']"),
     ({"dd": collections.defaultdict(list)}, "['dd']"), ({"sparse": torch.eye(2).to_sparse()}, "['sparse']"),
     ({"enum": [StrEnum.A]}, "['enum'][0]"), ({"np": {"x": 1, "y": IntEnum.B}}, "['np']['y']")],
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


def test_suffix_dispatch_and_magic_bytes(tmp_path):
    for suffix in (".sft", ".safetensors", ".safetensor"):
        save_state({"a": torch.ones(2)}, tmp_path / f"f{suffix}")
        raw = (tmp_path / f"f{suffix}").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert raw[8:9] == b"{" and n + 8 <= len(raw)
        assert checkpoint_format(tmp_path / f"f{suffix}") == "safetensors"
    for suffix in (".pt", ".pth", ".bin", ".ckpt"):
        save_state({"a": torch.ones(2)}, tmp_path / f"f{suffix}")
        assert (tmp_path / f"f{suffix}").read_bytes()[:4] == b"PK\x03\x04"


@pytest.mark.parametrize("name", ["noext", "x.json", "x.tar", "x.sft.tmp"])
def test_unknown_suffix_is_a_value_error_naming_path_and_suffixes(tmp_path, name):
    with pytest.raises(ValueError) as info:
        save_state({}, tmp_path / name)
    assert name in str(info.value) and ".sft" in str(info.value) and ".ckpt" in str(info.value)
    with pytest.raises(ValueError):
        load_state(tmp_path / name)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.sft"):
        load_state(tmp_path / "nothere.sft")


def test_weights_are_readable_by_plain_safetensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt = {"state_dict": model.state_dict(), "epoch": 3, "hyper_parameters": {"lr": 0.1}}
    save_state(ckpt, tmp_path / "c.sft")
    flat = load_file(tmp_path / "c.sft")
    assert torch.equal(flat["weight"], model.weight) and torch.equal(flat["bias"], model.bias)
    with safe_open(tmp_path / "c.sft", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta[SKELETON_KEY])["version"] == 1


def test_plain_safetensors_files_load(tmp_path):
    tensors = {"b": torch.zeros(2), "a": torch.ones(3, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "plain.safetensors")  # no metadata at all (orig: AttributeError)
    out = load_state(tmp_path / "plain.safetensors")
    assert set(out) == {"a", "b"} and out["a"].dtype == torch.bfloat16
    save_file(tensors, tmp_path / "hf.safetensors", metadata={"format": "pt"})
    assert set(load_state(tmp_path / "hf.safetensors")) == {"a", "b"}


def test_original_utils_export_layout_loads_wrapped(tmp_path):
    # The original utilities' export: one flat tensor dict plus JSON-valued metadata.
    meta = {
        "stats": json.dumps({"global_step": 5}),
        "userdata": json.dumps({"symmap": {"a": 1}}),
        "name": "x",
        "step": "5",
    }
    save_file({"w": torch.ones(2, 3)}, tmp_path / "fp32.sft", metadata=meta)
    out = load_state(tmp_path / "fp32.sft")
    assert set(out) == {"module", "stats", "userdata", "name", "step"}
    assert out["stats"] == {"global_step": 5} and type(out["stats"]["global_step"]) is int
    assert out["name"] == "x" and out["step"] == 5 and torch.equal(out["module"]["w"], torch.ones(2, 3))


def test_save_weights_is_a_plain_file_with_json_metadata(tmp_path):
    sd = {"w": torch.randn(2, 2), "b": torch.randn(2).to(torch.bfloat16)}
    save_weights(sd, tmp_path / "w.sft", metadata={"stats": {"global_step": 5}, "name": "x", "skip": None, "step": 5})
    flat = load_file(tmp_path / "w.sft")
    assert torch.equal(flat["w"], sd["w"]) and flat["b"].dtype == torch.bfloat16
    with safe_open(tmp_path / "w.sft", "pt") as f:
        meta = f.metadata()
    assert meta == {"format": "pt", "stats": '{"global_step":5}', "name": "x", "step": "5",
                    "lightning_utils.json_keys": '["stats","step"]'}  # fmt: skip
    out = load_state(tmp_path / "w.sft")
    assert out["stats"] == {"global_step": 5} and out["step"] == 5 and set(out["module"]) == {"w", "b"}
    assert out["name"] == "x" and "lightning_utils.json_keys" not in out
    with pytest.raises(ValueError, match="safetensors"):
        save_weights(sd, tmp_path / "w.pt")


def test_map_location_forms(tmp_path):
    save_state({"w": torch.ones(2), "v": torch.ones(4)[1:3]}, tmp_path / "m.sft")
    for ml in (None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s, lambda s, loc: None):
        out = load_state(tmp_path / "m.sft", map_location=ml)
        assert out["w"].device.type == "cpu" and torch.equal(out["v"], torch.ones(2))
    seen = []
    load_state(tmp_path / "m.sft", map_location=lambda s, loc: seen.append(loc) or s)
    assert seen == ["cpu", "cpu"]
    out = load_state(tmp_path / "m.sft", map_location="meta")
    assert out["w"].device.type == "meta"
    with pytest.raises(TypeError, match="map_location"):
        load_state(tmp_path / "m.sft", map_location=3)


def test_pick_path(tmp_path):
    (tmp_path / "pp.sft").write_bytes(b"")
    assert pick_path(tmp_path / "pp.pth", ".pt", ".sft") == tmp_path / "pp.sft"
    assert pick_path(tmp_path / "qq.pth", ".pt", ".sft") == tmp_path / "qq.pth"


def test_corrupted_skeleton_is_a_format_error(tmp_path):
    meta = {"format": "pt", SKELETON_KEY: '{"version": 1, "root": {"$": "tensor", "e": "missing"}}'}
    save_file({"w": torch.ones(1)}, tmp_path / "bad.sft", metadata=meta)
    with pytest.raises(CheckpointFormatError, match="bad.sft"):
        load_state(tmp_path / "bad.sft")
