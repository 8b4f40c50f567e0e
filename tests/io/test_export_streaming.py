"""The export building blocks in one process: streaming safetensors writer, staged directories,
metadata encoding, Hugging Face names and shards from meta tensors, and RankZeroGather without ranks."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_utils.io import hf_export, load_state
from lightning_utils.io.atomic import TEMP_PREFIX
from lightning_utils.io.gather import MemoryTracker, RankZeroGather
from lightning_utils.io.weights import (
    TensorSpec,
    encode_metadata,
    file_order,
    staged_directory,
    stream_safetensors,
)


def spec(name, t):
    return TensorSpec(name, t.dtype, tuple(t.shape))


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "h": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f": torch.randn(4, generator=g),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "b": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 7),
        "t": torch.randn(4, 6, generator=g).t(),  # not contiguous: the writer copies it
    }


def test_streamed_file_is_a_plain_safetensors_file(tmp_path):
    data = tensors()
    specs = file_order([spec(k, v) for k, v in data.items()])
    assert [s.name for s in specs][:2] == ["i", "scalar"]  # 8-byte dtypes first: every entry aligned
    path = tmp_path / "w.safetensors"
    with stream_safetensors(path, specs, encode_metadata({"step": 3, "note": "hi"})) as writer:
        for s in specs:
            assert writer.expected == s
            writer.write(s.name, data[s.name])
    loaded = load_file(path)
    assert loaded.keys() == data.keys()
    for k, v in data.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["note"] == "hi"
    state = load_state(path)  # decoded by lightning_utils exactly as save_weights' files are
    assert state["step"] == 3 and state["note"] == "hi" and torch.equal(state["module"]["i"], data["i"])


def test_streamed_file_refuses_wrong_tensors_and_leaves_nothing_behind(tmp_path):
    data = tensors()
    specs = file_order([spec(k, v) for k, v in data.items()])
    path = tmp_path / "w.sft"
    path.write_bytes(b"previous export")
    with pytest.raises(ValueError, match="out of order: expected 'i'"), stream_safetensors(path, specs) as w:
        w.write("f", data["f"])
    wrong_dtype = r"tensor 'i': got torch.int32 \(2, 3\), the header says torch.int64"
    with pytest.raises(ValueError, match=wrong_dtype), stream_safetensors(path, specs) as w:
        w.write("i", data["i"].int())
    with pytest.raises(ValueError, match="never written, first 'scalar'"), stream_safetensors(path, specs) as w:
        w.write("i", data["i"])
    with pytest.raises(ValueError, match="appears twice"), stream_safetensors(path, specs + specs[:1]):
        pass
    assert path.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["w.sft"]


def test_encode_metadata_reserved_keys():
    with pytest.raises(ValueError, match="'module' is reserved"):
        encode_metadata({"module": "x"})
    assert encode_metadata({"format": "pt", "gone": None}) == {"format": "pt"}


def test_staged_directory_replaces_whole_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "export"
    with staged_directory(target) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(TEMP_PREFIX) and not target.exists()
        (stage / "a.json").write_text("1")
        (stage / "stale.txt").write_text("old")
    assert sorted(os.listdir(target)) == ["a.json", "stale.txt"]
    with staged_directory(target) as stage:
        (stage / "a.json").write_text("2")
    assert sorted(os.listdir(target)) == ["a.json"] and (target / "a.json").read_text() == "2"

    def fail_midway():
        with staged_directory(target) as stage:
            (stage / "a.json").write_text("3")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    assert (target / "a.json").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging left
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"), staged_directory(tmp_path / "file"):
        pass


# -- Hugging Face names, from meta tensors -----------------------------------------------------
def tiny(arch):
    from helpers.hf_export_models import tiny_model

    if arch != "t5":
        return tiny_model(arch)
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def specs_of(model):
    return [spec(k, v) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_hf_names_are_those_save_pretrained_writes(tmp_path, arch):
    model = tiny(arch)
    names = hf_export.hf_weight_names(model, specs_of(model))
    model.save_pretrained(tmp_path)
    written = set(load_file(tmp_path / "model.safetensors"))
    assert set(names.values()) == written
    assert all(k == v for k, v in names.items())  # these models keep their own names
    if arch == "gpt2":
        assert "lm_head.weight" not in names
    # the fallback for transformers releases without remove_tied_weights_from_state_dict agrees
    meta = {s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs_of(model)}
    assert set(hf_export._drop_tied_fallback(model, meta)) == set(hf_export._drop_tied(model, meta))


def test_outermost_pretrained_models_and_their_class_names():
    model = tiny("gpt2")
    wrapper = torch.nn.ModuleDict({"lm": model, "head": torch.nn.Linear(2, 2)})
    assert hf_export.pretrained_models(wrapper) == [("lm", model)]  # not lm.transformer (a GPT2Model)
    assert hf_export.pretrained_models(model) == [("", model)]
    assert hf_export.pretrained_models(torch.nn.Linear(2, 2)) == []
    assert hf_export.architecture_name(model) == "GPT2LMHeadModel"


def test_shard_layout_and_sizes():
    model = tiny("llama")
    specs = specs_of(model)
    files, index = hf_export.shard_layout(specs, None)
    assert files == [("model.safetensors", [s.name for s in specs])] and index is None
    files, index = hf_export.shard_layout(specs, 10_000)
    n = len(files)
    assert n > 1 and [name for name, _ in files] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert {n for _, names in files for n in names} == set(index["weight_map"])
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        hf_export.check_shard_size("lots")
    with pytest.raises(ValueError, match="positive"):
        hf_export.check_shard_size(0)
    with pytest.raises(TypeError, match="max_shard_size"):
        hf_export.check_shard_size(1.5)


# -- RankZeroGather without a process group ------------------------------------------------------
def test_gather_in_one_process_casts_one_tensor_at_a_time():
    data = {"a": torch.randn(8, 8), "b": torch.randn(16, 8), "n": torch.arange(4)}
    tracker = MemoryTracker()
    gather = RankZeroGather(list(data.items()), tracker=tracker)

    def choose(available):
        out = [
            (n, TensorSpec(n, torch.bfloat16 if i.dtype.is_floating_point else i.dtype, i.shape))
            for n, i in available.items()
        ]
        return out, len(out)

    entries, extra = gather.plan(choose)
    assert extra == 3 and [e.name for e in entries] == ["a", "b", "n"]
    got = {}
    with gather.outcome() as outcome:
        gather.stream(entries, lambda e, t: got.__setitem__(e.name, t.clone()), outcome)
    assert got["b"].dtype == torch.bfloat16 and torch.equal(got["b"], data["b"].to(torch.bfloat16))
    assert torch.equal(got["n"], data["n"])
    assert tracker.peak_bytes == tracker.largest_tensor_bytes == 16 * 8 * 2  # one bf16 copy at a time
    assert tracker.current["cpu"] == 0

    def full_disk(entry, tensor):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"), gather.outcome() as outcome:
        gather.stream(entries, full_disk, outcome)
