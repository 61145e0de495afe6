"""A feedback item as the trainer sees it, and its tokenisation into aligned student/teacher inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from claas_ray.chat import ChatMessage, render_prompt_ids


class TrainingExample(BaseModel):
    """One piece of feedback on one response.

    When the response's token ids (and sampling log-probs) are known from the completion record, they
    are used as they are: re-tokenising text can drift from what was actually sampled.
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    response_text: str = ""
    response_token_ids: list[int] | None = None
    response_logprobs: list[float] | None = None
    feedback: str = Field(min_length=1)
    feedback_id: str | None = None
    training_settings: dict[str, float] = Field(
        default_factory=dict, description="Settings this item's step uses instead of the server's (operator-allowed)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingExample:
        if self.response_token_ids is None and not self.response_text:
            raise ValueError("a training example needs response_text or response_token_ids")
        if self.response_token_ids is not None and len(self.response_token_ids) == 0:
            raise ValueError("response_token_ids must not be empty")
        if self.response_logprobs is not None:
            if self.response_token_ids is None:
                raise ValueError("response_logprobs need response_token_ids")
            if len(self.response_logprobs) != len(self.response_token_ids):
                raise ValueError("response_logprobs and response_token_ids differ in length")
        return self


@dataclass(frozen=True)
class TokenizedExample:
    """Student and teacher inputs that end with the same response tokens.

    `student_ids[student_start:]` and `teacher_ids[teacher_start:]` are both `response_ids`, so the
    logits at positions `start-1 .. end-2` of each sequence predict the response, token for token.
    """

    student_ids: torch.Tensor  # [Ls]
    teacher_ids: torch.Tensor  # [Lt]
    response_ids: torch.Tensor  # [T]
    sampling_logprobs: torch.Tensor | None  # [T]

    @property
    def student_start(self) -> int:
        return self.student_ids.shape[0] - self.response_ids.shape[0]

    @property
    def teacher_start(self) -> int:
        return self.teacher_ids.shape[0] - self.response_ids.shape[0]

    def head(self, tokens: int | None) -> TokenizedExample:
        """The example with only its first `tokens` response tokens (all of them when None).

        A causal model scores a prefix exactly as it scores it inside the whole response, so training on the
        head is the same loss as masking the rest, without paying every pass for tokens that count for nothing.
        """
        if tokens is None or tokens >= self.response_ids.shape[0]:
            return self
        cut = self.response_ids.shape[0] - tokens
        return TokenizedExample(
            student_ids=self.student_ids[:-cut],
            teacher_ids=self.teacher_ids[:-cut],
            response_ids=self.response_ids[:tokens],
            sampling_logprobs=None if self.sampling_logprobs is None else self.sampling_logprobs[:tokens],
        )


class ExampleTooLongError(ValueError):
    """Prompt plus response do not fit the model's context."""


def response_ids_for(tokenizer, example: TrainingExample, append_eos: bool) -> list[int]:
    if example.response_token_ids is not None:
        return list(example.response_token_ids)
    ids = list(tokenizer(example.response_text, add_special_tokens=False)["input_ids"])
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_example(
    tokenizer,
    example: TrainingExample,
    teacher_messages: list[ChatMessage],
    *,
    append_eos: bool,
    max_len: int,
) -> TokenizedExample:
    response = response_ids_for(tokenizer, example, append_eos)
    student_prompt = render_prompt_ids(tokenizer, example.messages)
    teacher_prompt = render_prompt_ids(tokenizer, teacher_messages)
    longest = max(len(student_prompt), len(teacher_prompt)) + len(response)
    if longest > max_len:
        raise ExampleTooLongError(
            f"prompt + response is {longest} tokens; the limit is {max_len} (model.max_model_len, training.max_step_tokens)"
        )
    logprobs = example.response_logprobs
    return TokenizedExample(
        student_ids=torch.tensor(student_prompt + response, dtype=torch.long),
        teacher_ids=torch.tensor(teacher_prompt + response, dtype=torch.long),
        response_ids=torch.tensor(response, dtype=torch.long),
        sampling_logprobs=None if logprobs is None else torch.tensor(logprobs, dtype=torch.float32),
    )
