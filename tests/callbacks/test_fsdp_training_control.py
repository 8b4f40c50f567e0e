"""TrainingControl and MetricsPrinter under ModelParallelStrategy (FSDP2, 2 CPU gloo ranks).

Every command runs its collectives on every rank in the same order (both ranks record the same
sequence of saves, validations and exports at the same steps); typed commands (a command file)
and schedules reach both ranks at the same step; ``fit(ckpt_path="last")`` resumes from the quit
save and replays nothing; an ``eval_fn`` that raises (on one rank, or on both) is reported and
both ranks train on; a failure on one rank during a command ends both ranks quickly with that
error, never a process-group timeout or a hang.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers.ranks import check_ok, launch

SCRIPT = Path(__file__).parent / "control_scripts" / "fsdp_fit.py"

pytestmark = pytest.mark.ddp


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_fsdp2_commands_run_in_the_same_order_on_both_ranks_and_last_resumes_the_quit_save(tmp_path):
    results = launch(SCRIPT, [str(tmp_path), "commands"], timeout=280)
    check_ok(results)
    # rank 1's export hit a full disk: reported (with rank 1's own traceback there), training went on
    assert (
        "export failed at step 5 on rank 1: OSError: export exploded on rank 1; training goes on" in results[0].output
    )
    assert "Traceback" in results[1].output.split("export failed at step 5 on rank 1")[1]
    first = [_read(tmp_path / f"first-rank{r}.json") for r in range(2)]
    resumed = [_read(tmp_path / f"resumed-rank{r}.json") for r in range(2)]
    quit_step = first[0]["global_step"]
    assert first[1]["global_step"] == quit_step and 6 <= quit_step < 40
    # the same collective work, in the same order, at the same steps, on both ranks
    assert first[0]["events"] == first[1]["events"]
    assert first[0]["events"][:3] == [["save", 3], ["eval", 4], ["export", 5]]
    assert first[0]["events"][-2:] == [["save", quit_step], ["eval", quit_step]]  # quit saves; Lightning validates
    # the typed lr reached both ranks at the same step
    changed = [min(s for s, lr in r["lr_trace"] if lr == 0.05) for r in first]
    assert changed[0] == changed[1] and first[0]["lr_trace"] == first[1]["lr_trace"]
    # 'last' is the quit save: the resumed run starts there, does not replay the command file's
    # lines or the past schedules, and runs to its max_steps
    assert (tmp_path / "ckpts" / "last.ckpt").is_symlink()
    for r in resumed:
        assert r["global_step"] == quit_step + 4
        assert [s for s, _ in r["lr_trace"]] == list(range(quit_step + 1, quit_step + 5))
        assert all(lr == 0.05 for _, lr in r["lr_trace"])
    assert resumed[0]["events"] == resumed[1]["events"] == [["save", quit_step + 4]]
    # MetricsPrinter: rank 0 alone wrote one line per step; validation values only on their steps
    rows = [json.loads(x) for x in (tmp_path / "first-metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, quit_step + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == first[0]["val_steps"] == [4, quit_step]
    assert all("loss_mean" in r for r in rows)
    assert [r["lr"] for r in rows] == [lr for _, lr in [(0, 0.1), *first[0]["lr_trace"][:-1]]]

    # an eval_fn that raises (after an all-reduce): at step 2 on rank 1 only, at step 4 on both
    # ranks; each failure is reported and every rank trains on to max_steps, in step
    evalfail = [_read(tmp_path / f"evalfail-rank{r}.json") for r in range(2)]
    for r in evalfail:
        assert r["global_step"] == 6 and [s for s, _ in r["lr_trace"]] == [1, 2, 3, 4, 5, 6]
        # both ranks took part in both evaluations, then in TrainingControl's save at max_steps
        assert r["events"] == [["eval_fn", 2, 2.0], ["eval_fn", 4, 2.0], ["save", 6]]
    out0, out1 = (result.output for result in results)
    # rank 0 did not fail at step 2: it reports rank 1's error; rank 1 shows its own, with its traceback
    assert (
        "eval_fn failed at step 2 on rank 1: RuntimeError: eval exploded on rank 1 at step 2; training goes on" in out0
    )
    step2 = out1.split("eval_fn failed at step 2 on rank 1: RuntimeError: eval exploded on rank 1 at step 2")
    assert len(step2) == 2 and "Traceback" in step2[1]
    # at step 4 each rank failed and reports its own error
    assert "eval_fn failed at step 4 on rank 0: ValueError: eval exploded on rank 0 at step 4" in out0
    assert "eval_fn failed at step 4 on rank 1: KeyError: 'eval exploded on rank 1 at step 4'" in out1


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (
            "fail-save",
            r"saving .*step=3.ckpt failed at step 3 on rank 0: OSError: \[Errno 28\] No space left on device",
        ),
        ("fail-export", "export failed at step 3 on rank 1: RuntimeError: export exploded on rank 1"),
    ],
)
def test_fsdp2_a_failure_on_one_rank_during_a_command_ends_both_ranks_with_that_error(tmp_path, mode, message):
    import re

    started = time.monotonic()
    results = launch(SCRIPT, [str(tmp_path), mode], timeout=200)
    elapsed = time.monotonic() - started
    for result in results:
        assert result.returncode != 0, f"rank {result.rank} did not fail:\n{result.output[-3000:]}"
        assert re.search(f"RANK {result.rank} FAILED after [0-9.]+s: TrainingControl: {message}", result.output), (
            f"rank {result.rank}:\n{result.output[-3000:]}"
        )
        assert "Connection closed by peer" not in result.output and "timed out" not in result.output.lower()
    assert elapsed < 200  # ended by the error, not by the process group's 30-minute timeout
