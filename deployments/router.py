"""The router: the only HTTP ingress. Thin FastAPI routes over `OpenAIServing` and `ClaasServing`.

Every request passes `RequestGuard` first: the body is read up to its size cap and the bearer token is
checked before FastAPI parses anything, so an oversized or unauthenticated request costs nothing and
never reaches a route. Errors leave in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import claas_ray
from claas_ray.config import ClaasConfig
from claas_ray.dashboard.page import render as render_dashboard
from claas_ray.feedback.journal import FeedbackJournal
from claas_ray.protocol.claas import FeedbackRequest, LoraInitRequest, LoraRollbackRequest
from claas_ray.protocol.generation import GenerationRequest, ScoreRequest
from claas_ray.protocol.openai import ChatCompletionRequest, CompletionRequest, ErrorResponse, ScoreRequestIn
from claas_ray.serving.auth import ApiKeys, Principal
from claas_ray.serving.claas_serving import ClaasServing
from claas_ray.serving.completion_log import CompletionLog
from claas_ray.serving.errors import ApiError
from claas_ray.serving.metrics import ServingMetrics
from claas_ray.serving.openai_serving import OpenAIServing, Served
from claas_ray.serving.token_counter import load_token_counter
from claas_ray.sql_database import open_database
from claas_ray.stores import open_store

logger = logging.getLogger(__name__)



def reject_unknown_query(request: Request) -> None:
    """Unknown query parameters are a 400, as unknown body fields are: a typo must not be silently ignored."""
    route = request.scope.get("route")
    known = {param.alias for param in route.dependant.query_params} if route is not None else set()
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise ApiError(400, f"Unrecognized query parameter: {unknown[0]!r}", unknown[0])


app = FastAPI(
    title="claas-ray",
    description="OpenAI-compatible serving with per-user LoRA adapters trained by SDPO.",
    dependencies=[Depends(reject_unknown_query)],
)


UNAVAILABLE_RETRY_AFTER_S = 5
"""Retry-After of a 503: about how long Serve takes to notice a dead engine and route around its replica."""


def error_json(error: ErrorResponse, headers: dict[str, str] | None = None) -> JSONResponse:
    if error.status_code == 503 and not any(key.lower() == "retry-after" for key in headers or {}):
        headers = {**(headers or {}), "retry-after": str(UNAVAILABLE_RETRY_AFTER_S)}
    return JSONResponse(error.model_dump(), status_code=error.status_code, headers=headers)


def _describe(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A one-line message and the offending parameter from pydantic's error list."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON", None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'", param
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return (f"Invalid value for '{param}': {message}" if param else message), param


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _describe(list(exc.errors()))
    return error_json(ErrorResponse.make(400, message, param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_json(ErrorResponse.make(exc.status_code, str(exc.detail)))


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_json(exc.error, exc.headers)


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return error_json(ErrorResponse.make(500, f"internal error: {type(exc).__name__}"))


def to_http(result: Served) -> Response:
    if hasattr(result.body, "model_dump"):
        return JSONResponse(result.body.model_dump(exclude_none=True), headers=result.headers)
    return StreamingResponse(result.body, media_type="text/event-stream", headers=result.headers)


PUBLIC_PATHS = frozenset({"/", "/health", "/v1/health"})  # "/": CLaaS's container health check
IMPORT_PATH = "/v1/lora/import"


class RequestGuard:
    """ASGI middleware: cap the body and authenticate before any parsing or routing."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        router: Router = serve.get_replica_context().servable_object
        path = scope["path"]
        if path not in PUBLIC_PATHS:
            await router.keys.refresh()
            principal = router.keys.authenticate(Headers(scope=scope).get("authorization"))
            if principal is None:
                error = ErrorResponse.make(
                    401, "Missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
                )
                response = error_json(error, {"www-authenticate": 'Bearer realm="claas-ray"'})
                response.headers.append("www-authenticate", 'Basic realm="claas-ray"')  # browsers: the dashboard
                return await response(scope, receive, send)
            scope.setdefault("state", {})["principal"] = principal
        limits = router.config.router
        limit = limits.max_import_bytes if path == IMPORT_PATH else limits.max_body_bytes
        declared = Headers(scope=scope).get("content-length")
        too_large = ErrorResponse.make(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await error_json(too_large)(scope, receive, send)
        body = bytearray()
        while True:  # read it all here, within the cap; chunked bodies declare no length
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body.extend(message.get("body", b""))
            if len(body) > limit:
                return await error_json(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # only a disconnect is left to hear
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


app.add_middleware(RequestGuard)


def caller(request: Request) -> Principal:
    """The authenticated caller that `RequestGuard` put on the request."""
    return request.state.principal


Caller = Annotated[Principal, Depends(caller)]


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise ApiError(403, "this endpoint needs an admin key", code="permission_denied")


@serve.deployment(name="router", max_ongoing_requests=256)
@serve.ingress(app)
class Router:
    def __init__(self, config: dict[str, Any], inference: DeploymentHandle, trainer: DeploymentHandle):
        self.config = ClaasConfig.model_validate(config)
        self.keys = ApiKeys(self.config.auth)
        if not self.keys.enabled:
            logger.warning("auth is OFF (auth.enabled: false): every caller may use and train every adapter")
        self.store = open_store(self.config.store)
        self.metrics = ServingMetrics()
        self.completions = CompletionLog(
            open_database(self.config, "completions.sqlite", "NORMAL"), self.config.router.completion_log_size
        )
        # A streaming handle is expensive to configure: make it once.
        self._inference_stream = inference.options(stream=True)
        self._inference = inference
        self.openai = OpenAIServing(
            self.config, self.store, self.completions, self._generate, self.metrics, score=self._score_remote
        )
        self.journal = FeedbackJournal(open_database(self.config, "feedback.sqlite", "FULL"))
        self.claas = ClaasServing(
            self.config, self.store, self.completions, self.journal, trainer, load_token_counter(self.config)
        )
        reports = self.config.router.eval_reports_dir
        self.eval_reports = Path(reports).expanduser() if reports else self.config.state_path() / "eval"

    def _generate(self, request: GenerationRequest):
        return self._inference_stream.generate.remote(request)

    async def _score_remote(self, request: ScoreRequest):
        return await self._inference.score.remote(request)

    async def _timed(self, endpoint: str, model: str, answer: Awaitable[Served]) -> Response:
        """The answer, with its status and latency in the metrics (errors included)."""
        started = time.perf_counter()
        status = 200
        try:
            return to_http(await answer)
        except ApiError as exc:
            status = exc.status_code
            raise
        finally:
            self.metrics.observe(endpoint, model, status, time.perf_counter() - started)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, who: Caller, request: ChatCompletionRequest) -> Response:
        return await self._timed("chat", request.model, self.openai.chat(request, who))

    @app.post("/v1/completions")
    async def completions(self, who: Caller, request: CompletionRequest) -> Response:
        return await self._timed("completions", request.model, self.openai.completion(request, who))

    @app.post("/v1/score")
    async def score(self, who: Caller, request: ScoreRequestIn) -> Response:
        async def scored() -> Served:
            return Served(await self.openai.score(request, who))

        return await self._timed("score", request.model, scored())

    @app.get("/v1/models")
    async def models(self, who: Caller) -> Response:
        return JSONResponse((await self.openai.list_models(who)).model_dump())

    @app.get("/v1/models/{model:path}")
    async def model(self, who: Caller, model: str) -> Response:
        return JSONResponse((await self.openai.model_card(model, who)).model_dump())

    @app.get("/")
    async def root(self) -> Response:
        """What this server is and where its APIs are: what CLaaS's health check and a curious human get."""
        return JSONResponse({
            "name": "claas-ray",
            "version": claas_ray.__version__,
            "base_model": self.openai.base_name,
            "links": {"openai": "/v1", "models": "/v1/models", "feedback": "/v1/feedback", "lora": "/v1/lora",
                      "health": "/health", "dashboard": "/v1/dashboard", "metrics": "/metrics"},
        })

    @app.get("/health")
    @app.get("/v1/health")
    async def health(self) -> Response:
        return JSONResponse({"status": "ok", "model": self.openai.base_name})

    @app.get("/metrics")
    async def prometheus(self, who: Caller) -> Response:
        require_admin(who)  # its labels name every tenant's adapters
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # --- CLaaS API: adapters ---------------------------------------------------------------
    @app.post("/v1/lora/init")
    async def lora_init(self, who: Caller, request: LoraInitRequest) -> Response:
        return JSONResponse((await self.claas.init_lora(request, who)).model_dump(), status_code=201)

    @app.get("/v1/lora")
    async def lora_list(self, who: Caller, prefix: str = "") -> Response:
        return JSONResponse((await self.claas.list_loras(prefix, who)).model_dump())

    @app.delete("/v1/lora")
    async def lora_delete_by_query(self, who: Caller, lora_id: str) -> Response:
        return JSONResponse((await self.claas.delete_lora(lora_id, who)).model_dump())

    @app.get("/v1/lora/export")
    async def lora_export_by_query(self, who: Caller, lora_id: str, version: int | None = None) -> Response:
        return await self._zip(lora_id, version, who)

    @app.post(IMPORT_PATH)
    async def lora_import(self, who: Caller, request: Request, lora_id: str) -> Response:
        body = await request.body()  # RequestGuard has capped it at router.max_import_bytes
        return JSONResponse((await self.claas.import_zip(lora_id, body, who)).model_dump(), status_code=201)

    @app.get("/v1/lora/{lora_id:path}/export")
    async def lora_export(self, who: Caller, lora_id: str, version: int | None = None) -> Response:
        return await self._zip(lora_id, version, who)

    @app.post("/v1/lora/{lora_id:path}/rollback")
    async def lora_rollback(self, who: Caller, lora_id: str, request: LoraRollbackRequest) -> Response:
        return JSONResponse((await self.claas.rollback(lora_id, request.version, who)).model_dump())

    @app.get("/v1/lora/{lora_id:path}")
    async def lora_get(self, who: Caller, lora_id: str) -> Response:
        return JSONResponse((await self.claas.get_lora(lora_id, who)).model_dump())

    @app.delete("/v1/lora/{lora_id:path}")
    async def lora_delete(self, who: Caller, lora_id: str) -> Response:
        return JSONResponse((await self.claas.delete_lora(lora_id, who)).model_dump())

    async def _zip(self, lora_id: str, version: int | None, who: Principal) -> Response:
        data = await self.claas.export_zip(lora_id, version, who)
        filename = lora_id.replace("/", "__") + ".zip"
        return Response(data, media_type="application/zip", headers={"content-disposition": f'attachment; filename="{filename}"'})

    # --- CLaaS API: feedback ----------------------------------------------------------------
    @app.post("/v1/feedback")
    async def feedback(self, who: Caller, request: FeedbackRequest) -> Response:
        response, status = await self.claas.submit_feedback(request, who)
        return JSONResponse(response.model_dump(), status_code=status)

    @app.get("/v1/feedback/{feedback_id}")
    async def feedback_get(self, who: Caller, feedback_id: str) -> Response:
        return JSONResponse((await self.claas.feedback_status(feedback_id, who)).model_dump())

    # --- dashboard --------------------------------------------------------------------------
    @app.get("/dashboard")
    @app.get("/v1/dashboard")
    async def dashboard(self, who: Caller) -> Response:
        require_admin(who)  # it shows every tenant's adapters and feedback
        page = await asyncio.to_thread(
            lambda: render_dashboard(self.store, self.journal.recent(50), self.eval_reports, self.openai.base_name)
        )
        return HTMLResponse(page)

    @app.get("/dashboard/eval/{run}/compliance.png")
    async def dashboard_plot(self, who: Caller, run: str) -> Response:
        require_admin(who)
        path = (self.eval_reports / run / "compliance.png").resolve()
        if path.parent.parent != self.eval_reports.resolve() or not path.is_file():
            raise ApiError(404, f"no evaluation plot for run '{run}'")
        return FileResponse(path, media_type="image/png")
