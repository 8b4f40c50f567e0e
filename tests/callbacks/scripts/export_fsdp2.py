"""A 2-rank gloo FSDP2 fit (Lightning's ModelParallelStrategy) of a tiny GPT-2 with ExportWeights (for tests).

Usage: python export_fsdp2.py OUT_DIR

Exports at step 2 (TrainingControl's ``export@2``, and alongside its ``save@2`` checkpoint) and at the end: a Hugging Face directory in
fp32, one in bf16 sharded, and a plain ``.sft``. Then every rank runs the sharded model on a fixed
input; rank 0 saves the logits and the full state dict (``OUT_DIR/reference.pt``) and each rank
its exporters' memory accounting (``OUT_DIR/rank{r}.json``). Last, every rank calls ``export`` of
an exporter whose folder is a file on rank 0: each rank prints ``RANK r RAISED <type>: <message>``,
and a barrier shows the ranks are still in step.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for helpers

from helpers.hf_export_models import HFModule, logits

from lightning_utils.callbacks import ExportWeights, TrainingControl


def trainer(root: Path, callbacks: list, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def memory(exporter: ExportWeights) -> dict:
    m = exporter.last_memory
    assert m is not None
    return {"peak": m.peak_bytes, "largest": m.largest_tensor_bytes, "tensors": m.tensors, "current": dict(m.current)}


def ok(root: Path) -> None:
    control = TrainingControl(
        source=None, signal=None, commands=["export@2", "save@2"], save_on_export=False, save_on_train_end=False
    )
    hf32 = ExportWeights(dirpath=root / "hf32")  # the first ExportWeights: TrainingControl exports with it
    hf16 = ExportWeights(dirpath=root / "hf16", dtype="bf16", max_shard_size=20_000)
    plain = ExportWeights(dirpath=root / "plain", hf_format=False)
    # with the checkpoint TrainingControl saves at step 2, from the checkpoint's (sharded) state dict
    on_save = ExportWeights(
        dirpath=root / "on_save", hf_format=False, export_on_checkpoint=True, export_on_train_end=False
    )
    t = trainer(root, [control, hf32, hf16, plain, on_save], max_steps=3)
    module = HFModule("gpt2", fsdp=True)
    t.fit(module)
    out = logits(module.model)  # collective under FSDP2: every rank runs it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if t.is_global_zero:
        torch.save({"logits": out, "state": full}, root / "reference.pt")
    report = {
        "rank": t.global_rank,
        "hf32": memory(hf32),
        "hf16": memory(hf16),
        "plain": memory(plain),
        "paths": [str(e.last_path) if e.last_path else None for e in (hf32, hf16, plain)],
        "fsdp_class": type(module.model).__name__,
    }
    (root / f"rank{t.global_rank}.json").write_text(json.dumps(report))

    # A failure on rank 0 only (its export folder is a file): every rank raises, none hangs.
    if t.is_global_zero:
        (root / "blocked").write_text("a file where the export folder should be")
    t.strategy.barrier()
    bad = ExportWeights(dirpath=root / "blocked" / "export", hf_format=False)
    try:
        bad.export(t, module)
        print(f"RANK {t.global_rank} DID NOT RAISE", flush=True)
    except Exception as exc:
        print(f"RANK {t.global_rank} RAISED {type(exc).__name__}: {exc}", flush=True)
    t.strategy.barrier()
    print(f"RANK {t.global_rank} IN STEP", flush=True)


if __name__ == "__main__":
    ok(Path(sys.argv[1]))
