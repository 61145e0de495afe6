"""The messages between the router and the inference replicas (internal, not an HTTP surface)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from claas_ray.chat import ChatMessage


class GenerationRequest(BaseModel):
    """One generation: a chat (rendered with the model's template) or a raw text prompt."""

    request_id: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    adapter_id: str | None = None
    adapter_version: int | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0
    stream: bool = True  # False: one delta with the whole answer, so nothing crosses Ray per token


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]] = Field(default_factory=list)


class GenerationDelta(BaseModel):
    """A piece of output: new text and tokens since the last delta; the last one has finish_reason."""

    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] = Field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None
    prompt_token_ids: list[int] | None = None  # sent once, on the last delta
    replica: str = ""
    adapter_version: int | None = None


class GenerationError(BaseModel):
    """An error found before any token was produced, sent instead of the first delta."""

    status_code: int
    message: str
    param: str | None = None


class ScoreRequest(BaseModel):
    """Log-probabilities of a given completion after a chat or a prompt (nothing is sampled)."""

    request_id: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    completion: str
    adapter_id: str | None = None
    adapter_version: int | None = None


class ScoreResult(BaseModel):
    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float]
    prompt_tokens: int
    replica: str = ""
