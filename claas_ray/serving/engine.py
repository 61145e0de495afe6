"""`Engine`: what an inference replica runs, and the request admission every engine shares.

Two engines implement it: `VllmEngine` (`vllm_engine.py`, vLLM on this machine) and `TinkerEngine`
(`tinker_engine.py`, Tinker's sampler). The Serve deployment and the broadcast receiver use only this
interface, so neither knows which engine it drives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

from claas_ray.chat import render_prompt_ids
from claas_ray.protocol.generation import (
    GenerationDelta,
    GenerationError,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
)

T = TypeVar("T")


class GenerationInterrupted(RuntimeError):
    """The engine ended an answer it had started early (aborted or failed it): what was sent is incomplete, and
    the answer is neither finished with `stop` nor recorded."""


class Engine(Protocol):
    """One replica's model, serving the base model and any adapter version."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta | GenerationError]:
        """Stream `GenerationDelta`s; a request that cannot run yields one `GenerationError` and nothing else, and
        one the engine gives up mid-way raises `GenerationInterrupted`."""

    async def score(self, request: ScoreRequest) -> ScoreResult | GenerationError:
        """Teacher-forced log-probs of the request's completion."""

    async def load_version(self, adapter_id: str, version: int, files: dict[str, bytes]) -> None:
        """Make a version servable from its PEFT files (broadcast), before anyone asks for it."""

    async def sleep(self, level: int) -> None:
        """Release the accelerator's memory while the trainer steps on it."""

    async def wake(self) -> None:
        """Take the memory back after the step."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve (the replica is then replaced)."""

    def shutdown(self) -> None:
        """Stop the engine and remove what it wrote."""


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


async def admit_generation(
    tokenizer, request: GenerationRequest, limit: int, cached: Callable[[str, int], T | None], load: Callable[[str, int], T]
) -> tuple[list[int], int, T | None] | GenerationError:
    """(prompt ids, max_tokens, the engine's handle of the adapter version) or the 4xx error for the client."""
    prompt_ids = prompt_ids_for(tokenizer, request)
    max_tokens = tokens_to_generate(prompt_ids, request, limit)
    if isinstance(max_tokens, GenerationError):
        return max_tokens
    handle = await resolve_adapter(request, cached, load)
    return handle if isinstance(handle, GenerationError) else (prompt_ids, max_tokens, handle)


async def admit_score(
    tokenizer, request: ScoreRequest, limit: int, cached: Callable[[str, int], T | None], load: Callable[[str, int], T]
) -> tuple[list[int], list[int], T | None] | GenerationError:
    """(prompt ids, completion ids, the adapter handle) of a score request, or the 4xx error."""
    scored_ids = score_inputs(tokenizer, request, limit)
    if isinstance(scored_ids, GenerationError):
        return scored_ids
    handle = await resolve_adapter(request, cached, load)
    return handle if isinstance(handle, GenerationError) else (*scored_ids, handle)


async def resolve_adapter(
    request: GenerationRequest | ScoreRequest, cached: Callable[[str, int], T | None], load: Callable[[str, int], T]
) -> T | None | GenerationError:
    """The engine's handle of the request's adapter version (None: the base model), or the 404 for a version
    the store does not have. A handle not yet `cached` is made by `load` in a thread: it may download the
    version (S3) or open a remote client (Tinker), which must not stall every other request of the replica."""
    if request.adapter_id is None or request.adapter_version is None:
        return None
    handle = cached(request.adapter_id, request.adapter_version)
    if handle is not None:
        return handle
    try:
        return await asyncio.to_thread(load, request.adapter_id, request.adapter_version)
    except FileNotFoundError as exc:
        return GenerationError(status_code=404, param="model", message=str(exc))


