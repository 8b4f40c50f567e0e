"""FSDP2 runs saving sharded ``.sft`` checkpoints on S3, for tests/strategies/test_remote_sharded_checkpoints.py.

Launched by the test once per rank (LOCAL_RANK / WORLD_SIZE / MASTER_PORT in the environment),
with fsspec's ``s3`` configuration (``FSSPEC_S3``) pointing at the test session's moto server. The
model, data and Trainer settings are those of ``fsdp_run.py`` (a tiny Llama sharded with
``fully_shard`` over the data-parallel mesh, a global batch of 4 sequences). Each fit records its
losses to ``<out>/<phase>-rank<r>.json`` and the byte ranges it read from the bucket to
``<out>/<phase>-reads-rank<r>.json``.

usage: remote_fsdp_run.py OUT RUN PLAN     RUN: an s3:// prefix; PLAN: comma-separated phases

  full         8 steps, a sharded .sft every 3 steps with save_top_k=1 (step=3 removed at step 6;
               last.sft written at 3, rewritten at 6), and an ExportWeights Hugging Face export
               to RUN/export at the end
  resume       fit(ckpt_path="last") from RUN: resumes from last.sft (step 6), to step 8 (where
               save_last writes last.sft once more)
  resume_url   (1 rank) fit(ckpt_path="RUN/step=6.sft"): the 2-rank checkpoint resharded, to step 8
  fail         a sharded .sft every 2 steps; rank 1 raises while uploading its step-4 file
"""

import json
import logging
import os
import sys
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fsdp_run

import lightning_utils.io.remote as remote
from lightning_utils.callbacks import ExportWeights, SafetensorsModelCheckpoint
from lightning_utils.plugins import SafetensorsCheckpointIO
from lightning_utils.strategies import ModelParallelStrategy

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
READS: list[tuple[str, int, int]] = []  # (url, offset, bytes) of every ranged read


def record_reads() -> None:
    read_into, read_range = remote.read_into, remote.read_range

    def logged_read_into(url, pieces, *args, **kwargs):
        READS.extend((url, offset, len(buf)) for offset, buf in pieces)
        return read_into(url, pieces, *args, **kwargs)

    def logged_read_range(url, start, end, *args, **kwargs):
        READS.append((url, start, end - start))
        return read_range(url, start, end, *args, **kwargs)

    remote.read_into, remote.read_range = logged_read_into, logged_read_range


def fit(out, phase, run, ckpt_path=None, every=3, top_k=1, export=False):
    READS.clear()
    callbacks = [
        SafetensorsModelCheckpoint(
            dirpath=run, filename="{step}", every_n_train_steps=every, save_top_k=top_k, save_last=True
        )
    ]
    if export:
        callbacks.append(ExportWeights(dirpath=f"{run}/export", filename="hf-{step}", dtype="bf16"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1),
        plugins=[SafetensorsCheckpointIO()],
        max_steps=fsdp_run.STEPS,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    model = fsdp_run.TinyLM()
    trainer.fit(model, fsdp_run.loader(WORLD_SIZE), ckpt_path=ckpt_path)
    rank = trainer.global_rank
    with open(os.path.join(out, f"{phase}-rank{rank}.json"), "w") as f:
        json.dump({"losses": model.losses, "ckpt_path": trainer.ckpt_path}, f)
    with open(os.path.join(out, f"{phase}-reads-rank{rank}.json"), "w") as f:
        json.dump(READS, f)


def network_gone() -> None:
    raise OSError("the network went away while rank 1 was uploading")


def main() -> None:
    out, run, plan = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    record_reads()
    for phase in plan:
        if phase == "full":
            fit(out, phase, run, export=True)
        elif phase == "resume":
            fit(out, phase, run, ckpt_path="last")
        elif phase == "resume_url":
            fit(out, phase, run, ckpt_path=f"{run}/step=6.sft")
        elif phase == "fail":
            fsdp_run.fail_rank_1_at_step_4(network_gone)
            fit(out, phase, run, every=2, top_k=-1)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
    fsdp_run.end_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
