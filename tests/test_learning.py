"""SDPO really teaches: on the embedded model, repeated feedback moves the student toward the teacher."""

from __future__ import annotations

import hashlib

import pytest
import torch

from claas_ray.config import LoraConfig, TrainingConfig
from claas_ray.training import ChatMessage, TrainingExample
from claas_ray.training.teacher import hindsight_messages

pytestmark = pytest.mark.slow

STEPS = 4  # feedback events, ~25 s each: enough to show the move (bf16, 2026-12-02: French 4 of 4 accepted, +21 nats;
#            identity +33 nats; at 8 events +21 and +33)

CASES = [
    ("Tell me about your favourite season of the year.", "Answer only in French."),
    ("Who are you?", "Your name is Kuro. Always introduce yourself as Kuro."),
]


def base_fingerprint(trainer) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.base.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.replace(".base_layer", "").encode())  # PEFT wraps layers, renaming them
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("prompt,feedback", CASES, ids=["french", "identity"])
def test_feedback_moves_student_toward_teacher(trainer, prompt, feedback):
    config = TrainingConfig()
    measure = config.model_copy(update={"teacher": "base"})  # fixed yardstick: the hindsight teacher at v0
    messages = [ChatMessage(role="user", content=prompt)]
    fingerprint = base_fingerprint(trainer)
    base_logprob_probe = None

    state = trainer.init_adapter(LoraConfig(), seed=1)
    first_text, first_ids = trainer.generate(state, messages, max_new_tokens=48)
    probe = TrainingExample(messages=messages, response_text=first_text, response_token_ids=first_ids, feedback=feedback)
    teacher_text, teacher_ids = trainer.generate(None, hindsight_messages(messages, feedback, config.hindsight_template), 48)

    divergence_before = trainer.divergence(state, [probe], measure)
    teacher_logprob_before = trainer.response_logprob(state, messages, teacher_ids)
    base_logprob_probe = trainer.response_logprob(None, messages, teacher_ids)
    assert teacher_logprob_before == pytest.approx(base_logprob_probe, abs=1e-3)  # v0 is zero-effect

    history, accepted = [], 0
    for step in range(STEPS):
        text, ids = trainer.generate(state, messages, max_new_tokens=48)  # on-policy, as served
        example = TrainingExample(messages=messages, response_text=text, response_token_ids=ids, feedback=feedback)
        result = trainer.step(state, [example], config)
        # Only the collapse guard may refuse a step here: the 135M model's French loops easily, and a step that
        # would make the adapter degenerate must not be published.
        assert result.accepted or result.reason.startswith("collapse:"), result.reason
        accepted += result.accepted
        state = result.state
        history.append((step, result.accepted, round(result.metrics["divergence"], 4), text[:60]))
    assert accepted >= 2, history  # seen: French 4 of 4 at 4 events in bf16; 5 of 8 in bf16 and 3 of 8 in fp32 at 8

    # SDPO's objective: the student's own (greedy) answer, scored by the hindsight teacher, disagrees less.
    final_text, final_ids = trainer.generate(state, messages, max_new_tokens=48)
    final = TrainingExample(messages=messages, response_text=final_text, response_token_ids=final_ids, feedback=feedback)
    divergence_after = trainer.divergence(state, [final], measure)
    teacher_logprob_after = trainer.response_logprob(state, messages, teacher_ids)
    report = f"teacher said {teacher_text!r}; history {history}; final {final_text!r}; on-policy divergence {divergence_before:.4f} -> {divergence_after:.4f}; teacher logprob {teacher_logprob_before:.2f} -> {teacher_logprob_after:.2f}"
    print(report)
    assert divergence_after < divergence_before, report
    # The hindsight teacher's own answer became at least e^3 = 20 times likelier (seen: +21 and +33 nats in bf16,
    # +10 and +7 in fp32).
    assert teacher_logprob_after > teacher_logprob_before + 3.0, report
    # The base model is untouched: bit-identical weights, identical base scoring.
    assert base_fingerprint(trainer) == fingerprint
    assert trainer.response_logprob(None, messages, teacher_ids) == base_logprob_probe
