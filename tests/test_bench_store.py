"""The append-only result store: keys, duplicates, and a truncated last line after a kill."""

from __future__ import annotations

import json

from sgl_adaptive.bench.store import JsonlStore, config_hash, read_lines


def test_append_skips_existing_keys_and_survives_reopening(tmp_path):
    path = tmp_path / "r.jsonl"
    store = JsonlStore(path)
    assert store.append({"key": "a", "v": 1})
    assert not store.append({"key": "a", "v": 2})
    assert store.append({"key": "b", "v": 3})
    again = JsonlStore(path)
    assert "a" in again and "b" in again and len(again) == 2
    assert again.get("a")["v"] == 1
    assert not again.append({"key": "b", "v": 4})
    assert [json.loads(x)["v"] for x in path.read_text().splitlines()] == [1, 3]


def test_a_truncated_last_line_is_ignored_and_the_next_append_starts_a_new_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a", "v": 1}\n{"key": "b", "v"')  # killed while writing b
    store = JsonlStore(path)
    assert "a" in store and "b" not in store
    assert store.append({"key": "b", "v": 2})
    lines = path.read_text().splitlines()
    assert lines[-1] == '{"key":"b","v":2}'
    assert [r["key"] for r in read_lines(path)] == ["a", "b"]
    assert len(JsonlStore(path)) == 2


def test_a_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a", "v": 1}')
    store = JsonlStore(path)
    assert "a" in store
    store.append({"key": "c"})
    assert [r["key"] for r in read_lines(path)] == ["a", "c"]


def test_config_hash_ignores_key_order():
    assert config_hash({"n": 4, "t": 0.9}) == config_hash({"t": 0.9, "n": 4})
    assert config_hash({"n": 4}) != config_hash({"n": 8})
