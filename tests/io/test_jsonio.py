"""JSON helpers (:mod:`lightning_utils.io.jsonio`): float truncation, atomic writes, errors naming the file,
and identical text with or without orjson."""

from __future__ import annotations

import json

import pytest

from lightning_utils.io import json_dumps, json_read, json_write


def test_truncate_rounds_long_decimals_only(tmp_path):
    json_write({"a": 1.123456789, "b": 1.1234567}, tmp_path / "m.json", truncate=True)
    assert (tmp_path / "m.json").read_text() == '{"a":1.1235,"b":1.1234567}'
    assert json.loads(json_dumps({"e": 1.23456789e-05, "n": [0.123456789]}, truncate=True)) == {
        "e": 1.2346e-05,
        "n": [0.1235],
    }


def test_read_default_and_roundtrip(tmp_path):
    assert json_read(tmp_path / "missing.json", default={"d": 1}) == {"d": 1}
    data = {"x": [1, 2, {"y": None}], "s": "é"}
    json_write(data, tmp_path / "sub" / "d.json", pretty=True)
    assert json_read(tmp_path / "sub" / "d.json") == data
    assert (tmp_path / "sub" / "d.json").read_text().startswith('{\n  "x"')


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="bad.json"):
        json_read(tmp_path / "bad.json")


def test_stdlib_and_orjson_write_identical_text(monkeypatch):
    import lightning_utils.io.jsonio as jsonio

    data = {"a": 1.123456789, "b": [1, 2.5, None, True], "s": "x"}
    monkeypatch.setattr(jsonio, "_ORJSON", [None])  # as if orjson were not installed
    stdlib = (json_dumps(data), json_dumps(data, truncate=True), json_dumps(data, pretty=True))
    orjson = pytest.importorskip("orjson", reason="orjson (the optional `json` extra) is not installed")
    monkeypatch.setattr(jsonio, "_ORJSON", [orjson])
    assert (json_dumps(data), json_dumps(data, truncate=True), json_dumps(data, pretty=True)) == stdlib
