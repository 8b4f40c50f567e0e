"""The module callbacks under FSDP2 (Lightning's ModelParallelStrategy, 2 gloo ranks on CPU).

One launch of ``scripts/fsdp_modules.py`` (starting the ranks costs far more than the 3-step
fits it runs), shared by the tests below:

- ``ReplaceModules`` acts before ``fully_shard``: the replacements are what gets sharded, and
  the optimizer holds their DTensor parameters; a module already sharded is refused clearly;
- ``ActivationOffload`` and ``CompileModules`` (and both) on FSDP2 units, applied before or
  after ``fully_shard``: the loss curve and the final parameters equal the plain FSDP2 run's;
- an offloaded block with a ``fully_shard`` unit inside it is refused clearly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.ranks import run_launcher

pytestmark = pytest.mark.ddp

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_modules.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What each rank of the launch saved, ``[rank0, rank1]``."""
    out = tmp_path_factory.mktemp("fsdp_modules")
    proc = run_launcher([str(SCRIPT), str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_replace_modules_acts_before_fully_shard(runs):
    for rank in runs:
        report = rank["replace"]["report"]
        assert report["all_replaced"]  # no nn.Linear left
        assert report["linear_types"] == ["FSDPMyLinear", "MyLinear"]  # the head unit is the replacement
        assert report["head_is_unit"] and report["module_params_dtensor"]
        assert report["optimizer_holds_module_params"] and report["optimizer_params_dtensor"]
        assert rank["replace"]["by_hand_report"] == report  # replaced by hand in configure_model
        error = rank["replace"]["error"]
        assert error.startswith("ReplaceModules: '0.fc1' is already sharded (its parameters are DTensors)")
        assert "before fully_shard" in error
        assert rank["replace"]["unit_error"].startswith("ReplaceModules: '2' is already sharded (a fully_shard unit)")


@pytest.mark.parametrize("name", ["offload", "compile", "offload_compile"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_offload_and_compile_work_on_fsdp2_units(runs, name, order):
    """``before``: layers built in ``__init__``, transformed in setup, then sharded in
    configure_model; ``after``: built and sharded in configure_model, transformed right after."""
    for rank in runs:
        plain, run = rank[f"plain_{order}"], rank[f"{name}_{order}"]
        state = run["state"]
        assert state["units"]  # the blocks are fully_shard units
        assert state["offloaded"] == [name != "compile"] * 2
        assert state["compiled"] == [name != "offload"] * 2
        if name != "offload":
            assert state["graphs"] > 0  # the compiled code ran
        assert len(run["losses"]) == 3
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(plain["losses"]), atol=1e-6, rtol=0)
        for key, want in plain["params"].items():
            torch.testing.assert_close(run["params"][key], want, atol=1e-6, rtol=0, msg=key)
    for key, value in runs[0][f"{name}_{order}"]["params"].items():  # the ranks agree
        torch.testing.assert_close(runs[1][f"{name}_{order}"]["params"][key], value, atol=0, rtol=0)


def test_an_offloaded_block_with_units_inside_is_refused(runs):
    for rank in runs:
        error = rank["nested_units_error"]
        assert error is not None and error.startswith("ActivationOffload: FSDPBlock contains fully_shard units (fc1)")
