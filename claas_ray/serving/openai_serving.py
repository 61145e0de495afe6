"""The OpenAI-compatible endpoints' logic: requests in, responses or SSE streams out.

No FastAPI here: handlers return a response model, an SSE body, or an ErrorResponse, and the router maps
those to HTTP. Generation itself is a callable, so the same code runs over a Serve handle or a bare engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

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
    ErrorResponse,
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
    def resolve_model(self, model: str, who: Principal) -> _Target | ErrorResponse:
        """`model` is the base model's served name or an adapter id; adapters serve their latest version."""
        if model == self.base_name:
            return _Target(model, None, None)
        try:
            adapter_id = resolve_in_store(model, self.store, who.may_use, who.namespace())
        except AmbiguousAdapterName as exc:
            return ErrorResponse.make(400, str(exc), "model", "ambiguous_model")
        if adapter_id is not None:
            return _Target(adapter_id, adapter_id, self.store.latest_version(adapter_id))
        try:
            validate_adapter_id(model)
        except AdapterIdError as exc:
            return ErrorResponse.make(404, f"The model '{model}' does not exist ({exc})", "model", "model_not_found")
        if not who.may_use(model):
            return ErrorResponse.make(403, who.refusal(), "model", "permission_denied")
        return ErrorResponse.make(404, f"The model '{model}' does not exist", "model", "model_not_found")

    def list_models(self, who: Principal) -> ModelList:
        cards = [ModelCard(id=self.base_name)]
        for adapter_id in self.store.list_adapters(who.namespace()):
            try:
                latest = self.store.latest_version(adapter_id)
            except FileNotFoundError:
                continue  # deleted between listing and reading
            cards.append(ModelCard(id=adapter_id, parent=self.base_name, latest_version=latest))
        return ModelList(data=cards)

    # --- shared generation path -------------------------------------------------------------
    def _generation_request(self, request: SamplingFields, target: _Target, **kwargs) -> GenerationRequest:
        return GenerationRequest(
            request_id=kwargs.pop("request_id"),
            stream=request.stream,
            adapter_id=target.adapter_id,
            adapter_version=target.adapter_version,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=request.stop,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            **kwargs,
        )

    async def _start(self, generation: GenerationRequest) -> tuple[GenerationDelta, AsyncIterator] | ErrorResponse:
        """Run until the first delta, so errors become HTTP statuses before any header is sent."""
        stream = self._generate(generation).__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return ErrorResponse.make(503, "the inference replica returned no output")
        except Exception as exc:  # a dead replica or engine: not the client's fault
            logger.exception("generation failed before the first token")
            return ErrorResponse.make(503, f"inference is unavailable: {type(exc).__name__}")
        if isinstance(first, GenerationError):
            return ErrorResponse.make(first.status_code, first.message, first.param)
        return first, stream

    @staticmethod
    async def _deltas(first: GenerationDelta, rest: AsyncIterator) -> AsyncIterator[GenerationDelta]:
        yield first
        async for delta in rest:
            yield delta

    async def _collect(self, first: GenerationDelta, rest: AsyncIterator) -> list[GenerationDelta] | ErrorResponse:
        """The whole answer of a non-streaming request, within the router's time limit."""
        async def gather() -> list[GenerationDelta]:
            return [d async for d in self._deltas(first, rest)]

        limit = self.config.router.request_timeout_s
        try:
            return await asyncio.wait_for(gather(), timeout=limit)
        except asyncio.TimeoutError:
            return ErrorResponse.make(504, f"generation did not finish within {limit:.0f}s", code="timeout")

    def _record(
        self, completion_id: str, target: _Target, generation: GenerationRequest, deltas: list[GenerationDelta], who: Principal
    ) -> None:
        final = deltas[-1]
        token_ids = [t for d in deltas for t in d.token_ids]
        logprobs = [lp.logprob for d in deltas for lp in d.logprobs]
        self.completions.add(
            CompletionRecord(
                completion_id=completion_id,
                tenant=who.tenant,
                model=target.model,
                adapter_id=target.adapter_id,
                adapter_version=target.adapter_version,
                messages=generation.messages,
                prompt=generation.prompt,
                prompt_token_ids=final.prompt_token_ids or [],
                response_text="".join(d.text for d in deltas),
                response_token_ids=token_ids,
                response_logprobs=logprobs if len(logprobs) == len(token_ids) else [],
            )
        )
        self.metrics.count_tokens(target.model, len(final.prompt_token_ids or []), len(token_ids))

    async def _serve(
        self,
        target: _Target,
        generation: GenerationRequest,
        stream: Callable[[ClaasInfo, GenerationDelta, AsyncIterator], AsyncIterator[str]],
        respond: Callable[[ClaasInfo, list[GenerationDelta]], BaseModel],
        who: Principal,
    ) -> Served | ErrorResponse:
        """The path both endpoints share: start, then an SSE body or a recorded JSON answer."""
        began = time.perf_counter()
        started = await self._start(generation)
        if isinstance(started, ErrorResponse):
            return started
        first, rest = started
        if generation.stream:  # a non-streaming request's first delta is its whole answer
            self.metrics.first_token.labels(target.model).observe(time.perf_counter() - began)
        headers = self._headers(generation.request_id, target, first)
        info = ClaasInfo(adapter_id=target.adapter_id, adapter_version=target.adapter_version, replica=first.replica)
        if generation.stream:
            return Served(stream(info, first, rest), headers)
        deltas = await self._collect(first, rest)
        if isinstance(deltas, ErrorResponse):
            return deltas
        self._record(generation.request_id, target, generation, deltas, who)
        return Served(respond(info, deltas), headers)

    @staticmethod
    def _headers(completion_id: str, target: _Target, first: GenerationDelta) -> dict[str, str]:
        headers = {"x-claas-completion-id": completion_id, "x-claas-replica": first.replica}
        if target.adapter_version is not None:
            headers["x-claas-adapter-version"] = str(target.adapter_version)
        return headers

    @staticmethod
    def _usage(deltas: list[GenerationDelta]) -> Usage:
        prompt = len(deltas[-1].prompt_token_ids or [])
        completion = sum(len(d.token_ids) for d in deltas)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # --- chat -------------------------------------------------------------------------------
    async def chat(self, request: ChatCompletionRequest, who: Principal) -> Served | ErrorResponse:
        if len(request.messages) > self.config.router.max_messages:
            return ErrorResponse.make(400, f"at most {self.config.router.max_messages} messages are allowed", "messages")
        target = self.resolve_model(request.model, who)
        if isinstance(target, ErrorResponse):
            return target
        completion_id = new_id("chatcmpl")
        generation = self._generation_request(
            request, target, request_id=completion_id, messages=[m.to_chat_message() for m in request.messages],
            max_tokens=request.token_limit(), top_logprobs=request.top_logprobs or 0,
        )

        def respond(info: ClaasInfo, deltas: list[GenerationDelta]) -> ChatCompletionResponse:
            return ChatCompletionResponse(
                id=completion_id,
                model=target.model,
                choices=[
                    ChatChoice(
                        message=ChatMessageOut(content="".join(d.text for d in deltas)),
                        logprobs=_chat_logprobs([lp for d in deltas for lp in d.logprobs]) if request.logprobs else None,
                        finish_reason=deltas[-1].finish_reason,
                    )
                ],
                usage=self._usage(deltas),
                claas=info,
            )

        return await self._serve(
            target, generation,
            lambda info, first, rest: self._chat_stream(request, target, generation, completion_id, info, first, rest, who),
            respond,
            who,
        )

    async def _chat_stream(self, request, target, generation, completion_id, info, first, rest, who) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: ChatDelta, **kwargs) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=completion_id, created=created, model=target.model,
                                       choices=[ChatChunkChoice(delta=delta, **kwargs)], claas=info)

        deltas: list[GenerationDelta] = []
        try:
            yield sse(chunk(ChatDelta(role="assistant", content="")))
            async for delta in self._deltas(first, rest):
                deltas.append(delta)
                if delta.text or delta.finish_reason:
                    yield sse(
                        chunk(
                            ChatDelta(content=delta.text or None),
                            logprobs=_chat_logprobs(delta.logprobs) if request.logprobs else None,
                            finish_reason=delta.finish_reason,
                        )
                    )
            self._record(completion_id, target, generation, deltas, who)
            if request.stream_options and request.stream_options.include_usage:
                yield sse(ChatCompletionChunk(id=completion_id, created=created, model=target.model, choices=[],
                                              usage=self._usage(deltas), claas=info))
        except Exception as exc:  # headers are gone: report in-band, then end the stream properly
            logger.exception("chat stream failed")
            yield sse(ErrorResponse.make(503, f"generation failed mid-stream: {type(exc).__name__}"))
        yield sse("[DONE]")

    # --- score -------------------------------------------------------------------------------
    async def score(self, request: ScoreRequestIn, who: Principal) -> ScoreResponse | ErrorResponse:
        target = self.resolve_model(request.model, who)
        if isinstance(target, ErrorResponse):
            return target
        if self._score is None:
            return ErrorResponse.make(501, "scoring is not available on this server")
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
            return ErrorResponse.make(503, f"inference is unavailable: {type(exc).__name__}")
        if isinstance(result, GenerationError):
            return ErrorResponse.make(result.status_code, result.message, result.param)
        return ScoreResponse(
            model=target.model,
            logprobs=result.logprobs,
            tokens=result.tokens,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=len(result.token_ids),
            logprob_sum=sum(result.logprobs),
            claas=ClaasInfo(adapter_id=target.adapter_id, adapter_version=target.adapter_version, replica=result.replica),
        )

    # --- completions ------------------------------------------------------------------------
    async def completion(self, request: CompletionRequest, who: Principal) -> Served | ErrorResponse:
        target = self.resolve_model(request.model, who)
        if isinstance(target, ErrorResponse):
            return target
        completion_id = new_id("cmpl")
        generation = self._generation_request(
            request, target, request_id=completion_id, prompt=request.prompt, max_tokens=request.max_tokens,
            top_logprobs=request.logprobs or 0,
        )
        want_logprobs = request.logprobs is not None

        def respond(info: ClaasInfo, deltas: list[GenerationDelta]) -> CompletionResponse:
            return CompletionResponse(
                id=completion_id,
                model=target.model,
                choices=[
                    CompletionChoice(
                        text="".join(d.text for d in deltas),
                        logprobs=_completion_logprobs([lp for d in deltas for lp in d.logprobs]) if want_logprobs else None,
                        finish_reason=deltas[-1].finish_reason,
                    )
                ],
                usage=self._usage(deltas),
                claas=info,
            )

        return await self._serve(
            target, generation,
            lambda info, first, rest: self._completion_stream(
                request, target, generation, completion_id, info, first, rest, want_logprobs, who
            ),
            respond,
            who,
        )

    async def _completion_stream(
        self, request, target, generation, completion_id, info, first, rest, want_logprobs, who
    ) -> AsyncIterator[str]:
        created = int(time.time())
        deltas: list[GenerationDelta] = []
        try:
            async for delta in self._deltas(first, rest):
                deltas.append(delta)
                if delta.text or delta.finish_reason:
                    yield sse(
                        CompletionResponse(
                            id=completion_id, created=created, model=target.model, claas=info,
                            choices=[CompletionChoice(
                                text=delta.text,
                                logprobs=_completion_logprobs(delta.logprobs) if want_logprobs else None,
                                finish_reason=delta.finish_reason,
                            )],
                        )
                    )
            self._record(completion_id, target, generation, deltas, who)
            if request.stream_options and request.stream_options.include_usage:
                yield sse(CompletionResponse(id=completion_id, created=created, model=target.model, choices=[],
                                             usage=self._usage(deltas), claas=info))
        except Exception as exc:
            logger.exception("completion stream failed")
            yield sse(ErrorResponse.make(503, f"generation failed mid-stream: {type(exc).__name__}"))
        yield sse("[DONE]")


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
