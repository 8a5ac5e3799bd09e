"""configs/default.yaml is the written-out form of the built-in training defaults; recipes and `--set` overrides
that cannot be used are one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"


def test_default_recipe_equals_the_built_in_defaults():
    assert load_config(DEFAULT) == load_config(None)


def test_default_recipe_names_every_field_explicitly():
    written = yaml.safe_load(DEFAULT.read_text(encoding="utf-8"))
    assert set(written) == set(TrainConfig.model_fields)
    for section in ("head", "lora", "contrastive", "calibration"):
        assert set(written[section]) == set(type(getattr(TrainConfig(), section)).model_fields)


def test_default_recipe_trains_the_shop_pack_with_a_head():
    cfg = load_config(DEFAULT)
    assert (cfg.data, cfg.strategy, cfg.output) == ("pack:shop", "head", "models/default")


def test_every_shipped_recipe_loads():
    """A recipe in configs/ that the loader refuses (a renamed field, a typo) fails here, not in a user's hands."""
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        if recipe.name == "serve.yaml":
            continue  # the server's settings, not a training recipe
        load_config(recipe)


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=[", "--set epochs: line 1: not valid YAML"),
        ("head.hidden={a: [}", "--set head.hidden: line 1: not valid YAML"),
        ("epochs=" + "[" * 5000, "--set epochs: nested too deeply"),
    ],
)
def test_an_override_whose_value_is_not_yaml_is_a_config_error(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["calibration.min_floor=0.95"], "min_floor 0.95 is above max_floor 0.9"),
        (["calibration.min_floor=0.905", "calibration.max_floor=0.909"],
         "no floor of the 0.01 grid lies from min_floor 0.905 to max_floor 0.909"),
    ],
)
def test_a_calibration_floor_range_without_a_grid_point_is_refused_before_training(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert str(caught.value) == f"config: calibration: Value error, {message}"
