"""Apollo on DTensor parameters of every supported placement vs the same run on plain tensors.

Usage: python fsdp_placements.py OUT_DIR WORLD_SIZE

Forks WORLD_SIZE gloo ranks (CPU) with torch.multiprocessing; an exception on any rank ends
every rank and exits non-zero. Each case distributes the same parameters and, each step, the
same gradients, runs 8 steps with ``update_proj_gap=3`` and compares the gathered parameters
and optimizer moments with the plain run every rank also makes. Rank 0 writes
``OUT_DIR/results.pt``: per case, the relative errors and facts about the state (placements,
local shapes, bytes), for the test to assert on.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.distributed.tensor.placement_types import _StridedShard

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout under test

from lightning_utils.optim import Apollo, ApolloMini, apollo_param_groups

STEPS = 8
SHAPES = {
    "right": (12, 5),  # m >= n: right projection, rows stay local
    "left": (5, 12),  # left projection: rows are summed; 3/2 rows on two ranks
    "one": (1, 8),  # one row: an empty shard on rank 1
    "square": (6, 6),
    "conv": (6, 2, 3),  # treated as (6, 6)
    "bias": (7,),  # AdamW
}


def rows_only(shape: tuple[int, ...], mesh_ndim: int) -> list[Any]:
    return [Shard(0)] * mesh_ndim


def make_module(placements: Callable[[tuple[int, ...]], list[Any]] | None, mesh: Any) -> nn.Module:
    module = nn.Module()
    gen = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        full = torch.randn(shape, generator=gen)
        if placements is not None:
            full = distribute_tensor(full, mesh, placements(shape), src_data_rank=None)
        module.register_parameter(name, nn.Parameter(full))
    return module


def set_grads(module: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in module.parameters():
        grad = torch.randn(p.shape, generator=gen)
        if isinstance(p, DTensor):
            grad = distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = grad


def optimizer(kind: str, module: nn.Module) -> torch.optim.Optimizer:
    groups = apollo_param_groups(module, include=["*"], exclude=["bias"])
    if kind == "mini":
        return ApolloMini(groups, lr=1e-2, update_proj_gap=3, weight_decay=0.01)
    options: dict[str, Any] = {"lr": 1e-2, "rank": 3, "update_proj_gap": 3, "weight_decay": 0.01}
    if kind == "reverse":
        options["proj_type"] = "reverse_std"
    if kind == "tensor":
        options["scale_type"] = "tensor"
    return Apollo(groups, **options)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def full(t: Any) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def recorded_collectives() -> Iterator[list[tuple[str, int]]]:
    """Records ``(name, elements sent)`` of every torch.distributed collective called inside."""
    calls: list[tuple[str, int]] = []
    names = [
        name
        for name in ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter", "all_gather")
        + ("all_gather_single", "all_gather_into_tensor", "all_gather_object", "broadcast", "all_to_all_single")
        if hasattr(dist, name)
    ]
    originals = {name: getattr(dist, name) for name in names}

    def wrap(name: str) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, list) else [a])]
            sent = tensors[1] if name.startswith("reduce_scatter") else tensors[0]
            calls.append((name, sent.numel() if torch.is_tensor(sent) else -1))
            return originals[name](*args, **kwargs)

        return recorded

    for name in names:
        setattr(dist, name, wrap(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def run_case(mesh_shape: tuple[int, ...], placements: Any, kind: str) -> dict[str, Any]:
    names = ("replicate", "shard")[-len(mesh_shape) :] if len(mesh_shape) > 1 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    plain = make_module(None, mesh)
    sharded = make_module(placements, mesh)
    plain_opt, sharded_opt = optimizer(kind, plain), optimizer(kind, sharded)
    for step in range(STEPS):
        for module, opt in ((plain, plain_opt), (sharded, sharded_opt)):
            set_grads(module, step)
            if module is sharded and step == STEPS - 1:
                with recorded_collectives() as calls:
                    opt.step()
            else:
                opt.step()
    result: dict[str, Any] = {"params": {}, "moments": {}, "placements": {}, "local": {}, "collectives": calls}
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
        result["params"][name] = rel(full(p.detach()), q.detach())
        state, reference = sharded_opt.state[p], plain_opt.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            result["moments"][f"{name}.{key}"] = rel(full(state[key]), reference[key])
        value = state["exp_avg"]
        result["placements"][name] = (
            tuple(value.placements) if isinstance(value, DTensor) else None,
            tuple(value.shape),
        )
        result["local"][name] = tuple(value.to_local().shape) if isinstance(value, DTensor) else None
        scaling = state.get("scaling_grad")
        if scaling is not None:
            assert not isinstance(scaling, DTensor)
            gathered = [torch.empty_like(scaling) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, scaling)
            assert all(torch.equal(g, scaling) for g in gathered), "scaling_grad differs across ranks"
            result["moments"][f"{name}.scaling_grad"] = rel(scaling, reference["scaling_grad"])
    result["state_bytes"] = {
        name: sum(local_bytes(v) for v in sharded_opt.state[p].values() if torch.is_tensor(v))
        for name, p in sharded.named_parameters()
    }
    return result


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def roundtrip(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Through torch.save and torch.load(weights_only=True), as a checkpoint file would be: the
    loaded tensors are not the saved optimizer's (optimizers update their state in place)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def checkpoint_checks(rank: int, tmp: Path) -> dict[str, Any]:
    """State dicts: weights_only torch.load, DCP save/load resumes bit-exactly, and an unsharded
    state loaded into the sharded optimizer continues like the unsharded one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        module = make_module(lambda shape: rows_only(shape, 1), mesh)
        return module, optimizer("apollo", module)

    def steps(module: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
        for step in range(start, stop):
            set_grads(module, step)
            opt.step()

    module, opt = build()
    steps(module, opt, 0, 4)
    out["weights_only"] = sorted(roundtrip(opt.state_dict())["state"][0])

    # Lightning's ModelParallelStrategy path: get_optimizer_state_dict -> DCP save, and on
    # resume get_optimizer_state_dict (on a fresh optimizer) -> DCP load -> set_optimizer_state_dict
    dcp.save({"optimizer": get_optimizer_state_dict(module, opt)}, checkpoint_id=tmp / "dcp")
    # save_distributed_checkpoint=False: the gathered state on rank 0, broadcast on load
    full_options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
    gathered_state = roundtrip(get_optimizer_state_dict(module, opt, options=full_options))
    at_step4 = {name: full(p.detach()) for name, p in module.named_parameters()}

    def fresh_copy() -> tuple[nn.Module, torch.optim.Optimizer]:
        fresh, fresh_opt = build()
        with torch.no_grad():
            for p, q in zip(fresh.parameters(), module.parameters()):
                p.copy_(q)
        return fresh, fresh_opt

    from_dcp, from_dcp_opt = fresh_copy()
    target = {"optimizer": get_optimizer_state_dict(from_dcp, from_dcp_opt)}
    dcp.load(target, checkpoint_id=tmp / "dcp")
    set_optimizer_state_dict(from_dcp, from_dcp_opt, optim_state_dict=target["optimizer"])
    from_full, from_full_opt = fresh_copy()
    set_optimizer_state_dict(
        from_full, from_full_opt, optim_state_dict=gathered_state if rank == 0 else {}, options=full_options
    )
    for each, each_opt in ((module, opt), (from_dcp, from_dcp_opt), (from_full, from_full_opt)):
        steps(each, each_opt, 4, 8)
    for key, resumed in (("dcp_resume_equal", from_dcp), ("full_resume_equal", from_full)):
        out[key] = all(
            torch.equal(p.to_local(), q.to_local()) for p, q in zip(module.parameters(), resumed.parameters())
        )
    at_step8 = {name: full(p.detach()) for name, p in module.named_parameters()}
    if rank == 0:
        # the 2-rank DCP checkpoint loaded by one process into plain tensors (DCP reslices the
        # sharded moments), continued there: the same steps as the sharded run
        one, one_opt = make_module(None, mesh), None
        with torch.no_grad():
            for name, p in one.named_parameters():
                p.copy_(at_step4[name])
        one_opt = optimizer("apollo", one)
        target = {"optimizer": get_optimizer_state_dict(one, one_opt)}
        dcp.load(target, checkpoint_id=tmp / "dcp", no_dist=True)
        set_optimizer_state_dict(one, one_opt, optim_state_dict=target["optimizer"])
        steps(one, one_opt, 4, 8)
        out["dcp_to_one_process"] = max(rel(p.detach(), at_step8[name]) for name, p in one.named_parameters())
    metadata = dcp.FileSystemReader(tmp / "dcp").read_metadata().state_dict_metadata
    out["dcp_keys"] = {
        key: (tuple(meta.size), len(meta.chunks)) if hasattr(meta, "chunks") else type(meta).__name__
        for key, meta in metadata.items()
        if key.startswith("optimizer.state.")
    }

    # an unsharded state (a one-process run) loaded into the sharded optimizer
    plain = make_module(None, mesh)
    plain_opt = optimizer("apollo", plain)
    steps(plain, plain_opt, 0, 4)
    resharded, resharded_opt = build()
    with torch.no_grad():
        for p, q in zip(resharded.parameters(), plain.parameters()):
            p.copy_(distribute_tensor(q.detach(), p.device_mesh, p.placements, src_data_rank=None))
    resharded_opt.load_state_dict(roundtrip(plain_opt.state_dict()))
    steps(plain, plain_opt, 4, 8)
    steps(resharded, resharded_opt, 4, 8)
    out["from_unsharded"] = max(
        rel(full(p.detach()), q.detach()) for p, q in zip(resharded.parameters(), plain.parameters())
    )

    # the gathered (full_state_dict) optimizer state is the unsharded one's
    gathered = get_optimizer_state_dict(
        resharded, resharded_opt, options=StateDictOptions(full_state_dict=True, cpu_offload=False)
    )
    out["full_state_dict"] = max(
        rel(gathered["state"][name][key], plain_opt.state[q][key])
        for name, q in plain.named_parameters()
        for key in ("exp_avg", "exp_avg_sq")
    )
    return out


def error_checks(mesh_size: int) -> dict[str, str]:
    """Placements Apollo refuses: a clear ValueError naming the parameter and its placement."""
    mesh = init_device_mesh("cpu", (mesh_size,))
    gen = torch.Generator().manual_seed(0)
    cases = {
        "partial": ((4, 6), [Partial()], {}),
        "strided": ((4, 6), [_StridedShard(0, split_factor=2)], {}),
        "conv_cols": ((4, 2, 3), [Shard(1)], {}),
        "svd": ((4, 6), [Shard(0)], {"proj": "svd"}),
        "partial_bias": ((6,), [Partial()], {}),
    }
    messages = {}
    for name, (shape, placements, options) in cases.items():
        value = torch.randn(shape, generator=gen)
        if placements[0].is_partial():
            tensor = DTensor.from_local(value, mesh, placements, run_check=False)
        else:
            tensor = distribute_tensor(value, mesh, [Shard(0)], src_data_rank=None)
            if type(placements[0]) is not Shard or placements[0] != Shard(0):
                tensor = DTensor.from_local(
                    tensor.to_local(), mesh, placements, run_check=False, shape=tensor.shape, stride=tensor.stride()
                )
        param = nn.Parameter(tensor)
        try:
            Apollo([(f"{name}.weight", param)], rank=2, **options)
        except ValueError as error:
            messages[name] = str(error)
        else:
            messages[name] = "no error"
    return messages


CASES_2 = {
    "shard0_apollo": ((2,), lambda s: [Shard(0)], "apollo"),
    "shard0_mini": ((2,), lambda s: [Shard(0)], "mini"),
    "shard0_reverse": ((2,), lambda s: [Shard(0)], "reverse"),
    "shard0_tensor": ((2,), lambda s: [Shard(0)], "tensor"),
    "shard1_apollo": ((2,), lambda s: [Shard(1)] if len(s) == 2 else [Replicate()], "apollo"),
    "shard1_mini": ((2,), lambda s: [Shard(1)] if len(s) == 2 else [Replicate()], "mini"),
    "replicate": ((2,), lambda s: [Replicate()], "apollo"),
    "hsdp_1x2": ((1, 2), lambda s: [Replicate(), Shard(0)], "apollo"),
    "hsdp_2x1": ((2, 1), lambda s: [Replicate(), Shard(0)], "mini"),
}
CASES_4 = {
    "hsdp_2x2_mini": ((2, 2), lambda s: [Replicate(), Shard(0)], "mini"),
    "fsdp_tp_2x2": ((2, 2), lambda s: [Shard(0), Shard(1)] if len(s) == 2 else [Shard(0), Replicate()], "apollo"),
}


def worker(rank: int, world: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {}
        for name, (mesh_shape, placements, kind) in (CASES_2 if world == 2 else CASES_4).items():
            results[name] = run_case(mesh_shape, placements, kind)
        if world == 2:
            results["checkpoint"] = checkpoint_checks(rank, out)
            results["errors"] = error_checks(world)
        if rank == 0:
            torch.save(results, out / "results.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, world_size = Path(sys.argv[1]), int(sys.argv[2])
    # fork: the ranks inherit the imported modules instead of importing torch again each
    mp.start_processes(worker, args=(world_size, out_dir), nprocs=world_size, join=True, start_method="fork")
