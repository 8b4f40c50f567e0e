"""FSDP2 runs (Lightning's Trainer, gloo on CPU) for tests/strategies/test_sharded_checkpoints.py.

Launched by the test once per rank (LOCAL_RANK / WORLD_SIZE / MASTER_PORT in the environment, so
Lightning does not re-launch the script and each process runs several Trainers in turn). Every
fit trains a tiny Llama (transformers, built from a config) sharded with ``fully_shard`` over the
data-parallel mesh, on a ``ResumableDataLoader``, with a global batch of 4 sequences, and
records its losses to ``<out>/<phase>-rank<r>.json``.

usage: fsdp_run.py OUT PLAN        PLAN: a comma-separated list of the phases below

  full            8 steps, a sharded .sft at step 5 (mid-epoch) and last.sft
  resume          from full's step=5.sft, to step 8
  async           8 steps with AsyncCheckpointIO, a sharded .sft at step 5; then resumed to 8
  consolidated    save_distributed_checkpoint=False: one .sft at step 5; then resumed to 8
  lightning_ckpt  .ckpt paths are Lightning's own code: a DCP directory, then a consolidated .ckpt
                  (save_distributed_checkpoint=False), each at step 5 and resumed to 8
  resume_from_2   (1 or 2 ranks) from <out>/two/step=5.sft (written by 2 ranks), to step 8
  consolidated_from_2  (1 rank) from consolidated's <out>/consolidated/step=5.sft (one file
                  written by 2 ranks' save), to step 8
  save_1          (1 rank) 16 steps, a sharded .sft at step 12 (the end of epoch 0) in <out>/one
  resume_from_1   (2 ranks) from <out>/one/step=12.sft, to step 16
  apollo          full and resume with ApolloMini (projection refreshed every 2 steps) instead of AdamW
  apollo_resume_from_2  (1 rank) from apollo's 2-rank step=5.sft, to step 8
  kill            a sharded .sft at steps 2 and 4; rank 1 is SIGKILLed while writing step 4
"""

import json
import logging
import os
import signal
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_utils.io.sharded.writer as sharded_writer
from lightning_utils.callbacks import SafetensorsModelCheckpoint
from lightning_utils.data import ResumableDataLoader
from lightning_utils.data.samplers import RandomSampler
from lightning_utils.plugins import AsyncCheckpointIO, SafetensorsCheckpointIO
from lightning_utils.strategies import ModelParallelStrategy

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

GLOBAL_BATCH = 4
STEPS = 8
SAVE_AT = 5
EPOCH_STEPS = 12  # 48 sequences, 4 per step
# Read once: Lightning's teardown removes WORLD_SIZE from the environment after each fit.
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))


class TinyLM(pl.LightningModule):
    def __init__(self, lr: float = 0.01, optimizer: str = "adamw") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        self.lm = LlamaForCausalLM(config)
        self.losses: list[tuple[int, str]] = []

    def configure_model(self) -> None:
        if self.device_mesh is None:  # loaded outside a Trainer (load_from_checkpoint): nothing to shard
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.lm, mesh=mesh)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.lm(input_ids=batch, labels=batch).loss
        self.losses.append((self.global_step + 1, float(loss.detach()).hex()))
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "apollo_mini":
            from lightning_utils.optim import ApolloMini, apollo_param_groups

            groups = apollo_param_groups(self, include=["lm.model.layers.*"], exclude=["*norm*"])
            opt = ApolloMini(groups, lr=self.hparams.lr, weight_decay=0.1, update_proj_gap=2)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(world_size: int) -> ResumableDataLoader:
    data = torch.randint(0, 64, (48, 12), generator=torch.Generator().manual_seed(1))
    return ResumableDataLoader(data, batch_size=GLOBAL_BATCH // world_size, sampler=RandomSampler(len(data), seed=0))


def fit(
    out,
    phase,
    ckpt_dir=None,
    ckpt_path=None,
    every=SAVE_AT,
    async_io=False,
    distributed=True,
    top_k=-1,
    steps=STEPS,
    checkpoint_class=SafetensorsModelCheckpoint,
    optimizer="adamw",
):
    world_size = WORLD_SIZE
    io = SafetensorsCheckpointIO()
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(
            checkpoint_class(
                dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every, save_top_k=top_k, save_last=True
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=ModelParallelStrategy(
            data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=distributed
        ),
        plugins=[AsyncCheckpointIO(io) if async_io else io],
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    model = TinyLM(optimizer=optimizer)
    trainer.fit(model, loader(world_size), ckpt_path=ckpt_path)
    with open(os.path.join(out, f"{phase}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"losses": model.losses, "world_size": world_size}, f)
    return trainer


def fail_rank_1_at_step_4(fail) -> None:
    """Rank 1 writes part of its step-4 shard file, then calls ``fail()`` (which must not return)."""
    original = sharded_writer.write_entries

    def write_entries(f, specs, metadata):
        if int(os.environ["LOCAL_RANK"]) == 1 and any("step=4" in str(p) for p in _saving):
            f.write(b"partial")
            fail()
        original(f, specs, metadata)

    _saving: list[str] = []
    save = sharded_writer.save_sharded

    def save_sharded(obj, path, comm=None):
        _saving[:] = [str(path)]
        return save(obj, path, comm)

    sharded_writer.write_entries = write_entries
    import lightning_utils.plugins.checkpoint_io as plugin

    plugin.save_sharded = save_sharded


def kill_rank_1_at_step_4() -> None:
    """Rank 1 writes part of its step-4 shard file and is then SIGKILLed."""
    fail_rank_1_at_step_4(lambda: os.kill(os.getpid(), signal.SIGKILL))


def main() -> None:
    out, plan = sys.argv[1], sys.argv[2].split(",")
    two, one = os.path.join(out, "two"), os.path.join(out, "one")
    for phase in plan:
        if phase == "full":
            fit(out, phase, ckpt_dir=two)
        elif phase == "resume":
            fit(out, phase, ckpt_path=os.path.join(two, "step=5.sft"))
        elif phase == "async":
            fit(out, phase, ckpt_dir=os.path.join(out, "async"), async_io=True)
            fit(out, "async_resume", ckpt_path=os.path.join(out, "async", "step=5.sft"), async_io=True)
        elif phase == "consolidated":
            fit(out, phase, ckpt_dir=os.path.join(out, "consolidated"), distributed=False)
            fit(out, "consolidated_resume", ckpt_path=os.path.join(out, "consolidated", "step=5.sft"))
        elif phase == "lightning_ckpt":
            for distributed in (True, False):
                name = "dcp" if distributed else "dcp_full"
                ckpt_dir = os.path.join(out, name)
                fit(out, name, ckpt_dir=ckpt_dir, distributed=distributed, checkpoint_class=ModelCheckpoint)
                fit(out, f"{name}_resume", ckpt_path=os.path.join(ckpt_dir, "step=5.ckpt"), distributed=distributed)
        elif phase == "resume_from_2":
            fit(out, phase, ckpt_path=os.path.join(two, "step=5.sft"))
        elif phase == "consolidated_from_2":
            fit(out, phase, ckpt_path=os.path.join(out, "consolidated", "step=5.sft"))
        elif phase == "save_1":
            fit(out, phase, ckpt_dir=one, every=EPOCH_STEPS, steps=EPOCH_STEPS + 4)
        elif phase == "resume_from_1":
            fit(out, phase, ckpt_path=os.path.join(one, f"step={EPOCH_STEPS}.sft"), steps=EPOCH_STEPS + 4)
        elif phase == "apollo":
            fit(out, "apollo_full", ckpt_dir=os.path.join(out, "apollo"), optimizer="apollo_mini")
            fit(out, "apollo_resume", ckpt_path=os.path.join(out, "apollo", "step=5.sft"), optimizer="apollo_mini")
        elif phase == "apollo_resume_from_2":
            fit(out, phase, ckpt_path=os.path.join(out, "apollo", "step=5.sft"), optimizer="apollo_mini")
        elif phase == "kill":
            kill_rank_1_at_step_4()
            fit(out, phase, ckpt_dir=os.path.join(out, "kill"), every=2, top_k=1)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
    end_process_group()


def end_process_group() -> None:
    """Leave together: every rank waits for the others, then closes the group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
