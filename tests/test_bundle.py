"""bundle.json has a schema (bot/bundle.py `Manifest`): the JSON on disk stays as it was, old bundles
still load with the documented defaults, and foreign or malformed manifests are refused in one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from bot import bundle as bundle_mod
from bot.bundle import BundleError, Manifest, ManifestBody, parse_manifest
from bot.classifier import IntentClassifier


def _copy(bundle, tmp_path, edit=None):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    if edit is not None:
        meta = json.loads((target / "bundle.json").read_text())
        edit(meta)
        (target / "bundle.json").write_text(json.dumps(meta))
    return target


def test_the_manifest_round_trips_bundle_json_key_for_key(banking_head_bundle):
    on_disk = json.loads((banking_head_bundle / "bundle.json").read_text())
    again = parse_manifest(on_disk).to_json()
    assert again == on_disk
    assert list(again) == list(on_disk)  # same order too: format_version, version, created, ..., files
    assert list(on_disk)[:3] == ["format_version", "version", "created"] and list(on_disk)[-1] == "files"


def test_an_old_bundle_without_precision_serves_fp32_as_before(banking_head_bundle, tmp_path):
    old = _copy(banking_head_bundle, tmp_path, lambda m: m["encoder"].pop("precision"))
    loaded = bundle_mod.load(old)
    assert loaded.manifest.encoder.precision == "fp32"
    assert "precision" not in json.loads((old / "bundle.json").read_text())["encoder"]
    texts = ["my card has not arrived yet", "how do I activate my card"]
    assert IntentClassifier.from_bundle(old).predict(texts) == IntentClassifier.from_bundle(banking_head_bundle).predict(texts)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=2), r"bundle format 2 is not supported \(this supportbot reads 1\)"),
        (lambda m: m.clear() or m.update(name="some-other-tool", files={}), r"is not a supportbot bundle manifest"),
        (lambda m: m["calibration"].update(temperature="hot"), r"bundle\.json: calibration\.temperature: Input should be a valid number"),
        (lambda m: m["calibration"].pop("confidence_floor"), r"lacks the field 'calibration\.confidence_floor'"),
        (lambda m: m.update(labels=[]), r"bundle\.json: labels: List should have at least 1 item"),
        (lambda m: m.update(labels=m["labels"][:-1]), r"head\.safetensors has 8 outputs but bundle\.json lists 7 labels"),
        (lambda m: m.update(labels=[*m["labels"], "extra"]), r"head\.safetensors has 8 outputs but bundle\.json lists 9 labels"),
    ],
)
def test_a_foreign_or_malformed_manifest_is_refused_in_one_line(banking_head_bundle, tmp_path, edit, message):
    with pytest.raises(BundleError, match=message) as caught:
        bundle_mod.load(_copy(banking_head_bundle, tmp_path, edit))
    assert "\n" not in str(caught.value)


def test_sections_the_schema_does_not_name_pass_through_write_and_load(banking_head_bundle, tmp_path):
    source = bundle_mod.load(banking_head_bundle)
    body = ManifestBody.model_validate({**source.meta, "knowledge": {"passages": 3, "floor": 0.4}})
    writers = {name: (lambda target, name=name: shutil.copyfile(source.path / name, target)) for name in source.manifest.files}
    written = bundle_mod.write(tmp_path / "with-extra", body, writers)
    loaded = bundle_mod.load(written.path)
    assert loaded.meta["knowledge"] == {"passages": 3, "floor": 0.4}
    assert loaded.version == source.version  # the version hashes files, labels and calibration only
    assert isinstance(loaded.manifest, Manifest) and loaded.manifest.files == source.manifest.files


def test_write_replaces_a_bundle_or_an_empty_folder_and_refuses_anything_else(banking_head_bundle, tmp_path):
    source = bundle_mod.load(banking_head_bundle)
    writers = {name: bundle_mod.file_copier(source.path / name) for name in source.manifest.files}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bundle_mod.write(empty, source.manifest, writers).version == source.version
    assert bundle_mod.write(empty, source.manifest, writers).version == source.version  # now a bundle: replaced again
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    plain = tmp_path / "plain"
    plain.write_text("a file")
    (empty / "readme.txt").write_text("mine")  # a bundle that also holds a file of a person's
    for target, message in [(notes, "a folder that is not a model bundle (it holds notes.txt)"),
                            (plain, "exists and is not a folder"), (empty, "also holds readme.txt")]:
        with pytest.raises(BundleError, match=re.escape(message)) as caught:
            bundle_mod.write(target, source.manifest, writers)
        assert str(target) in str(caught.value) and "\n" not in str(caught.value)
    assert (notes / "notes.txt").read_text() == "precious" and sorted(p.name for p in notes.iterdir()) == ["notes.txt"]
    assert plain.read_text() == "a file" and (empty / "readme.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes", "plain"]  # no hidden copies left behind
