"""What crosses the wire to a remote trainer: calls and replies as plain data (bytes, numbers, JSON).

Adapter states travel as their safetensors files (`AdapterState.to_files`), so a remote step needs no
pickled tensors and a reply can be checked before anything is published.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from claas_ray.adapters.state import AdapterState
from claas_ray.config import LoraConfig, TrainingConfig
from claas_ray.training.example import TrainingExample
from claas_ray.training.step import SDPOTrainer, StepResult


class StepCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_files: dict[str, bytes]
    examples: list[TrainingExample]
    training: TrainingConfig

    @classmethod
    def of(cls, state: AdapterState, examples: list[TrainingExample], training: TrainingConfig) -> StepCall:
        return cls(state_files=state.to_files(), examples=list(examples), training=training)


class StepReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accepted: bool
    state_files: dict[str, bytes]
    metrics: dict[str, float]
    reason: str | None = None

    def result(self) -> StepResult:
        return StepResult(
            accepted=self.accepted, state=AdapterState.from_files(self.state_files), metrics=self.metrics,
            reason=self.reason,
        )


class InitCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora: LoraConfig
    seed: int = 0


def run_step(trainer: SDPOTrainer, call: dict[str, Any]) -> dict[str, Any]:
    """A remote step's body: the very `SDPOTrainer.step` the local backend runs."""
    request = StepCall.model_validate(call)
    state = AdapterState.from_files(request.state_files)
    result = trainer.step(state, request.examples, request.training)
    return StepReply(
        accepted=result.accepted, state_files=result.state.to_files(), metrics=result.metrics, reason=result.reason
    ).model_dump()


def run_init(trainer: SDPOTrainer, call: dict[str, Any]) -> dict[str, bytes]:
    request = InitCall.model_validate(call)
    return trainer.init_adapter(request.lora, request.seed).to_files()


def run_check(trainer: SDPOTrainer, state_files: dict[str, bytes]) -> str | None:
    """None if the state fits the base model, else why not (a remote exception would lose its type)."""
    try:
        trainer.check_compatible(AdapterState.from_files(state_files))
    except ValueError as exc:
        return str(exc)
    return None
