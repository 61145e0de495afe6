"""The teacher side of SDPO: the hindsight context, and the EMA teacher weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from claas_ray.chat import ChatMessage


def hindsight_messages(messages: Sequence[ChatMessage], feedback: str, template: str) -> list[ChatMessage]:
    """The student's context with the feedback appended to its last user turn.

    Everything else, the system prompt above all, stays byte-identical to what the student saw: the
    teacher must differ from the student only by the hindsight it was given. The feedback is inserted
    with a plain replace, never `str.format`, so braces in user text cannot reach anything else.
    """
    result = [message.model_copy() for message in messages]
    for index in range(len(result) - 1, -1, -1):
        if result[index].role == "user":
            block = template.replace("{feedback}", feedback)
            result[index] = ChatMessage(role="user", content=result[index].content + block)
            return result
    raise ValueError("the student's messages contain no user turn to attach the feedback to")


@torch.no_grad()
def ema_update(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], rate: float) -> None:
    """teacher <- (1 - rate) * teacher + rate * student, in place."""
    for name, weight in teacher.items():
        weight.mul_(1.0 - rate).add_(student[name].to(weight.dtype), alpha=rate)
