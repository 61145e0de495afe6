"""The CLaaS API: adapter lifecycle and feedback. Our shapes, plus CLaaS's so its users can switch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from claas_ray.adapters.store import AdapterVersionMeta
from claas_ray.protocol.openai import ChatMessageIn, ErrorInfo

FeedbackSource = Literal["completion_id", "completion_log", "text"]

MAX_FEEDBACK_CHARS = 4000


class ClaasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- adapters --------------------------------------------------------------------------------
class LoraInitRequest(ClaasRequest):
    lora_id: str = Field(min_length=1, max_length=129)
    base_model: str | None = Field(None, description="Must be the served base model when given.")
    rank: int | None = Field(None, ge=1, le=256, validation_alias=AliasChoices("rank", "lora_r"))
    alpha: int | None = Field(None, ge=1, le=1024, validation_alias=AliasChoices("alpha", "lora_alpha"))
    target_modules: list[str] | None = Field(None, min_length=1, max_length=16)


class LoraRollbackRequest(ClaasRequest):
    version: int = Field(ge=0)


class LoraSummary(BaseModel):
    lora_id: str
    latest_version: int
    base_model: str


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraSummary]
    loras: list[str] = Field(default_factory=list, description="CLaaS's shape: the ids alone.")


class LoraDetail(BaseModel):
    lora_id: str
    latest_version: int
    versions: list[AdapterVersionMeta]


class LoraDeleted(BaseModel):
    lora_id: str
    deleted: bool


# --- feedback --------------------------------------------------------------------------------
class TrainingSettingsIn(BaseModel):
    """CLaaS's `training` object (its names; `kl_weight` is ours for `kl_reg_weight`). Other keys are ignored,
    as the whole object is unless the operator allows some settings (router.request_training)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    learning_rate: float | None = None
    alpha: float | None = None
    is_clip: float | None = None
    kl_weight: float | None = Field(None, validation_alias=AliasChoices("kl_weight", "kl_reg_weight"))
    max_grad_norm: float | None = None
    teacher_top_k: int | None = None

    def given(self) -> dict[str, float]:
        return {key: value for key, value in self.model_dump().items() if value is not None}


class FeedbackItemIn(ClaasRequest):
    """Either a `completion_id` (the server knows the rest), or the conversation and response themselves."""

    feedback: str = Field(min_length=1, max_length=MAX_FEEDBACK_CHARS)
    completion_id: str | None = Field(None, max_length=200)
    lora_id: str | None = Field(None, max_length=129)
    messages: list[ChatMessageIn] | None = Field(None, min_length=1, max_length=256)
    prompt: str | None = Field(None, min_length=1)
    response: str | None = Field(None, min_length=1)
    training: TrainingSettingsIn | None = Field(
        None, description="CLaaS's per-request settings: ignored unless the operator allows some for admin keys "
        "(router.request_training); then those are used for this item's step, the rest ignored.",
    )

    @model_validator(mode="after")
    def _complete(self) -> FeedbackItemIn:
        if self.completion_id is not None:
            if self.messages is not None or self.prompt is not None or self.response is not None:
                raise ValueError("give either completion_id or messages/prompt + response, not both")
            return self
        if self.lora_id is None:
            raise ValueError("lora_id is required when completion_id is not given")
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt (or a completion_id)")
        if self.response is None:
            raise ValueError("response is required when completion_id is not given")
        return self


class FeedbackRequest(ClaasRequest):
    """One item (its fields at the top level), `items: [...]`, or CLaaS's `requests: [...]`."""

    items: list[FeedbackItemIn] = Field(min_length=1, max_length=64)
    wait: bool = Field(False, description="Block until every item is applied or rejected.")
    wait_timeout_s: float = Field(120.0, gt=0, le=600)
    shape: Literal["native", "claas"] = Field(
        "native", description="Set from the body: `claas` for CLaaS's `requests: [...]`, answered as CLaaS does "
        "(after the step, in its response shape).",
    )

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "requests" in data and "items" not in data:  # CLaaS
            data["items"] = data.pop("requests")
            data.pop("orchestration", None)  # CLaaS's sleep/wake hints: placement is server config here
            data["shape"] = "claas"
        elif "items" not in data:
            envelope = {key: data.pop(key) for key in ("wait", "wait_timeout_s") if key in data}
            data = {"items": [data], **envelope}
        return data


class FeedbackStatus(BaseModel):
    id: str
    lora_id: str
    status: Literal["queued", "training", "applied", "rejected"]
    version: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None
    completion_id: str | None = None
    source: FeedbackSource | None = Field(
        None, description="What the step trains on: `completion_id` (named), `completion_log` (text matched to a "
        "served completion: its recorded tokens, system prompt and sampling log-probs), or `text` (no match: the "
        "text re-tokenised, importance ratio 1).",
    )
    created_at: float
    updated_at: float


class DistillResult(BaseModel):
    """CLaaS's `distill_result`: its metric names, then ours."""

    lora_id: str
    metadata: dict[str, float]


class TimingMs(BaseModel):
    """CLaaS's `timing_ms`; sleep, wake and save happen inside our trainer's step, so they are in `distill`."""

    sleep: int = 0
    distill: int = 0
    save: int = 0
    wake: int = 0
    logprobs: int = 0
    total: int = 0


def _none(value: Any) -> bool:
    return value is None


class FeedbackResponse(BaseModel):
    items: list[FeedbackStatus]
    # CLaaS's summary fields, for clients written against it.
    status: str
    lora_id: str
    batch_size: int
    request_id: str
    # CLaaS's synchronous answer (a `requests: [...]` body), and the 504 when the wait ran out.
    distill_result: DistillResult | None = Field(None, exclude_if=_none)
    timing_ms: TimingMs | None = Field(None, exclude_if=_none)
    vllm: dict[str, bool] | None = Field(None, exclude_if=_none)
    feedback_log_path: str | None = Field(None, exclude_if=_none)
    error: ErrorInfo | None = Field(None, exclude_if=_none)
