"""Where SDPO steps run: in the trainer deployment (`local`) or on Modal GPUs (`modal`).

Every backend offers the three calls the trainer deployment makes; the deployment itself (journal,
publish, broadcast) is the same whichever backend computes the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from claas_ray.adapters.state import AdapterState
from claas_ray.config import ClaasConfig, LoraConfig, TrainingConfig
from claas_ray.training.example import TrainingExample
from claas_ray.training.step import StepResult


class TrainingBackend(Protocol):
    def init_adapter(self, lora: LoraConfig, seed: int = 0) -> AdapterState:
        """A zero-effect adapter of this shape for the base model."""

    def check_compatible(self, state: AdapterState) -> None:
        """Raise ValueError unless the state fits the base model's LoRA layout."""

    def step(self, state: AdapterState, examples: Sequence[TrainingExample], config: TrainingConfig) -> StepResult:
        """One guarded SDPO step."""


def open_backend(config: ClaasConfig) -> TrainingBackend:
    """The backend `trainer.backend` names."""
    backend = config.trainer.backend
    if backend == "local":
        from claas_ray.training.step import SDPOTrainer

        return SDPOTrainer(config.model)
    if backend == "modal":
        from claas_ray.backends.modal.client import ModalTrainingBackend

        return ModalTrainingBackend(config)
    raise ValueError(f"trainer.backend: unsupported backend {backend!r}")
