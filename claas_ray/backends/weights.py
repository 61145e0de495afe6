"""`WeightsStepBackend`: steps on adapter weights we hold, computed here (`local`) or on Modal (`modal`).

The version is published to our adapter store, and its PEFT files go to the inference replicas: they load
it from the Ray object store without reading the adapter store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from claas_ray.adapters.state import AdapterState
from claas_ray.adapters.store import AdapterStore
from claas_ray.backends.step_backend import PublishedVersion, StepOutcome, WeightsTrainer
from claas_ray.config import LoraConfig, TrainingConfig
from claas_ray.lru_map import LruMap
from claas_ray.training.example import TrainingExample


class WeightsStepBackend:
    """A `StepBackend` over a `WeightsTrainer` and the adapter store."""

    def __init__(self, trainer: WeightsTrainer, store: AdapterStore, base_model: str, served_targets: Sequence[str],
                 colocated: bool = True, cached_states: int = 16, wire_dtype: torch.dtype | None = None):
        self.trainer = trainer
        self.store = store
        self.base_model = base_model
        self.served_targets = list(served_targets)  # the LoRA modules the engines load (`lora.target_modules`)
        self.colocated = colocated
        self.wire_dtype = wire_dtype  # what the broadcast sends (`ServingConfig.lora_wire_dtype`)
        # Saves a store read per step of a busy adapter; bounded (`trainer.max_cached_states`).
        self._latest: LruMap[str, tuple[int, AdapterState]] = LruMap(cached_states)

    def init_adapter(self, adapter_id: str, lora: LoraConfig) -> PublishedVersion:
        state = self.trainer.init_adapter(lora)
        meta = self.store.create(adapter_id, state)
        self._latest.put(adapter_id, (meta.version, state))
        return PublishedVersion(meta, state.peft_files(self.wire_dtype))

    def reset_adapter(self, adapter_id: str, lora: LoraConfig) -> PublishedVersion:
        state = self.trainer.init_adapter(lora)
        parent = self.store.latest_version(adapter_id)
        meta = self.store.publish(adapter_id, state, parent, note="reset: zero-effect adapter")
        self._latest.put(adapter_id, (meta.version, state))
        return PublishedVersion(meta, state.peft_files(self.wire_dtype))

    def import_adapter(self, adapter_id: str, files: dict[str, bytes]) -> PublishedVersion:
        state = AdapterState.from_files(files)
        unserved = sorted(set(state.lora.target_modules) - set(self.served_targets))
        if unserved:
            raise ValueError(f"target_modules {unserved}: this server serves LoRA on {self.served_targets} only")
        state.base_model = self.base_model
        state.teacher = {name: tensor.clone() for name, tensor in state.student.items()}
        self.trainer.check_compatible(state)
        meta = self.store.create(adapter_id, state, note="imported")
        return PublishedVersion(meta, state.peft_files(self.wire_dtype))

    def step(self, adapter_id: str, examples: Sequence[TrainingExample], config: TrainingConfig,
             feedback_ids: Sequence[str]) -> StepOutcome:
        parent, state = self._load_latest(adapter_id)
        result = self.trainer.step(state, examples, config)
        if not result.accepted:
            return StepOutcome(None, dict(result.metrics), result.reason)
        started = time.perf_counter()
        meta = self.store.publish(adapter_id, result.state, parent, list(feedback_ids), result.metrics)
        self._latest.put(adapter_id, (meta.version, result.state))
        metrics = {**result.metrics, "publish_s": time.perf_counter() - started}
        return StepOutcome(PublishedVersion(meta, result.state.peft_files(self.wire_dtype)), metrics)

    def forget(self, adapter_id: str) -> None:
        self._latest.pop(adapter_id)

    def _load_latest(self, adapter_id: str) -> tuple[int, AdapterState]:
        """The latest version's state: from memory if this backend wrote it, else from the store (a rollback,
        another process, a restart)."""
        latest = self.store.latest_version(adapter_id)
        cached = self._latest.get(adapter_id)
        if cached is not None and cached[0] == latest:
            return cached
        state, meta = self.store.load_state(adapter_id, latest)
        self._latest.put(adapter_id, (meta.version, state))
        return meta.version, state
