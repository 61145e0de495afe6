"""The OpenAI-compatible endpoints' logic: requests in, responses or SSE streams out.

No FastAPI here: handlers return a response model or an SSE body and raise `ApiError`, and the router maps
those to HTTP. Generation itself is a callable, so the same code runs over a Serve handle or a bare engine.
Chat and completions share one path (`_serve`, `_stream`); what differs is their `_Format`: how an answer,
a streamed piece and the usage chunk are written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from claas_ray.adapters.ids import AdapterIdError, validate_adapter_id
from claas_ray.adapters.names import AmbiguousAdapterName, resolve_in_store
from claas_ray.adapters.store import AdapterStore
from claas_ray.config import ClaasConfig
from claas_ray.protocol.generation import (
    GenerationDelta,
    GenerationError,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    TokenLogprob,
)
from claas_ray.protocol.openai import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatLogprobTop,
    ChatMessageOut,
    ClaasInfo,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    ScoreRequestIn,
    ScoreResponse,
    Usage,
    new_id,
)
from claas_ray.serving.auth import Principal
from claas_ray.serving.completion_log import CompletionLog, CompletionRecord
from claas_ray.serving.errors import ApiError
from claas_ray.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

Generate = Callable[[GenerationRequest], AsyncIterator[GenerationDelta | GenerationError]]
Score = Callable[[ScoreRequest], Awaitable[ScoreResult | GenerationError]]


@dataclass
class Served:
    """A successful answer: a JSON body or an SSE stream, and headers that must go out first."""

    body: BaseModel | AsyncIterator[str]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Target:
    model: str
    adapter_id: str | None
    adapter_version: int | None


@dataclass
class _Answer:
    """One request's answer in the making: everything its JSON body or its SSE chunks are built from."""

    completion_id: str
    target: _Target
    generation: GenerationRequest
    who: Principal
    info: ClaasInfo = field(default_factory=ClaasInfo)
    created: int = field(default_factory=lambda: int(time.time()))


class _Format(Protocol):
    """How one endpoint writes its answer (chat and completions differ only here)."""

    include_usage: bool

    def whole(self, answer: _Answer, deltas: list[GenerationDelta], usage: Usage) -> BaseModel:
        """The non-streaming response."""

    def opening(self, answer: _Answer) -> list[BaseModel]:
        """Chunks sent before the first token (chat's role chunk)."""

    def piece(self, answer: _Answer, delta: GenerationDelta) -> BaseModel:
        """One streamed chunk."""

    def usage_chunk(self, answer: _Answer, usage: Usage) -> BaseModel:
        """The last chunk when the client asked for usage."""


class _ChatFormat:
    def __init__(self, request: ChatCompletionRequest):
        self.logprobs = bool(request.logprobs)
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def whole(self, answer: _Answer, deltas: list[GenerationDelta], usage: Usage) -> BaseModel:
        logprobs = [lp for d in deltas for lp in d.logprobs]
        return ChatCompletionResponse(
            id=answer.completion_id, model=answer.target.model, usage=usage, claas=answer.info,
            choices=[ChatChoice(message=ChatMessageOut(content="".join(d.text for d in deltas)),
                                logprobs=_chat_logprobs(logprobs) if self.logprobs else None,
                                finish_reason=deltas[-1].finish_reason)],
        )

    def _chunk(self, answer: _Answer, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=answer.completion_id, created=answer.created, model=answer.target.model,
                                   choices=choices, usage=usage, claas=answer.info)

    def opening(self, answer: _Answer) -> list[BaseModel]:
        return [self._chunk(answer, [ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def piece(self, answer: _Answer, delta: GenerationDelta) -> BaseModel:
        return self._chunk(answer, [ChatChunkChoice(
            delta=ChatDelta(content=delta.text or None), finish_reason=delta.finish_reason,
            logprobs=_chat_logprobs(delta.logprobs) if self.logprobs else None,
        )])

    def usage_chunk(self, answer: _Answer, usage: Usage) -> BaseModel:
        return self._chunk(answer, [], usage)


class _CompletionFormat:
    def __init__(self, request: CompletionRequest):
        self.logprobs = request.logprobs is not None
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def _response(self, answer: _Answer, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=answer.completion_id, created=answer.created, model=answer.target.model,
                                  choices=choices, usage=usage, claas=answer.info)

    def _choice(self, deltas: list[GenerationDelta]) -> CompletionChoice:
        logprobs = [lp for d in deltas for lp in d.logprobs]
        return CompletionChoice(text="".join(d.text for d in deltas), finish_reason=deltas[-1].finish_reason,
                                logprobs=_completion_logprobs(logprobs) if self.logprobs else None)

    def whole(self, answer: _Answer, deltas: list[GenerationDelta], usage: Usage) -> BaseModel:
        return self._response(answer, [self._choice(deltas)], usage)

    def opening(self, answer: _Answer) -> list[BaseModel]:
        return []

    def piece(self, answer: _Answer, delta: GenerationDelta) -> BaseModel:
        return self._response(answer, [self._choice([delta])])

    def usage_chunk(self, answer: _Answer, usage: Usage) -> BaseModel:
        return self._response(answer, [], usage)


def sse(payload: BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n"


class OpenAIServing:
    def __init__(
        self,
        config: ClaasConfig,
        store: AdapterStore,
        completions: CompletionLog,
        generate: Generate,
        metrics: ServingMetrics,
        score: Score | None = None,
    ):
        self.config = config
        self.store = store
        self.completions = completions
        self._generate = generate
        self._score = score
        self.metrics = metrics
        self.base_name = config.served_model_name()

    # --- models -----------------------------------------------------------------------------
    async def resolve_model(self, model: str, who: Principal) -> _Target:
        """`model` is the base model's served name or an adapter id; adapters serve their latest version."""
        if model == self.base_name:
            return _Target(model, None, None)
        return await asyncio.to_thread(self._resolve_adapter, model, who)  # the store: files or S3

    def _resolve_adapter(self, model: str, who: Principal) -> _Target:
        try:
            adapter_id = resolve_in_store(model, self.store, who.may_use, who.namespace())
        except AmbiguousAdapterName as exc:
            raise ApiError(400, str(exc), "model", "ambiguous_model") from exc
        if adapter_id is not None:
            try:
                return _Target(adapter_id, adapter_id, self.store.latest_version(adapter_id))
            except FileNotFoundError:
                pass  # deleted just now
        try:
            validate_adapter_id(model)
        except AdapterIdError as exc:
            raise ApiError(404, f"The model '{model}' does not exist ({exc})", "model", "model_not_found") from exc
        if not who.may_use(model):
            raise ApiError(403, who.refusal(), "model", "permission_denied")
        raise ApiError(404, f"The model '{model}' does not exist", "model", "model_not_found")

    async def list_models(self, who: Principal) -> ModelList:
        return await asyncio.to_thread(self._list_models, who)

    def _list_models(self, who: Principal) -> ModelList:
        cards = [ModelCard(id=self.base_name)]
        for adapter_id in self.store.list_adapters(who.namespace()):
            try:
                latest = self.store.latest_version(adapter_id)
            except FileNotFoundError:
                continue  # deleted between listing and reading
            cards.append(ModelCard(id=adapter_id, parent=self.base_name, latest_version=latest))
        return ModelList(data=cards)

    async def model_card(self, model: str, who: Principal) -> ModelCard:
        """The card `/v1/models` lists for this model (named by its id, or by a CLaaS name)."""
        target = await self.resolve_model(model, who)
        if target.adapter_id is None:
            return ModelCard(id=self.base_name)
        return ModelCard(id=target.model, parent=self.base_name, latest_version=target.adapter_version)

    # --- chat and completions ---------------------------------------------------------------
    async def chat(self, request: ChatCompletionRequest, who: Principal) -> Served:
        if len(request.messages) > self.config.router.max_messages:
            raise ApiError(400, f"at most {self.config.router.max_messages} messages are allowed", "messages")
        target = await self.resolve_model(request.model, who)
        generation = self._generation_request(
            request, target, new_id("chatcmpl"), messages=[m.to_chat_message() for m in request.messages],
            max_tokens=request.token_limit(), top_logprobs=request.top_logprobs or 0,
        )
        return await self._serve(_Answer(generation.request_id, target, generation, who), _ChatFormat(request))

    async def completion(self, request: CompletionRequest, who: Principal) -> Served:
        target = await self.resolve_model(request.model, who)
        generation = self._generation_request(
            request, target, new_id("cmpl"), prompt=request.prompt, max_tokens=request.max_tokens,
            top_logprobs=request.logprobs or 0,
        )
        return await self._serve(_Answer(generation.request_id, target, generation, who), _CompletionFormat(request))

    @staticmethod
    def _generation_request(request: SamplingFields, target: _Target, request_id: str, **fields) -> GenerationRequest:
        return GenerationRequest(
            request_id=request_id,
            stream=request.stream,
            adapter_id=target.adapter_id,
            adapter_version=target.adapter_version,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=request.stop,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            **fields,
        )

    async def _serve(self, answer: _Answer, form: _Format) -> Served:
        """Start (errors become HTTP statuses before any header is sent), then an SSE body or a recorded answer."""
        began = time.perf_counter()
        first, rest = await self._start(answer.generation)
        answer.info = ClaasInfo(adapter_id=answer.target.adapter_id, adapter_version=answer.target.adapter_version,
                                replica=first.replica)
        headers = {"x-claas-completion-id": answer.completion_id, "x-claas-replica": first.replica}
        if answer.target.adapter_version is not None:
            headers["x-claas-adapter-version"] = str(answer.target.adapter_version)
        if answer.generation.stream:  # a non-streaming request's first delta is its whole answer
            self.metrics.first_token.labels(answer.target.model).observe(time.perf_counter() - began)
            return Served(self._stream(answer, form, first, rest), headers)
        limit = self.config.router.request_timeout_s
        try:
            deltas = await asyncio.wait_for(self._gather(first, rest), timeout=limit)
        except asyncio.TimeoutError as exc:
            raise ApiError(504, f"generation did not finish within {limit:.0f}s", code="timeout") from exc
        await self._record(answer, deltas)
        return Served(form.whole(answer, deltas, _usage(deltas)), headers)

    async def _start(self, generation: GenerationRequest) -> tuple[GenerationDelta, AsyncIterator]:
        """Run until the first delta."""
        stream = self._generate(generation).__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration as exc:
            raise ApiError(503, "the inference replica returned no output") from exc
        except Exception as exc:  # a dead replica or engine: not the client's fault
            logger.exception("generation failed before the first token")
            raise ApiError(503, f"inference is unavailable: {type(exc).__name__}") from exc
        if isinstance(first, GenerationError):
            raise ApiError.from_generation(first)
        return first, stream

    @staticmethod
    async def _gather(first: GenerationDelta, rest: AsyncIterator) -> list[GenerationDelta]:
        return [first] + [delta async for delta in rest]

    async def _stream(self, answer: _Answer, form: _Format, first: GenerationDelta, rest: AsyncIterator) -> AsyncIterator[str]:
        deltas: list[GenerationDelta] = []
        try:
            for chunk in form.opening(answer):
                yield sse(chunk)
            delta = first
            while True:
                deltas.append(delta)
                if delta.text or delta.finish_reason:
                    yield sse(form.piece(answer, delta))
                try:
                    delta = await rest.__anext__()
                except StopAsyncIteration:
                    break
            await self._record(answer, deltas)
            if form.include_usage:
                yield sse(form.usage_chunk(answer, _usage(deltas)))
        except Exception as exc:  # headers are gone: report in-band, then end the stream properly
            logger.exception("stream of %s failed", answer.completion_id)
            yield sse(ApiError(503, f"generation failed mid-stream: {type(exc).__name__}").error)
        yield sse("[DONE]")

    async def _record(self, answer: _Answer, deltas: list[GenerationDelta]) -> None:
        """Keep what was sampled, so feedback can name just the completion id (in a thread: an SQLite write)."""
        final = deltas[-1]
        token_ids = [t for d in deltas for t in d.token_ids]
        logprobs = [lp.logprob for d in deltas for lp in d.logprobs]
        record = CompletionRecord(
            completion_id=answer.completion_id,
            tenant=answer.who.tenant,
            model=answer.target.model,
            adapter_id=answer.target.adapter_id,
            adapter_version=answer.target.adapter_version,
            messages=answer.generation.messages,
            prompt=answer.generation.prompt,
            prompt_token_ids=final.prompt_token_ids or [],
            response_text="".join(d.text for d in deltas),
            response_token_ids=token_ids,
            response_logprobs=logprobs if len(logprobs) == len(token_ids) else [],
        )
        await asyncio.to_thread(self.completions.add, record)
        self.metrics.count_tokens(answer.target.model, len(final.prompt_token_ids or []), len(token_ids))

    # --- score -------------------------------------------------------------------------------
    async def score(self, request: ScoreRequestIn, who: Principal) -> ScoreResponse:
        target = await self.resolve_model(request.model, who)
        if self._score is None:
            raise ApiError(501, "scoring is not available on this server")
        try:
            result = await self._score(
                ScoreRequest(
                    request_id=new_id("score"),
                    messages=None if request.messages is None else [m.to_chat_message() for m in request.messages],
                    prompt=request.prompt,
                    completion=request.completion,
                    adapter_id=target.adapter_id,
                    adapter_version=target.adapter_version,
                )
            )
        except Exception as exc:  # a dead replica or engine: not the client's fault
            logger.exception("scoring failed")
            raise ApiError(503, f"inference is unavailable: {type(exc).__name__}") from exc
        if isinstance(result, GenerationError):
            raise ApiError.from_generation(result)
        return ScoreResponse(
            model=target.model,
            logprobs=result.logprobs,
            tokens=result.tokens,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=len(result.token_ids),
            logprob_sum=sum(result.logprobs),
            claas=ClaasInfo(adapter_id=target.adapter_id, adapter_version=target.adapter_version, replica=result.replica),
        )


def _usage(deltas: list[GenerationDelta]) -> Usage:
    prompt = len(deltas[-1].prompt_token_ids or [])
    completion = sum(len(d.token_ids) for d in deltas)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _chat_logprobs(logprobs: list[TokenLogprob]) -> ChatChoiceLogprobs:
    return ChatChoiceLogprobs(
        content=[
            ChatLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[ChatLogprobTop(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top],
            )
            for lp in logprobs
        ]
    )


def _completion_logprobs(logprobs: list[TokenLogprob]) -> CompletionLogprobs:
    offsets, position = [], 0
    for lp in logprobs:
        offsets.append(position)
        position += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[dict(lp.top) for lp in logprobs],
        text_offset=offsets,
    )
