"""One rank of a 4-rank gloo run of sharded saves of real ``DTensor``s (started by test_sharded_placements.py).

usage: LOCAL_RANK=r WORLD_SIZE=4 MASTER_ADDR=... MASTER_PORT=... python sharded_placements_script.py OUT

On a 2 x 2 mesh: HSDP (``Replicate(), Shard(0)``) and FSDP x TP on another dimension
(``Shard(0), Shard(1)``) save with ``save_sharded`` and ``save_consolidated``, load whole, and
load back into ``DTensor``s of other placements (each rank reading its own slice); FSDP x TP on
the same dimension (``_StridedShard``) and ``Partial`` are refused on every rank, naming the
tensor's key path, before anything is written. Each rank writes what it saw to
``OUT/rank<r>.json``; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.distributed.tensor.placement_types import _StridedShard

from lightning_utils.io import load_state
from lightning_utils.io.sharded import (
    INDEX_NAME,
    ProcessGroupComm,
    ShardedCheckpoint,
    fill,
    save_consolidated,
    save_sharded,
)

RANK, WORLD = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hsdp_w": torch.randn(8, 4, generator=g),
        "hsdp_b": torch.randn(5, generator=g),  # uneven: blocks of 3 and 2 rows
        "tp_w": torch.randn(6, 4, generator=g),  # FSDP on rows x TP on columns
        "moment": torch.randn(8, 4, generator=g).to(torch.bfloat16),
    }


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    full = full_tensors()
    hsdp, tp = [Replicate(), Shard(0)], [Shard(0), Shard(1)]

    def state(placements: dict[str, list]) -> dict:
        t = {k: distribute_tensor(v, mesh, placements[k], src_data_rank=None) for k, v in full.items()}
        return {
            "state_dict": {"layer.weight": t["hsdp_w"], "layer.bias": t["hsdp_b"], "tp.weight": t["tp_w"]},
            "optimizer_states": [{"state": {"layer.weight": {"exp_avg": t["moment"], "step": torch.tensor(3.0)}}}],
            "global_step": 3,
        }

    saved_placements = {"hsdp_w": hsdp, "hsdp_b": hsdp, "tp_w": tp, "moment": hsdp}
    report: dict = {"rank": RANK, "coordinate": mesh.get_coordinate()}

    # HSDP and FSDP x TP: a sharded directory and a consolidated file, both loading whole
    directory, single = out / "hsdp.sft", out / "hsdp-one.sft"
    save_sharded(state(saved_placements), directory, ProcessGroupComm())
    save_consolidated(state(saved_placements), single, ProcessGroupComm())
    for name, path in (("sharded", directory), ("consolidated", single)):
        whole = load_state(path)
        report[f"{name}_whole_equal"] = {
            "hsdp_w": torch.equal(whole["state_dict"]["layer.weight"], full["hsdp_w"]),
            "hsdp_b": torch.equal(whole["state_dict"]["layer.bias"], full["hsdp_b"]),
            "tp_w": torch.equal(whole["state_dict"]["tp.weight"], full["tp_w"]),
            "moment": torch.equal(whole["optimizer_states"][0]["state"]["layer.weight"]["exp_avg"], full["moment"]),
        }
    if RANK == 0:
        index = json.loads((directory / INDEX_NAME).read_text())
        report["chunks"] = {k: v["chunks"] for k, v in index["tensors"].items()}
        report["files"] = sorted(p.name for p in directory.iterdir())

    # loaded back into DTensors: the saved placements, then others (a 1-D mesh of 4, rows; HSDP
    # on the TP weight), each rank filling only its own block from the memory-mapped files
    flat = init_device_mesh("cpu", (WORLD,))
    loaded: dict[str, bool] = {}
    for label, targets in (
        ("same", {k: distribute_tensor(torch.zeros_like(v), mesh, saved_placements[k]) for k, v in full.items()}),
        (
            "other",
            {
                "hsdp_w": distribute_tensor(torch.zeros(8, 4), flat, [Shard(0)]),
                "hsdp_b": distribute_tensor(torch.zeros(5), flat, [Replicate()]),
                "tp_w": distribute_tensor(torch.zeros(6, 4), mesh, hsdp),
                "moment": distribute_tensor(torch.zeros(8, 4, dtype=torch.bfloat16), mesh, [Shard(1), Shard(0)]),
            },
        ),
    ):
        with ShardedCheckpoint(directory) as source:
            lazy = source.load_lazy()
            saved = {
                "hsdp_w": lazy["state_dict"]["layer.weight"],
                "hsdp_b": lazy["state_dict"]["layer.bias"],
                "tp_w": lazy["state_dict"]["tp.weight"],
                "moment": lazy["optimizer_states"][0]["state"]["layer.weight"]["exp_avg"],
            }
            for key, target in targets.items():
                fill(target, saved[key], source, where=key)
        for key, target in targets.items():
            expected = distribute_tensor(full[key], target.device_mesh, target.placements, src_data_rank=None)
            loaded[f"{label}:{key}"] = torch.equal(target.to_local(), expected.to_local())
    report["loaded"] = loaded

    # refused placements: every rank raises, naming the key path, and nothing is written
    strided_local = distribute_tensor(torch.randn(8, 4), mesh, [Replicate(), Shard(0)]).to_local()
    refused = {
        # FSDP x TP on the same dimension: what fully_shard over a TP-sharded parameter makes
        "strided": DTensor.from_local(
            strided_local,
            mesh,
            [_StridedShard(0, split_factor=2), Shard(0)],
            run_check=False,
            shape=torch.Size([8, 4]),
            stride=(4, 1),
        ),
        "partial": DTensor.from_local(torch.ones(2, 3), mesh, [Replicate(), Partial()]),
    }
    errors: dict[str, str] = {}
    for kind, tensor in refused.items():
        target = out / f"refused-{kind}.sft"
        bad = state(saved_placements)
        bad["optimizer_states"][0]["state"]["layer.weight"]["exp_avg_sq"] = tensor
        for save in (save_sharded, save_consolidated):
            try:
                save(bad, target, ProcessGroupComm())
            except ValueError as exc:
                errors[f"{kind}:{save.__name__}"] = str(exc)
            else:
                errors[f"{kind}:{save.__name__}"] = "no error"
    report["errors"] = errors
    dist.barrier()
    report["names_after_refusals"] = sorted(p.name for p in out.iterdir() if not p.name.startswith("rank"))

    (out / f"rank{RANK}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
