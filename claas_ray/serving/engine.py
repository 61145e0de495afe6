"""`InferenceEngine`: vLLM's AsyncLLM with per-version LoRA requests, speaking our generation protocol.

No Ray here: the Serve deployment wraps this class, and tests or benchmarks can use it bare.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil

from claas_ray.adapters.store import AdapterStore
from claas_ray.chat import render_prompt_ids
from claas_ray.config import ClaasConfig
from claas_ray.models.registry import resolve_model_path
from claas_ray.protocol.generation import (
    GenerationDelta,
    GenerationError,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    TokenLogprob,
)
from claas_ray.serving import orphan_reaper
from claas_ray.serving.lora_versions import LoraVersions

logger = logging.getLogger(__name__)


def engine_args(config: ClaasConfig):
    """AsyncEngineArgs from our config: the one place our knobs meet vLLM's."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    serving = config.serving
    kwargs = dict(
        model=resolve_model_path(config.model.base_model),
        served_model_name=config.served_model_name(),
        enable_lora=True,
        max_loras=serving.max_loras,
        max_cpu_loras=serving.max_cpu_loras,
        max_lora_rank=serving.max_lora_rank,
        # Only the projections adapters train get LoRA layers. Left open, vLLM also wraps lm_head, and its CPU
        # path then applies the head's LoRA with one index per request to every prompt position when prompt
        # log-probs are asked for: two /v1/score requests in one batch killed the engine (einsum size mismatch).
        lora_target_modules=list(config.lora.target_modules),
        max_model_len=config.model.max_model_len,
        gpu_memory_utilization=serving.gpu_memory_utilization,
        enforce_eager=serving.enforce_eager,
        max_num_seqs=serving.max_num_seqs,
        dtype=serving.dtype,
        disable_log_stats=True,
    )
    if config.trainer.colocation == "sleep":
        kwargs["enable_sleep_mode"] = True  # the trainer puts the engine to sleep while it steps
    if serving.kv_cache_memory_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(serving.kv_cache_memory_gb * 2**30)
    kwargs.update(serving.engine_kwargs)
    return AsyncEngineArgs(**kwargs)


def prompt_ids_for(tokenizer, request: GenerationRequest | ScoreRequest) -> list[int]:
    """A chat through the model's template, or a raw prompt with the tokenizer's special tokens."""
    if request.messages is not None:
        return render_prompt_ids(tokenizer, request.messages)
    return list(tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"])


def tokens_to_generate(prompt_ids: list[int], request: GenerationRequest, limit: int) -> int | GenerationError:
    """max_tokens (all the room left by default), or the 400 that says why the request cannot fit."""
    room = limit - len(prompt_ids)
    if room <= 0:
        return GenerationError(
            status_code=400, param="messages",
            message=f"the prompt is {len(prompt_ids)} tokens; this model's maximum context length is {limit} tokens",
        )
    max_tokens = request.max_tokens if request.max_tokens is not None else room
    if max_tokens > room:
        return GenerationError(
            status_code=400, param="max_tokens",
            message=f"max_tokens={max_tokens} plus a {len(prompt_ids)}-token prompt exceeds this model's "
            f"maximum context length of {limit} tokens",
        )
    return max_tokens


def score_inputs(tokenizer, request: ScoreRequest, limit: int) -> tuple[list[int], list[int]] | GenerationError:
    """(prompt ids, completion ids) of a score request, or the 400 that says why it cannot be scored."""
    prompt_ids = prompt_ids_for(tokenizer, request)
    completion_ids = list(tokenizer(request.completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        return GenerationError(status_code=400, param="completion", message="the completion is empty")
    if len(prompt_ids) + len(completion_ids) >= limit:
        return GenerationError(
            status_code=400, param="completion",
            message=f"prompt plus completion is {len(prompt_ids) + len(completion_ids)} tokens; "
            f"this model's maximum context length is {limit} tokens",
        )
    return prompt_ids, completion_ids


def admit_generation(
    tokenizer, request: GenerationRequest, limit: int, resolve: Callable[[GenerationRequest], Any]
) -> tuple[list[int], int, Any] | GenerationError:
    """(prompt ids, max_tokens, the engine's handle of the adapter) or the 4xx error for the client.

    `resolve` turns the request's adapter version into whatever the engine runs it with; a version the
    store does not have is a 404.
    """
    prompt_ids = prompt_ids_for(tokenizer, request)
    max_tokens = tokens_to_generate(prompt_ids, request, limit)
    if isinstance(max_tokens, GenerationError):
        return max_tokens
    try:
        return prompt_ids, max_tokens, resolve(request)
    except FileNotFoundError as exc:
        return GenerationError(status_code=404, param="model", message=str(exc))


def admit_score(
    tokenizer, request: ScoreRequest, limit: int, resolve: Callable[[ScoreRequest], Any]
) -> tuple[list[int], list[int], Any] | GenerationError:
    """(prompt ids, completion ids, the adapter handle) of a score request, or the 4xx error."""
    scored_ids = score_inputs(tokenizer, request, limit)
    if isinstance(scored_ids, GenerationError):
        return scored_ids
    try:
        return *scored_ids, resolve(request)
    except FileNotFoundError as exc:
        return GenerationError(status_code=404, param="model", message=str(exc))


class InferenceEngine:
    """One vLLM engine plus the adapter versions it can serve."""

    def __init__(self, config: ClaasConfig, store: AdapterStore, replica: str = "local"):
        # vLLM's engine <-> worker queues otherwise bind to the machine's external address.
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        self.replica = replica
        self.store = store
        # Broadcast adapter versions are written here (tmpfs: RAM), one folder per replica.
        self.scratch = Path(config.trainer.tmpfs_dir) / replica
        self.llm = AsyncLLM.from_engine_args(engine_args(config))
        engine_pids = [child.pid for child in psutil.Process().children(recursive=True)]
        self._reaper = orphan_reaper.start(os.getpid(), engine_pids, [self.scratch])
        self.tokenizer = self.llm.get_tokenizer()
        self.loras = LoraVersions(store.peft_dir, capacity=max(1024, config.serving.max_cpu_loras))

    def _sampling_params(self, request: GenerationRequest, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logprobs=request.top_logprobs,  # 0 still returns the sampled token's log-prob, which feedback needs
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta | GenerationError]:
        """Stream deltas; a request that cannot run yields one GenerationError and nothing else."""
        admitted = admit_generation(self.tokenizer, request, self.config.model.max_model_len, self._lora)
        if isinstance(admitted, GenerationError):
            yield admitted
            return
        prompt_ids, max_tokens, lora = admitted
        async for output in self.llm.generate(
            {"prompt_token_ids": prompt_ids},
            self._sampling_params(request, max_tokens),
            request.request_id,
            lora_request=lora,
        ):
            completion = output.outputs[0]
            finish = None
            if output.finished:
                finish = "length" if completion.finish_reason == "length" else "stop"
            yield GenerationDelta(
                text=completion.text,
                token_ids=list(completion.token_ids),
                logprobs=self._logprobs(completion, request.top_logprobs),
                finish_reason=finish,
                prompt_token_ids=prompt_ids if output.finished else None,
                replica=self.replica,
                adapter_version=request.adapter_version,
            )

    def _lora(self, request: GenerationRequest | ScoreRequest):
        if request.adapter_id is None or request.adapter_version is None:
            return None
        return self.loras.request_for(request.adapter_id, request.adapter_version)

    async def score(self, request: ScoreRequest) -> ScoreResult | GenerationError:
        """Teacher-forced log-probs of `completion` (vLLM's prompt log-probs over prompt + completion)."""
        from vllm import SamplingParams

        admitted = admit_score(self.tokenizer, request, self.config.model.max_model_len, self._lora)
        if isinstance(admitted, GenerationError):
            return admitted
        prompt_ids, completion_ids, lora = admitted
        final = None
        async for output in self.llm.generate(
            {"prompt_token_ids": prompt_ids + completion_ids},
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
            request.request_id,
            lora_request=lora,
        ):
            final = output
        scored = final.prompt_logprobs[len(prompt_ids):]
        return ScoreResult(
            token_ids=completion_ids,
            tokens=[entries[token].decoded_token or "" for token, entries in zip(completion_ids, scored)],
            logprobs=[entries[token].logprob for token, entries in zip(completion_ids, scored)],
            prompt_tokens=len(prompt_ids),
            replica=self.replica,
        )

    @staticmethod
    def _logprobs(completion, top_k: int) -> list[TokenLogprob]:
        """The sampled token's log-prob always; the top-k alternatives only when asked for."""
        if not completion.logprobs:
            return []
        result = []
        for token_id, entries in zip(completion.token_ids, completion.logprobs):
            chosen = entries[token_id]
            top = sorted(
                ((entry.decoded_token or "", entry.logprob) for entry in entries.values() if entry.rank <= top_k),
                key=lambda item: -item[1],
            )
            result.append(
                TokenLogprob(token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob, top=top)
            )
        return result

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
        shutil.rmtree(self.scratch, ignore_errors=True)
