"""A STAND-IN for Tinker's service, running on the local torch model. It is not Tinker.

Tinker cannot be reached from a test machine, so tests point the Tinker backend at this class instead of
`tinker.ServiceClient`, through `tinker.service_factory: tinker_standin:make_service` (`tests/` is on the
app's PYTHONPATH in the tests, and nowhere else). It implements the part of the SDK's client interface that
`claas_ray.backends.tinker.sdk` calls, with the SDK's own method signatures, request types and response
types, and futures with `.result()` like the SDK's:

  ServiceClient  create_lora_training_client, create_training_client_from_state_with_optimizer,
                 create_sampling_client
  TrainingClient forward_backward (loss "importance_sampling"), optim_step (AdamParams), save_state,
                 save_weights_for_sampler, get_tokenizer
  SamplingClient sample, compute_logprobs, get_tokenizer

Weights are a LoRA on every attention and MLP projection, updated with torch's AdamW semantics as
Tinker documents. Checkpoints get `tinker://standin/<id>` paths; with a `checkpoint_dir` they are
safetensors files there, so stand-ins in several processes (trainer, replicas) share them as they would
share Tinker's.
"""

from __future__ import annotations

import math
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tinker import types

from claas_ray.config import ClaasConfig
from claas_ray.models.registry import resolve_model_path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Done:
    """An already-finished future (the SDK's APIFuture offers `.result()` too)."""

    def __init__(self, value: Any):
        self._value = value

    def result(self, timeout: float | None = None) -> Any:
        return self._value


@dataclass
class _Weights:
    lora: dict[str, torch.Tensor]
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    steps: int = 0

    def copy(self) -> _Weights:
        return _Weights(
            {k: v.clone() for k, v in self.lora.items()},
            {k: (m.clone(), v.clone()) for k, (m, v) in self.moments.items()},
            self.steps,
        )


class StandInTinkerService:
    """Stand-in for `tinker.ServiceClient` (one base model, one LoRA rank per instance)."""

    def __init__(self, base_model: str, rank: int = 16, checkpoint_dir: str | None = None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(base_model)
        self.base_model = base_model
        self.rank = rank
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS)))
        self.model.eval()
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self._checkpoints: dict[str, _Weights] = {}
        self.lock = threading.Lock()  # one model: one request at a time

    # --- helpers for the clients ------------------------------------------------------------
    def params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    def load(self, weights: _Weights | None) -> None:
        with torch.no_grad():
            for name, parameter in self.params().items():
                parameter.copy_(weights.lora[name] if weights else torch.zeros_like(parameter))

    def fresh_weights(self, seed: int | None) -> _Weights:
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        lora = {}
        for name, parameter in self.params().items():
            tensor = torch.zeros(parameter.shape)
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(tensor.shape[1])
                tensor.uniform_(-bound, bound, generator=generator)
            lora[name] = tensor
        return _Weights(lora)

    def _check_model(self, base_model: str | None) -> None:
        if base_model is not None and base_model != self.base_model:
            raise ValueError(f"this stand-in serves {self.base_model!r}, not {base_model!r}")

    def put_checkpoint(self, kind: str, name: str, weights: _Weights) -> str:
        key = f"{uuid.uuid4().hex}-{kind}-{name}"
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tensors = dict(weights.lora)
            for param, (m, v) in weights.moments.items():
                tensors[f"m::{param}"], tensors[f"v::{param}"] = m, v
            tensors["steps"] = torch.tensor(float(weights.steps))
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(self.checkpoint_dir / f"{key}.safetensors"))
        self._checkpoints[key] = weights.copy()
        return f"tinker://standin/{key}"

    def get_checkpoint(self, path: str) -> _Weights:
        key = path.removeprefix("tinker://standin/")
        if key not in self._checkpoints:
            file = None if self.checkpoint_dir is None else self.checkpoint_dir / f"{key}.safetensors"
            if file is None or "/" in key or not file.is_file():
                raise KeyError(f"no checkpoint {path!r}")
            tensors = load_file(str(file))
            steps = int(tensors.pop("steps"))
            lora = {k: t for k, t in tensors.items() if "::" not in k}
            moments = {k: (tensors[f"m::{k}"], tensors[f"v::{k}"]) for k in lora if f"m::{k}" in tensors}
            self._checkpoints[key] = _Weights(lora, moments, steps)
        return self._checkpoints[key].copy()

    # --- tinker.ServiceClient ---------------------------------------------------------------
    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
        train_attn: bool = True, train_unembed: bool = True, user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> _Done:
        self._check_model(base_model)
        if rank != self.rank:
            raise ValueError(f"this stand-in trains rank {self.rank} LoRAs, not rank {rank}")
        return _Done(StandInTrainingClient(self, self.fresh_weights(seed)))

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> _Done:
        self._check_model(base_model)
        return _Done(StandInTrainingClient(self, self.get_checkpoint(path)))

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> _Done:
        self._check_model(base_model)
        weights = None if model_path is None else self.get_checkpoint(model_path)
        return _Done(StandInSamplingClient(self, weights))


class StandInTrainingClient:
    """Stand-in for `tinker.TrainingClient`."""

    def __init__(self, service: StandInTinkerService, weights: _Weights):
        self.service = service
        self.weights = weights
        self.grads: dict[str, torch.Tensor] | None = None

    def get_tokenizer(self):
        return self.service.tokenizer

    def forward_backward(self, data: list[types.Datum], loss_fn: types.LossFnType,
                         loss_fn_config: dict[str, float | str] | None = None) -> _Done:
        if loss_fn != "importance_sampling":
            raise ValueError(f"the stand-in implements only the importance_sampling loss, not {loss_fn!r}")
        service = self.service
        with service.lock:
            service.load(self.weights)
            params = service.params()
            for parameter in params.values():
                parameter.grad = None
                parameter.requires_grad_(True)
            total, outputs = 0.0, []
            for datum in data:
                tokens = torch.tensor(datum.model_input.to_ints()).unsqueeze(0)
                inputs = {k: v.to_torch() for k, v in datum.loss_fn_inputs.items()}
                logits = service.model(input_ids=tokens).logits[0].float()
                logprobs = torch.log_softmax(logits, -1).gather(-1, inputs["target_tokens"].long().unsqueeze(-1)).squeeze(-1)
                ratio = torch.exp(logprobs - inputs["logprobs"].float())
                loss = -(ratio * inputs["advantages"].float()).sum()
                loss.backward()
                total += float(loss.detach())
                outputs.append({"logprobs": types.TensorData.from_torch(logprobs.detach())})
            self.grads = {n: p.grad.detach().clone() for n, p in params.items()}
            for parameter in params.values():
                parameter.requires_grad_(False)
                parameter.grad = None
        return _Done(types.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics={"loss:sum": total}
        ))

    def optim_step(self, optim_params: types.OptimParams | None = None, *,
                   adam_params: types.AdamParams | None = None) -> _Done:
        adam = optim_params or adam_params or types.AdamParams()
        if self.grads is None:
            raise ValueError("optim_step before forward_backward")
        grads = self.grads
        if adam.grad_clip_norm > 0:
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
            scale = min(1.0, adam.grad_clip_norm / (norm + 1e-6))
            grads = {n: g * scale for n, g in grads.items()}
        w = self.weights
        w.steps += 1
        for name, grad in grads.items():
            m, v = w.moments.get(name, (torch.zeros_like(grad), torch.zeros_like(grad)))
            m = adam.beta1 * m + (1 - adam.beta1) * grad
            v = adam.beta2 * v + (1 - adam.beta2) * grad * grad
            w.moments[name] = (m, v)
            m_hat, v_hat = m / (1 - adam.beta1 ** w.steps), v / (1 - adam.beta2 ** w.steps)
            p = w.lora[name]
            p.mul_(1 - adam.learning_rate * adam.weight_decay)
            p.sub_(adam.learning_rate * m_hat / (v_hat.sqrt() + adam.eps))
        self.grads = None
        return _Done(types.OptimStepResponse(metrics={"step": float(w.steps)}))

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> _Done:
        return _Done(types.SaveWeightsResponse(path=self.service.put_checkpoint("weights", name, self.weights)))

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None) -> _Done:
        weights = _Weights(self.weights.lora)
        return _Done(types.SaveWeightsForSamplerResponse(path=self.service.put_checkpoint("sampler", name, weights)))


class StandInSamplingClient:
    """Stand-in for `tinker.SamplingClient` (base weights when made without a model path)."""

    def __init__(self, service: StandInTinkerService, weights: _Weights | None):
        self.service = service
        self.weights = weights

    def get_tokenizer(self):
        return self.service.tokenizer

    @torch.no_grad()
    def _logprobs(self, tokens: list[int]) -> list[float]:
        logits = self.service.model(input_ids=torch.tensor([tokens])).logits[0].float()
        scores = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)
        return scores.tolist()

    def compute_logprobs(self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None) -> _Done:
        tokens = prompt.to_ints()
        with self.service.lock:
            self.service.load(self.weights)
            scores = self._logprobs(tokens)
        values: list[float | None] = [None, *scores]
        if prompt_logprobs_last_n is not None:
            values = [None] * (len(values) - prompt_logprobs_last_n) + values[-prompt_logprobs_last_n:]
        return _Done(values)

    @torch.no_grad()
    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: types.TensorData | None = None, prompt_alt_tokens_k: int = 0,
               prompt_logprobs_last_n: int | None = None) -> _Done:
        service, params = self.service, sampling_params
        tokens = prompt.to_ints()
        stop = [int(s) for s in (params.stop or []) if isinstance(s, int)] or [service.tokenizer.eos_token_id]
        sequences = []
        with service.lock:
            service.load(self.weights)
            for index in range(num_samples):
                if params.seed is not None:
                    torch.manual_seed(params.seed + index)
                output = service.model.generate(
                    input_ids=torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                    max_new_tokens=params.max_tokens or 64, do_sample=params.temperature > 0,
                    temperature=params.temperature if params.temperature > 0 else None,
                    top_p=params.top_p if params.temperature > 0 else None, top_k=None,
                    eos_token_id=stop, pad_token_id=service.tokenizer.eos_token_id,
                )
                new = output[0, len(tokens):].tolist()
                reason = "stop" if new and new[-1] in stop else "length"
                scores = self._logprobs(tokens + new)[-len(new):] if new else []
                sequences.append(types.SampledSequence(
                    stop_reason=reason, sequence_id=f"standin-{index}",
                    tokens_np=np.array(new, dtype=np.int32), logprobs_np=np.array(scores, dtype=np.float32),
                ))
        return _Done(types.SampleResponse(sequences=sequences))


def make_service(config: ClaasConfig) -> StandInTinkerService:
    """The `tinker.service_factory` the tests name: one stand-in per process, sharing checkpoints on disk."""
    return StandInTinkerService(
        config.tinker_base_model(), rank=config.lora.rank, checkpoint_dir=str(config.state_path() / "tinker-standin")
    )
