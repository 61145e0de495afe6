"""One SDPO step on the real embedded model: guards, teacher modes, EMA, optimizer persistence."""

from __future__ import annotations

import pytest
import torch

from claas_ray.config import LoraConfig, TrainingConfig
from claas_ray.training import ChatMessage, TrainingExample

pytestmark = pytest.mark.slow

MESSAGES = [ChatMessage(role="system", content="You are terse."), ChatMessage(role="user", content="Name a colour.")]
EXAMPLE = TrainingExample(messages=MESSAGES, response_text="Blue is a nice colour 🙂", feedback="No emoji, please.")


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_effect_init_and_step_changes_only_lora(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=3)
    assert all(float(t.abs().sum()) == 0.0 for k, t in state.student.items() if "lora_B" in k)
    result = trainer.step(state, [EXAMPLE], TrainingConfig(learning_rate=1e-3))
    assert result.accepted, result.reason
    assert not same_tensors(result.state.student, state.student)
    assert result.metrics["tokens"] > 5 and result.metrics["grad_norm"] > 0
    assert result.metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # v0 equals the base model


def test_ema_teacher_update_is_exact(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=4)
    config = TrainingConfig(learning_rate=1e-3, ema_rate=0.25)
    new = trainer.step(state, [EXAMPLE], config).state
    for name, teacher in new.teacher.items():
        expected = 0.75 * state.teacher[name] + 0.25 * new.student[name]
        assert torch.allclose(teacher, expected, atol=1e-7), name


@pytest.mark.parametrize("mode", ["base", "current"])
def test_other_teacher_modes(trainer, mode):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=5)
    result = trainer.step(state, [EXAMPLE], TrainingConfig(teacher=mode, learning_rate=1e-3))
    assert result.accepted and result.metrics["divergence"] > 0


def test_optimizer_state_persists_and_learning_rate_is_honoured(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=6)
    one = trainer.step(state, [EXAMPLE], TrainingConfig(learning_rate=1e-3)).state
    steps = {k: float(v) for k, v in one.optimizer.items() if k.endswith("::step")}
    assert steps and set(steps.values()) == {1.0}
    two = trainer.step(one, [EXAMPLE], TrainingConfig(learning_rate=1e-3)).state
    assert {float(v) for k, v in two.optimizer.items() if k.endswith("::step")} == {2.0}
    # Same state and data, a 10x smaller learning rate: a visibly smaller update (CLaaS ignored it).
    small = trainer.step(one, [EXAMPLE], TrainingConfig(learning_rate=1e-4)).state
    delta = lambda new: sum(float((new.student[k] - one.student[k]).abs().sum()) for k in one.student)
    assert delta(small) < 0.2 * delta(two)


def test_kl_guard_rejects_and_keeps_state(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=7)
    result = trainer.step(state, [EXAMPLE], TrainingConfig(learning_rate=5e-2, max_kl_to_base=1e-6))
    assert not result.accepted
    assert "KL to base" in result.reason
    assert result.state is state and same_tensors(result.state.student, state.student)
    # The next step starts from the kept state, not from the rejected weights left in the model.
    again = trainer.step(state, [EXAMPLE], TrainingConfig(learning_rate=1e-3))
    assert again.accepted and again.metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)


def test_non_finite_loss_is_rejected(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=8)
    poisoned = dict(state.student)
    name = next(k for k in poisoned if "lora_B" in k)
    poisoned[name] = torch.full_like(poisoned[name], float("nan"))
    bad = type(state)(lora=state.lora, base_model=state.base_model, student=poisoned, teacher=state.teacher)
    result = trainer.step(bad, [EXAMPLE], TrainingConfig())
    assert not result.accepted and "not finite" in result.reason
    assert result.state is bad


def test_batch_of_items_is_one_step(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=9)
    other = TrainingExample(messages=MESSAGES, response_text="Red!!! 🔥🔥", feedback="No emoji, please.")
    result = trainer.step(state, [EXAMPLE, other], TrainingConfig(learning_rate=1e-3))
    assert result.accepted and result.metrics["examples"] == 2.0
    assert {float(v) for k, v in result.state.optimizer.items() if k.endswith("::step")} == {1.0}


def test_sampling_logprobs_drive_the_importance_ratio(trainer):
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=10)
    ids = trainer.tokenizer("Blue.", add_special_tokens=False)["input_ids"] + [trainer.tokenizer.eos_token_id]
    far = TrainingExample(messages=MESSAGES, response_token_ids=ids, response_logprobs=[-30.0] * len(ids), feedback="Say more.")
    result = trainer.step(state, [far], TrainingConfig(is_clip=2.0))
    assert result.metrics["is_clipped_fraction"] == 1.0 and result.metrics["is_ratio_mean"] == pytest.approx(2.0)


def test_rank_change_between_adapters(trainer):
    small = trainer.init_adapter(LoraConfig(rank=2, alpha=4), seed=11)
    big = trainer.init_adapter(LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]), seed=12)
    assert trainer.step(small, [EXAMPLE], TrainingConfig()).accepted
    assert trainer.step(big, [EXAMPLE], TrainingConfig()).accepted
    assert all(t.shape[0] == 8 or t.shape[1] == 8 for t in big.student.values())


def test_examples_longer_than_max_step_tokens_are_refused_before_any_work(trainer):
    """A step's memory grows with its length: an over-long example is a clear error, never an OOM."""
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=9)
    with pytest.raises(ValueError, match=r"training\.max_step_tokens"):
        trainer.step(state, [EXAMPLE], TrainingConfig(max_step_tokens=16))
