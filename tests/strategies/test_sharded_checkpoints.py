"""Sharded ``.sft`` checkpoints under FSDP2 (``lightning_utils.strategies.ModelParallelStrategy``), end to end.

Each test launches ``scripts/fsdp_run.py`` on 2 gloo ranks on CPU (or 1), in subprocesses with a
timeout: exact mid-epoch resume on the same world size, resharded resume 2->1 and 1->2 with the
same global batch, asynchronous and consolidated saves (a 2-rank consolidated file resumed on
1 rank too), Lightning's own ``.ckpt`` paths left to
Lightning, a rank SIGKILLed while it writes, and the tools (``load_state``, ``convert``,
``inspect``, ``load_from_checkpoint``) on what the runs wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import ranks
from helpers.ranks import RankResult

from lightning_utils.io import load_state
from lightning_utils.io.sharded import INDEX_NAME, ShardedCheckpoint

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_run.py"
TIMEOUT = 300
# Each test launches one or two short runs (a few seconds each on an idle machine); the generous
# limits are for a machine shared with other jobs. A hang still fails the test.
pytestmark = [pytest.mark.ddp, pytest.mark.timeout(900)]


def launch(out: Path, plan: str, world_size: int = 2, expect_ok: bool = True) -> list[RankResult]:
    """Run ``fsdp_run.py OUT PLAN`` on ``world_size`` ranks; kill every rank if one hangs."""
    out.mkdir(parents=True, exist_ok=True)
    results = ranks.launch(SCRIPT, [str(out), plan], timeout=TIMEOUT, world_size=world_size)
    if expect_ok:
        ranks.check_ok(results)
    return results


def losses(out: Path, phase: str, rank: int) -> dict[int, float]:
    record = json.loads((out / f"{phase}-rank{rank}.json").read_text())
    return {step: float.fromhex(value) for step, value in record["losses"]}


def global_losses(out: Path, phase: str, world_size: int) -> dict[int, float]:
    """The loss of each step over the global batch (the ranks' batches are of equal size)."""
    per_rank = [losses(out, phase, r) for r in range(world_size)]
    return {step: sum(r[step] for r in per_rank) / world_size for step in per_rank[0]}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """On 2 ranks: 8 steps with a sharded .sft at step 5 (mid-epoch), then resumed from it; the same
    with an asynchronous save, and with a consolidated one (one .sft file)."""
    out = tmp_path_factory.mktemp("fsdp")
    launch(out, "full,resume,async,consolidated")
    return out


@pytest.fixture(scope="module")
def one_rank_run(two_rank_run) -> Path:
    """On 1 rank: resumed from the 2-rank step=5.sft and from the 2-rank consolidated step=5.sft;
    then 16 steps with a sharded .sft at step 12."""
    launch(two_rank_run, "resume_from_2,consolidated_from_2,save_1", world_size=1)
    return two_rank_run


def test_exact_resume_on_the_same_world_size_mid_epoch(two_rank_run):
    for rank in range(2):
        full, resumed = losses(two_rank_run, "full", rank), losses(two_rank_run, "resume", rank)
        assert sorted(resumed) == [6, 7, 8]
        assert all(resumed[s] == full[s] for s in resumed), (rank, full, resumed)  # bit-equal


def test_a_sharded_checkpoint_holds_only_safetensors_files_and_one_json_index(two_rank_run):
    ckpts = two_rank_run / "two"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.sft", "step=5.sft"]
    assert sorted(p.name for p in (two_rank_run / "async").iterdir()) == ["last.sft", "step=5.sft"]
    for directory in [*ckpts.iterdir(), *(two_rank_run / "async").iterdir()]:
        names = sorted(p.name for p in directory.iterdir())
        assert names == [INDEX_NAME, "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
        for p in directory.iterdir():
            data = p.read_bytes()
            assert b"\x80\x04" not in data[:2] and not data.startswith(b"PK")  # no pickle, no torch zip
            if p.suffix == ".json":
                json.loads(data)
    # both ranks hold (different) blocks of the weights and moments; the index records global shapes
    with ShardedCheckpoint(ckpts / "step=5.sft") as checkpoint:
        record = checkpoint.record("lm.model.layers.0.mlp.gate_proj.weight")
        assert record.shape == (64, 32)
        assert sorted((c.file, c.offsets, c.shape) for c in record.chunks) == [
            (0, (0, 0), (32, 32)),
            (1, (32, 0), (32, 32)),
        ]


def test_resharded_resume_from_2_ranks_on_1(one_rank_run):
    full, resumed = global_losses(one_rank_run, "full", 2), losses(one_rank_run, "resume_from_2", 0)
    assert sorted(resumed) == [6, 7, 8]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-4)


def test_a_consolidated_checkpoint_of_2_ranks_resumes_on_1(one_rank_run):
    full = global_losses(one_rank_run, "full", 2)
    resumed = losses(one_rank_run, "consolidated_from_2", 0)
    assert (one_rank_run / "consolidated" / "step=5.sft").is_file()
    assert sorted(resumed) == [6, 7, 8]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-4)


def test_resharded_resume_from_1_rank_on_2(one_rank_run):
    # at the end of epoch 0: ResumableDataLoader refuses a mid-epoch resume on more ranks
    launch(one_rank_run, "resume_from_1", world_size=2)
    one, resumed = losses(one_rank_run, "save_1", 0), global_losses(one_rank_run, "resume_from_1", 2)
    assert sorted(resumed) == [13, 14, 15, 16]
    for step, loss in resumed.items():
        assert loss == pytest.approx(one[step], abs=1e-4)


def test_async_and_consolidated_saves_resume_exactly(two_rank_run):
    tmp_path = two_rank_run
    for rank in range(2):
        full = losses(tmp_path, "full", rank)
        for phase in ("async", "async_resume", "consolidated", "consolidated_resume"):
            got = losses(tmp_path, phase, rank)
            assert all(got[s] == full[s] for s in got), (phase, rank)
        assert sorted(losses(tmp_path, "async_resume", rank)) == [6, 7, 8]
    consolidated = tmp_path / "consolidated" / "step=5.sft"
    assert consolidated.is_file()  # one file, written by rank 0, loadable anywhere
    state = load_state(consolidated)
    assert state["state_dict"]["lm.model.layers.0.mlp.gate_proj.weight"].shape == (64, 32)
    assert sorted(state["optimizer_states"][0]["state"])[:2] == [0, 1]  # keyed by index, as Lightning's own
    sharded = load_state(tmp_path / "async" / "step=5.sft")
    for key, value in state["state_dict"].items():
        assert torch.equal(value, sharded["state_dict"][key]), key


def test_ckpt_paths_are_lightnings_own_checkpoints(two_rank_run):
    tmp_path = two_rank_run
    launch(tmp_path, "lightning_ckpt")
    assert (tmp_path / "dcp" / "step=5.ckpt" / "meta.pt").is_file()  # Lightning's DCP directory
    assert (tmp_path / "dcp_full" / "step=5.ckpt").is_file()
    for rank in range(2):
        full = losses(tmp_path, "full", rank)
        for phase in ("dcp", "dcp_resume", "dcp_full", "dcp_full_resume"):
            got = losses(tmp_path, phase, rank)
            assert all(got[s] == full[s] for s in got), (phase, rank)


def _apollo_takes_dtensors() -> bool:
    import importlib.util

    return importlib.util.find_spec("lightning_utils.optim.sharded") is not None


@pytest.mark.skipif(
    not _apollo_takes_dtensors(), reason="Apollo/ApolloMini do not run on FSDP2 DTensor parameters here"
)
def test_apollo_mini_state_reshards_like_adamw_s(tmp_path):
    launch(tmp_path, "apollo")
    for rank in range(2):
        full, resumed = losses(tmp_path, "apollo_full", rank), losses(tmp_path, "apollo_resume", rank)
        assert sorted(resumed) == [6, 7, 8]
        assert all(resumed[s] == full[s] for s in resumed), rank  # bit-equal on the same world size
    launch(tmp_path, "apollo_resume_from_2", world_size=1)
    full, resumed = global_losses(tmp_path, "apollo_full", 2), losses(tmp_path, "apollo_resume_from_2", 0)
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-4)


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    results = launch(tmp_path, "kill", expect_ok=False)
    assert results[1].returncode == -9  # SIGKILLed while writing its step-4 file
    assert results[0].returncode != 0  # the survivor stopped with an error, not a hang
    assert "saving the checkpoint failed: a rank stopped taking part" in results[0].output
    ckpts = tmp_path / "kill"
    names = sorted(p.name for p in ckpts.iterdir())
    assert "step=4.sft" not in names and "step=2.sft" in names and "last.sft" in names
    assert any(n.startswith(".lu-tmp-") for n in names)  # the killed save's staging area, never read
    for name in ("step=2.sft", "last.sft"):  # intact and loadable: the step-2 state
        state = load_state(ckpts / name)
        assert state["global_step"] == 2


def test_tools_read_a_sharded_checkpoint(two_rank_run, tmp_path, capsys):
    from lightning_utils.cli import main
    from lightning_utils.plugins import load_from_checkpoint

    sys.path.insert(0, str(SCRIPT.parent))
    from fsdp_run import TinyLM

    directory = two_rank_run / "two" / "step=5.sft"
    state = load_state(directory)
    assert state["global_step"] == 5 and state["hyper_parameters"]["lr"] == 0.01
    assert state["state_dict"]["lm.lm_head.weight"].shape == (64, 32)
    assert set(state["optimizer_states"][0]["state"]) == set(state["state_dict"])  # keyed by name
    model = load_from_checkpoint(TinyLM, directory)
    assert torch.equal(model.lm.lm_head.weight, state["state_dict"]["lm.lm_head.weight"])

    assert main(["convert", str(directory), str(tmp_path / "one.sft")]) == 0
    assert main(["convert", str(directory), str(tmp_path / "one.ckpt")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.ckpt", "one.sft"]  # no scratch file left
    for converted in (load_state(tmp_path / "one.sft"), torch.load(tmp_path / "one.ckpt", weights_only=False)):
        for key, value in state["state_dict"].items():
            assert torch.equal(converted["state_dict"][key], value), key
        exp_avg = converted["optimizer_states"][0]["state"]["lm.lm_head.weight"]["exp_avg"]
        assert torch.equal(exp_avg, state["optimizer_states"][0]["state"]["lm.lm_head.weight"]["exp_avg"])
    assert main(["convert", str(directory), str(tmp_path / "one.sft")]) == 2  # exists: --overwrite

    capsys.readouterr()
    assert main(["inspect", str(directory), "--depth", "3"]) == 0
    shown = capsys.readouterr().out
    assert "sharded safetensors, 2 files, global shapes" in shown.splitlines()[0]
    assert "lm.model.layers.0.mlp.gate_proj.weight: tensor float32 [64, 32]" in shown  # the global shape
