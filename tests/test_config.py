"""The config schema names bad keys, and environment overrides land where they say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from claas_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    config = load_config({}, environ={})
    assert config.training.teacher == "base" and config.training.alpha == 0.0 and config.training.top_k == 100 and config.lora.rank == 16


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


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_serve_config_validates(path):
    (application,) = yaml.safe_load(Path(path).read_text())["applications"]
    assert application["import_path"] == "deployments.app:build_app"
    load_config(application["args"], environ={})


def test_s3_store_needs_a_bucket_and_backends_are_named():
    with pytest.raises(ConfigError, match=r"store.*bucket"):
        load_config({"store": {"kind": "s3"}}, environ={})
    with pytest.raises(ConfigError, match=r"trainer\.backend"):
        load_config({"trainer": {"backend": "sagemaker"}}, environ={})
    config = load_config({"trainer": {"backend": "modal", "modal": {"app_name": "mine"}}}, environ={})
    assert config.trainer.modal.app_name == "mine" and config.trainer.modal.class_name == "SDPOTrainerGPU"
