"""``save_state``/``load_state`` on object storage (:mod:`lightning_utils.io.remote`), against a real
S3-compatible server on 127.0.0.1 (moto's, through s3fs and botocore over HTTP): streamed
uploads that appear whole or not at all, header-first parallel ranged reads, clear errors."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.checkpoints import Custom, assert_same
from helpers.s3 import s3_bucket_fixture, s3_server_fixture  # noqa: F401  (the s3_bucket and s3_server fixtures)

from lightning_utils.io import (
    CheckpointFormatError,
    CheckpointWriteError,
    UnsafeCheckpointError,
    load_state,
    remote,
    save_state,
    storage,
)

MiB = 1 << 20


def _checkpoint(n: int = 1000, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    return {
        "epoch": 3,
        "state_dict": {"w": w, "w_t": w[: (n // 2) * 2].view(2, -1).t(), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "hyper_parameters": {"root": pathlib.PurePosixPath("/data"), "betas": (0.9, 0.99)},
        "flags": torch.tensor([True, False]),
    }


@pytest.fixture
def small_parts(monkeypatch):
    """S3's smallest parts (5 MiB), two in flight, so a few MiB make a real multipart upload; reads
    of 1 MiB, so a few MiB make several."""
    monkeypatch.setattr(remote, "PART_SIZE", 5 * MiB)
    monkeypatch.setattr(remote, "PARALLEL_PARTS", 2)
    monkeypatch.setattr(remote, "READ_SPAN", 1 * MiB)


@pytest.mark.parametrize("suffix", [".sft", ".ckpt"])
def test_round_trip_is_the_same_object_and_the_same_bytes(s3_bucket, tmp_path, small_parts, suffix):
    ckpt = _checkpoint(3 * MiB)  # 12 MiB of floats: three parts
    url = f"{s3_bucket}/run/last{suffix}"
    save_state(ckpt, url)
    save_state(ckpt, tmp_path / f"last{suffix}")
    assert storage.read_range(url, 0, 1 << 30) == (tmp_path / f"last{suffix}").read_bytes()
    assert_same(load_state(url, weights_only=False), load_state(tmp_path / f"last{suffix}", weights_only=False))


def test_map_location_applies_as_for_a_local_file(s3_bucket, tmp_path):
    url = f"{s3_bucket}/x.sft"
    save_state(_checkpoint(), url)
    save_state(_checkpoint(), tmp_path / "x.sft")
    for location in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage):
        assert_same(load_state(url, map_location=location), load_state(tmp_path / "x.sft", map_location=location))
    for location in ("meta", {"cpu": "meta"}):  # meta tensors have no values: compare their layout
        remote_meta = load_state(url, map_location=location)
        assert _layout(remote_meta) == _layout(load_state(tmp_path / "x.sft", map_location=location))
        assert remote_meta["state_dict"]["w"].device.type == "meta"


def _layout(obj):
    if isinstance(obj, torch.Tensor):
        return (obj.device.type, obj.dtype, tuple(obj.shape), obj.stride())
    if isinstance(obj, dict):
        return {k: _layout(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_layout(v) for v in obj)
    return obj


def test_a_load_reads_the_header_then_ranges_never_the_whole_object(s3_server, s3_bucket, small_parts):
    url = f"{s3_bucket}/x.sft"
    save_state(_checkpoint(MiB), url)  # 4 MiB of tensor data: four 1 MiB reads
    s3_server.requests.clear()
    load_state(url)
    gets = [(path, rng) for method, path, rng in s3_server.requests if method == "GET"]
    assert gets and all(rng and rng.startswith("bytes=") for _, rng in gets), gets
    assert gets[0][1].startswith("bytes=0-")  # the header first
    assert len(gets) >= 5


BOUNDED = textwrap.dedent(
    """
    import sys, tracemalloc, torch
    from lightning_utils.io import load_state, remote, save_state
    remote.PART_SIZE, remote.PARALLEL_PARTS, remote.READ_SPAN, remote.READ_PARALLEL = 5 << 20, 1, 4 << 20, 4
    opts = eval(sys.argv[2])
    ckpt = {"w": torch.randn(6 << 20)}  # 24 MiB, in torch's memory (which tracemalloc does not see)
    save_state({"warm": torch.ones(1)}, sys.argv[1], storage_options=opts)
    tracemalloc.start()
    save_state(ckpt, sys.argv[1], storage_options=opts)
    print(tracemalloc.get_traced_memory()[1])
    tracemalloc.reset_peak()
    out = load_state(sys.argv[1], storage_options=opts)
    print(tracemalloc.get_traced_memory()[1])
    assert torch.equal(out["w"], ckpt["w"])
    """
)


@pytest.mark.parametrize("suffix", [".sft", ".ckpt"])
def test_a_save_and_a_load_stream_through_bounded_buffers(s3_server, s3_bucket, tmp_path, suffix):
    """No serialised copy of the checkpoint in memory: the client's Python-side allocations while
    saving 24 MiB of tensors (``.sft`` or ``.ckpt``) or loading them (``.sft``) stay within its
    part buffers and reads in flight. (The client runs in a subprocess, so the server's memory is
    not counted.)"""
    script = tmp_path / "child.py"
    script.write_text(BOUNDED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(script), f"{s3_bucket}/big{suffix}", repr(s3_server.storage_options)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr
    save_peak, load_peak = (int(x) for x in out.stdout.split())
    print(f"{suffix} save: {save_peak / MiB:.1f} MiB, load: {load_peak / MiB:.1f} MiB")
    assert save_peak < 20 * MiB, f"save: {save_peak / MiB:.1f} MiB"  # 2 part buffers are 10 MiB
    if suffix == ".sft":  # a .ckpt loads with torch.load through fsspec, which the README does not call streamed
        assert load_peak < 8 * MiB, f"load: {load_peak / MiB:.1f} MiB"  # 4 ranges of 4 MiB in flight, streamed


def test_the_defaults_8_mib_parts_four_in_flight_five_buffers_eight_reads_in_flight(s3_bucket, monkeypatch):
    """At the default settings: a save of 80 MiB is a multipart upload of 8 MiB parts, at most four
    uploading at once (four do, when the server is slow), through five part buffers in all (each
    reused); a load has at most eight ranged GETs in flight (eight are, when the server is slow;
    the read span is lowered to 1 MiB so that 80 MiB make 80 of them)."""
    import asyncio
    import threading
    import time

    import s3fs

    assert remote.PART_SIZE == 8 << 20 and remote.PARALLEL_PARTS == 4 and remote.READ_PARALLEL == 8
    buffers: list[int] = []

    def counted_bytearray(*args):
        buf = bytearray(*args)
        if len(buf):
            buffers.append(len(buf))
        return buf

    monkeypatch.setattr(remote, "bytearray", counted_bytearray, raising=False)
    lock, uploading, most, parts = threading.Lock(), [0], [0], []
    upload_part = remote._S3MultipartUpload._upload_part

    def slow_upload_part(self, number, buf, length):
        with lock:
            uploading[0] += 1
            most[0] = max(most[0], uploading[0])
            parts.append((number, length, id(buf)))
        try:
            time.sleep(0.2)  # a slow server: the parts pile up to the limit
            return upload_part(self, number, buf, length)
        finally:
            with lock:
                uploading[0] -= 1

    monkeypatch.setattr(remote._S3MultipartUpload, "_upload_part", slow_upload_part)
    ckpt = {"w": torch.arange(20 * MiB, dtype=torch.float32)}  # 80 MiB: 10 full parts and a last one
    url = f"{s3_bucket}/big.sft"
    save_state(ckpt, url)
    assert len(parts) == 11 and all(length == 8 * MiB for _, length, _ in parts[:-1])
    assert most[0] == 4  # four in flight, never more
    assert buffers == [8 * MiB] * 5  # five part buffers allocated, whatever the size
    assert len({buf for _, _, buf in parts}) == 5  # and reused

    monkeypatch.setattr(remote, "READ_SPAN", 1 * MiB)
    reading, most_reads, gets = [0], [0], [0]
    call_s3 = s3fs.S3FileSystem._call_s3

    async def slow_call_s3(self, method, *args, **kwargs):
        if method != "get_object":
            return await call_s3(self, method, *args, **kwargs)
        reading[0] += 1  # one event loop: no lock needed
        gets[0] += 1
        most_reads[0] = max(most_reads[0], reading[0])
        try:
            await asyncio.sleep(0.05)
            return await call_s3(self, method, *args, **kwargs)
        finally:
            reading[0] -= 1

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", slow_call_s3)
    out = load_state(url)
    assert torch.equal(out["w"], ckpt["w"])
    assert gets[0] >= 80 and most_reads[0] == 8  # eight ranged reads in flight, never more


def test_server_stopped_mid_upload_leaves_the_previous_object_intact(s3_server, s3_bucket, small_parts):
    url = f"{s3_bucket}/run/last.sft"
    save_state({"version": 1, "w": torch.ones(4)}, url)
    s3_server.stop_on = lambda method, target: "partNumber=2" in target
    with pytest.raises(CheckpointWriteError) as info:
        save_state({"version": 2, "w": torch.full((3 * MiB,), 2.0)}, url)
    assert url in str(info.value) and "nothing partial" in str(info.value)
    assert not s3_server.running
    s3_server.start()
    out = load_state(url)
    assert out["version"] == 1 and torch.equal(out["w"], torch.ones(4))
    assert storage.listdir(f"{s3_bucket}/run") == ["last.sft"]
    # The abort could not reach the stopped server: the error says so; the parts stay invisible.
    assert "could not be aborted" in str(info.value)


def test_a_failure_while_streaming_aborts_the_multipart_upload(s3_server, s3_bucket, small_parts):
    bucket = s3_bucket.removeprefix("s3://")
    url = f"{s3_bucket}/x.sft"
    save_state({"version": 1}, url)

    def fail_mid_upload():
        with storage.atomic_writer(url) as f:
            f.write(b"\0" * (11 * MiB))  # two parts uploaded
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_mid_upload()
    assert s3_server.multipart_uploads(bucket) == []
    assert load_state(url) == {"version": 1}


KILLED = textwrap.dedent(
    """
    import sys, time, torch
    from lightning_utils.io import remote, save_state
    remote.PART_SIZE = 5 << 20
    real = remote._S3MultipartUpload._upload_part
    def upload_part(self, number, *args):
        out = real(self, number, *args)
        print("PART", number, flush=True)
        time.sleep(60)
        return out
    remote._S3MultipartUpload._upload_part = upload_part
    save_state({"version": 2, "w": torch.full((3 << 20,), 2.0)}, sys.argv[1], storage_options=eval(sys.argv[2]))
    """
)


def test_a_killed_upload_leaves_no_object_and_the_previous_intact(s3_server, s3_bucket, tmp_path):
    url = f"{s3_bucket}/last.sft"
    save_state({"version": 1}, url)
    script = tmp_path / "child.py"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(script), url, repr(s3_server.storage_options)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().split()[0] == "PART"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert load_state(url) == {"version": 1}
    assert storage.listdir(s3_bucket) == ["last.sft"]
    # its parts are invisible, left in the incomplete upload that a lifecycle rule removes
    assert len(s3_server.multipart_uploads(s3_bucket.removeprefix("s3://"))) == 1


def test_truncated_object_is_a_format_error_naming_the_url(s3_bucket, tmp_path):
    save_state(_checkpoint(), tmp_path / "x.sft")
    data = (tmp_path / "x.sft").read_bytes()
    fs, _ = remote.filesystem(s3_bucket)
    for name, cut in (("short.sft", data[:-100]), ("header.sft", data[:50]), ("tiny.sft", data[:3])):
        fs.pipe_file(f"{s3_bucket}/{name}", cut)
        with pytest.raises(CheckpointFormatError) as info:
            load_state(f"{s3_bucket}/{name}")
        message = str(info.value)
        assert f"{s3_bucket}/{name}" in message and ("truncated" in message or "shorter" in message), message


def test_an_unsafe_ckpt_on_s3_is_refused_naming_the_url(s3_bucket):
    url = f"{s3_bucket}/u.ckpt"
    save_state({"obj": Custom(3)}, url)
    with pytest.raises(UnsafeCheckpointError, match=url) as info:
        load_state(url)
    assert "Custom" in str(info.value)
    assert load_state(url, weights_only=False)["obj"].v == 3


def test_missing_object_is_file_not_found_naming_the_url(s3_bucket):
    for suffix in (".sft", ".ckpt"):
        with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/nope{suffix}"):
            load_state(f"{s3_bucket}/nope{suffix}")


def test_save_weights_and_plain_safetensors_readers(s3_bucket):
    from safetensors.torch import load as st_load

    from lightning_utils.io import save_weights

    url = f"{s3_bucket}/export/w.safetensors"
    save_weights({"a": torch.arange(6.0)}, url, metadata={"step": 5})
    assert load_state(url)["step"] == 5
    assert torch.equal(st_load(storage.read_range(url, 0, 1 << 20))["a"], torch.arange(6.0))


@pytest.mark.parametrize("suffix", [".sft", ".ckpt"])
def test_any_fsspec_url_works_memory_included(suffix, monkeypatch):
    monkeypatch.setattr(remote, "READ_CHUNK", 4096)  # several ranged reads
    url = f"memory://bucket/run-{suffix[1:]}/x{suffix}"
    save_state({"v": 1, "w": torch.ones(3)}, url)
    new = {"v": 2, "w": torch.randn(5000), "i": torch.arange(7)}
    save_state(new, url)  # replaced whole through a temporary name
    assert_same(load_state(url, weights_only=False), new)
    assert storage.listdir(url.rsplit("/", 1)[0]) == [f"x{suffix}"]
    storage.remove(url)
    assert not storage.exists(url)


@pytest.mark.parametrize("suffix", [".sft", ".ckpt"])
def test_file_urls_are_local_paths(tmp_path, suffix):
    url = f"file://{tmp_path}/x{suffix}"
    save_state({"w": torch.ones(2)}, url)
    assert (tmp_path / f"x{suffix}").is_file()
    assert torch.equal(load_state(url)["w"], torch.ones(2))


@pytest.mark.parametrize(("url", "extra"), [("gs://bucket/x.sft", "gcs"), ("az://container/x.ckpt", "azure")])
def test_a_missing_back_end_names_the_extra(url, extra, monkeypatch):
    package = {"gcs": "gcsfs", "azure": "adlfs"}[extra]
    monkeypatch.setitem(sys.modules, package, None)  # not installed (whether or not it is here)
    for call in (lambda: save_state({"x": 1}, url), lambda: load_state(url)):
        with pytest.raises(ImportError) as info:
            call()
        assert url in str(info.value) and f"lightning-utils[{extra}]" in str(info.value)


def test_local_saves_import_no_back_end():
    code = (
        "import sys, tempfile, torch; from lightning_utils.io import save_state, load_state\n"
        "d = tempfile.mkdtemp(); save_state({'w': torch.ones(2)}, d + '/x.sft'); load_state(d + '/x.sft')\n"
        "print(sorted(m for m in ('s3fs', 'gcsfs', 'adlfs', 'botocore', 'aiobotocore') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_part_sizes_double_every_1000_parts_so_any_checkpoint_fits_s3_limits():
    upload = remote._S3MultipartUpload.__new__(remote._S3MultipartUpload)
    upload._part_size = remote.PART_SIZE
    sizes = [upload._size_of_part(n) for n in range(1, 10_001)]
    assert sizes[0] == sizes[999] == remote.PART_SIZE and sizes[1000] == 2 * remote.PART_SIZE
    assert sum(sizes) > 5 * 2**40 and max(sizes) <= 5 * 2**30  # S3: 5 TiB objects, 5 GiB parts


def test_the_readme_examples_run_as_written(s3_bucket, tmp_path, monkeypatch):
    """Both examples of README's object storage section, with only the bucket's name changed; the
    Trainer one twice: the second run resumes from the first one's ``last.sft`` in the bucket."""
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Checkpoints on object storage", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0].replace("s3://my-bucket", s3_bucket) for b in section.split("```python\n")[1:]]
    trainer_block, state_block = blocks
    monkeypatch.chdir(tmp_path)  # Lightning's default_root_dir
    first: dict = {}
    exec(compile(trainer_block, "README.md", "exec"), first)
    assert first["trainer"].ckpt_path is None  # nothing to resume from yet
    saved = storage.listdir(f"{s3_bucket}/run1")
    assert "last.sft" in saved and len(saved) == 4  # the 3 best of steps 5, 10, 15, 20 by train_loss
    assert load_state(f"{s3_bucket}/run1/last.sft")["global_step"] == 20
    second: dict = {}
    exec(compile(trainer_block, "README.md", "exec"), second)
    assert second["trainer"].ckpt_path == f"{s3_bucket}/run1/last.sft"
    assert second["trainer"].global_step == 20
    namespace: dict = {}
    exec(compile(state_block, "README.md", "exec"), namespace)
    assert namespace["state"]["step"] == 5
    assert "state.sft" in storage.listdir(f"{s3_bucket}/run1")
