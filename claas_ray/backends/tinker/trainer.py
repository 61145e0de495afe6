"""SDPO on Tinker: the same hindsight teacher, expressed with Tinker's primitives.

Tinker trains a LoRA it keeps on its side; it does not take our loss. So a step is on-policy
distillation in its terms, as the Tinker cookbook does it:

1. the student's log-probs of its own response: the sampling log-probs from the completion record, or
   `compute_logprobs` under the adapter's current sampler weights;
2. the teacher's log-probs of the same tokens: `compute_logprobs` on the hindsight context (the feedback
   appended to the last user turn, as in the local trainer), under the base model (`training.teacher:
   base`) or the adapter itself (`current`; Tinker keeps no EMA copy, so `ema` falls back to `current`);
3. per-token advantages `kl_coef * (teacher - student)` and Tinker's `importance_sampling` loss, whose
   gradient is that of the reverse KL to the teacher on the sampled tokens;
4. `optim_step` with our AdamW settings, then `save_state` (weights + Adam moments, to resume) and
   `save_weights_for_sampler` (to serve). The paths go into `TinkerAdapterRegistry`, a JSON file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from claas_ray.adapters.ids import validate_adapter_id
from claas_ray.adapters.store import AdapterExistsError, AdapterNotFoundError
from claas_ray.backends.tinker import sdk
from claas_ray.config import LoraConfig, TrainingConfig
from claas_ray.training.example import TrainingExample, tokenize_example
from claas_ray.training.teacher import hindsight_messages


class TinkerVersion(BaseModel):
    version: int = Field(ge=0)
    state_path: str
    sampler_path: str
    parent_version: int | None = None
    created_at: float = Field(default_factory=time.time)
    feedback_ids: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class TinkerAdapter(BaseModel):
    rank: int
    latest: int
    versions: list[TinkerVersion]


class TinkerAdapterRegistry:
    """Adapter id -> its Tinker checkpoints, in one JSON file replaced atomically on every change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, TinkerAdapter]:
        if not self.path.exists():
            return {}
        return {k: TinkerAdapter.model_validate(v) for k, v in json.loads(self.path.read_text()).items()}

    def _write(self, adapters: dict[str, TinkerAdapter]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temp, "w") as handle:
            json.dump({k: v.model_dump() for k, v in adapters.items()}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)

    def get(self, adapter_id: str) -> TinkerAdapter:
        adapter = self._read().get(validate_adapter_id(adapter_id))
        if adapter is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        return adapter

    def latest(self, adapter_id: str) -> TinkerVersion:
        adapter = self.get(adapter_id)
        return next(v for v in adapter.versions if v.version == adapter.latest)

    def list_adapters(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._read() if k.startswith(prefix))

    def create(self, adapter_id: str, rank: int, first: TinkerVersion) -> None:
        with self._lock:
            adapters = self._read()
            if validate_adapter_id(adapter_id) in adapters:
                raise AdapterExistsError(f"adapter {adapter_id!r} already exists")
            adapters[adapter_id] = TinkerAdapter(rank=rank, latest=first.version, versions=[first])
            self._write(adapters)

    def publish(self, adapter_id: str, version: TinkerVersion) -> None:
        with self._lock:
            adapters = self._read()
            adapter = adapters.get(adapter_id)
            if adapter is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
            if any(v.version == version.version for v in adapter.versions):
                raise AdapterExistsError(f"adapter {adapter_id!r} version {version.version} already exists")
            adapter.versions.append(version)
            adapter.latest = version.version
            self._write(adapters)

    def delete(self, adapter_id: str) -> bool:
        with self._lock:
            adapters = self._read()
            if adapters.pop(adapter_id, None) is None:
                return False
            self._write(adapters)
            return True


class TinkerSDPO:
    """Per-adapter LoRA training on Tinker with the SDPO signal; see the module docstring."""

    def __init__(self, service: Any, base_model: str, registry: TinkerAdapterRegistry, kl_coef: float = 1.0,
                 max_len: int = 4096):
        self.service = service
        self.base_model = base_model
        self.registry = registry
        self.kl_coef = kl_coef
        self.max_len = max_len
        self._base_sampler = sdk.sampling_client(service, base_model=base_model)
        self.tokenizer = self._base_sampler.get_tokenizer()

    def init_adapter(self, adapter_id: str, lora: LoraConfig, seed: int = 0) -> TinkerVersion:
        validate_adapter_id(adapter_id)
        if adapter_id in self.registry.list_adapters():
            raise AdapterExistsError(f"adapter {adapter_id!r} already exists")
        training = sdk.new_training_client(self.service, self.base_model, lora.rank, seed)
        state_path, sampler_path = sdk.save(training, _checkpoint_name(adapter_id, 0))
        first = TinkerVersion(version=0, state_path=state_path, sampler_path=sampler_path)
        self.registry.create(adapter_id, lora.rank, first)
        return first

    def sampler(self, adapter_id: str | None) -> Any:
        """A sampling client for an adapter's latest version, or the base model for None."""
        if adapter_id is None:
            return self._base_sampler
        return sdk.sampling_client(self.service, model_path=self.registry.latest(adapter_id).sampler_path)

    def step(self, adapter_id: str, examples: Sequence[TrainingExample], config: TrainingConfig) -> TinkerVersion:
        if not examples:
            raise ValueError("a step needs at least one example")
        started = time.perf_counter()
        current = self.registry.latest(adapter_id)
        student = sdk.sampling_client(self.service, model_path=current.sampler_path)
        teacher = self._base_sampler if config.teacher == "base" else student
        datums, gaps, tokens = [], [], 0
        for example in examples:
            item = tokenize_example(
                self.tokenizer, example, hindsight_messages(example.messages, example.feedback, config.hindsight_template),
                append_eos=config.append_eos, max_len=self.max_len,
            )
            prompt = item.student_ids[: item.student_start].tolist()
            response = item.response_ids.tolist()
            student_lp = (item.sampling_logprobs.tolist() if item.sampling_logprobs is not None
                          else sdk.response_logprobs(student, prompt, response))
            teacher_lp = sdk.response_logprobs(teacher, item.teacher_ids[: item.teacher_start].tolist(), response)
            gap = [t - s for t, s in zip(teacher_lp, student_lp)]
            datums.append(sdk.importance_sampling_datum(prompt, response, student_lp, [self.kl_coef * g for g in gap]))
            gaps.extend(gap)
            tokens += len(response)
        training = sdk.resume_training_client(self.service, current.state_path)
        tinker_metrics = sdk.train_step(training, datums, sdk.adam_params(config))
        version = current.version + 1
        state_path, sampler_path = sdk.save(training, _checkpoint_name(adapter_id, version))
        metrics = {
            "teacher_minus_student_logprob": sum(gaps) / tokens,
            "tokens": float(tokens),
            "examples": float(len(examples)),
            "learning_rate": config.learning_rate,
            "step_seconds": time.perf_counter() - started,
            **{f"tinker/{k}": float(v) for k, v in tinker_metrics.items()},
        }
        new = TinkerVersion(
            version=version, state_path=state_path, sampler_path=sampler_path, parent_version=current.version,
            feedback_ids=[e.feedback_id for e in examples if e.feedback_id], metrics=metrics,
        )
        self.registry.publish(adapter_id, new)
        return new


def _checkpoint_name(adapter_id: str, version: int) -> str:
    return f"{adapter_id.replace('/', '--')}-v{version}"
