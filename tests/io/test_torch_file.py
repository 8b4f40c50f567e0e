"""``.pt``/``.ckpt`` loading (:mod:`lightning_utils.io.torch_file`): weights_only by default, an allowlist,
and clear refusals."""

from __future__ import annotations

import pathlib

import pytest
import torch
from helpers.checkpoints import Custom

from lightning_utils.io import CheckpointFormatError, UnsafeCheckpointError, load_state, save_state


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
    assert load_state(tmp_path / "u.pt", weights_only=False)["obj"].v == 3


def test_garbage_pickle_is_a_format_error_not_unsafe(tmp_path):
    """A damaged pickle is a CheckpointFormatError; only a well-formed pickle that needs a
    disallowed global is an UnsafeCheckpointError (which suggests ``weights_only=False``)."""
    p = tmp_path / "bad.pt"
    p.write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00a\xff")  # a dict, then an invalid opcode
    with pytest.raises(CheckpointFormatError, match="bad.pt"):
        load_state(p)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": Custom(1)}, unsafe)  # a real disallowed global
    with pytest.raises(UnsafeCheckpointError):
        load_state(unsafe)


def test_force_weights_only_env_wins_over_false(tmp_path, monkeypatch):
    save_state({"obj": Custom(3)}, tmp_path / "u.pt")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError):
        load_state(tmp_path / "u.pt", weights_only=False)


def test_force_no_weights_only_env_changes_the_default(tmp_path, monkeypatch):
    save_state({"obj": Custom(3)}, tmp_path / "u.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert load_state(tmp_path / "u.pt")["obj"].v == 3


def test_torch_load_keeps_the_users_own_safe_globals(tmp_path):
    """``torch.serialization.safe_globals`` removes on exit what it was given, even classes the user
    had allowed before with ``add_safe_globals``; load_torch adds only what is not allowed
    already, so after a load_state of a .pt the user's own ``torch.load`` still works."""
    allowed_before = torch.serialization.get_safe_globals()
    try:
        torch.serialization.add_safe_globals([pathlib.PosixPath])
        p = tmp_path / "paths.pt"
        torch.save({"root": pathlib.PosixPath("/data")}, p)
        assert load_state(p)["root"] == pathlib.PosixPath("/data")
        assert pathlib.PosixPath in torch.serialization.get_safe_globals()
        assert torch.load(p)["root"] == pathlib.PosixPath("/data")
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(allowed_before)


def test_map_location_forms_for_torch_files(tmp_path):
    save_state({"w": torch.ones(2)}, tmp_path / "m.pt")
    for ml in (None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s):
        assert torch.equal(load_state(tmp_path / "m.pt", map_location=ml)["w"], torch.ones(2))
