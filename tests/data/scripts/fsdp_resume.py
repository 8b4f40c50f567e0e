"""2-rank gloo ModelParallelStrategy runs for tests/data/test_fsdp_loader.py.

Launched once per rank by the test (LOCAL_RANK / MASTER_PORT in the environment, so Lightning
does not re-launch the script and several Trainers run in the same two processes). For each
layout (``dp2``: FSDP2 over 2 data-parallel ranks; ``tp2``: 1 data-parallel rank x 2
tensor-parallel ranks), with a ResumableDataLoader built before the strategy exists: a full
2-epoch run checkpointing every 3 steps, then a run resumed from the mid-epoch checkpoint of
step 3. Each rank writes what it trained on to <out>/<layout>-<phase>-rank<r>.json.

usage: fsdp_resume.py OUT_DIR LAYOUT[,LAYOUT...]
"""

import json
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/: helpers
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loader_harness

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from loader_harness import RecordingModel, make_loader, make_trainer

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

LAYOUTS = {"dp2": (2, 1), "tp2": (1, 2)}  # (data_parallel_size, tensor_parallel_size)


class ShardedModel(RecordingModel):
    """RecordingModel's loss on a 1 -> 8 -> 1 MLP, sharded in ``configure_model``: FSDP2 over the
    data-parallel mesh, or column/row tensor parallelism over the tensor-parallel mesh."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        with torch.no_grad():
            for i, p in enumerate(self.net.parameters()):
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p) * (i + 1))
        del self.layer

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        else:
            from torch.distributed.fsdp import fully_shard

            for module in self.net:
                if isinstance(module, torch.nn.Linear):
                    fully_shard(module, mesh=mesh["data_parallel"])
            fully_shard(self.net, mesh=mesh["data_parallel"])

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.tolist())
        loss = self.net(batch.float().view(-1, 1) / 10).pow(2).mean()
        self.losses.append(float(loss.detach()))
        return loss


def run(out: str, layout: str, phase: str, ckpt_path: str | None = None, callbacks=None) -> None:
    dp, tp = LAYOUTS[layout]
    loader = make_loader("random")  # built before the strategy (and its device mesh) exists
    model = ShardedModel()
    trainer = make_trainer(
        os.path.join(out, "root"),
        max_epochs=2,
        callbacks=callbacks,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp),
    )
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    record = {
        "seen": model.seen,
        "losses": model.losses,
        "sampler_kwargs": trainer.distributed_sampler_kwargs,
        "shard": [loader.sampler.num_replicas, loader.sampler.rank],
        "len": len(loader),
    }
    with open(os.path.join(out, f"{layout}-{phase}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


def main() -> None:
    out, layouts = sys.argv[1], sys.argv[2].split(",")
    for layout in layouts:
        ckpt_dir = os.path.join(out, f"ckpt-{layout}")
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}", save_on_train_epoch_end=False
        )
        run(out, layout, "full", callbacks=[checkpoint])
        run(out, layout, "resume3", ckpt_path=os.path.join(ckpt_dir, "step=3.ckpt"))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
