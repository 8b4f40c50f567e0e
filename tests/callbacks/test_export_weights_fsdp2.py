"""ExportWeights under FSDP2 (Lightning's ModelParallelStrategy) on 2 gloo ranks: unsharded weights, one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.hf_export_models import logits
from helpers.ranks import run_launcher
from safetensors.torch import load_file

pytestmark = pytest.mark.ddp

SCRIPT = Path(__file__).parent / "scripts" / "export_fsdp2.py"
ROOT = Path(__file__).resolve().parents[2]


def run_fsdp2(out: Path) -> str:
    proc = run_launcher([str(SCRIPT), str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_fsdp2_exports_unsharded_weights_one_tensor_at_a_time(tmp_path):
    from transformers import AutoModelForCausalLM

    output = run_fsdp2(tmp_path)
    reference = torch.load(tmp_path / "reference.pt")
    state = reference["state"]  # the full state dict, gathered by torch for the comparison
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["fsdp_class"] == "FSDPGPT2LMHeadModel"  # the model really was sharded

    # plain .sft: every tensor of the LightningModule, unsharded, exactly as trained
    plain = load_file(tmp_path / "plain" / "weights-step=3.sft")
    assert plain.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(plain[name], value), name

    # Hugging Face directory, fp32: loads with from_pretrained and computes what the sharded model computes
    hf32 = tmp_path / "hf32" / "weights-step=3"
    assert json.loads((hf32 / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    model = AutoModelForCausalLM.from_pretrained(hf32)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[f"model.{name}"]), name
    torch.testing.assert_close(logits(model), reference["logits"], atol=1e-5, rtol=1e-5)
    assert "lm_head.weight" not in load_file(hf32 / "model.safetensors")  # tied: written once
    # TrainingControl's `export@2` went through the same exporter on both ranks
    step2 = load_file(tmp_path / "hf32" / "weights-step=2" / "model.safetensors")
    # and export_on_checkpoint exported the same step from the checkpoint's sharded state dict
    on_save = load_file(tmp_path / "on_save" / "weights-step=2.sft")
    assert on_save.keys() == state.keys()
    for name, value in step2.items():
        assert torch.equal(on_save[f"model.{name}"], value), name

    # bf16, sharded as save_pretrained shards
    hf16 = tmp_path / "hf16" / "weights-step=3"
    index = json.loads((hf16 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((hf16 / s).is_file() for s in shards)
    model16 = AutoModelForCausalLM.from_pretrained(hf16)
    assert model16.dtype == torch.bfloat16
    for name, value in model16.named_parameters():
        assert torch.equal(value, state[f"model.{name}"].to(torch.bfloat16)), name
    torch.testing.assert_close(logits(model16), reference["logits"], atol=0.1, rtol=0.05)
    exports = [p for d in ("hf32", "hf16", "plain", "on_save") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert {p.suffix for p in exports} == {".json", ".safetensors", ".sft"}  # no pickle anywhere

    # memory: on every rank, never more than one tensor extra; rank 1 only ever sends its shards
    for report in reports:
        for which in ("hf32", "hf16", "plain"):
            m = report[which]
            assert m["peak"] <= m["largest"], (report["rank"], which, m)
            assert all(v == 0 for v in m["current"].values()), m  # all freed
    total = sum(v.numel() * 4 for v in state.values())
    assert reports[0]["plain"]["largest"] < total / 4  # one tensor is far from the whole model
    assert reports[0]["plain"]["peak"] > 0 and reports[0]["plain"]["tensors"] == len(state)
    assert reports[1]["plain"]["peak"] == 0  # fp32 shards go out as they are: no copy at all
    assert reports[1]["hf16"]["peak"] <= reports[1]["hf16"]["largest"] // 2  # a bf16 copy of one shard

    # a failure on rank 0 only ends the export on both ranks with that error, and they stay in step
    assert "RANK 0 RAISED NotADirectoryError" in output, output[-3000:]
    assert "RANK 1 RAISED OtherRankOSError: rank 0: NotADirectoryError" in output, output[-3000:]
    assert "RANK 0 IN STEP" in output and "RANK 1 IN STEP" in output
