"""The teacher's context: where the feedback goes, and the adapter's earlier feedback it keeps in view."""

from __future__ import annotations

import torch

from claas_ray.adapters.state import AdapterState
from claas_ray.chat import ChatMessage
from claas_ray.config import DEFAULT_HINDSIGHT_TEMPLATE, LoraConfig
from claas_ray.training.teacher import (
    LEARNED_FEEDBACK_LIMIT,
    MEMORY_CHARS,
    hindsight_messages,
    learn_feedback,
    remembered_feedback,
)

MESSAGES = [ChatMessage(role="system", content="Be nice."), ChatMessage(role="user", content="Tell me about bees.")]


def test_default_template_puts_the_feedback_before_the_question():
    teacher = hindsight_messages(MESSAGES, "Be concise.", DEFAULT_HINDSIGHT_TEMPLATE)
    assert teacher[0] == MESSAGES[0]  # the system prompt is untouched
    assert teacher[1].content == "Be concise.\n\nTell me about bees."
    assert MESSAGES[1].content == "Tell me about bees."  # the student's messages are not modified


def test_placeholders_are_filled_in_one_pass():
    """A user whose text or feedback contains a placeholder cannot make it expand twice."""
    messages = [ChatMessage(role="user", content="say {feedback}")]
    teacher = hindsight_messages(messages, "write {message} and {feedback}", "{feedback}\n\n{message}")
    assert teacher[0].content == "write {message} and {feedback}\n\nsay {feedback}"


def test_the_teacher_remembers_earlier_feedback():
    learned = learn_feedback([], ["Be concise."])
    learned = learn_feedback(learned, ["Call me Sam.", "Be concise."])  # taught again: moves to the end, once
    assert learned == ["Call me Sam.", "Be concise."]
    assert remembered_feedback(learned, "No emoji.", memory=8) == "Call me Sam.\nBe concise.\nNo emoji."
    assert remembered_feedback(learned, "Be concise.", memory=8) == "Call me Sam.\nBe concise."  # not twice
    assert remembered_feedback(learned, "No emoji.", memory=1) == "Be concise.\nNo emoji."  # the newest kept
    assert remembered_feedback(learned, "No emoji.", memory=0) == "No emoji."
    # Bounded: the newest earlier texts that fit in MEMORY_CHARS, and at most LEARNED_FEEDBACK_LIMIT kept.
    long = [f"{index:03d} " + "x" * 300 for index in range(10)]
    remembered = remembered_feedback(long, "now", memory=8).split("\n")
    assert remembered[-1] == "now" and remembered[:-1] == long[-len(remembered) + 1:]
    assert sum(map(len, remembered[:-1])) <= MEMORY_CHARS < sum(map(len, remembered[:-1])) + 304
    assert len(learn_feedback([str(i) for i in range(100)], ["new"])) == LEARNED_FEEDBACK_LIMIT


def test_learned_feedback_travels_with_the_adapter_state():
    student = {"base_model.model.layer.lora_A.weight": torch.zeros(2, 4), "base_model.model.layer.lora_B.weight": torch.zeros(4, 2)}
    state = AdapterState(lora=LoraConfig(rank=2, target_modules=["q_proj"]), base_model="m", student=student,
                         learned_feedback=["Répondez en français.", "Call me Sam."])
    assert AdapterState.from_files(state.to_files()).learned_feedback == ["Répondez en français.", "Call me Sam."]
    assert AdapterState.from_files(AdapterState(lora=state.lora, base_model="m", student=student).to_files()).learned_feedback == []
