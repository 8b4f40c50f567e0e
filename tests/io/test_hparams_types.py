"""The hyperparameter types users pass, in a ``.sft`` (:mod:`lightning_utils.io.skeleton`, format
version 2): numpy scalars and arrays, ``argparse.Namespace``, enums, dataclasses and ``transformers``
configs are stored, and each comes back as documented in ``docs/sft-format.md``: what ``torch.load``
of a ``.pt`` gives where rebuilding it is safe, data where it would mean importing a class named in
the file. Files that use none of these are still version-1 files, and version-1 files still load."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from helpers.checkpoints import save_both

from lightning_utils.io import CheckpointFormatError, check_storable, load_state, save_state
from lightning_utils.io.skeleton import FORMAT_VERSION, SkeletonError, decode, encode
from lightning_utils.io.state import SKELETON_KEY, load_structure


class Color(enum.Enum):
    RED = 1
    BLUE = (2, "b")


class Mode(str, enum.Enum):
    TRAIN = "train"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Optim:
    lr: float = 0.1
    betas: tuple = (0.9, 0.99)
    path: pathlib.PurePosixPath = dataclasses.field(default_factory=lambda: pathlib.PurePosixPath("/data"))
    extra: dict = dataclasses.field(default_factory=lambda: {"warmup": 10})
    steps: int = dataclasses.field(default=0, init=False)


@dataclasses.dataclass
class Outer:
    optim: Optim
    name: str = "run"


def _skeleton(path: pathlib.Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()[SKELETON_KEY])


def test_numpy_scalars_come_back_as_the_same_numpy_scalars(tmp_path):
    scalars = {
        "f16": np.float16(0.1), "f32": np.float32(0.1), "f64": np.float64(0.1), "nan": np.float32("nan"),
        "ninf": np.float64(-np.inf), "i8": np.int8(-5), "i64": np.int64(2**62), "u64": np.uint64(2**64 - 1),
        "u8": np.uint8(255), "b": np.bool_(True), "c64": np.complex64(1 - 2j), "c128": np.complex128(3 + 0.5j),
    }  # fmt: skip
    sft, pt = save_both({"hp": scalars}, tmp_path)
    for k, v in scalars.items():
        assert type(sft["hp"][k]) is type(v) is type(pt["hp"][k]), k
        assert np.array_equal(sft["hp"][k], v, equal_nan=True) and sft["hp"][k].dtype == v.dtype, k
    assert _skeleton(tmp_path / "x.sft")["version"] == 2


def test_numpy_arrays_come_back_as_arrays_with_dtype_shape_values_and_layout(tmp_path):
    base = np.arange(12, dtype=np.int32)
    arrays = {
        "f32": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3), "bool": np.array([True, False]),
        "u16": np.array([1, 65535], dtype=np.uint16), "zero_d": np.array(2.5), "empty": np.zeros((0, 3)),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "reversed": base[::-1],
        "big_endian": np.array([1.5, -2.0], dtype=">f8"), "readonly": np.frombuffer(b"\x01\x02\x03\x04", np.uint8),
        "c64": np.array([1 + 1j], dtype=np.complex64),
    }  # fmt: skip
    save_state({"hp": arrays, "view": base[2:5], "base": base}, tmp_path / "a.sft")
    out = load_state(tmp_path / "a.sft")
    for k, v in arrays.items():
        got = out["hp"][k]
        assert type(got) is np.ndarray, k
        assert got.shape == v.shape and got.dtype == v.dtype.newbyteorder("=") and np.array_equal(got, v), k
    assert out["hp"]["fortran"].flags.f_contiguous  # its layout, as a .pt load keeps it
    assert out["hp"]["readonly"].flags.writeable
    # a view and its base (reached in either order) still share memory, as the tensors of a .sft do
    assert np.shares_memory(out["view"], out["base"]) and np.array_equal(out["view"], base[2:5])
    # the numbers are ordinary safetensors entries that other tools read
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "a.sft")["hp.f32"], torch.from_numpy(arrays["f32"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to map tensors onto")
def test_numpy_arrays_stay_numpy_on_the_cpu_when_tensors_are_mapped_to_cuda(tmp_path):
    arr = np.arange(3.0)
    save_state({"a": arr, "t": torch.ones(1)}, tmp_path / "m.sft")
    out = load_state(tmp_path / "m.sft", map_location="cuda")
    assert out["t"].device.type == "cuda" and type(out["a"]) is np.ndarray and np.array_equal(out["a"], arr)


def test_numpy_arrays_under_a_callable_map_location(tmp_path):
    arr = np.arange(3.0)
    save_state({"a": arr}, tmp_path / "m.sft")
    out = load_state(tmp_path / "m.sft", map_location=lambda storage, location: storage.clone())
    assert type(out["a"]) is np.ndarray and np.array_equal(out["a"], arr)


def test_the_same_array_twice_is_one_array(tmp_path):
    arr = np.arange(4)
    sft, pt = save_both({"a": arr, "b": [arr]}, tmp_path)
    assert pt["a"] is pt["b"][0] and sft["a"] is sft["b"][0]


def test_namespace_comes_back_as_a_namespace(tmp_path):
    inner = argparse.Namespace(depth=2)
    ns = argparse.Namespace(lr=0.1, layers=[1, 2], name="gpt", path=pathlib.PosixPath("/x"), inner=inner, again=inner)
    sft, pt = save_both({"hyper_parameters": {"args": ns}}, tmp_path)
    assert type(sft["hyper_parameters"]["args"]) is argparse.Namespace
    assert sft["hyper_parameters"]["args"] == pt["hyper_parameters"]["args"] == ns
    assert list(vars(sft["hyper_parameters"]["args"])) == list(vars(ns))  # attribute order kept
    assert sft["hyper_parameters"]["args"].inner is sft["hyper_parameters"]["args"].again


def test_enums_come_back_as_their_values(tmp_path):
    """Rebuilding an enum member would mean importing the class the file names, so the member's
    value comes back (a str or int enum compares equal to it)."""
    save_state(
        {"hp": {"color": Color.RED, "pair": Color.BLUE, "mode": Mode.TRAIN, "level": Level.HIGH}}, tmp_path / "e.sft"
    )
    out = load_state(tmp_path / "e.sft")["hp"]
    assert out == {"color": 1, "pair": (2, "b"), "mode": "train", "level": 3}
    assert type(out["mode"]) is str and type(out["level"]) is int and out["mode"] == Mode.TRAIN


def test_dataclasses_come_back_as_dicts_of_their_fields(tmp_path):
    cfg = Outer(Optim(lr=0.5))
    save_state({"hp": {"cfg": cfg}}, tmp_path / "d.sft")
    out = load_state(tmp_path / "d.sft")["hp"]["cfg"]
    assert out == {
        "optim": {"lr": 0.5, "betas": (0.9, 0.99), "path": pathlib.PurePosixPath("/data"), "extra": {"warmup": 10}, "steps": 0},
        "name": "run",
    }  # fmt: skip
    assert type(out) is dict and list(out["optim"]) == ["lr", "betas", "path", "extra", "steps"]
    assert Outer(Optim(**{k: v for k, v in out["optim"].items() if k != "steps"}), out["name"]) == cfg


def _gpt2_config():
    transformers = pytest.importorskip("transformers", reason="transformers configs need the test extra")
    return transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)


def test_transformers_config_comes_back_as_the_same_config_class(tmp_path):
    """A ``PretrainedConfig`` is stored as its ``to_dict()`` data; transformers' own registry (the
    one ``AutoConfig`` reads ``config.json`` with) maps its ``model_type`` back to the same class."""
    import transformers

    config = _gpt2_config()
    enc_dec = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(config, config)
    save_state({"hp": {"config": config, "again": config, "enc_dec": enc_dec}}, tmp_path / "c.sft")
    out = load_state(tmp_path / "c.sft")["hp"]
    assert type(out["config"]) is transformers.GPT2Config and out["config"].to_dict() == config.to_dict()
    assert out["again"] is out["config"]
    assert type(out["enc_dec"]) is transformers.EncoderDecoderConfig
    assert out["enc_dec"].to_dict() == enc_dec.to_dict()
    node = _skeleton(tmp_path / "c.sft")["root"]["v"]["hp"]["v"]["config"]
    assert node["$"] == "hfconfig" and node["type"] == "gpt2" and node["v"]["v"]["n_embd"] == 16


def test_transformers_config_comes_back_as_data_when_the_class_is_not_transformers_own(tmp_path):
    """A config class that transformers' registry does not map its ``model_type`` to (a user's
    subclass, here) is never imported from the file: its ``to_dict()`` data comes back."""
    transformers = pytest.importorskip("transformers", reason="transformers configs need the test extra")

    class MyConfig(transformers.PretrainedConfig):
        model_type = "my-model-not-registered"

    config = MyConfig(hidden=4)
    save_state({"config": config}, tmp_path / "c.sft")
    out = load_state(tmp_path / "c.sft")["config"]
    assert type(out) is dict and out == config.to_dict() and out["hidden"] == 4


def test_transformers_config_with_a_lying_class_name_is_data(tmp_path):
    """The class name in the file only selects the rebuild when transformers' registry agrees."""
    save_state({"config": _gpt2_config()}, tmp_path / "c.sft")
    skeleton = _skeleton(tmp_path / "c.sft")
    skeleton["root"]["v"]["config"]["cls"] = "os.system"
    out = decode(skeleton, lambda name, device: None)
    assert type(out["config"]) is dict and out["config"]["n_embd"] == 16


def test_unstorable_values_inside_new_kinds_name_their_key_path(tmp_path):
    cases = [
        ({"hp": argparse.Namespace(fn=print)}, "checkpoint['hp']['fn']"),
        ({"hp": {"o": Optim(extra={"cb": object()})}}, "checkpoint['hp']['o']['extra']['cb']"),
        ({"hp": {"a": np.array(["x", "y"])}}, "checkpoint['hp']['a']"),
        ({"hp": {"a": np.array([1 + 1j])}}, "checkpoint['hp']['a']"),  # complex128: not a safetensors dtype
        ({"hp": {"d": np.datetime64("2024-01-01")}}, "checkpoint['hp']['d']"),
        ({"hp": {"cls": Optim}}, "checkpoint['hp']['cls']"),  # a dataclass *class* is a class
    ]
    save_state({"ok": 1}, tmp_path / "x.sft")
    before = (tmp_path / "x.sft").read_bytes()
    for bad, where in cases:
        with pytest.raises(TypeError) as info:
            save_state(bad, tmp_path / "x.sft")
        assert where in str(info.value), (where, str(info.value))
        with pytest.raises(TypeError, match=where.replace("[", r"\[").replace("]", r"\]")):
            check_storable(bad)
    assert (tmp_path / "x.sft").read_bytes() == before


def test_a_namespace_that_contains_itself_is_refused():
    ns = argparse.Namespace()
    ns.me = ns
    with pytest.raises(TypeError, match=r"checkpoint\['hp'\]"):
        encode({"hp": ns})


def test_check_storable_names_the_key_path_under_a_prefix_and_copies_nothing():
    check_storable({"lr": np.float32(0.1), "w": torch.ones(2), "ns": argparse.Namespace(a=1)}, ("hyper_parameters",))
    with pytest.raises(TypeError, match=r"checkpoint\['hyper_parameters'\]\['loss'\]"):
        check_storable({"loss": torch.nn.MSELoss()}, ("hyper_parameters",))
    with pytest.raises(TypeError, match=r"checkpoint\['callbacks'\]\['Cb'\]\[0\]"):
        check_storable([lambda: 0], ("callbacks", "Cb"))


def test_files_without_the_new_kinds_are_version_1_and_version_1_files_still_load(tmp_path):
    """The writer writes the lowest version that has every tag a file uses, so a file an older
    reader can read stays readable by it; this reader reads both versions."""
    save_state({"a": [1, (2,)], "t": torch.ones(1)}, tmp_path / "v1.sft")
    assert _skeleton(tmp_path / "v1.sft")["version"] == 1
    assert FORMAT_VERSION == 2
    # a version-1 skeleton as the 0.2 writer wrote it
    v1 = {"version": 1, "root": {"$": "dict", "v": {"hp": {"$": "attrdict", "v": {"lr": 0.1}}, "p": {"$": "path", "cls": "PurePosixPath", "v": "/d"}}}}  # fmt: skip
    out = decode(v1, lambda name, device: None)
    assert out == {"hp": {"lr": 0.1}, "p": pathlib.PurePosixPath("/d")}
    # a version-2 tag in a version-1 skeleton is refused: a version-1 reader would refuse it too
    with pytest.raises(SkeletonError, match="version 1"):
        decode({"version": 1, "root": {"$": "namespace", "v": {}}}, lambda name, device: None)


def test_crafted_numpy_nodes_are_format_errors(tmp_path):
    save_state({"x": np.float32(1.0), "a": np.arange(2)}, tmp_path / "n.sft")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(tmp_path / "n.sft", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    for bad_node in ({"$": "npscalar", "dtype": "object", "v": 1}, {"$": "npscalar", "dtype": "int8", "v": "x"},
                     {"$": "ndarray", "v": 5}):  # fmt: skip
        skeleton = {"version": 2, "root": {"$": "dict", "v": {"x": bad_node}}}
        save_file(tensors, tmp_path / "bad.sft", metadata={"format": "pt", SKELETON_KEY: json.dumps(skeleton)})
        with pytest.raises(CheckpointFormatError, match="bad.sft"):
            load_state(tmp_path / "bad.sft")


def test_structure_only_loads_show_arrays_without_reading_data(tmp_path):
    save_state({"a": np.zeros((2, 3), np.float32)}, tmp_path / "s.sft")
    out = load_structure(tmp_path / "s.sft")
    assert tuple(out["a"].shape) == (2, 3)


def test_numpy_scalar_json_floats_are_exact(tmp_path):
    vals = [np.float32(1 / 3), np.float16(65504), np.float32(math.pi)]
    save_state(vals, tmp_path / "f.sft")
    out = load_state(tmp_path / "f.sft")
    assert [v.tobytes() for v in out] == [v.tobytes() for v in vals]
