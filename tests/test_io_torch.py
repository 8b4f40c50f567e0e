"""``.pt``/``.ckpt`` loading: weights_only by default, an allowlist, and clear refusals."""

from __future__ import annotations

import pathlib

import pytest
import torch

from lightning_utils.io import UnsafeCheckpointError, load_state, save_state


class Custom:  # an arbitrary object: weights_only=True must refuse it
    def __init__(self, x):
        self.x = x


def test_lightning_style_hparams_with_paths_load_by_default(tmp_path):
    ckpt = {
        "hyper_parameters": {"root": pathlib.Path("/data"), "win": pathlib.PureWindowsPath("C:/x")},
        "state_dict": {"w": torch.ones(1)},
    }
    save_state(ckpt, tmp_path / "c.ckpt")
    out = load_state(tmp_path / "c.ckpt")  # weights_only=None -> torch's default, True
    assert out["hyper_parameters"]["root"] == pathlib.Path("/data")
    assert out["hyper_parameters"]["win"] == pathlib.PureWindowsPath("C:/x")


def test_unsafe_object_gets_an_error_that_says_weights_only_false(tmp_path):
    save_state({"obj": Custom(3)}, tmp_path / "u.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state(tmp_path / "u.pt")
    msg = str(info.value)
    assert "u.pt" in msg and "weights_only=False" in msg and "Custom" in msg
    assert isinstance(info.value, ValueError)
    assert load_state(tmp_path / "u.pt", weights_only=False)["obj"].x == 3


def test_force_weights_only_env_wins_over_false(tmp_path, monkeypatch):
    save_state({"obj": Custom(3)}, tmp_path / "u.pt")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError):
        load_state(tmp_path / "u.pt", weights_only=False)


def test_force_no_weights_only_env_changes_the_default(tmp_path, monkeypatch):
    save_state({"obj": Custom(3)}, tmp_path / "u.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert load_state(tmp_path / "u.pt")["obj"].x == 3


def test_map_location_forms_for_torch_files(tmp_path):
    save_state({"w": torch.ones(2)}, tmp_path / "m.pt")
    for ml in (None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s):
        assert torch.equal(load_state(tmp_path / "m.pt", map_location=ml)["w"], torch.ones(2))
