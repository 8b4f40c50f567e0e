"""TrainingControl under 2-rank gloo DDP: rank 0 reads stdin, both ranks act at the same step."""

from __future__ import annotations

import json

import pytest
import torch
from control_scripts.proc import Driven, child_env
from helpers.ports import free_port

pytestmark = pytest.mark.ddp


def test_ddp_command_reaches_both_ranks_at_the_same_step_and_quit_ends_both(tmp_path):
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    run = Driven(
        [
            "--root",
            str(tmp_path),
            "--devices",
            "2",
            "--max-steps",
            "500",
            "--sleep",
            "0.02",
            "--print-steps",
            "--lightning-val",
            "--export-on-quit",
        ],
        env=env,
    )
    try:
        run.wait_for("STEP 3", timeout=120)
        run.send("lr 0.5\neval\nsave@1000000\n")
        run.wait_for("scheduled 'save' for step 1000000")
        run.send("quit\n")
        out = run.finish(timeout=120)
    finally:
        run.kill()
    assert run.proc.returncode == 0, out
    r0, r1 = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1))
    # quit stopped both ranks at the same step, well before max_steps, and fit returned
    assert r0["global_step"] == r1["global_step"] < 500
    assert "FIT RETURNED" in out
    # the lr command took effect at the same step on both ranks
    first = [min(s for s, lr in r["lr_trace"] if lr == 0.5) for r in (r0, r1)]
    assert first[0] == first[1]
    assert r0["lr_trace"] == r1["lr_trace"]
    # 'eval' ran the model's validation loop on both ranks at the same step (then Lightning's own
    # validation when should_stop is set, at the quit step)
    assert r0["val_steps"] == r1["val_steps"]
    assert len(r0["val_steps"]) == 2 and r0["val_steps"][0] < r0["val_steps"][1] == r0["global_step"]
    assert r0["val_steps"][0] >= first[0]  # the eval came with or after the lr command
    # the quit save is collective and written once, by rank 0
    assert r0["checkpoints"] == [f"step={r0['global_step']}.ckpt"]
    # ExportWeights at train end: one file, written by rank 0, readable by plain safetensors
    from safetensors.torch import load_file

    exported = sorted((tmp_path / "export").iterdir())
    assert [p.name for p in exported] == [f"weights-step={r0['global_step']}.sft"]
    assert load_file(exported[0])["layer.weight"].dtype == torch.bfloat16
    # MetricsPrinter: rank 0 alone wrote one line per step, and its local running means did not hang
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, r0["global_step"] + 1))
    assert "loss_mean" in rows[-1]
    # lightning_utils.distributed before and after the process group existed
    assert [r["before_init"]["global_rank"] for r in (r0, r1)] == [0, 1]
    assert [r["before_init"]["initialized"] for r in (r0, r1)] == [False, False]
    gathered = [{"from": 0, "pad": ""}, {"from": 1, "pad": "x" * 100}]  # every rank's object, in rank order
    assert [r["after_init"] for r in (r0, r1)] == [
        {"global_rank": rank, "world_size": 2, "initialized": True, "broadcast": "from rank 0", "gathered": gathered}
        for rank in (0, 1)
    ]
