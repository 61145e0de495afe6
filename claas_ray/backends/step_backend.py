"""`StepBackend`: what the trainer loop needs from wherever SDPO steps run.

Every backend takes a batch of one adapter's feedback and returns a *published* version (or the reason it
refused the step), so the loop in `claas_ray/training/worker.py` is the same for all of them:

- `WeightsStepBackend` (`claas_ray/backends/weights.py`) holds the weights: the step is computed here
  (`local`) or on Modal GPUs (`modal`) by a `WeightsTrainer`, published to our adapter store, and its PEFT
  files are handed to the inference replicas.
- `TinkerSDPO` (`claas_ray/backends/tinker/trainer.py`) keeps the weights on Tinker: a version is a pair
  of checkpoint paths in the store, and replicas sample from it there, so there are no files to hand on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from claas_ray.adapters.state import AdapterState
from claas_ray.adapters.store import AdapterVersionMeta
from claas_ray.config import LoraConfig, TrainingConfig
from claas_ray.training.example import TrainingExample
from claas_ray.training.step import StepResult


@dataclass
class PublishedVersion:
    """A version already in the adapter store, and the PEFT files replicas load it from (None: they read the
    store themselves, as Tinker's replicas do)."""

    meta: AdapterVersionMeta
    files: dict[str, bytes] | None = None


@dataclass
class StepOutcome:
    """A published version, or why the step was refused (the previous version keeps serving)."""

    published: PublishedVersion | None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


class StepBackend(Protocol):
    """Where steps run. Calls block (they run the model or wait on a remote service): the loop runs them in a
    thread. `AdapterNotFoundError` means the adapter was deleted; `ValueError` means the request cannot be done
    (an example longer than the context, an operation the backend does not offer), with a message for the user."""

    colocated: bool
    """The step runs on this machine's accelerator, so inference must sleep meanwhile under `trainer.colocation: sleep`."""

    def init_adapter(self, adapter_id: str, lora: LoraConfig) -> PublishedVersion:
        """Version 0 of a new, zero-effect adapter."""

    def reset_adapter(self, adapter_id: str, lora: LoraConfig) -> PublishedVersion:
        """A new zero-effect version of an existing adapter; its history stays for rollback."""

    def import_adapter(self, adapter_id: str, files: dict[str, bytes]) -> PublishedVersion:
        """Version 0 of an adapter from PEFT files a user trained elsewhere."""

    def step(self, adapter_id: str, examples: Sequence[TrainingExample], config: TrainingConfig,
             feedback_ids: Sequence[str]) -> StepOutcome:
        """One guarded SDPO step on the adapter's latest version; an accepted one is published naming
        `feedback_ids`, which is what makes recovery after a crash exactly-once."""

    def forget(self, adapter_id: str) -> None:
        """The adapter was deleted: drop anything cached for it."""


class WeightsTrainer(Protocol):
    """Computes steps on adapter states we hold: `SDPOTrainer` here, `ModalTrainingBackend` on Modal."""

    def init_adapter(self, lora: LoraConfig, seed: int = 0) -> AdapterState:
        """A zero-effect adapter of this shape for the base model."""

    def check_compatible(self, state: AdapterState) -> None:
        """Raise ValueError unless the state fits the base model's LoRA layout."""

    def step(self, state: AdapterState, examples: Sequence[TrainingExample], config: TrainingConfig) -> StepResult:
        """One guarded SDPO step; a rejected step returns the input state and the reason."""
