"""Every ``map_location`` form ``torch.load`` takes works on ``.sft`` loads (:mod:`lightning_utils.io.map_location`),
and a bad one is reported as the argument's fault, not the file's."""

from __future__ import annotations

import pytest
import torch

from lightning_utils.io import CheckpointFormatError, load_state, save_state


def test_map_location_forms(tmp_path):
    save_state({"w": torch.ones(2), "v": torch.ones(4)[1:3]}, tmp_path / "m.sft")
    for ml in (None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s, lambda s, loc: None):
        out = load_state(tmp_path / "m.sft", map_location=ml)
        assert out["w"].device.type == "cpu" and torch.equal(out["v"], torch.ones(2))
    seen = []
    load_state(tmp_path / "m.sft", map_location=lambda s, loc: seen.append(loc) or s)
    assert seen == ["cpu", "cpu"]
    out = load_state(tmp_path / "m.sft", map_location="meta")
    assert out["w"].device.type == "meta"
    with pytest.raises(TypeError, match="map_location"):
        load_state(tmp_path / "m.sft", map_location=3)


@pytest.mark.parametrize("suffix", [".pt", ".sft"])
def test_bad_map_location_is_not_blamed_on_the_file(tmp_path, suffix):
    """A bad ``map_location`` (``3``, ``"nonsense"``) is checked before the file is read, for both
    formats: a TypeError/ValueError about the argument, never a CheckpointFormatError."""
    p = tmp_path / f"ok{suffix}"
    save_state({"a": torch.ones(1)}, p)
    with pytest.raises(TypeError, match="map_location"):
        load_state(p, map_location=3)
    with pytest.raises(Exception) as info:
        load_state(p, map_location="nonsense")
    assert not isinstance(info.value, CheckpointFormatError)
