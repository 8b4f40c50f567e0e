"""``save_state`` / ``load_state`` / ``save_weights`` (:mod:`lightning_utils.io.state`): the suffix picks
the format, loads are copy-on-write memory maps, plain safetensors files from other tools load, and
errors name the file."""

from __future__ import annotations

import gc
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from lightning_utils.io import checkpoint_format, load_state, save_state, save_weights
from lightning_utils.io import safetensors_file as sft_file
from lightning_utils.io.state import SKELETON_KEY


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


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


def test_header_too_large_error_names_the_file(tmp_path, monkeypatch):
    """An over-limit header (e.g. a long per-step history a callback keeps) raises ValueError
    naming the file, and nothing is written."""
    monkeypatch.setattr(sft_file, "MAX_HEADER_BYTES", 600)
    target = tmp_path / "big-header.sft"
    with pytest.raises(ValueError, match="big-header.sft"):
        save_state({"history": list(range(500))}, target)
    assert _listing(tmp_path) == []


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

    gc.collect()
    assert torch.equal(mid, torch.zeros(10)) and torch.equal(old["w"], w)


def test_mmap_false_gives_private_memory(tmp_path):
    base = torch.ones(8)
    save_state({"w": base, "v": base[2:]}, tmp_path / "m.sft")
    out = load_state(tmp_path / "m.sft", mmap=False)
    out["w"].add_(1)
    assert torch.equal(out["v"], torch.full((6,), 2.0))
    assert torch.equal(load_state(tmp_path / "m.sft")["w"], torch.ones(8))


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


def test_save_model_files_load_with_aliases_retied(tmp_path):
    """A file from ``safetensors.torch.save_model`` with tied weights records the dropped alias in
    its metadata (``{"head.weight": "emb.weight"}``); it loads as the full flat state dict with
    the aliases re-tied."""
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    save_model(model, str(tmp_path / "m.safetensors"))
    out = load_state(tmp_path / "m.safetensors")
    assert set(out) == {"emb.weight", "head.weight"}
    assert out["emb.weight"].untyped_storage().data_ptr() == out["head.weight"].untyped_storage().data_ptr()
    model.load_state_dict(out, strict=True)


def test_flat_weights_with_json_metadata_load_wrapped(tmp_path):
    # An export of one flat tensor dict plus JSON-valued metadata (a config, training stats).
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


def test_save_weights_string_metadata_comes_back_as_strings(tmp_path):
    """``save_weights`` stores str metadata values as they are and lists the keys it JSON-encoded,
    so ``"123"``, ``"null"`` and ``"NaN"`` come back as strings and only encoded values are
    decoded."""
    meta = {"name": "123", "kind": "null", "tag": "NaN", "stats": {"step": 5}}
    save_weights({"w": torch.ones(1)}, tmp_path / "w.sft", metadata=meta)
    out = load_state(tmp_path / "w.sft")
    assert out["name"] == "123" and out["kind"] == "null" and out["tag"] == "NaN"
    assert out["stats"] == {"step": 5}


def test_save_weights_metadata_named_module_does_not_drop_the_tensors(tmp_path):
    """``save_weights(metadata={"module": ...})`` cannot replace the tensors on load: the reserved
    key is refused (or the tensors are kept)."""
    target = tmp_path / "w.sft"
    try:
        save_weights({"w": torch.ones(2)}, target, metadata={"module": "resnet"})
    except (TypeError, ValueError) as exc:  # refusing the reserved key is a fine fix too
        assert "module" in str(exc) and not target.exists()
        return
    out = load_state(target)
    assert isinstance(out["module"], dict) and torch.equal(out["module"]["w"], torch.ones(2))


def test_save_weights_refuses_a_tensor_named_metadata(tmp_path):
    """A tensor named ``__metadata__`` would replace the header's metadata object: save_weights
    refuses it and writes nothing."""
    target = tmp_path / "w.sft"
    with pytest.raises((TypeError, ValueError), match="__metadata__"):
        save_weights({"__metadata__": torch.ones(1)}, target)
    assert not target.exists()
