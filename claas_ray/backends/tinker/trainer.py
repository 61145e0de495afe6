"""SDPO on Tinker: the same hindsight teacher, expressed with Tinker's primitives.

Tinker trains a LoRA it keeps on its side; it does not take our loss. So a step is on-policy
distillation in its terms, as the Tinker cookbook does it:

1. the student's log-probs of its own response: the sampling log-probs from the completion record, or
   `compute_logprobs` under the adapter's current sampler weights;
2. the teacher's log-probs of the same tokens: `compute_logprobs` on the hindsight context (the feedback
   appended to the last user turn, as in the local trainer), under the base model (`training.teacher:
   base`) or the adapter itself (`current`; Tinker keeps no EMA copy, so `ema` is refused when the config is validated);
3. per-token advantages `kl_coef * (teacher - student)` and Tinker's `importance_sampling` loss, whose
   gradient is that of the reverse KL to the teacher on the sampled tokens;
4. `optim_step` with our AdamW settings, then `save_state` (weights + Adam moments, to resume) and
   `save_weights_for_sampler` (to serve). The paths are published as a version of the adapter in
   `TinkerAdapterStore`, a local JSON file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from claas_ray.adapters.store import AdapterExistsError, AdapterVersionMeta
from claas_ray.backends.step_backend import PublishedVersion, StepOutcome
from claas_ray.backends.tinker import sdk
from claas_ray.backends.tinker.store import TinkerAdapterStore, TinkerCheckpoint
from claas_ray.config import ClaasConfig, LoraConfig, TrainingConfig
from claas_ray.training.example import TrainingExample, tokenize_example
from claas_ray.training.teacher import hindsight_messages


class TinkerSDPO:
    """Per-adapter LoRA training on Tinker with the SDPO signal; see the module docstring. A `StepBackend`:
    versions are published as checkpoint paths, and replicas sample them on Tinker (no files to hand on)."""

    colocated = False  # the step runs on Tinker's machines

    def __init__(self, service: Any, base_model: str, store: TinkerAdapterStore, kl_coef: float = 1.0,
                 max_len: int = 4096):
        self.service = service
        self.base_model = base_model
        self.store = store
        self.kl_coef = kl_coef
        self.max_len = max_len
        self._base_sampler = sdk.sampling_client(service, base_model=base_model)
        self.tokenizer = self._base_sampler.get_tokenizer()

    @classmethod
    def from_config(cls, config: ClaasConfig, store: TinkerAdapterStore) -> TinkerSDPO:
        return cls(sdk.connect_service(config), config.tinker_base_model(), store, config.tinker.kl_coef,
                   max_len=config.model.max_model_len)

    def init_adapter(self, adapter_id: str, lora: LoraConfig, seed: int = 0) -> PublishedVersion:
        if self.store.version_numbers(adapter_id):
            raise AdapterExistsError(f"adapter {adapter_id!r} already exists")
        return self._fresh(adapter_id, lora, seed, version=0, parent=None)

    def reset_adapter(self, adapter_id: str, lora: LoraConfig) -> PublishedVersion:
        return self._fresh(adapter_id, lora, 0, version=self.store.next_version(adapter_id),
                           parent=self.store.latest_version(adapter_id))

    def _fresh(self, adapter_id: str, lora: LoraConfig, seed: int, version: int, parent: int | None) -> PublishedVersion:
        """A new Tinker LoRA (zero effect: its B matrices start at zero), saved and published as `version`."""
        training = sdk.new_training_client(self.service, self.base_model, lora.rank, seed)
        checkpoint = _save(training, adapter_id, version)
        meta = AdapterVersionMeta(adapter_id=adapter_id, version=version, parent_version=parent, base_model=self.base_model,
                                  note=f"{'initial' if parent is None else 'reset: new'} Tinker LoRA, rank {lora.rank}")
        return PublishedVersion(self.store.publish_files(meta, self.store.checkpoint_files(checkpoint)))

    def import_adapter(self, adapter_id: str, files: dict[str, bytes]) -> PublishedVersion:
        raise ValueError("adapters trained on Tinker live there: importing weights files is not supported")

    def forget(self, adapter_id: str) -> None:
        return None  # nothing is cached per adapter

    def sampler(self, adapter_id: str | None, version: int | None = None) -> Any:
        """A sampling client for an adapter version (latest by default), or the base model for None."""
        if adapter_id is None:
            return self._base_sampler
        version = self.store.latest_version(adapter_id) if version is None else version
        return sdk.sampling_client(self.service, model_path=self.store.checkpoint(adapter_id, version).sampler_path)

    def step(self, adapter_id: str, examples: Sequence[TrainingExample], config: TrainingConfig,
             feedback_ids: Sequence[str] | None = None) -> StepOutcome:
        """One SDPO step on the adapter's latest version, published as the next version.

        `feedback_ids` go into the version's meta: after a crash, the trainer loop finds there which feedback
        a version already applied (exactly once); they default to the examples' own ids.
        """
        if not examples:
            raise ValueError("a step needs at least one example")
        started = time.perf_counter()
        parent = self.store.latest_version(adapter_id)
        current = self.store.checkpoint(adapter_id, parent)
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
        version = self.store.next_version(adapter_id)
        checkpoint = _save(training, adapter_id, version)
        metrics = {
            "teacher_minus_student_logprob": sum(gaps) / tokens,
            "tokens": float(tokens),
            "examples": float(len(examples)),
            "learning_rate": config.learning_rate,
            "step_seconds": time.perf_counter() - started,
            **{f"tinker/{k}": float(v) for k, v in tinker_metrics.items()},
        }
        meta = AdapterVersionMeta(
            adapter_id=adapter_id, version=version, parent_version=parent, base_model=self.base_model,
            feedback_ids=list(feedback_ids) if feedback_ids is not None else [e.feedback_id for e in examples if e.feedback_id],
            metrics=metrics,
        )
        return StepOutcome(PublishedVersion(self.store.publish_files(meta, self.store.checkpoint_files(checkpoint))), metrics)


def _save(training: Any, adapter_id: str, version: int) -> TinkerCheckpoint:
    state_path, sampler_path = sdk.save(training, f"{adapter_id.replace('/', '--')}-v{version}")
    return TinkerCheckpoint(state_path=state_path, sampler_path=sampler_path)
