"""Apollo / ApolloMini on DTensor parameters: FSDP2 under Lightning's ModelParallelStrategy, and
every supported placement (Shard(0), Shard(1), Replicate, HSDP and FSDP x TP meshes) against
the same run on plain tensors; sharded state layout, checkpoints and refused placements.

Each test runs gloo ranks on CPU in a subprocess with a timeout (a hang fails the test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers.ranks import run_launcher

SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from fsdp_apollo_fit import NAMES, STEPS, Body, batch, loss_fn, make_optimizer  # noqa: E402

pytestmark = pytest.mark.ddp


def _run(*args: str, timeout: float = 240) -> None:
    proc = run_launcher(list(args), timeout=timeout, env={"PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _one_process_run() -> dict[int, dict[str, torch.Tensor]]:
    """The sharded run's reference: the same bodies and optimizers on plain tensors, one process,
    the global batch of every step."""
    bodies = {name: Body() for name in NAMES}
    optimizers = {name: make_optimizer(name, body) for name, body in bodies.items()}
    params: dict[int, dict[str, torch.Tensor]] = {0: {}}
    for name, body in bodies.items():
        params[0].update({f"{name}.{k}": v.detach().clone() for k, v in body.named_parameters()})
    for step in range(STEPS):
        x, y, z = batch(step)
        params[step + 1] = {}
        for name, body in bodies.items():
            optimizers[name].zero_grad()
            loss_fn(body, x, y, z).backward()
            optimizers[name].step()
            params[step + 1].update({f"{name}.{k}": v.detach().clone() for k, v in body.named_parameters()})
    return params


def test_fsdp2_fit_matches_one_process_and_resumes_bit_exactly(tmp_path):
    """Under ModelParallelStrategy (FSDP2: each Linear, then the root, fully_shard-ed on the
    data-parallel mesh), 8 steps with update_proj_gap=3 (two projection refreshes) make the same
    parameters as one process with the global batch, within 1e-4 relative, for matrices projected
    on either side, uneven and empty shards. A distributed checkpoint saved at step 5 and resumed
    in a new Trainer gives bit-identical steps 6-8 (one refresh among them)."""
    _run(str(SCRIPTS / "fsdp_apollo_fit.py"), str(tmp_path))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    reference = _one_process_run()
    assert sorted(full) == list(range(1, STEPS + 1))
    for name, value in full[STEPS].items():
        assert _relative(value, reference[STEPS][name]) <= 1e-4, name
        if name.endswith("weight") and "norm" not in name:  # the comparison is not vacuous
            assert _relative(reference[STEPS][name], reference[0][name]) > 1e-3, name
    assert sorted(resumed) == [6, 7, 8]
    for step in (6, 7, 8):
        for name, value in full[step].items():
            assert torch.equal(value, resumed[step][name]), (step, name)

    # The distributed checkpoint holds the optimizer moments as sharded tensors of their global
    # (low-rank) shape, one chunk per rank, and the scalar limiter state once.
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(tmp_path / "step5").read_metadata().state_dict_metadata
    shapes = {key: (tuple(m.size), len(m.chunks)) for key, m in metadata.items() if hasattr(m, "chunks")}
    prefix = "optimizer_0.state.bodies.apollo."
    assert shapes[prefix + "fc1.weight.exp_avg"] == ((48, 3), 2)  # right projection: (m, r)
    assert shapes[prefix + "fc2.weight.exp_avg_sq"] == ((3, 48), 2)  # left projection: (r, n)
    assert shapes[prefix + "tiny.weight.exp_avg"] == ((1, 16), 2)  # the chunk of rank 1 is empty
    assert shapes[prefix + "fc1.bias.exp_avg"] == ((48,), 2)  # AdamW
    assert shapes[prefix + "fc1.weight.scaling_grad"] == ((), 1)
    assert shapes["optimizer_1.state.bodies.mini.fc1.weight.exp_avg"] == ((48, 1), 2)


def test_every_supported_placement_matches_plain_tensors(tmp_path):
    """DTensor parameters (distribute_tensor) with Shard(0), Shard(1), Replicate and 2-D
    (replicate, shard) meshes, 2 ranks: after 8 steps (gap 3) the gathered parameters and moments
    equal those of the plain run within 1e-4 relative, for Apollo (channel and tensor scale, both
    sides) and ApolloMini. The state follows the parameter's placements; the limiter norm is a
    plain tensor, equal on every rank. Also: weights_only state dicts; bit-exact resume through
    DCP (sharded) and through a gathered full state dict broadcast from rank 0; the sharded DCP
    checkpoint loaded into one process and an unsharded state loaded into the sharded optimizer
    (world size 2 -> 1 and 1 -> 2) continue like the other; clear errors for refused placements."""
    _run(str(SCRIPTS / "fsdp_placements.py"), str(tmp_path), "2")
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    checkpoint, errors = results.pop("checkpoint"), results.pop("errors")
    for case, result in results.items():
        for name, error in {**result["params"], **result["moments"]}.items():
            assert error <= 1e-4, (case, name, error)

    # FSDP2's layout: one reduce-scatter (the left-projected gradients: r x n = 3 x 12 and 1 x 8,
    # rows padded to the 2 ranks) and one all-reduce (norms) per step; nothing is gathered
    def collectives(case):  # reduce_scatter_single on torch >= 2.13, reduce_scatter_tensor before
        return [(name.split("_single")[0].split("_tensor")[0], n) for name, n in results[case]["collectives"]]

    for case in ("shard0_apollo", "shard0_mini", "shard0_tensor", "hsdp_1x2"):
        assert sorted(name for name, _ in collectives(case)) == ["all_reduce", "reduce_scatter"], case
    assert dict(collectives("shard0_apollo"))["reduce_scatter"] == 4 * 12 + 2 * 8
    assert dict(collectives("shard0_apollo"))["all_reduce"] <= 3 * 12 + 3 * 8 + 4  # floats
    assert results["replicate"]["collectives"] == [] and results["hsdp_2x1"]["collectives"] == []

    shard0 = results["shard0_apollo"]
    from torch.distributed.tensor import Replicate, Shard

    assert shard0["placements"]["right"] == ((Shard(0),), (12, 3))  # (m, r), rows as the param's
    assert shard0["placements"]["left"] == ((Shard(0),), (3, 12))  # (r, n), r split as the param's rows
    assert shard0["placements"]["bias"] == ((Shard(0),), (7,))
    assert shard0["local"] == {
        "right": (6, 3),
        "left": (2, 12),
        "one": (1, 8),
        "square": (3, 3),
        "conv": (3, 3),
        "bias": (4,),
    }
    # per rank: at most its share of the unsharded state plus one low-rank factor
    # (two moments of 12x3 and 3x12 floats, and a 4-byte limiter norm)
    assert shard0["state_bytes"]["right"] <= 2 * 12 * 3 * 4 / 2 + 12 * 3 * 4 + 4
    assert shard0["state_bytes"]["left"] <= 2 * 3 * 12 * 4 / 2 + 3 * 12 * 4 + 4
    shard1 = results["shard1_apollo"]
    assert shard1["placements"]["right"] == ((Shard(1),), (12, 3))
    assert shard1["placements"]["conv"] == ((Replicate(),), (6, 3))
    assert results["hsdp_1x2"]["placements"]["left"] == ((Replicate(), Shard(0)), (3, 12))

    assert checkpoint["weights_only"] == ["exp_avg", "exp_avg_sq", "scaling_grad", "seed", "step"]
    assert checkpoint["dcp_resume_equal"] and checkpoint["full_resume_equal"]
    assert checkpoint["dcp_to_one_process"] <= 1e-4  # world size 2 -> 1 through DCP's resharding load
    assert checkpoint["from_unsharded"] <= 1e-4
    assert checkpoint["full_state_dict"] <= 1e-4
    assert checkpoint["dcp_keys"]["optimizer.state.left.exp_avg"] == ((3, 12), 2)
    assert checkpoint["dcp_keys"]["optimizer.state.one.exp_avg"] == ((1, 8), 2)
    assert checkpoint["dcp_keys"]["optimizer.state.left.scaling_grad"] == ((), 1)

    for case, placement in (
        ("partial", "Partial(sum)"),
        ("strided", "_StridedShard"),
        ("conv_cols", "Shard(dim=1)"),
        ("svd", "Shard(dim=0)"),
        ("partial_bias", "Partial(sum)"),
    ):
        assert f"parameter '{case}.weight'" in errors[case] and placement in errors[case], errors[case]
    assert "proj='svd'" in errors["svd"]


def test_hsdp_and_fsdp_tp_meshes_on_four_ranks(tmp_path):
    """A 2x2 mesh: HSDP (Replicate, Shard(0)) and FSDP x row-wise TP (Shard(0), Shard(1)), where
    both matrix dimensions are split and the update needs two rounds of sums."""
    _run(str(SCRIPTS / "fsdp_placements.py"), str(tmp_path), "4")
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for case, result in results.items():
        for name, error in {**result["params"], **result["moments"]}.items():
            assert error <= 1e-4, (case, name, error)
    from torch.distributed.tensor import Shard

    tp = results["fsdp_tp_2x2"]
    assert tp["placements"]["left"] == ((Shard(0), Shard(1)), (3, 12))
    assert tp["local"]["left"] in {(2, 6), (1, 6)}
