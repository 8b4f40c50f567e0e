"""``lightning-utils inspect`` and ``convert`` with fsspec URLs, against moto's S3 server over HTTP."""

from __future__ import annotations

import sys

import torch
from helpers.checkpoints import assert_same
from helpers.s3 import s3_bucket_fixture, s3_server_fixture  # noqa: F401  (the s3_bucket and s3_server fixtures)

from lightning_utils.cli import main
from lightning_utils.io import load_state, save_state


def _ckpt() -> dict:
    model = torch.nn.Linear(4, 3)
    return {"state_dict": model.state_dict(), "epoch": 1, "bf": torch.zeros(2, 2, dtype=torch.bfloat16)}


def test_inspect_reads_only_the_header_of_an_s3_sft(s3_server, s3_bucket, capsys):
    url = f"{s3_bucket}/run/c.sft"
    save_state(_ckpt(), url)
    s3_server.requests.clear()
    assert main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert url in out and "weight: tensor float32 [3, 4] 48 B" in out and "epoch: 1" in out
    gets = [rng for method, _, rng in s3_server.requests if method == "GET"]
    assert gets == ["bytes=0-" + gets[0].split("-")[1]]  # one ranged read: the header


def test_convert_between_local_files_and_urls(s3_bucket, tmp_path, capsys):
    ckpt = _ckpt()
    save_state(ckpt, tmp_path / "c.ckpt")
    url = f"{s3_bucket}/c.sft"
    assert main(["convert", str(tmp_path / "c.ckpt"), url]) == 0
    assert f"wrote {url}" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "c.ckpt"), url]) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", url, f"{s3_bucket}/c.ckpt"]) == 0
    assert main(["convert", f"{s3_bucket}/c.ckpt", str(tmp_path / "back.sft")]) == 0
    assert_same(load_state(tmp_path / "back.sft"), ckpt)


def test_a_missing_object_or_back_end_exits_1_naming_it(s3_bucket, tmp_path, capsys, monkeypatch):
    assert main(["inspect", f"{s3_bucket}/nope.sft"]) == 1
    assert f"{s3_bucket}/nope.sft" in capsys.readouterr().err
    assert main(["convert", f"{s3_bucket}/nope.sft", f"{s3_bucket}/out.ckpt"]) == 1
    assert f"{s3_bucket}/nope.sft" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # not installed
    save_state(_ckpt(), tmp_path / "c.sft")
    for args in (["inspect", "gs://bucket/c.sft"], ["convert", str(tmp_path / "c.sft"), "gs://bucket/c.ckpt"]):
        assert main(args) == 1
        assert "lightning-utils[gcs]" in capsys.readouterr().err
