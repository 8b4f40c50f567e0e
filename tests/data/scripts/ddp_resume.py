"""2-rank gloo DDP run for tests/data/test_loader_ddp.py.

Launched once per rank by the test (LOCAL_RANK / MASTER_PORT in the environment, so Lightning
does not re-launch the script and several Trainers can run in the same processes). For each
sampler kind: a full run that checkpoints every step, then resumes from mid-epoch checkpoints.
Each rank writes what it trained on to <out>/<kind>-<phase>-rank<r>.json.

usage: ddp_resume.py OUT_DIR USE_DISTRIBUTED_SAMPLER(0|1) KIND:FORMAT[,KIND:FORMAT...]   (FORMAT: ckpt | sft)
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/: helpers
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loader_harness

from loader_harness import RecordingModel, ckpt_for_step, every_n_steps_checkpoint, make_loader, make_trainer

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

RESUME_STEPS = {"random": [2, 4], "batched": [3], "ordered": [2]}


def run(out: str, kind: str, fmt: str, use_distributed_sampler: bool, ckpt_path=None, phase="full", callbacks=None):
    model = RecordingModel()
    trainer = make_trainer(
        os.path.join(out, "root"),
        max_epochs=2,
        callbacks=callbacks,
        devices=2,
        strategy="ddp",
        use_distributed_sampler=use_distributed_sampler,
        fmt=fmt,
    )
    trainer.fit(model, train_dataloaders=make_loader(kind), ckpt_path=ckpt_path)
    loader = trainer.train_dataloader
    record = {
        "seen": model.seen,
        "loader_type": type(loader).__name__,
        "sampler_type": type(loader.sampler).__name__,
        "world_size": trainer.world_size,
    }
    with open(os.path.join(out, f"{kind}-{phase}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)
    return trainer


def main() -> None:
    out, uds, kinds = sys.argv[1], bool(int(sys.argv[2])), sys.argv[3].split(",")
    for spec in kinds:
        kind, fmt = spec.split(":")
        ckpt_dir = os.path.join(out, f"ckpt-{kind}")
        run(out, kind, fmt, uds, callbacks=[every_n_steps_checkpoint(ckpt_dir, 1, fmt)])
        for step in RESUME_STEPS[kind]:
            run(out, kind, fmt, uds, ckpt_path=ckpt_for_step(ckpt_dir, step, fmt), phase=f"resume{step}")
    # Tear the gloo group down before the interpreter exits: left to exit-time destructors, its
    # worker threads sometimes abort the process ("terminate called without an active exception").
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
