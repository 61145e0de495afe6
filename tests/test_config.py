"""The config schema names bad keys, and environment overrides land where they say."""

from __future__ import annotations

import pytest

from claas_ray.config import ConfigError, load_config


def test_defaults_validate():
    config = load_config({}, environ={})
    assert config.training.teacher == "ema" and config.training.top_k == 100 and config.lora.rank == 16


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"training\.learning_rat"):
        load_config({"training": {"learning_rat": 1e-4}}, environ={})


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"training\.alpha"):
        load_config({"training": {"alpha": 2.0}}, environ={})
    with pytest.raises(ConfigError, match=r"hindsight_template"):
        load_config({"training": {"hindsight_template": "no placeholder"}}, environ={})


def test_environment_overrides_yaml():
    config = load_config(
        {"training": {"learning_rate": 1e-5, "teacher": "base"}},
        environ={"CLAAS_RAY__TRAINING__LEARNING_RATE": "3e-4", "CLAAS_RAY__LORA__TARGET_MODULES": "[q_proj, v_proj]"},
    )
    assert config.training.learning_rate == pytest.approx(3e-4)
    assert config.training.teacher == "base"
    assert config.lora.target_modules == ["q_proj", "v_proj"]


def test_bad_environment_key_is_named():
    with pytest.raises(ConfigError, match=r"training\.nope"):
        load_config({}, environ={"CLAAS_RAY__TRAINING__NOPE": "1"})
