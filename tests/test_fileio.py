"""bot/fileio.py: atomic writes (a reader sees the old file or the new one, never half of one, and no temporary is
left), and YAML that cannot be parsed, reported in one line in the caller's error class."""

from __future__ import annotations

import os

import pytest

from bot.errors import SupportbotError
from bot.fileio import atomic_write_bytes, atomic_write_text, parse_yaml, read_yaml


class Refused(SupportbotError):
    """The error class a caller hands to the YAML readers."""


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


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 5000, "nested too deeply"),  # PyYAML recurses per level: RecursionError, not a yaml.YAMLError
        ("{a: " * 5000, "nested too deeply"),
    ],
)
def test_a_yaml_file_that_cannot_be_parsed_is_one_line_in_the_callers_error_class(tmp_path, text, message):
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(Refused) as caught:
        read_yaml(path, error=Refused)
    assert str(caught.value) == f"{path}: {message}"


def test_yaml_text_names_where_it_came_from_when_it_is_nested_too_deeply():
    with pytest.raises(Refused) as caught:
        parse_yaml("title: " + "[" * 5000, where="notes.md: front matter", error=Refused)
    assert str(caught.value) == "notes.md: front matter: nested too deeply"
