"""The CLaaS API's logic: adapter lifecycle and feedback intake. No FastAPI here (see deployments/router.py).

Feedback is validated, resolved (a completion id becomes the exact tokens that were served), and
written to the journal before anything is acknowledged; the trainer is only nudged, so a trainer that
is down or restarting never loses an acknowledged item. Errors are raised as `ApiError`. The store, the
journal and the completion log are files, SQLite or S3: the public (async) methods call them in a thread,
never on the router's event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import threading
import time
import zipfile
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from claas_ray.adapters.ids import AdapterIdError, validate_adapter_id
from claas_ray.adapters.names import AmbiguousAdapterName, resolve_in_store
from claas_ray.adapters.state import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_FILES
from claas_ray.adapters.store import AdapterExistsError, AdapterNotFoundError, AdapterStore
from claas_ray.chat import ChatMessage
from claas_ray.config import REQUEST_TRAINING_BOUNDS, ClaasConfig
from claas_ray.feedback.journal import FINAL, FeedbackEntry, FeedbackJournal
from claas_ray.protocol.claas import (
    DistillResult,
    FeedbackItemIn,
    FeedbackRequest,
    FeedbackResponse,
    FeedbackSource,
    FeedbackStatus,
    LoraDeleted,
    LoraDetail,
    LoraInitRequest,
    LoraList,
    LoraSummary,
    TimingMs,
)
from claas_ray.protocol.openai import ErrorResponse, new_id
from claas_ray.serving.auth import Principal
from claas_ray.serving.completion_log import CompletionLog, CompletionRecord
from claas_ray.serving.errors import ApiError
from claas_ray.serving.token_counter import TokenCounter, utf8_bytes
from claas_ray.training.example import TrainingExample

logger = logging.getLogger(__name__)

MAX_IMPORT_FILE_BYTES = 2 * 2**30


CLAAS_METRIC_NAMES = {
    "loss": "total_loss",
    "divergence": "distill_loss",
    "kl_to_base": "kl_reg",
    "is_ratio_mean": "mean_is_ratio",
    "is_clipped_fraction": "clip_fraction",
    "grad_norm": "grad_norm",
    "tokens": "tokens_processed",
}
"""Our step metrics under the names CLaaS's clients read from `distill_result.metadata`."""


@dataclass(frozen=True)
class _Prepared:
    """A feedback item ready for the journal: its adapter, what the step trains on, and where that came from."""

    lora_id: str
    example: TrainingExample
    completion_id: str | None
    source: FeedbackSource


def feedback_status(entry: FeedbackEntry) -> FeedbackStatus:
    return FeedbackStatus(
        id=entry.id, lora_id=entry.adapter_id, status=entry.status, version=entry.version, metrics=entry.metrics,
        reason=entry.reason, completion_id=entry.completion_id, source=entry.source, created_at=entry.created_at,
        updated_at=entry.updated_at,
    )


def remote_message(exc: BaseException) -> str:
    """The message of an error raised in another Ray actor, without Ray's traceback around it."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)


class ClaasServing:
    def __init__(
        self,
        config: ClaasConfig,
        store: AdapterStore,
        completions: CompletionLog,
        journal: FeedbackJournal,
        trainer: Any,
        count_tokens: TokenCounter = utf8_bytes,
    ):
        self.config = config
        self.store = store
        self.completions = completions
        self.journal = journal
        self.trainer = trainer  # the trainer's Serve handle: `await trainer.method.remote(...)`
        self.count_tokens = count_tokens
        self._intake = threading.Lock()

    async def _trainer_call(self, method: str, *args: Any) -> Any:
        """A call to the trainer; if it is down or restarting, a 503 to retry, not a 500."""
        try:
            return await getattr(self.trainer, method).remote(*args)
        except (AdapterExistsError, ValueError, KeyError):
            raise  # the trainer's answer about the request itself (Ray re-raises the original type)
        except Exception as exc:
            logger.warning("trainer call %s failed: %s", method, type(exc).__name__)
            raise ApiError(503, f"the trainer is unavailable ({type(exc).__name__}); retry shortly",
                           code="trainer_unavailable", headers={"retry-after": str(self.config.router.retry_after_s)}) from exc

    # --- adapters ---------------------------------------------------------------------------
    @staticmethod
    def _valid_id(lora_id: str, param: str = "lora_id") -> str:
        try:
            return validate_adapter_id(lora_id)
        except AdapterIdError as exc:
            raise ApiError(400, str(exc), param) from exc

    def _owned(self, lora_id: str, who: Principal, param: str = "lora_id") -> str:
        """A valid id inside the caller's namespace (decided by the id alone: nothing about others leaks)."""
        self._valid_id(lora_id, param)
        if not who.may_use(lora_id):
            raise ApiError(403, who.refusal(), param, "permission_denied")
        return lora_id

    def _resolve(self, name: str, who: Principal, param: str) -> str | None:
        """The id of an adapter the caller may use, named by its id or by a CLaaS name (adapters/names.py)."""
        try:
            return resolve_in_store(name, self.store, who.may_use, who.namespace())
        except AmbiguousAdapterName as exc:
            raise ApiError(400, str(exc), param, "ambiguous_lora_id") from exc

    def _existing(self, lora_id: str, who: Principal, param: str = "lora_id") -> str:
        resolved = self._resolve(lora_id, who, param)
        if resolved is not None:
            return resolved
        self._owned(lora_id, who, param)
        raise ApiError(404, f"LoRA adapter '{lora_id}' does not exist", param, "lora_not_found")

    def _detail(self, lora_id: str) -> LoraDetail:
        return LoraDetail(
            lora_id=lora_id, latest_version=self.store.latest_version(lora_id), versions=self.store.list_versions(lora_id)
        )

    async def init_lora(self, request: LoraInitRequest, who: Principal) -> LoraDetail:
        self._owned(request.lora_id, who)
        served = {self.config.model.base_model, self.config.served_model_name()}
        if request.base_model is not None and request.base_model not in served:
            raise ApiError(400, f"this server trains adapters of '{self.config.served_model_name()}' only", "base_model")
        lora = self.config.lora.model_copy(
            update={
                key: value
                for key, value in {"rank": request.rank, "alpha": request.alpha, "target_modules": request.target_modules}.items()
                if value is not None
            }
        )
        unserved = sorted(set(lora.target_modules) - set(self.config.lora.target_modules))
        if unserved:
            raise ApiError(400, f"target_modules {unserved}: this server serves LoRA on {self.config.lora.target_modules} only "
                       "(lora.target_modules)", "target_modules")
        if lora.rank > self.config.serving.max_lora_rank:
            raise ApiError(400, f"rank {lora.rank} exceeds the server's max_lora_rank {self.config.serving.max_lora_rank}", "rank")
        exists = await asyncio.to_thread(self.store.exists, request.lora_id)
        if exists and self.config.router.reinit == "conflict":
            raise ApiError(409, f"LoRA adapter '{request.lora_id}' already exists", "lora_id", "lora_exists")
        try:
            await self._trainer_call("reset_adapter" if exists else "init_adapter", request.lora_id, lora.model_dump())
        except AdapterExistsError as exc:
            raise ApiError(409, remote_message(exc), "lora_id", "lora_exists") from exc
        except ValueError as exc:  # e.g. target modules this model does not have
            raise ApiError(400, remote_message(exc), "target_modules") from exc
        return await asyncio.to_thread(self._detail, request.lora_id)

    async def list_loras(self, prefix: str, who: Principal) -> LoraList:
        return await asyncio.to_thread(self._list_loras, prefix, who)

    def _list_loras(self, prefix: str, who: Principal) -> LoraList:
        summaries = []
        for lora_id in self.store.list_adapters(prefix):
            if not who.may_use(lora_id):
                continue
            try:
                latest = self.store.latest_version(lora_id)
                summaries.append(LoraSummary(lora_id=lora_id, latest_version=latest, base_model=self.store.read_meta(lora_id, latest).base_model))
            except AdapterNotFoundError:
                continue
        return LoraList(data=summaries, loras=[s.lora_id for s in summaries])

    async def get_lora(self, lora_id: str, who: Principal) -> LoraDetail:
        return await asyncio.to_thread(lambda: self._detail(self._existing(lora_id, who)))

    async def delete_lora(self, lora_id: str, who: Principal) -> LoraDeleted:
        lora_id, deleted = await asyncio.to_thread(self._delete, lora_id, who)
        if deleted:
            await self._trainer_call("forget_adapter", lora_id)
        return LoraDeleted(lora_id=lora_id, deleted=deleted)

    def _delete(self, lora_id: str, who: Principal) -> tuple[str, bool]:
        lora_id = self._owned(self._resolve(lora_id, who, "lora_id") or lora_id, who)  # idempotent: a miss is no error
        return lora_id, self.store.delete(lora_id)

    async def rollback(self, lora_id: str, version: int, who: Principal) -> LoraDetail:
        return await asyncio.to_thread(self._rollback, lora_id, version, who)

    def _rollback(self, lora_id: str, version: int, who: Principal) -> LoraDetail:
        self._existing(lora_id, who)
        try:
            self.store.rollback(lora_id, version)
        except AdapterNotFoundError as exc:
            raise ApiError(404, str(exc), "version") from exc
        return self._detail(lora_id)

    async def export_zip(self, lora_id: str, version: int | None, who: Principal) -> bytes:
        return await asyncio.to_thread(self._export_zip, lora_id, version, who)

    def _export_zip(self, lora_id: str, version: int | None, who: Principal) -> bytes:
        self._existing(lora_id, who)
        try:
            files = self.store.export_files(lora_id, version)
        except AdapterNotFoundError as exc:
            raise ApiError(404, str(exc), "version") from exc
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in sorted(files.items()):
                # A fixed timestamp: the same version always exports to the same bytes.
                archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
        return buffer.getvalue()

    async def import_zip(self, lora_id: str, data: bytes, who: Principal) -> LoraDetail:
        self._owned(lora_id, who)
        if await asyncio.to_thread(self.store.exists, lora_id):
            raise ApiError(409, f"LoRA adapter '{lora_id}' already exists", "lora_id", "lora_exists")
        files = await asyncio.to_thread(read_adapter_zip, data)
        try:
            await self._trainer_call("import_adapter", lora_id, files)
        except AdapterExistsError as exc:
            raise ApiError(409, remote_message(exc), "lora_id", "lora_exists") from exc
        except (ValueError, KeyError) as exc:
            raise ApiError(400, f"the adapter does not fit this base model: {remote_message(exc)}", "file") from exc
        return await asyncio.to_thread(self._detail, lora_id)

    # --- feedback ---------------------------------------------------------------------------
    def _example(self, item: FeedbackItemIn, index: int, who: Principal) -> _Prepared:
        param = f"items.{index}"
        limit = self.config.router.max_feedback_tokens
        if self.count_tokens(item.feedback) > limit:
            raise ApiError(400, f"feedback is longer than {limit} tokens", f"{param}.feedback", "feedback_too_long")
        settings = self._training_settings(item, who, param)
        if item.completion_id is not None:
            record = self.completions.get(item.completion_id)
            if record is not None and not (who.admin or record.tenant == who.tenant):
                record = None  # another tenant's conversation: as if it did not exist
            if record is None:
                raise ApiError(404, f"completion '{item.completion_id}' is not known (too old, or never served here)",
                           f"{param}.completion_id", "completion_not_found")
            if record.messages is None:
                raise ApiError(400, "feedback by completion id needs a chat completion", f"{param}.completion_id")
            named = None if item.lora_id is None else self._existing(item.lora_id, who, f"{param}.lora_id")
            if named is None and record.adapter_id is None:
                raise ApiError(400, "that completion was served by the base model: name the lora_id to train", f"{param}.lora_id")
            if named is not None and record.adapter_id is not None and named != record.adapter_id:
                raise ApiError(400, f"that completion was served by '{record.adapter_id}', not '{item.lora_id}'", f"{param}.lora_id")
            lora_id = named or self._existing(record.adapter_id, who, f"{param}.lora_id")
            return self._from_record(lora_id, record, item, settings, "completion_id", f"{param}.completion_id")
        lora_id = self._existing(item.lora_id or "", who, f"{param}.lora_id")
        if item.messages is not None and len(item.messages) > self.config.router.max_messages:
            raise ApiError(400, f"at most {self.config.router.max_messages} messages are allowed", f"{param}.messages")
        if item.messages is not None:
            messages = [message.to_chat_message() for message in item.messages]
        else:
            messages = [ChatMessage(role="user", content=item.prompt or "")]
        if not any(m.role == "user" for m in messages):
            raise ApiError(400, "messages must contain a user turn", f"{param}.messages")
        record = self._served(lora_id, item, None if item.messages is None else messages, who)
        if record is not None:
            return self._from_record(lora_id, record, item, settings, "completion_log", f"{param}.response")
        example = TrainingExample(messages=messages, response_text=item.response or "", feedback=item.feedback,
                                  training_settings=settings)
        return _Prepared(lora_id, example, None, "text")

    def _served(self, lora_id: str, item: FeedbackItemIn, messages: list[ChatMessage] | None,
                who: Principal) -> CompletionRecord | None:
        """The completion this text feedback is about, if this server answered it: same adapter, same answer
        text, and the same messages (or last user turn, for CLaaS's `prompt`) where the item gives them."""
        for record in self.completions.find(lora_id, item.response or ""):
            if record.messages is None or not (who.admin or record.tenant == who.tenant):
                continue
            if messages is not None and record.messages != messages:
                continue
            if item.prompt is not None:
                last_user = next((m.content for m in reversed(record.messages) if m.role == "user"), None)
                if last_user is None or last_user.strip() != item.prompt.strip():
                    continue
            return record
        return None

    def _from_record(self, lora_id: str, record: CompletionRecord, item: FeedbackItemIn, settings: dict[str, float],
                     source: FeedbackSource, param: str) -> _Prepared:
        """Train on what was served: the recorded tokens, the whole conversation, the sampling log-probs."""
        size = len(record.prompt_token_ids) + len(record.response_token_ids) + self.count_tokens(item.feedback)
        step_limit = self.config.training.max_step_tokens or self.config.model.max_model_len
        if size > step_limit:
            raise ApiError(400, f"that conversation and the feedback are about {size} tokens; a step takes at most "
                       f"{step_limit} (training.max_step_tokens, else model.max_model_len)", param, "too_long_to_train")
        example = TrainingExample(
            messages=record.messages,
            response_text=record.response_text,
            response_token_ids=record.response_token_ids or None,
            response_logprobs=record.response_logprobs or None,
            feedback=item.feedback,
            training_settings=settings,
        )
        return _Prepared(lora_id, example, record.completion_id, source)

    def _training_settings(self, item: FeedbackItemIn, who: Principal, param: str) -> dict[str, float]:
        """What of the item's `training` this step uses: the operator-allowed settings, for admin keys, in bounds.

        Anything else is ignored as before (CLaaS's clients always send the whole object), never refused, so
        an unchanged CLaaS client keeps working; a value out of bounds for an allowed setting is a 400.
        """
        allowed = self.config.router.request_training
        if item.training is None or not allowed or not who.admin:
            return {}
        settings = {}
        for key, value in item.training.given().items():
            if key not in allowed:
                continue
            low, high = REQUEST_TRAINING_BOUNDS[key]
            if not low <= value <= high:
                raise ApiError(400, f"training.{key} must be within [{low:g}, {high:g}]", f"{param}.training.{key}")
            settings[key] = float(value)
        return settings

    def _journal(self, prepared: list[_Prepared]) -> list[str]:
        """Admit and append in one critical section (a queue cannot overfill between them); returns the ids."""
        with self._intake:
            self._admit(prepared)
            ids = [new_id("fb") for _ in prepared]
            self.journal.append([(fid, p.lora_id, p.example, p.completion_id, p.source) for fid, p in zip(ids, prepared)])
        return ids

    def _admit(self, prepared: list[_Prepared]) -> None:
        """Backpressure: a full per-adapter queue is a 429 with a Retry-After from measured step times."""
        limit = self.config.trainer.max_pending_per_adapter
        for lora_id in sorted({item.lora_id for item in prepared}):
            adding = sum(1 for item in prepared if item.lora_id == lora_id)
            pending = self.journal.count_pending(lora_id)
            if pending + adding <= limit:
                continue
            if adding > limit:
                raise ApiError(400, f"{adding} items for '{lora_id}' exceed its queue of {limit}: send fewer at once",
                           "items", "too_many_items")
            steps_ahead = math.ceil(self.journal.count_pending() / self.config.trainer.max_batch_items)
            step_s = self.journal.recent_step_seconds() or float(self.config.router.retry_after_s)
            retry_after = max(1, math.ceil(steps_ahead * step_s))
            raise ApiError(429, f"LoRA adapter '{lora_id}' already has {pending} of {limit} feedback items "
                           f"waiting; retry in {retry_after}s", "lora_id", "queue_full", headers={"retry-after": str(retry_after)})

    async def submit_feedback(self, request: FeedbackRequest, who: Principal) -> tuple[FeedbackResponse, int]:
        """Journal the items (acknowledged = durable), then answer: at once (202), or once they are final when
        the caller waits. A CLaaS-shaped body always waits, as CLaaS answers after its step."""
        started = time.monotonic()
        prepared = await asyncio.to_thread(lambda: [self._example(item, i, who) for i, item in enumerate(request.items)])
        ids = await asyncio.to_thread(self._journal, prepared)
        try:  # a nudge only: the trainer drains the journal on its own, also after a restart
            await asyncio.wait_for(self.trainer.notify.remote(), timeout=5)
        except Exception as exc:
            logger.warning("trainer not reachable for a nudge (%s); feedback stays queued", type(exc).__name__)
        claas = request.shape == "claas"
        timeout_s = request.wait_timeout_s  # CLaaS's body has no such field: ours, when given, beside its own
        if claas and "wait_timeout_s" not in request.model_fields_set:
            timeout_s = self.config.router.claas_feedback_timeout_s
        entries = await asyncio.to_thread(self.journal.get_many, ids)
        if request.wait or claas:
            deadline = started + timeout_s
            while time.monotonic() < deadline and not all(e.status in FINAL for e in entries):
                await asyncio.sleep(0.1)
                entries = await asyncio.to_thread(self.journal.get_many, ids)
        statuses = [feedback_status(entry) for entry in entries]
        final = all(s.status in FINAL for s in statuses)
        overall = statuses[0].status if len({s.status for s in statuses}) == 1 else "mixed"
        response = FeedbackResponse(
            items=statuses, status=overall, lora_id=statuses[0].lora_id, batch_size=len(statuses), request_id=ids[0]
        )
        if not claas:
            return response, 200 if final else 202
        if not final:
            response.error = ErrorResponse.make(
                504, f"feedback {ids} not applied within {timeout_s:g}s; it stays queued: GET /v1/feedback/<id>",
                code="feedback_timeout",
            ).error  # in the body, beside the items: not raised
            return response, 504
        return self._claas_answer(response, entries, started), 200

    def _claas_answer(self, response: FeedbackResponse, entries: list[FeedbackEntry], started: float) -> FeedbackResponse:
        """CLaaS's synchronous answer: `status` ok or error, `distill_result` with its metric names, `timing_ms`."""
        applied = [entry for entry in entries if entry.status == "applied"]
        response.status = "ok" if len(applied) == len(entries) else "error"
        if applied:
            names = sorted({name for entry in applied for name in entry.metrics})
            ours = {name: sum(e.metrics.get(name, 0.0) for e in applied) / len(applied) for name in names}
            theirs = {claas: ours[name] for name, claas in CLAAS_METRIC_NAMES.items() if name in ours}
            response.distill_result = DistillResult(
                lora_id=response.lora_id, metadata={**theirs, "batch_size": float(len(entries)), **ours}
            )
        train_s = max((entry.metrics.get("train_s", 0.0) for entry in applied), default=0.0)
        response.timing_ms = TimingMs(distill=round(1000 * train_s), total=round(1000 * (time.monotonic() - started)))
        sleeps = self.config.trainer.colocation == "sleep"
        response.vllm = {"slept": sleeps and bool(applied), "woke": sleeps and bool(applied)}
        response.feedback_log_path = f"/v1/feedback/{response.request_id}"
        return response

    async def feedback_status(self, feedback_id: str, who: Principal) -> FeedbackStatus:
        entry = await asyncio.to_thread(self.journal.get, feedback_id)
        if entry is None or not who.may_use(entry.adapter_id):
            raise ApiError(404, f"feedback '{feedback_id}' does not exist", "feedback_id", "feedback_not_found")
        return feedback_status(entry)


def read_adapter_zip(data: bytes) -> dict[str, bytes]:
    """The two PEFT files from an uploaded zip, or a 400: nothing else, nothing huge, no pickles."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ApiError(400, "the upload is not a zip archive", "file") from exc
    files: dict[str, bytes] = {}
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            name = info.filename.rsplit("/", 1)[-1]
            if name not in PEFT_FILES or info.filename.count("/") > 1 or info.filename.startswith("/") or ".." in info.filename:
                raise ApiError(400, f"unexpected file {info.filename!r} in the archive; only {list(PEFT_FILES)} are allowed", "file")
            if name in files:
                raise ApiError(400, f"{name} appears twice in the archive", "file")
            if info.file_size > MAX_IMPORT_FILE_BYTES:
                raise ApiError(400, f"{name} is too large ({info.file_size} bytes)", "file")
            files[name] = archive.read(info)
    missing = [name for name in PEFT_FILES if name not in files]
    if missing:
        raise ApiError(400, f"the archive lacks {missing}", "file")
    try:
        config = json.loads(files[ADAPTER_CONFIG])
        if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
            raise ValueError("peft_type must be LORA")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in config:
                raise ValueError(f"missing {key}")
    except ValueError as exc:
        raise ApiError(400, f"adapter_config.json is not a valid LoRA config: {exc}", "file") from exc
    try:
        load_safetensors(files[ADAPTER_WEIGHTS])  # the safetensors format cannot carry code
    except (SafetensorError, ValueError, OSError) as exc:
        raise ApiError(400, f"adapter_model.safetensors is not a valid safetensors file: {exc}", "file") from exc
    return files
