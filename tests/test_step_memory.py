"""The SDPO step's memory work (issue 18) changes its cost, not its result.

A step projects hidden states to the vocabulary a chunk of positions at a time, recomputes layer activations in
the backward pass, and computes the base model's and the teacher's shared prefix once. Here the same step is
written out the plain way (whole-sequence passes, full-vocabulary logits, no cache, no checkpointing) and
compared: loss, gradients, updated weights and the KL guard's figure agree to float tolerance. Then a
4,096-token conversation steps in bounded memory (before this work 2,048 tokens took 6.5 GB), its KL guard
reading only the end of the conversation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import claas_ray.training.step as step_module
from claas_ray.config import LoraConfig, TrainingConfig
from claas_ray.training import ChatMessage, TrainingExample
from claas_ray.training.sdpo_loss import feedback_concern, guided_topk, sdpo_loss, teacher_topk

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are the assistant of a small bakery. You answer questions about opening hours (eight to six on weekdays, "
    "nine to one on Saturdays), the bread of the day, allergens, and orders for cakes, which need two days' notice."
)
CONFIG = TrainingConfig(
    teacher_rollouts=0, optimizer_steps=1, own_response_tokens=None, collapse_check_tokens=None,
    learning_rate=1e-3, kl_weight=0.1, is_clip=1.5, gradient_checkpointing_tokens=0,  # checkpoint even a short example
)


def _perturbed_state(trainer, seed: int):
    """An adapter that differs from the base (B non-zero), so the student, teacher and base passes all differ."""
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state.student.items():
        if "lora_B" in name:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return state


def _reference(trainer, state, example: TrainingExample, config: TrainingConfig):
    """Loss, gradients and the exact KL after an AdamW update, computed the unoptimised way."""
    (item,) = trainer._tokenize([example], config, state.learned_feedback)
    trainer._prepare(state)
    length = item.response_ids.shape[0]

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return trainer._peft(input_ids=ids.unsqueeze(0), logits_to_keep=length + 1, use_cache=False).logits[0, :-1].float()

    def chosen(full: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(full, -1).gather(-1, item.response_ids.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad(), trainer._weights("base"):
        base_full = torch.log_softmax(logits(item.student_ids), -1)
        teacher_full = torch.log_softmax(logits(item.teacher_ids), -1)
        target = guided_topk(teacher_full, base_full, config.top_k, config.teacher_guidance)
    params = trainer._slot_params("student")
    for parameter in params.values():
        parameter.grad = None
    with trainer._weights("student"):
        leash = ({"base_logprobs": chosen(base_full)} if config.leash_top_k is None
                 else {"base_topk": teacher_topk(base_full, config.leash_top_k)})
        if config.leash_concern_nats is not None:
            leash["leash_weights"] = torch.exp(-feedback_concern(base_full, target) / config.leash_concern_nats)
        out = sdpo_loss(
            logits(item.student_ids), item.response_ids, target, alpha=config.alpha, is_clip=config.is_clip,
            kl_weight=config.kl_weight, sampling_logprobs=item.sampling_logprobs, **leash,
        )
        (out.loss_sum / length).backward()
    grads = {name: parameter.grad.clone() for name, parameter in params.items()}
    # The update: gradient clipping, then AdamW from fresh moments, on copies of the student's weights.
    weights = {name: state.student[name].clone().requires_grad_() for name in sorted(params)}
    for name, weight in weights.items():
        weight.grad = grads[name].clone()
    torch.nn.utils.clip_grad_norm_(list(weights.values()), config.max_grad_norm)
    torch.optim.AdamW(list(weights.values()), lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay).step()
    updated = {name: weight.detach() for name, weight in weights.items()}
    trainer._load_slot("student", updated)
    with torch.no_grad(), trainer._weights("student"):
        student_full = torch.log_softmax(logits(item.student_ids), -1)
        kl_after = float((student_full.exp() * (student_full - base_full)).sum()) / length
    for parameter in params.values():
        parameter.grad = None
    return float(out.loss_sum.detach()) / length, grads, updated, kl_after, item


@pytest.mark.parametrize(("leash_top_k", "concern", "guidance"), [(64, None, 1.0), (None, None, 1.0), (64, 0.5, 2.0)],
                         ids=["bucketed-leash", "k3-leash", "concern-weighted-leash-guided-teacher"])
def test_step_matches_the_unoptimised_computation(fp32_trainer, monkeypatch, leash_top_k, concern, guidance):
    config = CONFIG.model_copy(update={"leash_top_k": leash_top_k, "leash_concern_nats": concern,
                                       "teacher_guidance": guidance})
    trainer = fp32_trainer  # float32 precision is what "the same result" is checked to
    # Three positions per vocabulary chunk, so a 20-token answer is cut into several chunks.
    monkeypatch.setattr(step_module, "LOGIT_CHUNK_ELEMENTS", 3 * trainer.base.config.vocab_size)
    state = _perturbed_state(trainer, seed=21)
    messages = [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content="Do you sell rye bread?")]
    _, response = trainer.generate(state, messages, max_new_tokens=20, temperature=0.8, seed=3)
    # Sampling log-probs a little off the student's own, so the importance ratio (and its clip) takes part.
    sampled = [-0.5 - 0.1 * (index % 7) for index in range(len(response))]
    example = TrainingExample(messages=messages, response_token_ids=response, response_logprobs=sampled,
                              feedback="Answer in one short sentence.")
    loss, grads, updated, kl_after, item = _reference(trainer, state, example, config)
    assert item.student_start > step_module.SHARED_PREFIX_MIN_TOKENS  # the shared-prefix path is the one taken

    trainer._prepare(state)  # the reference left its update in the student slot
    targets, base = trainer._teacher_and_base([item], config, need_base=True)
    sums = trainer._backward([item], targets, [trainer._leash(item, base[0], targets[0], config)], [0.0], config,
                             item.response_ids.shape[0])
    assert sums["loss"] / item.response_ids.shape[0] == pytest.approx(loss, rel=1e-4)
    # float32 rounding differs with the shapes (a 3-row matmul is blocked differently from a 21-row one) and
    # grows through 30 layers of backward: about 1e-5 over all gradients, up to 4e-4 on the smallest tensors.
    params = trainer._slot_params("student")
    ours = torch.cat([params[name].grad.flatten() for name in sorted(params)])
    plain = torch.cat([grads[name].flatten() for name in sorted(params)])
    assert float((ours - plain).norm() / plain.norm()) < 1e-4
    for name, parameter in params.items():
        error = float((parameter.grad - grads[name]).norm() / grads[name].norm())
        assert error < 2e-3, f"{name}: relative gradient error {error:.2e}"
        parameter.grad = None

    result = trainer.step(state, [example], config)
    assert result.accepted, result.reason
    assert result.metrics["loss"] == pytest.approx(loss, rel=1e-4)
    assert result.metrics["kl_to_base_after"] == pytest.approx(kl_after, rel=1e-3, abs=1e-6)
    # Adam's first update is about lr * sign(gradient): where a gradient element is within rounding of zero its
    # sign may differ, so the updates are compared as a whole, not element by element.
    names = sorted(updated)
    ours = torch.cat([(result.state.student[name] - state.student[name]).flatten() for name in names])
    plain = torch.cat([(updated[name] - state.student[name]).flatten() for name in names])
    assert float((ours - plain).norm() / plain.norm()) < 2e-2


def _peak_rss_mb() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def _rss_mb() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


EXAMPLE_SHORT = TrainingExample(messages=[ChatMessage(role="user", content="Do you sell rye bread?")],
                                response_text="Yes, every day.", feedback="Be more concise.")


def test_a_4096_token_conversation_steps_in_bounded_memory(trainer):
    """An agent's turn: a long system prompt of notes, a short answer. Before issue 18 a 2,048-token step took
    6.5 GB above the loaded model, and 7,600 tokens more than the machine's 24 GB; now a few hundred MB."""
    notes = "".join(f"Note {i}: ticket {1000 + i} touched src/module_{i % 37}.py; tests passed; field {i % 13} is open.\n"
                    for i in range(400))
    ids = trainer.tokenizer(notes, add_special_tokens=False)["input_ids"][:4000]
    messages = [ChatMessage(role="system", content=trainer.tokenizer.decode(ids)),
                ChatMessage(role="user", content="Which tickets touched module 3?")]
    example = TrainingExample(messages=messages, response_text="Tickets 1003, 1040 and 1077 touched it.",
                              feedback="Be more concise.")
    (item,) = trainer._tokenize([example], CONFIG)
    assert item.student_ids.shape[0] >= 4096 - 64
    state = trainer.init_adapter(LoraConfig())
    assert trainer.step(state, [EXAMPLE_SHORT], CONFIG).accepted  # first-use costs (slots, weight pages) are not the step's
    before = _rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    result = trainer.step(state, [example], CONFIG)
    peak = _peak_rss_mb() - before
    kept = _rss_mb() - before
    assert result.accepted, result.reason
    assert result.metrics["tokens"] == item.response_ids.shape[0]
    assert peak < 1500, f"a 4,096-token step peaked {peak:.0f} MB above the loaded model"
    # And gave its memory back to the system (the heap's free pages are trimmed after a step).
    assert kept < 150, f"the trainer kept {kept:.0f} MB after the step"
    # The KL guard read the conversation's last KL_GUARD_CONTEXT_TOKENS before the answer, with both models.
    length = item.response_ids.shape[0]
    ids = item.student_ids[-(step_module.KL_GUARD_CONTEXT_TOKENS + length):]
    trainer._prepare(result.state)
    logprobs = {}
    for weights in ("student", "base"):
        with torch.no_grad(), trainer._weights(weights):
            logprobs[weights] = torch.log_softmax(trainer._logits(trainer._response_hidden(ids, length)), -1)
    kl = float((logprobs["student"].exp() * (logprobs["student"] - logprobs["base"])).sum()) / length
    assert kl > 0
    assert result.metrics["kl_to_base_after"] == pytest.approx(kl, rel=1e-2)
