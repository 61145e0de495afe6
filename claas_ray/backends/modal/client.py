"""The trainer deployment's side of the Modal backend: each call goes to the deployed GPU class.

Needs Modal credentials in the trainer's environment (MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or
~/.modal.toml) and the app deployed with `modal deploy -m claas_ray.backends.modal.app`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from claas_ray.adapters.state import AdapterState
from claas_ray.backends.wire import InitCall, StepCall, StepReply
from claas_ray.config import ClaasConfig, LoraConfig, TrainingConfig
from claas_ray.training.example import TrainingExample
from claas_ray.training.step import StepResult


class ModalTrainingBackend:
    """`TrainingBackend` over a deployed `SDPOTrainerGPU` (or any object with the same `.remote` methods)."""

    def __init__(self, config: ClaasConfig, remote: Any | None = None):
        if remote is None:
            import modal

            settings = config.trainer.modal
            cls = modal.Cls.from_name(settings.app_name, settings.class_name, environment_name=settings.environment)
            remote = cls(base_model=config.model.base_model, max_model_len=config.model.max_model_len)
        self._remote = remote

    def _invoke(self, method: str, payload: Any) -> Any:
        return getattr(self._remote, method).remote(payload)

    def init_adapter(self, lora: LoraConfig, seed: int = 0) -> AdapterState:
        return AdapterState.from_files(self._invoke("init_adapter", InitCall(lora=lora, seed=seed).model_dump()))

    def check_compatible(self, state: AdapterState) -> None:
        problem = self._invoke("check_compatible", state.to_files())
        if problem is not None:
            raise ValueError(problem)

    def step(self, state: AdapterState, examples: Sequence[TrainingExample], config: TrainingConfig) -> StepResult:
        reply = StepReply.model_validate(self._invoke("step", StepCall.of(state, list(examples), config).model_dump()))
        result = reply.result()
        if result.state.student.keys() != state.student.keys():
            raise ValueError("the remote trainer returned an adapter of a different layout")
        return result
