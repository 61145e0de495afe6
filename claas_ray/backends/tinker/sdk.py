"""Every call claas-ray makes to the `tinker` SDK, in one place.

Requests are built from the SDK's own types (`ModelInput`, `Datum`, `SamplingParams`, `AdamParams`), so a
shape the installed SDK would refuse fails here, in tests, against a stand-in service just as against
Tinker's. Every SDK call returns a future; these functions wait for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from tinker import types

from claas_ray.config import ClaasConfig, TrainingConfig


def connect_service(config: ClaasConfig) -> Any:
    """Tinker's ServiceClient, or what `tinker.service_factory` makes instead (tests: a stand-in)."""
    if config.tinker.service_factory is None:
        return connect()
    module, _, name = config.tinker.service_factory.partition(":")
    return getattr(importlib.import_module(module), name)(config)


def connect(api_key: str | None = None, base_url: str | None = None) -> Any:
    """A `tinker.ServiceClient` (TINKER_API_KEY and TINKER_BASE_URL from the environment by default)."""
    import tinker

    return tinker.ServiceClient(api_key=api_key, base_url=base_url)


def model_input(tokens: Sequence[int]) -> types.ModelInput:
    return types.ModelInput.from_ints([int(token) for token in tokens])


def sampling_params(max_tokens: int, temperature: float, seed: int | None = None,
                    stop: Sequence[str] | Sequence[int] | None = None, top_p: float = 1.0) -> types.SamplingParams:
    return types.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, stop=list(stop) if stop else None, top_p=top_p
    )


def adam_params(config: TrainingConfig) -> types.AdamParams:
    """Our AdamW settings in Tinker's terms (Tinker's Adam is torch's AdamW)."""
    return types.AdamParams(
        learning_rate=config.learning_rate, beta1=config.betas[0], beta2=config.betas[1],
        weight_decay=config.weight_decay, grad_clip_norm=config.max_grad_norm,
    )


def importance_sampling_datum(
    prompt: Sequence[int], response: Sequence[int], sampling_logprobs: Sequence[float], advantages: Sequence[float]
) -> types.Datum:
    """One sequence for Tinker's `importance_sampling` loss: -sum(exp(logp - sampling_logp) * advantage).

    Position i of the input predicts token i+1; prompt positions get advantage 0, so only the response
    is trained on.
    """
    if not (len(response) == len(sampling_logprobs) == len(advantages)):
        raise ValueError("response, sampling_logprobs and advantages must have the same length")
    full = list(prompt) + list(response)
    pad = [0.0] * (len(prompt) - 1)
    return types.Datum(
        model_input=model_input(full[:-1]),
        loss_fn_inputs={
            "target_tokens": full[1:],
            "logprobs": pad + [float(x) for x in sampling_logprobs],
            "advantages": pad + [float(x) for x in advantages],
        },
    )


def new_training_client(service: Any, base_model: str, rank: int, seed: int | None = None) -> Any:
    return service.create_lora_training_client(base_model=base_model, rank=rank, seed=seed).result()


def resume_training_client(service: Any, state_path: str) -> Any:
    """A training client with the weights and Adam moments of a saved state."""
    return service.create_training_client_from_state_with_optimizer(state_path).result()


def sampling_client(service: Any, model_path: str | None = None, base_model: str | None = None) -> Any:
    return service.create_sampling_client(model_path=model_path, base_model=base_model).result()


def train_step(training: Any, datums: list[types.Datum], adam: types.AdamParams) -> dict[str, float]:
    """forward_backward with the importance-sampling loss, then one optimizer step."""
    output = training.forward_backward(datums, "importance_sampling").result()
    training.optim_step(adam).result()
    return dict(output.metrics)


def save(training: Any, name: str) -> tuple[str, str]:
    """(training state path with optimizer, sampler weights path) of the client's current weights."""
    state = training.save_state(name).result()
    sampler = training.save_weights_for_sampler(name).result()
    return state.path, sampler.path


def response_logprobs(sampler: Any, prompt: Sequence[int], response: Sequence[int]) -> list[float]:
    """Log-probs of `response`'s tokens after `prompt` under the sampler's weights."""
    scored = sampler.compute_logprobs(model_input(list(prompt) + list(response)),
                                      prompt_logprobs_last_n=len(response)).result()
    tail = scored[-len(response):]
    if any(value is None for value in tail):
        raise RuntimeError("Tinker returned no log-prob for some response tokens")
    return [float(value) for value in tail]


def sample(sampler: Any, prompt: Sequence[int], params: types.SamplingParams) -> tuple[list[int], list[float], str]:
    """One sampled continuation: its tokens, their log-probs, and why it stopped."""
    response = sampler.sample(model_input(prompt), 1, params).result()
    sequence = response.sequences[0]
    return list(sequence.tokens), list(sequence.logprobs or []), str(sequence.stop_reason)
