"""One SDPO step on the real embedded model: guards, teacher modes, EMA, optimizer persistence."""

from __future__ import annotations

import pytest
import torch

from claas_ray.chat import render_prompt_ids
from claas_ray.config import LoraConfig, TrainingConfig
from claas_ray.degeneration import is_degenerate
from claas_ray.training import ChatMessage, TrainingExample
from claas_ray.training.sdpo_loss import guided_topk, repeated_ngrams
from claas_ray.training.teacher import hindsight_messages

pytestmark = pytest.mark.slow

MESSAGES = [ChatMessage(role="system", content="You are terse."), ChatMessage(role="user", content="Name a colour.")]
EXAMPLE = TrainingExample(messages=MESSAGES, response_text="Blue is a nice colour 🙂", feedback="No emoji, please.")
# The SDPO core alone: no teacher rollouts, one update, no collapse guard (each tested on its own below).
CORE = {"teacher_rollouts": 0, "optimizer_steps": 1, "own_response_tokens": None, "collapse_check_tokens": None}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_effect_init_and_step_changes_only_lora(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=3)
    assert all(float(t.abs().sum()) == 0.0 for k, t in state.student.items() if "lora_B" in k)
    result = trainer.step(state, [EXAMPLE], TrainingConfig(**CORE, learning_rate=1e-3))
    assert result.accepted, result.reason
    assert not same_tensors(result.state.student, state.student)
    assert result.metrics["tokens"] > 5 and result.metrics["grad_norm"] > 0
    assert result.metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # v0 equals the base model


def test_ema_teacher_update_is_exact(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=4)
    config = TrainingConfig(**CORE, learning_rate=1e-3, ema_rate=0.25)
    new = trainer.step(state, [EXAMPLE], config).state
    for name, teacher in new.teacher.items():
        expected = 0.75 * state.teacher[name] + 0.25 * new.student[name]
        assert torch.allclose(teacher, expected, atol=1e-7), name


@pytest.mark.parametrize("mode", ["base", "current"])
def test_other_teacher_modes(trainer, mode):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=5)
    result = trainer.step(state, [EXAMPLE], TrainingConfig(**CORE, teacher=mode, learning_rate=1e-3))
    assert result.accepted and result.metrics["divergence"] > 0


def test_snapshot_teacher_is_the_adapter_when_its_feedback_first_arrived(trainer):
    """`teacher: snapshot` is frozen while one feedback is taught and taken anew when another arrives, so the
    second preference is taught by the adapter that learned the first."""
    config = TrainingConfig(**CORE, teacher="snapshot", learning_rate=1e-3)
    start = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=8)
    one = trainer.step(start, [EXAMPLE], config)
    assert one.accepted and one.metrics["divergence"] > 0
    assert same_tensors(one.state.teacher, start.student)  # a new feedback: the adapter as it was
    two = trainer.step(one.state, [EXAMPLE], config).state
    assert not same_tensors(two.student, one.state.student)
    assert same_tensors(two.teacher, start.student)  # the same feedback again: the same teacher
    other = EXAMPLE.model_copy(update={"feedback": "Answer in one word."})
    three = trainer.step(two, [other], config)
    assert same_tensors(three.state.teacher, two.student)  # another feedback: the adapter that learned the first
    # The teacher's targets really come from that snapshot: scored under it, the batch is not scored as under
    # the base model's weights.
    base = trainer.step(two, [other], config.model_copy(update={"teacher": "base"}))
    assert three.metrics["divergence"] != pytest.approx(base.metrics["divergence"], rel=1e-3)


def test_optimizer_state_persists_and_learning_rate_is_honoured(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=6)
    one = trainer.step(state, [EXAMPLE], TrainingConfig(**CORE, learning_rate=1e-3)).state
    steps = {k: float(v) for k, v in one.optimizer.items() if k.endswith("::step")}
    assert steps and set(steps.values()) == {1.0}
    two = trainer.step(one, [EXAMPLE], TrainingConfig(**CORE, learning_rate=1e-3)).state
    assert {float(v) for k, v in two.optimizer.items() if k.endswith("::step")} == {2.0}
    # Same state and data, a 10x smaller learning rate: a visibly smaller update (CLaaS ignored it).
    small = trainer.step(one, [EXAMPLE], TrainingConfig(**CORE, learning_rate=1e-4)).state
    delta = lambda new: sum(float((new.student[k] - one.student[k]).abs().sum()) for k in one.student)
    assert delta(small) < 0.2 * delta(two)


def test_kl_guard_rejects_and_keeps_state(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=7)
    result = trainer.step(state, [EXAMPLE], TrainingConfig(**CORE, learning_rate=5e-2, max_kl_to_base=1e-6))
    assert not result.accepted
    assert "KL to base" in result.reason
    assert result.state is state and same_tensors(result.state.student, state.student)
    # The next step starts from the kept state, not from the rejected weights left in the model.
    again = trainer.step(state, [EXAMPLE], TrainingConfig(**CORE, learning_rate=1e-3))
    assert again.accepted and again.metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)


# A step forced to collapse: a degenerate response, feedback that asks for it, and a learning rate 50x the default.
COLLAPSE = TrainingExample(
    messages=[ChatMessage(role="user", content="Tell me about the ocean.")],
    response_text=" ".join(["Sam"] * 40), feedback="Only ever say Sam, over and over.",
)
# Unlikelihood on loops is off: it works against exactly the collapse this step must bring about for the guard.
FORCED = {"learning_rate": 5e-2, "optimizer_steps": 2, "max_kl_to_base": None, "teacher_rollouts": 0,
          "own_response_tokens": None, "repetition_unlikelihood": 0.0}


def test_collapse_guard_rejects_a_collapsing_step_and_keeps_state(trainer):
    state = trainer.init_adapter(LoraConfig(), seed=9)
    result = trainer.step(state, [COLLAPSE], TrainingConfig(**FORCED))
    assert not result.accepted and result.reason.startswith("collapse:"), result.reason
    assert result.state is state and same_tensors(result.state.student, state.student)
    assert result.metrics["collapse_check_seconds"] > 0
    # The same step with the guard off is accepted, and the adapter it makes really is degenerate.
    unguarded = trainer.step(state, [COLLAPSE], TrainingConfig(**FORCED, collapse_check_tokens=None))
    assert unguarded.accepted
    answers = [text for text, _ in trainer.generate_batch(unguarded.state, [COLLAPSE.messages], 32)]
    assert is_degenerate(answers[0]), answers
    # A healthy step with the shipped defaults (rollouts and guard on) passes the guard.
    healthy = trainer.step(state, [EXAMPLE], TrainingConfig())
    assert healthy.accepted, healthy.reason
    assert healthy.metrics["teacher_rollouts"] >= 1 and healthy.metrics["collapse_check_seconds"] > 0


def test_teacher_rollouts_are_fluent_and_the_ones_the_feedback_explains_best(trainer):
    """Rollouts: sampled by the teacher in its own context, degenerate ones dropped, the best `rollout_keep` kept by
    the mean log-prob gain from seeing the feedback (checked here against independent scoring)."""
    example = TrainingExample(messages=[ChatMessage(role="user", content="Tell me about the ocean.")],
                              response_text="The ocean is big.", feedback="Answer as a bulleted list.")
    config = TrainingConfig(teacher_rollouts=6, rollout_keep=None)
    trainer._prepare(trainer.init_adapter(LoraConfig(), seed=10))
    batch = trainer._tokenize([example], config)
    every = [rollout.example for rollout in trainer._teacher_rollouts(batch, config)]
    kept = [rollout.example for rollout in trainer._teacher_rollouts(batch, config.model_copy(update={"rollout_keep": 2}))]
    assert 2 <= len(every) <= 6 and len(kept) == 2
    teacher_messages = hindsight_messages(example.messages, example.feedback, config.hindsight_template)

    def gain(rollout) -> float:
        ids = rollout.response_ids.tolist()
        assert rollout.student_ids[-len(ids):].tolist() == ids and rollout.teacher_ids[-len(ids):].tolist() == ids
        assert not is_degenerate(trainer.tokenizer.decode(ids, skip_special_tokens=True))
        with_feedback = trainer.response_logprob(None, teacher_messages, ids)
        return (with_feedback - trainer.response_logprob(None, example.messages, ids)) / len(ids)

    gains = sorted((gain(r) for r in every), reverse=True)
    assert all(r.response_ids.tolist() in [e.response_ids.tolist() for e in every] for r in kept)
    # The kept ones are the two best (within float noise: sampling scored them with a KV cache, this test without).
    assert all(gain(r) >= gains[1] - 1e-3 for r in kept), (gains, [gain(r) for r in kept])
    assert gains[0] > 0  # the feedback explains the best rollout better than the plain context does


def test_guided_teacher_guides_the_rollouts_targets_by_their_pass_without_the_feedback(trainer):
    """With `teacher_guidance` the rollouts are the same samples, and each one's target is `guided_topk` of the
    teacher's distribution on it against the same weights' without the feedback (the pass that already scores it)."""
    example = TrainingExample(messages=[ChatMessage(role="user", content="Tell me about the ocean.")],
                              response_text="The ocean is big.", feedback="Answer as a bulleted list.")
    config = TrainingConfig(teacher_rollouts=2, rollout_keep=None, rollout_max_tokens=16)
    trainer._prepare(trainer.init_adapter(LoraConfig(), seed=10))
    batch = trainer._tokenize([example], config)
    plain = trainer._teacher_rollouts(batch, config)
    guided = trainer._teacher_rollouts(batch, config.model_copy(update={"teacher_guidance": 2.0}))
    assert plain and [r.example.response_ids.tolist() for r in guided] == [r.example.response_ids.tolist() for r in plain]
    for before, after in zip(plain, guided):
        assert torch.equal(after.target.token_ids, before.target.token_ids)
        assert torch.equal(after.target.plain().logprobs, before.target.logprobs)
        # The plain target's top-K as a full distribution (the rest impossible) gives guided_topk the same top-K.
        full = torch.full((before.target.logprobs.shape[0], trainer.base.config.vocab_size), -torch.inf)
        full.scatter_(-1, before.target.token_ids.cpu(), before.target.logprobs.cpu())
        length = after.example.response_ids.shape[0]
        with torch.no_grad(), trainer._weights("base"):
            without = torch.log_softmax(trainer._logits(trainer._response_hidden(after.example.student_ids, length)), -1)
        want = guided_topk(full, without.cpu(), config.top_k, 2.0)

        def by_token(target) -> torch.Tensor:  # bf16 logits tie often, and ties may come out of top-K in any order
            return target.logprobs.cpu().gather(-1, target.token_ids.cpu().argsort(-1))

        assert torch.allclose(by_token(after.target), by_token(want), atol=1e-5)
        assert not torch.allclose(after.target.logprobs, before.target.logprobs, atol=1e-3)


def test_rollout_sample_weight_is_cross_entropy_on_the_kept_rollouts_only(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=12)
    # Without rollouts the weight has nothing to act on: the user's own response never gets it.
    plain = [trainer.step(state, [EXAMPLE], TrainingConfig(**CORE, rollout_sample_weight=w)).state for w in (0.0, 3.0)]
    assert same_tensors(plain[0].student, plain[1].student)
    # With rollouts (the same ones: a step is seeded), it adds their tokens' NLL to the loss and changes the update.
    example = TrainingExample(messages=[ChatMessage(role="user", content="Tell me about the ocean.")],
                              response_text="The ocean is big.", feedback="Answer as a bulleted list.")
    small = {"teacher_rollouts": 4, "rollout_keep": 2, "rollout_max_tokens": 24, "optimizer_steps": 1,
             "collapse_check_tokens": None, "max_kl_to_base": None}
    without, weighted = (trainer.step(state, [example], TrainingConfig(**small, rollout_sample_weight=w)) for w in (0.0, 1.0))
    assert without.metrics["teacher_rollouts"] >= 1
    assert weighted.metrics["divergence"] == pytest.approx(without.metrics["divergence"], rel=1e-5)
    assert weighted.metrics["loss"] > without.metrics["loss"] + 0.1  # a sampled token's NLL is well above 0.1 nats
    assert not same_tensors(without.state.student, weighted.state.student)


def test_repetition_unlikelihood_makes_loops_less_likely(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=13)
    # A loop in the response the user reacted to, and one in the student's own greedy answer to a guard prompt.
    loop = TrainingExample(messages=MESSAGES, response_text="Blue, blue, blue, blue, blue, blue, blue.",
                           feedback="Name one colour, once.")
    (tokenized,) = trainer._tokenize([loop], TrainingConfig())
    probe = [ChatMessage(role="user", content="Write the word blue ten times.")]
    _, greedy = trainer.generate(state, probe, max_new_tokens=48)
    assert repeated_ngrams(torch.tensor(greedy)).any(), greedy
    config = TrainingConfig(**CORE, collapse_check_prompts=[probe[0].content])
    steps = {w: trainer.step(state, [loop], config.model_copy(update={"repetition_unlikelihood": w})) for w in (0.0, 2.0)}
    assert all(result.accepted for result in steps.values())
    # Loop tokens per response token: the response's own, and with the term on also the greedy answer's.
    assert steps[2.0].metrics["repeated_fraction"] > steps[0.0].metrics["repeated_fraction"] > 0.3
    assert steps[0.0].metrics["loop_probes"] == 0 and steps[2.0].metrics["loop_probes"] >= 1
    assert steps[2.0].metrics["divergence"] == pytest.approx(steps[0.0].metrics["divergence"], rel=1e-5)
    # The same step, the same teacher: the term alone makes both loops' repeated tokens less likely.
    for messages, response in ((MESSAGES, tokenized.response_ids.tolist()), (probe, greedy)):
        logprob = {w: repeated_logprob(trainer, result.state, messages, response) for w, result in steps.items()}
        assert logprob[2.0] < logprob[0.0] - 0.2, logprob  # measured: 1.1 and 0.45 nats


def repeated_logprob(trainer, state, messages, response: list[int]) -> float:
    """Summed log-prob of the tokens of `response` that repeat a trigram of it, after `messages`."""
    ids = torch.tensor(render_prompt_ids(trainer.tokenizer, messages) + response)
    with torch.no_grad(), trainer._weights(trainer._select(state)):
        logprobs = trainer._chosen_logprobs(trainer._response_hidden(ids, len(response)), torch.tensor(response))
    return float(logprobs[repeated_ngrams(torch.tensor(response))].sum())


def test_non_finite_loss_is_rejected(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=8)
    poisoned = dict(state.student)
    name = next(k for k in poisoned if "lora_B" in k)
    poisoned[name] = torch.full_like(poisoned[name], float("nan"))
    bad = type(state)(lora=state.lora, base_model=state.base_model, student=poisoned, teacher=state.teacher)
    result = trainer.step(bad, [EXAMPLE], TrainingConfig(**CORE))
    assert not result.accepted and "not finite" in result.reason
    assert result.state is bad


def test_batch_of_items_is_one_step(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=9)
    other = TrainingExample(messages=MESSAGES, response_text="Red!!! 🔥🔥", feedback="No emoji, please.")
    result = trainer.step(state, [EXAMPLE, other], TrainingConfig(**CORE, learning_rate=1e-3))
    assert result.accepted and result.metrics["examples"] == 2.0
    assert {float(v) for k, v in result.state.optimizer.items() if k.endswith("::step")} == {1.0}


def test_sampling_logprobs_drive_the_importance_ratio(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=10)
    ids = trainer.tokenizer("Blue.", add_special_tokens=False)["input_ids"] + [trainer.tokenizer.eos_token_id]
    far = TrainingExample(messages=MESSAGES, response_token_ids=ids, response_logprobs=[-30.0] * len(ids), feedback="Say more.")
    result = trainer.step(state, [far], TrainingConfig(**CORE, is_clip=2.0))
    assert result.metrics["is_clipped_fraction"] == 1.0 and result.metrics["is_ratio_mean"] == pytest.approx(2.0)


def test_lora_dropout_acts_in_the_training_pass_only(trainer):
    """A step puts only what needs train mode into it (checkpointing, LoRA dropout): dropout must still act on the
    student's training pass, and never on a scoring pass."""

    def adapter(dropout: float):
        state = trainer.init_adapter(LoraConfig(rank=4, alpha=8, dropout=dropout), seed=13)
        generator = torch.Generator().manual_seed(13)
        for name, tensor in state.student.items():
            if "lora_B" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        return state

    plain, dropped = adapter(0.0), adapter(0.5)
    response = trainer.tokenizer("Blue is a nice colour.", add_special_tokens=False)["input_ids"]
    assert trainer.response_logprob(plain, MESSAGES, response) == trainer.response_logprob(dropped, MESSAGES, response)
    config = TrainingConfig(**CORE, learning_rate=1e-3)
    loss = {p: trainer.step(state, [EXAMPLE], config).metrics["loss"] for p, state in ((0.0, plain), (0.5, dropped))}
    assert abs(loss[0.5] - loss[0.0]) > 1e-3 * abs(loss[0.0]), loss


def test_rank_change_between_adapters(trainer):
    small = trainer.init_adapter(LoraConfig(rank=2, alpha=4), seed=11)
    big = trainer.init_adapter(LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]), seed=12)
    assert trainer.step(small, [EXAMPLE], TrainingConfig(**CORE)).accepted
    assert trainer.step(big, [EXAMPLE], TrainingConfig(**CORE)).accepted
    assert all(t.shape[0] == 8 or t.shape[1] == 8 for t in big.student.values())


def test_examples_longer_than_max_step_tokens_are_refused_before_any_work(trainer):
    """A step's memory grows with its length: an over-long example is a clear error, never an OOM."""
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=9)
    with pytest.raises(ValueError, match=r"training\.max_step_tokens"):
        trainer.step(state, [EXAMPLE], TrainingConfig(**CORE, max_step_tokens=16))


def test_own_response_head_scores_exactly_as_inside_the_whole_response(fp32_trainer):
    """`own_response_tokens` trains on the head of the user's response: every pass sees the same logits for those
    tokens as it would on the whole response (the rest is cut off, not computed and masked)."""
    state = fp32_trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=12)
    trained = fp32_trainer.step(state, [EXAMPLE], TrainingConfig(**CORE, learning_rate=1e-2)).state
    (whole,) = fp32_trainer._tokenize([EXAMPLE], TrainingConfig())
    head = whole.head(4)
    assert head.response_ids.tolist() == whole.response_ids[:4].tolist()
    assert head.student_ids.tolist() == whole.student_ids[: whole.student_start + 4].tolist()
    assert head.teacher_ids.tolist() == whole.teacher_ids[: whole.teacher_start + 4].tolist()
    assert whole.head(None) is whole and whole.head(10_000) is whole
    fp32_trainer._prepare(trained)
    for weights, ids, head_ids in (("student", whole.student_ids, head.student_ids), ("base", whole.teacher_ids, head.teacher_ids)):
        with torch.no_grad(), fp32_trainer._weights(weights):
            full = fp32_trainer._logits(fp32_trainer._response_hidden(ids, whole.response_ids.shape[0]))
            cut = fp32_trainer._logits(fp32_trainer._response_hidden(head_ids, 4))
        torch.testing.assert_close(cut, full[:4], rtol=1e-4, atol=1e-4)
