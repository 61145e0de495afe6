"""Shared fixtures. Ray and the app start once per session (see DEVELOPERS.md), never per test."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every Ray socket on 127.0.0.1
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def trainer():
    """The real SDPO trainer on the embedded SmolLM2-135M model (pulled on demand)."""
    from claas_ray.config import ModelConfig
    from claas_ray.training import SDPOTrainer

    return SDPOTrainer(ModelConfig())
