"""Sharded ``.sft`` checkpoints on object storage under FSDP2, end to end, against moto's S3 server.

``scripts/remote_fsdp_run.py`` runs ``lightning_utils.strategies.ModelParallelStrategy`` on 2 gloo
ranks on CPU (or 1), in subprocesses with a timeout, with ``SafetensorsModelCheckpoint(dirpath=
"s3://...")``; the server runs in this test process and the ranks reach it over HTTP. Checked:
each rank uploads its own file and the index lands last, ``save_top_k`` removes whole prefixes,
``last.sft`` rewritten in place keeps only its newest files, ``fit(ckpt_path="last")`` resumes
exactly, a 1-rank run reshards from the URL reading only byte ranges, an ExportWeights Hugging
Face export lands under the URL, and a rank failing mid-upload leaves the previous checkpoint
and no index for the failed one.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers import ranks
from helpers.s3 import s3_bucket_fixture, s3_server_fixture  # noqa: F401  (the s3_bucket and s3_server fixtures)

from lightning_utils.io import load_state, storage
from lightning_utils.io.sharded import INDEX_NAME, ShardedCheckpoint
from lightning_utils.io.sharded.layout import is_shard_file_name

SCRIPT = Path(__file__).parent / "scripts" / "remote_fsdp_run.py"
TIMEOUT = 300
pytestmark = [pytest.mark.ddp, pytest.mark.timeout(900)]


def launch(server, out: Path, run: str, plan: str, world_size: int = 2, expect_ok: bool = True) -> list:
    """Run ``remote_fsdp_run.py OUT RUN PLAN`` on ``world_size`` ranks; kill every rank if one hangs."""
    out.mkdir(parents=True, exist_ok=True)
    env = {"FSSPEC_S3": json.dumps(server.storage_options)}
    results = ranks.launch(SCRIPT, [str(out), run, plan], timeout=TIMEOUT, world_size=world_size, env=env)
    if expect_ok:
        ranks.check_ok(results)
    return results


def record(out: Path, phase: str, rank: int) -> dict:
    return json.loads((out / f"{phase}-rank{rank}.json").read_text())


def losses(out: Path, phase: str, rank: int) -> dict[int, float]:
    return {step: float.fromhex(value) for step, value in record(out, phase, rank)["losses"]}


def reads(out: Path, phase: str, rank: int) -> list[tuple[str, int, int]]:
    return [tuple(r) for r in json.loads((out / f"{phase}-reads-rank{rank}.json").read_text())]


@pytest.fixture(scope="module")
def two_rank_run(s3_server, tmp_path_factory):
    """On 2 ranks: 8 steps saving to S3 every 3 steps (top-1) with a HF export, then resumed from "last"."""
    out = tmp_path_factory.mktemp("remote_fsdp")
    fs = s3_server.client()
    bucket = "remote-fsdp"
    fs.call_s3("create_bucket", Bucket=bucket)
    run = f"s3://{bucket}/run"
    launch(s3_server, out, run, "full")
    s3_server.requests.clear()
    launch(s3_server, out, run, "resume")
    resume_requests = list(s3_server.requests)
    return out, run, resume_requests


def shard_files(url: str) -> list[str]:
    return [n for n in storage.listdir(url) if n != INDEX_NAME]


def test_each_rank_uploads_its_own_file_and_top_k_removes_whole_prefixes(two_rank_run):
    _, run, _ = two_rank_run
    assert storage.listdir(run) == ["export", "last.sft", "step=6.sft"]  # step=3.sft removed, prefix and all
    for name in ("last.sft", "step=6.sft"):
        files = shard_files(f"{run}/{name}")
        # one file per rank, named for this save; last.sft (written at steps 3 and 6) keeps only its newest
        assert len(files) == 2 and all(is_shard_file_name(f) for f in files), files
        assert [f.split(".")[0] for f in files] == ["shard-00000-of-00002", "shard-00001-of-00002"]
        assert len({f.split(".")[1] for f in files}) == 1  # the same save id
        with ShardedCheckpoint(f"{run}/{name}") as checkpoint:
            assert [f.name for f in checkpoint.index.files] == files
            record_ = checkpoint.record("lm.model.layers.0.mlp.gate_proj.weight")
            assert sorted((c.file, c.offsets) for c in record_.chunks) == [(0, (0, 0)), (1, (32, 0))]
    # last.sft was written at steps 3 and 6, then at 8 when the resumed run ended (save_last)
    assert load_state(f"{run}/last.sft")["global_step"] == 8
    assert load_state(f"{run}/step=6.sft")["global_step"] == 6


def test_fit_resumes_exactly_from_last_on_s3(two_rank_run):
    out, run, _ = two_rank_run
    for rank in range(2):
        full, resumed = losses(out, "full", rank), losses(out, "resume", rank)
        assert sorted(resumed) == [7, 8]
        assert all(resumed[s] == full[s] for s in resumed), (rank, full, resumed)  # bit-equal
        # "last" on object storage resolves to the index of the newest complete last.sft
        assert record(out, "resume", rank)["ckpt_path"] == f"{run}/last.sft/{INDEX_NAME}"


def _data_ranges(url: str) -> list[list[tuple[int, int, bool]]]:
    """For each shard file of the checkpoint at ``url``, by rank: (start, end, is a block of a
    sharded tensor) of each entry."""
    with ShardedCheckpoint(url) as checkpoint:
        multi = {n for n, r in checkpoint.index.tensors.items() if r.single_chunk() is None}
        out = []
        for i in range(len(checkpoint.index.files)):
            opened = checkpoint._open(i)
            base = opened.header.data_start
            out.append([(base + e.begin, base + e.end, e.name in multi) for e in opened.header.entries])
        return out


def _by_rank_file(got: list[tuple[str, int, int]], world_size: int = 2) -> list[list[tuple[int, int]]]:
    """The byte ranges read from each rank's shard file, by the rank that wrote it."""
    return [
        sorted((o, o + n) for url, o, n in got if f"/shard-{r:05d}-of-{world_size:05d}." in url)
        for r in range(world_size)
    ]


def test_each_resumed_rank_reads_only_the_ranges_it_needs(two_rank_run):
    out, run, requests = two_rank_run
    # the resume read last.sft as it was at step 6: the same bytes as step=6.sft, under other names
    ranges = _data_ranges(f"{run}/step=6.sft")
    for rank in range(2):
        got = _by_rank_file(reads(out, "resume", rank))
        for start, end in got[1 - rank]:  # the other rank's file: only tensors stored whole, never a block
            overlapping = [multi for s, e, multi in ranges[1 - rank] if s < end and start < e]
            assert not any(overlapping), (rank, start, end)
        own_blocks = sum(e - s for s, e, multi in ranges[rank] if multi)
        assert own_blocks <= sum(e - s for s, e in got[rank]) <= max(e for _, e, _ in ranges[rank])
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(got[rank]))  # no byte fetched twice
    # no whole-object GET of a shard file: every read of one is a ranged read
    shard_gets = [(path, rng) for method, path, rng in requests if method == "GET" and "/shard-" in path]
    assert shard_gets and all(rng and rng.startswith("bytes=") for _, rng in shard_gets), shard_gets


def test_a_one_rank_run_reshards_from_the_url_reading_each_byte_once(s3_server, two_rank_run):
    out, run, _ = two_rank_run
    launch(s3_server, out, run, "resume_url", world_size=1)
    full = {s: (losses(out, "full", 0)[s] + losses(out, "full", 1)[s]) / 2 for s in losses(out, "full", 0)}
    resumed = losses(out, "resume_url", 0)
    assert sorted(resumed) == [7, 8]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-4)
    ranges = _data_ranges(f"{run}/step=6.sft")
    for rank, spans in enumerate(_by_rank_file(reads(out, "resume_url", 0))):
        assert spans and all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans  # no byte fetched twice
        assert sum(b - a for a, b in spans) <= max(e for _, e, _ in ranges[rank])


def test_export_weights_writes_a_hugging_face_directory_under_the_url(two_rank_run):
    from transformers import LlamaForCausalLM

    out, run, _ = two_rank_run
    directory = f"{run}/export/hf-8"
    names = storage.listdir(directory)
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    local = out / "hf"
    local.mkdir(exist_ok=True)
    for name in names:
        (local / name).write_bytes(storage.read_bytes(f"{directory}/{name}"))
    model = LlamaForCausalLM.from_pretrained(local)
    assert model.dtype == torch.bfloat16
    trained = load_state(f"{run}/last.sft")  # step 6; the export is of step 8: compare shapes and names
    assert {f"lm.{k}" for k in model.state_dict()} <= set(trained["state_dict"])


def test_a_rank_failing_mid_upload_leaves_the_previous_checkpoint_and_no_index(s3_server, s3_bucket, tmp_path):
    run = f"{s3_bucket}/run"
    results = launch(s3_server, tmp_path, run, "fail", expect_ok=False)
    assert all(r.returncode != 0 for r in results)  # every rank stopped with the error, none hung
    assert "rank 1: OSError: the network went away" in results[0].output[-6000:]
    assert storage.listdir(run) == ["last.sft", "step=2.sft"]  # step=4.sft: nothing left, not even files
    assert load_state(f"{run}/last.sft")["global_step"] == 2  # the previous last.sft, intact
    assert len(shard_files(f"{run}/last.sft")) == 2
    bucket = s3_bucket.removeprefix("s3://")
    assert s3_server.multipart_uploads(bucket) == []
