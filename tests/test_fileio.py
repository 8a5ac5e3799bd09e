"""bot/fileio.py's atomic writes: a reader sees the old file or the new one, never half of one, and no temporary is left."""

from __future__ import annotations

import os

import pytest

from bot.fileio import atomic_write_bytes, atomic_write_text


def test_an_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "picture.png"
    target.write_bytes(b"old" * 1000)
    atomic_write_bytes(target, b"\x89PNG new")
    assert target.read_bytes() == b"\x89PNG new"
    atomic_write_text(tmp_path / "rows.csv", "text,cluster\r\ncaf\u00e9,1\n")  # newlines as given, UTF-8
    assert (tmp_path / "rows.csv").read_bytes() == "text,cluster\r\ncaf\u00e9,1\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picture.png", "rows.csv"]


def test_a_write_that_fails_before_the_rename_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "corrections.yaml"
    target.write_text("labels: [kept]\n", encoding="utf-8")

    def refuse(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "labels: []\n")
    assert target.read_text(encoding="utf-8") == "labels: [kept]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["corrections.yaml"]
