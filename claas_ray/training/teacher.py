"""The teacher side of SDPO: the hindsight context, and the EMA teacher weights."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from claas_ray.chat import ChatMessage


def hindsight_messages(messages: Sequence[ChatMessage], feedback: str, template: str) -> list[ChatMessage]:
    """The student's context with the feedback placed in its last user turn by `template`.

    A template with `{message}` replaces the turn (`{message}` is the user's original text), so the feedback
    can come first and the question last; one without is appended to the turn. Everything else, the system
    prompt above all, stays byte-identical to what the student saw: the teacher must differ from the student
    only by the hindsight it was given. Placeholders are filled in one pass, never with `str.format`, so
    braces in user text cannot reach anything else.
    """
    result = [message.model_copy() for message in messages]
    for index in range(len(result) - 1, -1, -1):
        if result[index].role == "user":
            original = result[index].content
            if "{message}" not in template:
                template = "{message}" + template
            content = _fill(template, {"{feedback}": feedback, "{message}": original})
            result[index] = ChatMessage(role="user", content=content)
            return result
    raise ValueError("the student's messages contain no user turn to attach the feedback to")


def _fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{feedback\}|\{message\}", lambda match: values[match.group(0)], template)


@torch.no_grad()
def ema_update(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], rate: float) -> None:
    """teacher <- (1 - rate) * teacher + rate * student, in place."""
    for name, weight in teacher.items():
        weight.mul_(1.0 - rate).add_(student[name].to(weight.dtype), alpha=rate)


LEARNED_FEEDBACK_LIMIT = 64
"""Feedback texts an adapter's state keeps; the teacher sees `training.feedback_memory` of them."""


MEMORY_CHARS = 1000
"""Most characters of earlier feedback the teacher is shown, newest kept first: a long history must not crowd
out the conversation (a step's tokens are bounded by `training.max_step_tokens`)."""


def remembered_feedback(learned: Sequence[str], feedback: str, memory: int) -> str:
    """The feedback as the teacher sees it: up to `memory` earlier texts, oldest first, then this item's own."""
    earlier: list[str] = []
    for text in reversed([text for text in learned if text != feedback][-memory:] if memory else []):
        if sum(map(len, earlier)) + len(text) > MEMORY_CHARS:
            break
        earlier.insert(0, text)
    return "\n".join([*earlier, feedback])


def learn_feedback(learned: Sequence[str], taught: Sequence[str]) -> list[str]:
    """The adapter's feedback texts after a step taught `taught`: each text once, at its latest place."""
    result: list[str] = []
    for text in [*learned, *taught]:
        if text in result:
            result.remove(text)
        result.append(text)
    return result[-LEARNED_FEEDBACK_LIMIT:]
