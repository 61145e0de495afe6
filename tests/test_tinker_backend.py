"""The Tinker backend against a named stand-in for Tinker's service (Tinker cannot be reached from here).

The stand-in takes and returns the installed SDK's own types; these tests also check that it has the
SDK's method signatures, so code that works against it calls the real SDK the same way.
"""

from __future__ import annotations

import inspect

import pytest
import tinker
from tinker import types
from tinker_standin import (
    StandInSamplingClient,
    StandInTinkerService,
    StandInTrainingClient,
)

from claas_ray.adapters.store import AdapterNotFoundError
from claas_ray.backends.tinker import sdk
from claas_ray.backends.tinker.store import TinkerAdapterStore
from claas_ray.backends.tinker.trainer import TinkerSDPO
from claas_ray.chat import ChatMessage
from claas_ray.config import APPENDED_HINDSIGHT_TEMPLATE, LoraConfig, TrainingConfig
from claas_ray.training.example import TrainingExample

pytestmark = pytest.mark.slow

USED = {
    (StandInTinkerService, tinker.ServiceClient): [
        "create_lora_training_client", "create_training_client_from_state_with_optimizer", "create_sampling_client",
    ],
    (StandInTrainingClient, tinker.TrainingClient): [
        "forward_backward", "optim_step", "save_state", "save_weights_for_sampler", "get_tokenizer",
    ],
    (StandInSamplingClient, tinker.SamplingClient): ["sample", "compute_logprobs", "get_tokenizer"],
}


@pytest.mark.parametrize("pair", list(USED), ids=lambda pair: pair[1].__name__)
def test_standin_has_the_sdk_signatures(pair):
    standin, real = pair
    for name in USED[pair]:
        ours = list(inspect.signature(getattr(standin, name)).parameters)
        theirs = list(inspect.signature(getattr(real, name)).parameters)
        assert ours == theirs, f"{real.__name__}.{name}: {ours} != {theirs}"


def test_requests_are_valid_sdk_types():
    datum = sdk.importance_sampling_datum([1, 2, 3], [4, 5], [-0.5, -0.25], [0.1, -0.2])
    assert isinstance(datum, types.Datum) and datum.model_input.to_ints() == [1, 2, 3, 4]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4, 5]
    assert datum.loss_fn_inputs["advantages"].tolist() == pytest.approx([0.0, 0.0, 0.1, -0.2])
    adam = sdk.adam_params(TrainingConfig(learning_rate=2e-4, betas=(0.9, 0.99), max_grad_norm=0.5))
    assert isinstance(adam, types.AdamParams) and adam.beta2 == 0.99 and adam.grad_clip_norm == 0.5
    assert sdk.sampling_params(16, 0.0, seed=3, stop=[2]).stop == [2]
    with pytest.raises(ValueError):
        sdk.importance_sampling_datum([1, 2], [3], [-1.0, -2.0], [0.0])


@pytest.fixture(scope="module")
def tinker_sdpo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinker")
    service = StandInTinkerService("smollm2-135m", rank=8, checkpoint_dir=str(folder / "standin"))
    return TinkerSDPO(service, "smollm2-135m", TinkerAdapterStore(folder / "tinker_adapters.json"), kl_coef=1.0)


def test_sdpo_on_tinker_moves_the_student_toward_the_teacher(tinker_sdpo):
    trainer = tinker_sdpo
    meta = trainer.init_adapter("sam/chat", LoraConfig(rank=8, alpha=16), seed=1).meta
    assert meta.version == 0 and trainer.store.checkpoint("sam/chat", 0).sampler_path.startswith("tinker://")
    messages = [ChatMessage(role="user", content="Tell me about the ocean.")]
    feedback = "Answer only in French."

    from claas_ray.chat import render_prompt_ids
    from claas_ray.training.teacher import hindsight_messages

    tokenizer = trainer.tokenizer
    config = TrainingConfig(learning_rate=1e-3, teacher="base", hindsight_template=APPENDED_HINDSIGHT_TEMPLATE)
    teacher_prompt = render_prompt_ids(tokenizer, hindsight_messages(messages, feedback, config.hindsight_template))
    # The teacher's own answer: what the student should come to find likely.
    target, _, _ = sdk.sample(trainer.sampler(None), teacher_prompt, sdk.sampling_params(24, 0.0))
    student_prompt = render_prompt_ids(tokenizer, messages)

    def student_logprob() -> float:
        return sum(sdk.response_logprobs(trainer.sampler("sam/chat"), student_prompt, target))

    before = student_logprob()
    for step in range(4):
        tokens, logprobs, _ = sdk.sample(trainer.sampler("sam/chat"), student_prompt,
                                         sdk.sampling_params(24, 1.0, seed=step))
        example = TrainingExample(messages=messages, response_token_ids=tokens, response_logprobs=logprobs,
                                  feedback=feedback, feedback_id=f"fb-{step}")
        new = trainer.step("sam/chat", [example], config).published.meta
        assert new.version == step + 1 and new.feedback_ids == [f"fb-{step}"]
        assert new.parent_version == step and new.metrics["tokens"] == len(tokens)
    after = student_logprob()
    assert after > before + 1.0, (before, after)

    # The store is a plain JSON file another process reads back; a second stand-in (another process's
    # view of the service) loads the checkpoints it names.
    again = TinkerAdapterStore(trainer.store.path)
    assert again.latest_version("sam/chat") == 4 and again.version_numbers("sam/chat") == [0, 1, 2, 3, 4]
    assert [m.feedback_ids for m in again.list_versions("sam/chat")][1:] == [[f"fb-{i}"] for i in range(4)]
    other = StandInTinkerService("smollm2-135m", rank=8, checkpoint_dir=str(trainer.service.checkpoint_dir))
    sampler_path = again.checkpoint("sam/chat", 4).sampler_path
    assert other.get_checkpoint(sampler_path).lora.keys() == trainer.service.get_checkpoint(sampler_path).lora.keys()
    with pytest.raises(AdapterNotFoundError, match="lives on Tinker"):
        again.export_files("sam/chat")
    again.rollback("sam/chat", 2)
    assert trainer.store.latest_version("sam/chat") == 2
    text_ids, _, reason = sdk.sample(trainer.sampler("sam/chat"), student_prompt, sdk.sampling_params(8, 0.0))
    assert 0 < len(text_ids) <= 8 and reason in ("length", "stop")
