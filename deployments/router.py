"""The router: the only HTTP ingress. Thin FastAPI routes over `OpenAIServing`; errors in OpenAI's shape."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from claas_ray.adapters.store import open_store
from claas_ray.config import ClaasConfig
from claas_ray.dashboard.page import render as render_dashboard
from claas_ray.feedback.journal import FeedbackJournal
from claas_ray.protocol.claas import FeedbackRequest, LoraInitRequest, LoraRollbackRequest
from claas_ray.protocol.generation import GenerationRequest, ScoreRequest
from claas_ray.protocol.openai import ChatCompletionRequest, CompletionRequest, ErrorResponse, ScoreRequestIn
from claas_ray.serving.claas_serving import ClaasServing, Rejected
from claas_ray.serving.completion_log import CompletionLog
from claas_ray.serving.metrics import ServingMetrics
from claas_ray.serving.openai_serving import OpenAIServing, Served

app = FastAPI(title="claas-ray", description="OpenAI-compatible serving with per-user LoRA adapters trained by SDPO.")


def error_json(error: ErrorResponse, headers: dict[str, str] | None = None) -> JSONResponse:
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


@app.exception_handler(Rejected)
async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
    return error_json(exc.error)


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return error_json(ErrorResponse.make(500, f"internal error: {type(exc).__name__}"))


def to_http(result: Served | ErrorResponse) -> Response:
    if isinstance(result, ErrorResponse):
        return error_json(result)
    if isinstance(result.body, ErrorResponse):
        return error_json(result.body, result.headers)
    if hasattr(result.body, "model_dump"):
        return JSONResponse(result.body.model_dump(exclude_none=True), headers=result.headers)
    return StreamingResponse(result.body, media_type="text/event-stream", headers=result.headers)


@serve.deployment(name="router", max_ongoing_requests=256)
@serve.ingress(app)
class Router:
    def __init__(self, config: dict[str, Any], inference: DeploymentHandle, trainer: DeploymentHandle):
        self.config = ClaasConfig.model_validate(config)
        self.store = open_store(self.config.store)
        self.metrics = ServingMetrics()
        self.completions = CompletionLog(
            self.config.state_path() / "completions.sqlite", self.config.router.completion_log_size
        )
        # A streaming handle is expensive to configure: make it once.
        self._inference_stream = inference.options(stream=True)
        self._inference = inference
        self.openai = OpenAIServing(
            self.config, self.store, self.completions, self._generate, self.metrics, score=self._score_remote
        )
        self.journal = FeedbackJournal(self.config.state_path() / "feedback.sqlite")
        self.claas = ClaasServing(self.config, self.store, self.completions, self.journal, trainer)
        reports = self.config.router.eval_reports_dir
        self.eval_reports = Path(reports).expanduser() if reports else self.config.state_path() / "eval"

    def _generate(self, request: GenerationRequest):
        return self._inference_stream.generate.remote(request)

    async def _score_remote(self, request: ScoreRequest):
        return await self._inference.score.remote(request)

    async def _timed(self, endpoint: str, model: str, result: Served | ErrorResponse, started: float) -> Response:
        status = result.status_code if isinstance(result, ErrorResponse) else 200
        self.metrics.observe(endpoint, model, status, time.perf_counter() - started)
        return to_http(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: ChatCompletionRequest) -> Response:
        started = time.perf_counter()
        return await self._timed("chat", request.model, await self.openai.chat(request), started)

    @app.post("/v1/completions")
    async def completions(self, request: CompletionRequest) -> Response:
        started = time.perf_counter()
        return await self._timed("completions", request.model, await self.openai.completion(request), started)

    @app.post("/v1/score")
    async def score(self, request: ScoreRequestIn) -> Response:
        started = time.perf_counter()
        result = await self.openai.score(request)
        served = result if isinstance(result, ErrorResponse) else Served(result)
        return await self._timed("score", request.model, served, started)

    @app.get("/v1/models")
    async def models(self) -> Response:
        return JSONResponse(self.openai.list_models().model_dump())

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str) -> Response:
        for card in self.openai.list_models().data:
            if card.id == model:
                return JSONResponse(card.model_dump())
        return error_json(ErrorResponse.make(404, f"The model '{model}' does not exist", "model", "model_not_found"))

    @app.get("/health")
    @app.get("/v1/health")
    async def health(self) -> Response:
        return JSONResponse({"status": "ok", "model": self.openai.base_name})

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # --- CLaaS API: adapters ---------------------------------------------------------------
    @app.post("/v1/lora/init")
    async def lora_init(self, request: LoraInitRequest) -> Response:
        return JSONResponse((await self.claas.init_lora(request)).model_dump(), status_code=201)

    @app.get("/v1/lora")
    async def lora_list(self, prefix: str = "") -> Response:
        return JSONResponse(self.claas.list_loras(prefix).model_dump())

    @app.delete("/v1/lora")
    async def lora_delete_by_query(self, lora_id: str) -> Response:
        return JSONResponse((await self.claas.delete_lora(lora_id)).model_dump())

    @app.get("/v1/lora/export")
    async def lora_export_by_query(self, lora_id: str, version: int | None = None) -> Response:
        return self._zip(lora_id, version)

    @app.post("/v1/lora/import")
    async def lora_import(self, request: Request, lora_id: str) -> Response:
        body = await self._body(request)
        return JSONResponse((await self.claas.import_zip(lora_id, body)).model_dump(), status_code=201)

    @app.get("/v1/lora/{lora_id:path}/export")
    async def lora_export(self, lora_id: str, version: int | None = None) -> Response:
        return self._zip(lora_id, version)

    @app.post("/v1/lora/{lora_id:path}/rollback")
    async def lora_rollback(self, lora_id: str, request: LoraRollbackRequest) -> Response:
        return JSONResponse(self.claas.rollback(lora_id, request.version).model_dump())

    @app.get("/v1/lora/{lora_id:path}")
    async def lora_get(self, lora_id: str) -> Response:
        return JSONResponse(self.claas.get_lora(lora_id).model_dump())

    @app.delete("/v1/lora/{lora_id:path}")
    async def lora_delete(self, lora_id: str) -> Response:
        return JSONResponse((await self.claas.delete_lora(lora_id)).model_dump())

    def _zip(self, lora_id: str, version: int | None) -> Response:
        data = self.claas.export_zip(lora_id, version)
        filename = lora_id.replace("/", "__") + ".zip"
        return Response(data, media_type="application/zip", headers={"content-disposition": f'attachment; filename="{filename}"'})

    async def _body(self, request: Request) -> bytes:
        limit = self.config.router.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Rejected(ErrorResponse.make(413, f"the request body exceeds {limit} bytes"))
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise Rejected(ErrorResponse.make(413, f"the request body exceeds {limit} bytes"))
        return bytes(body)

    # --- CLaaS API: feedback ----------------------------------------------------------------
    @app.post("/v1/feedback")
    async def feedback(self, request: FeedbackRequest) -> Response:
        response, status = await self.claas.submit_feedback(request)
        return JSONResponse(response.model_dump(), status_code=status)

    @app.get("/v1/feedback/{feedback_id}")
    async def feedback_get(self, feedback_id: str) -> Response:
        return JSONResponse(self.claas.feedback_status(feedback_id).model_dump())

    # --- dashboard --------------------------------------------------------------------------
    @app.get("/dashboard")
    @app.get("/v1/dashboard")
    async def dashboard(self) -> Response:
        page = render_dashboard(self.store, self.journal.recent(50), self.eval_reports, self.openai.base_name)
        return HTMLResponse(page)

    @app.get("/dashboard/eval/{run}/compliance.png")
    async def dashboard_plot(self, run: str) -> Response:
        path = (self.eval_reports / run / "compliance.png").resolve()
        if path.parent.parent != self.eval_reports.resolve() or not path.is_file():
            return error_json(ErrorResponse.make(404, f"no evaluation plot for run '{run}'"))
        return FileResponse(path, media_type="image/png")
