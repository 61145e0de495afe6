"""The Modal backend without Modal's service: the app builds offline, and its method bodies, run by
Modal's own local execution on the embedded model, give exactly the local trainer's tensors."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import modal
import pytest
import torch

from claas_ray.backends.modal.client import ModalTrainingBackend
from claas_ray.chat import ChatMessage
from claas_ray.config import ClaasConfig, LoraConfig, TrainingConfig
from claas_ray.training.example import TrainingExample

pytestmark = pytest.mark.slow


def test_app_module_builds_offline(monkeypatch):
    monkeypatch.setenv("CLAAS_RAY_MODAL_GPU", "A100-80GB")
    monkeypatch.setenv("CLAAS_RAY_MODAL_APP", "claas-ray-test")
    sys.modules.pop("claas_ray.backends.modal.app", None)
    module = importlib.import_module("claas_ray.backends.modal.app")
    assert module.app.name == "claas-ray-test" and module.GPU == "A100-80GB"
    assert isinstance(module.SDPOTrainerGPU, modal.Cls)
    # Deploying reads the module the same way, in a fresh interpreter, with no network needed to build it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAAS_RAY_MODAL_")}
    result = subprocess.run([sys.executable, "-c", "import claas_ray.backends.modal.app as m; print(m.app.name)"],
                            capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "claas-ray-trainer", result.stderr[-2000:]


class LocalModal:
    """Stand-in for Modal's transport: `.remote(x)` runs the deployed method's body with Modal's `.local(x)`."""

    def __init__(self, instance):
        for name in ("step", "init_adapter", "check_compatible"):
            setattr(self, name, SimpleNamespace(remote=getattr(instance, name).local))


def test_modal_step_matches_the_local_backend(trainer):
    from claas_ray.backends.modal.app import SDPOTrainerGPU

    config = ClaasConfig()
    backend = ModalTrainingBackend(config, remote=LocalModal(SDPOTrainerGPU(base_model=config.model.base_model)))
    lora = LoraConfig(rank=4, alpha=8)
    remote_state = backend.init_adapter(lora, seed=5)
    local_state = trainer.init_adapter(lora, seed=5)
    assert all(torch.equal(remote_state.student[k], local_state.student[k]) for k in local_state.student)

    messages = [ChatMessage(role="user", content="Tell me about dogs.")]
    examples = [TrainingExample(messages=messages, response_text="Dogs are loyal animals.", feedback="Answer in French.")]
    training = TrainingConfig(learning_rate=1e-3, seed=7)
    remote = backend.step(remote_state, examples, training)
    local = trainer.step(local_state, examples, training)
    assert remote.accepted and local.accepted
    assert remote.metrics["loss"] == pytest.approx(local.metrics["loss"], rel=1e-6)
    for name, tensor in local.state.student.items():
        assert torch.equal(remote.state.student[name], tensor), name
    assert any(not torch.equal(remote.state.student[k], remote_state.student[k]) for k in remote_state.student)
    for name, tensor in local.state.optimizer.items():
        assert torch.equal(remote.state.optimizer[name], tensor), name

    backend.check_compatible(remote.state)
    broken = remote.state
    broken.student = {k: v for k, v in list(broken.student.items())[1:]}
    broken.teacher = {}
    with pytest.raises(ValueError, match="LoRA layout"):
        backend.check_compatible(broken)
