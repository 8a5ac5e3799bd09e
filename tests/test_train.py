"""Training with the real encoder on small slices of BANKING77: head, lora, contrastive, full; bundles; the frozen base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ROOT, train_bundle
from safetensors.torch import load_file

from bot import bundle as bundle_mod
from bot.bundle import BundleError
from bot.classifier import IntentClassifier
from bot.encoder import resolve_base
from finetune.config import HeadConfig, load_config
from finetune.data import OOS_LABEL, DataError
from finetune.data import load as load_data
from finetune.train import train


def _accuracy(bundle_path, test_csv) -> float:
    from finetune.data import load

    rows = load(str(test_csv))["train"]
    predictions = IntentClassifier.from_bundle(bundle_path).predict(list(rows["text"]))
    return sum(p.label == gold for p, gold in zip(predictions, rows["label"])) / len(rows)


def test_head_bundle_predicts_well_above_chance(banking_head_bundle, banking_slice):
    assert _accuracy(banking_head_bundle, banking_slice["test"]) > 0.8  # chance is 1/8
    meta = json.loads((banking_head_bundle / "bundle.json").read_text())
    assert set(meta["files"]) == {"head.safetensors"}
    for key in ("format_version", "version", "created", "base", "strategy", "labels", "encoder", "calibration", "metrics", "training", "files"):
        assert key in meta
    assert meta["base"]["id"] == "sentence-transformers/all-MiniLM-L6-v2" and len(meta["base"]["sha256"]) == 64
    assert meta["encoder"] == {"pooling": "mean", "normalize": True, "max_length": 64, "precision": "fp32"}
    assert meta["calibration"]["temperature"] > 0 and 0 <= meta["calibration"]["confidence_floor"] <= 0.9
    assert len(meta["training"]["data_fingerprint"]) == 64 and meta["training"]["seconds"] > 0


def test_prediction_fields(banking_head_bundle):
    classifier = IntentClassifier.from_bundle(banking_head_bundle)
    (prediction,) = classifier.predict(["my card still has not arrived"], top_k=3)
    assert prediction.label in classifier.labels and len(prediction.ranking) == 3
    assert prediction.ranking[0] == (prediction.label, prediction.confidence)
    assert prediction.ranking[0][1] >= prediction.ranking[1][1] >= prediction.ranking[2][1]
    assert prediction.out_of_scope == (prediction.confidence < classifier.confidence_floor)
    assert classifier.predict([]) == []


def test_batched_prediction_matches_one_by_one(banking_head_bundle, banking_slice):
    """Length-sorted batching must not change a text's prediction."""
    classifier = IntentClassifier.from_bundle(banking_head_bundle)
    texts = ["card", "I was charged twice for the same thing and I would like to understand why this happened", "hi?"]
    batched = classifier.logits(texts)
    single = torch.cat([classifier.logits([t]) for t in texts])
    assert torch.allclose(batched, single, atol=1e-4)


def test_same_seed_same_model_and_second_run_uses_the_cache(tmp_path, banking_slice):
    logs_a, logs_b = [], []
    cfg = load_config(None, [f"data={banking_slice['train']}", f"output={tmp_path / 'a'}", "epochs=30", "onnx=false"])
    a = train(cfg, progress=False, log=logs_a.append)
    b = train(cfg.model_copy(update={"output": str(tmp_path / "b")}), progress=False, log=logs_b.append)
    assert a.bundle.version == b.bundle.version
    assert "embeddings: 0 computed" in " ".join(logs_b)


def test_bottleneck_head(tmp_path, banking_slice):
    path = train_bundle(tmp_path / "mlp", f"data={banking_slice['train']}", "head.hidden=64", "epochs=60")
    state = load_file(str(path / "head.safetensors"))
    assert [tuple(v.shape) for k, v in sorted(state.items()) if k.endswith("weight")] == [(64, 384), (8, 64)]
    assert _accuracy(path, banking_slice["test"]) > 0.7


@pytest.mark.parametrize("strategy, extra", [
    ("lora", []),
    ("contrastive", ["few_shot=12"]),  # contrastive body phase, then the head on its vectors
])
def test_adapter_strategies_train_adapters_only_and_leave_the_base_bit_identical(tmp_path, banking_slice, strategy, extra):
    from transformers import AutoModel

    original = AutoModel.from_pretrained(resolve_base("sentence-transformers/all-MiniLM-L6-v2")).state_dict()
    cfg = load_config(None, [
        f"data={banking_slice['train']}", f"strategy={strategy}", f"output={tmp_path / strategy}",
        "epochs=2", "max_length=32", "lora.r=4", "batch_size=16", "onnx=false", *extra,
    ])
    result = train(cfg, progress=False, log=lambda _m: None)
    peft_body = result.model.body
    trained = peft_body.get_base_model().state_dict()
    base_keys = {k.replace("base_layer.", ""): k for k in trained if "lora_" not in k}
    assert set(original) <= set(base_keys)
    for name, tensor in original.items():
        assert torch.equal(tensor, trained[base_keys[name]]), f"base tensor {name} changed"
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # the adapters did train

    files = set(json.loads((result.bundle.path / "bundle.json").read_text())["files"])
    assert files == {"head.safetensors", "adapter.safetensors"}
    adapter = load_file(str(result.bundle.path / "adapter.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert sum(v.numel() for v in adapter.values()) == result.summary["trainable_parameters"] - sum(
        v.numel() for v in load_file(str(result.bundle.path / "head.safetensors")).values()
    )
    assert _accuracy(result.bundle.path, banking_slice["test"]) > 0.6



def test_lora_recipe_serves_its_head_scale_and_runs_every_epoch(tmp_path, banking_slice):
    """A recipe's head scale reaches the served head (set to 20 here: configs/lora.yaml's own 10 is the
    default, which would not show it), and configs/lora.yaml's patience never cuts its schedule short."""
    recipe = ROOT / "configs" / "lora.yaml"
    written = load_config(recipe)
    assert written.label_smoothing > 0 and written.head_lr != load_config(None).head_lr  # the recipe sets both
    assert written.patience is not None and written.epochs is not None and written.patience >= written.epochs
    scale = 20.0
    assert scale != HeadConfig().scale
    cfg = load_config(recipe, [
        f"data={banking_slice['train']}", f"output={tmp_path / 'lora'}", "epochs=2", "patience=2",
        "max_length=32", "lora.r=4", "onnx=false", f"head.scale={scale}",
    ])
    result = train(cfg, progress=False, log=lambda _m: None)
    meta = json.loads((result.bundle.path / "bundle.json").read_text())
    assert meta["head"]["scale"] == scale and meta["training"]["epochs_run"] == 2
    # the recipe refits: the shipped model learned validation's rows too, for the epoch validation kept
    assert written.refit and meta["training"]["refit_epochs"] == [meta["metrics"]["validation"]["best_epoch"]]
    assert IntentClassifier.from_bundle(result.bundle.path).backend.head.scale == scale
    assert _accuracy(result.bundle.path, banking_slice["test"]) > 0.6


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_probe_head_starts_lora_from_a_head_fitted_on_the_frozen_base(tmp_path, banking_slice, precision):
    """LP-FT: with learning rates too small to move anything, only the probed head can make the model
    accurate; the probe's vectors are the head strategy's cached float32 ones (the body in eval mode),
    also when the bundle serves at int8."""
    logs: list[str] = []
    cfg = load_config(None, [
        f"data={banking_slice['train']}", "strategy=lora", f"output={tmp_path / 'lpft'}", "probe_head=true",
        "epochs=1", "lr=1e-9", "head_lr=1e-9", "max_length=32", "lora.r=4", "batch_size=16", "onnx=false",
        f"precision={precision}",
    ])
    result = train(cfg, progress=False, log=logs.append)
    assert any(line.startswith("head probed on the frozen base") for line in logs)
    assert _accuracy(result.bundle.path, banking_slice["test"]) > 0.7  # chance is 1/8; an unprobed head stays near it


def test_a_refit_replays_each_phase_in_order_the_head_probe_then_the_joint_lora_phase(tmp_path, banking_slice, monkeypatch):
    """Two supervised phases (LP-FT's probe, then lora jointly): the refit trains each for the epochs its own phase
    kept, in the order they ran, and the bundle records both. The first run's model is freed before the second
    run loads its base: one model in memory, not two."""
    import gc
    import weakref

    from finetune import train as train_mod

    first_models: list[weakref.ref] = []
    alive_when_the_refit_starts: list[bool] = []
    real_calibrate, real_start_run = train_mod.calibrate, train_mod.start_run

    def calibrate(run, fitted, serving, inputs):
        first_models.append(weakref.ref(fitted.model))
        return real_calibrate(run, fitted, serving, inputs)

    def start_run(*args, **kwargs):
        if first_models:  # the refit's run
            gc.collect()
            alive_when_the_refit_starts.append(first_models[0]() is not None)
        return real_start_run(*args, **kwargs)

    monkeypatch.setattr(train_mod, "calibrate", calibrate)
    monkeypatch.setattr(train_mod, "start_run", start_run)
    logs: list[str] = []
    cfg = load_config(None, [
        f"data={banking_slice['train']}", "strategy=lora", f"output={tmp_path / 'lpft'}", "probe_head=true", "refit=true",
        "epochs=1", "max_length=32", "lora.r=4", "batch_size=16", "onnx=false",
    ])
    result = train(cfg, progress=False, log=logs.append)
    probes = [int(line.split("best epoch ")[1].split(",")[0]) for line in logs if line.startswith("head probed")]
    meta = json.loads((result.bundle.path / "bundle.json").read_text())
    joint = meta["metrics"]["validation"]["best_epoch"]
    assert meta["training"]["refit_epochs"] == [probes[0], joint]
    assert probes == [probes[0], probes[0]]  # the refit's probe stopped where the first run's kept its head
    assert probes[0] > 1  # the probe's own length (the head's defaults), not the joint phase's one epoch
    assert result.summary["refit_epochs"] == f"{probes[0]}, {joint}"
    assert alive_when_the_refit_starts == [False]


def test_best_epoch_is_chosen_on_validation_loss_with_the_recipes_label_smoothing(tmp_path, banking_slice):
    import torch.nn.functional as F

    from bot.encoder import Encoder
    from finetune.loop import Prepared
    from finetune.train import prepare_data

    cfg = load_config(None, [f"data={banking_slice['train']}", f"output={tmp_path / 'smooth'}", "epochs=40", "label_smoothing=0.3", "onnx=false"])
    result = train(cfg, progress=False, log=lambda _m: None)
    meta = json.loads((result.bundle.path / "bundle.json").read_text())
    prepared: Prepared = prepare_data(cfg)  # the same seeded validation split
    vectors = Encoder.load(resolve_base(cfg.base), max_length=cfg.max_length).embed(list(prepared.val["text"]))
    with torch.inference_mode():
        val_logits = result.model.eval()(vectors)
    smoothed = F.cross_entropy(val_logits, prepared.y_val, label_smoothing=0.3).item()
    assert meta["metrics"]["validation"]["val_loss"] == pytest.approx(smoothed, abs=1e-4)
    assert F.cross_entropy(val_logits, prepared.y_val).item() < smoothed - 0.1  # the two losses differ: it was not unsmoothed


def test_the_weight_average_follows_every_step_and_the_model_gets_its_own_weights_back():
    from torch import nn

    from finetune.loop import WeightAverage

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    frozen = model.bias.requires_grad_(False).detach().clone()
    average = WeightAverage(model, decay=0.9)
    weighted, total = torch.zeros_like(model.weight), 0.0
    optimizer = torch.optim.SGD([model.weight], lr=0.5)
    for _ in range(5):
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        average.update()
        weighted, total = 0.9 * weighted + model.weight.detach(), 0.9 * total + 1.0
    expected = weighted / total  # the steps' weights, step t weighed 0.9^(5 - t): not the initial weights
    own = model.weight.detach().clone()
    assert not torch.allclose(own, expected)
    with average.swapped_in():
        assert torch.allclose(model.weight, expected, atol=1e-6)
        assert torch.equal(model.bias, frozen)  # only what trains is averaged
    assert torch.equal(model.weight, own)


def test_with_ema_validation_judges_the_averaged_weights_and_the_bundle_keeps_them(tmp_path, banking_slice):
    """The recorded validation loss is the shipped head's own: the loop judged what it kept (the average),
    and that differs from what the same seed keeps without averaging."""
    import torch.nn.functional as F

    from bot.encoder import Encoder
    from finetune.train import prepare_data

    common = [f"data={banking_slice['train']}", "epochs=30", "patience=30", "onnx=false"]
    cfg = load_config(None, [*common, f"output={tmp_path / 'ema'}", "ema=0.95"])
    result = train(cfg, progress=False, log=lambda _m: None)
    plain = train(load_config(None, [*common, f"output={tmp_path / 'plain'}"]), progress=False, log=lambda _m: None)
    meta = json.loads((result.bundle.path / "bundle.json").read_text())
    prepared = prepare_data(cfg)
    vectors = Encoder.load(resolve_base(cfg.base), max_length=cfg.max_length).embed(list(prepared.val["text"]))
    with torch.inference_mode():
        shipped_loss = F.cross_entropy(result.model.eval()(vectors), prepared.y_val).item()
    assert meta["metrics"]["validation"]["val_loss"] == pytest.approx(shipped_loss, abs=1e-4)
    shipped, last_steps = (load_file(str(r.bundle.path / "head.safetensors")) for r in (result, plain))
    assert any(not torch.allclose(shipped[name], last_steps[name], atol=1e-4) for name in shipped)
    assert _accuracy(result.bundle.path, banking_slice["test"]) > 0.8  # chance is 1/8


def test_refit_learns_the_validation_rows_too_for_the_epochs_validation_chose_and_keeps_its_calibration(
    tmp_path, banking_slice, monkeypatch
):
    """`refit`: the first run is the plain one (same choice, same calibration, same record); then the model is
    trained again on train + validation for the epoch that run kept, with no validation pass (its rows are
    training data by then), and that model ships."""
    import torch.nn.functional as F

    from bot.encoder import Encoder
    from finetune import loop
    from finetune.train import prepare_data

    passes = {"val": 0}
    real_logits = loop.logits

    def counted(run, net, inputs, split, indices):
        passes[split] = passes.get(split, 0) + 1
        return real_logits(run, net, inputs, split, indices)

    monkeypatch.setattr(loop, "logits", counted)  # what the training loop calls each epoch
    common = [f"data={banking_slice['train']}", "epochs=200", "lr=0.05", "patience=5", "onnx=false"]  # overfits: stops early
    plain = train(load_config(None, [*common, f"output={tmp_path / 'plain'}"]), progress=False, log=lambda _m: None)
    plain_passes, passes["val"] = passes["val"], 0
    logs: list[str] = []
    refitted = train(load_config(None, [*common, f"output={tmp_path / 'refit'}", "refit=true"]), progress=False, log=logs.append)
    assert plain_passes == len(json.loads((plain.bundle.path / "bundle.json").read_text())["training"]["history"])
    assert passes["val"] == plain_passes  # the first run's, and none in the refit
    first, again = (json.loads((r.bundle.path / "bundle.json").read_text()) for r in (plain, refitted))

    assert again["calibration"] == first["calibration"]
    assert again["metrics"]["validation"] == first["metrics"]["validation"]
    assert again["training"]["history"] == first["training"]["history"]
    best = first["metrics"]["validation"]["best_epoch"]
    assert best < len(first["training"]["history"])  # early stopping chose: a refit that ran every epoch would not match
    assert first["training"]["refit_epochs"] is None and again["training"]["refit_epochs"] == [best]
    assert first["training"]["n_train"] + first["training"]["n_validation"] == again["training"]["n_train"] == 320
    assert any(line.startswith("refit: training again on train + validation (320 examples)") for line in logs)
    assert (refitted.summary["refit_epochs"], refitted.summary["refit_examples"]) == (str(best), 320)
    assert "refit_epochs" not in plain.summary

    # the shipped model learned the held-out rows: its loss on them drops below the first model's
    cfg = load_config(None, common)
    prepared = prepare_data(cfg)  # the same seeded validation split
    vectors = Encoder.load(resolve_base(cfg.base), max_length=cfg.max_length).embed(list(prepared.val["text"]))
    with torch.inference_mode():
        losses = [F.cross_entropy(r.model.eval()(vectors), prepared.y_val).item() for r in (plain, refitted)]
    assert losses[1] < losses[0] * 0.8
    assert _accuracy(refitted.bundle.path, banking_slice["test"]) > 0.8


@pytest.mark.slow
def test_full_fine_tune_writes_encoder_weights(tmp_path, banking_slice):
    path = train_bundle(
        tmp_path / "full", f"data={banking_slice['train']}", "strategy=full", "epochs=1", "max_length=32", "batch_size=16"
    )
    assert set(json.loads((path / "bundle.json").read_text())["files"]) == {"head.safetensors", "encoder.safetensors"}
    assert _accuracy(path, banking_slice["test"]) > 0.3


def _copy(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_eval_data_with_labels_the_model_cannot_know_is_refused_before_training(tmp_path, banking_slice, monkeypatch):
    import finetune.train

    def never(*args, **kwargs):
        raise AssertionError("the base was loaded: training started")

    monkeypatch.setattr(finetune.train, "start_run", never)
    cfg = load_config(None, [f"data={banking_slice['train']}", "eval_data=pack:shop", f"output={tmp_path / 'm'}"])
    shop_labels = set(load_data("pack:shop")["test"]["label"]) - {OOS_LABEL}
    with pytest.raises(DataError) as caught:
        train(cfg, progress=False, log=lambda _msg: None)
    assert str(caught.value).startswith(
        f"{len(shop_labels)} label(s) in pack:shop are unknown to the model trained on {banking_slice['train']}: "
    )
    assert not (tmp_path / "m").exists()


def test_flipped_byte_is_refused_naming_the_file(banking_head_bundle, tmp_path):
    copy = _copy(banking_head_bundle, tmp_path)
    weights = copy / "head.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"file head\.safetensors is damaged"):
        bundle_mod.load(copy)


def test_missing_file_is_refused_naming_it(banking_head_bundle, tmp_path):
    copy = _copy(banking_head_bundle, tmp_path)
    (copy / "head.safetensors").unlink()
    with pytest.raises(BundleError, match=r"file head\.safetensors is missing"):
        IntentClassifier.from_bundle(copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=99), "bundle format 99 is not supported"),
        (lambda m: m.pop("labels"), "lacks the field 'labels'"),
        (lambda m: m["base"].update(sha256="0" * 64), "but the base found here has"),
    ],
)
def test_foreign_or_mismatched_bundles_are_refused(banking_head_bundle, tmp_path, edit, message):
    copy = _copy(banking_head_bundle, tmp_path)
    meta = json.loads((copy / "bundle.json").read_text())
    edit(meta)
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        IntentClassifier.from_bundle(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        bundle_mod.load(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"bundle\.json is damaged"):
        bundle_mod.load(tmp_path)
    with pytest.raises(BundleError, match="not a directory"):
        bundle_mod.load(tmp_path / "nope")
