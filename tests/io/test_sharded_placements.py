"""Sharded saves of real ``DTensor``s on 4 gloo ranks (a 2 x 2 mesh): HSDP and FSDP x TP on another
dimension save, load whole and load back into other placements; ``_StridedShard`` (FSDP x TP on the
same dimension) and ``Partial`` are refused on every rank with the tensor's key path.

One launch of ``sharded_placements_script.py`` (a few seconds); every rank reports to a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ranks

SCRIPT = Path(__file__).with_name("sharded_placements_script.py")
WORLD = 4

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("placements")
    ranks.check_ok(ranks.launch(SCRIPT, [str(out)], timeout=240, world_size=WORLD))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_hsdp_and_fsdp_x_tp_on_another_dimension_save_and_load_whole(reports):
    for report in reports:
        for kind in ("sharded", "consolidated"):
            assert report[f"{kind}_whole_equal"] == {"hsdp_w": True, "hsdp_b": True, "tp_w": True, "moment": True}
    chunks = reports[0]["chunks"]

    def blocks(name):
        return sorted((c["file"], c["offsets"], c["shape"]) for c in chunks[name])

    # HSDP: the mesh is [[0, 1], [2, 3]]; the replicas at replicate coordinate 0 (ranks 0, 1)
    # store the blocks, once each; ranks 2 and 3 store none of them
    assert [r["coordinate"] for r in reports] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert blocks("layer.weight") == [(0, [0, 0], [4, 4]), (1, [4, 0], [4, 4])]
    assert blocks("layer.bias") == [(0, [0], [3]), (1, [3], [2])]
    assert blocks("optimizer_states.0.state.layer.weight.exp_avg") == [(0, [0, 0], [4, 4]), (1, [4, 0], [4, 4])]
    # FSDP on rows x TP on columns: four blocks, one per rank
    assert blocks("tp.weight") == [
        (0, [0, 0], [3, 2]),
        (1, [0, 2], [3, 2]),
        (2, [3, 0], [3, 2]),
        (3, [3, 2], [3, 2]),
    ]
    assert reports[0]["files"] == ["index.json"] + [f"shard-0000{r}-of-00004.safetensors" for r in range(WORLD)]


def test_hsdp_checkpoints_load_into_dtensors_of_the_same_and_other_placements(reports):
    for report in reports:
        assert report["loaded"] and all(report["loaded"].values()), (report["rank"], report["loaded"])
        assert len(report["loaded"]) == 8


@pytest.mark.parametrize(("kind", "placement"), [("strided", "_StridedShard"), ("partial", "Partial")])
def test_strided_and_partial_placements_are_refused_with_the_key_path(reports, kind, placement):
    key_path = "checkpoint['optimizer_states'][0]['state']['layer.weight']['exp_avg_sq']"
    for report in reports:
        for save in ("save_sharded", "save_consolidated"):
            message = report["errors"][f"{kind}:{save}"]
            assert message.startswith(f"{key_path}: a DTensor with placement "), (report["rank"], message)
            assert f"({placement})" in message and "Shard(dim) and Replicate()" in message, message
        # refused before anything was written: only the two good checkpoints, no staging directory
        assert report["names_after_refusals"] == ["hsdp-one.sft", "hsdp.sft"]
