"""`VllmEngine` bare (no Ray), on the CPU build: how a replica behaves while the trainer has it asleep.

On a GPU the trainer puts vLLM to sleep (level 1) for each step. What happens to answers in flight is the scheduler's
pause, which is the same on the CPU: level 0 runs it without the memory offload. An answer in flight finishes whole,
a new request waits for the wake, and an answer the engine aborts is an error, never a `stop`.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from claas_ray.adapters import LocalAdapterStore
from claas_ray.chat import ChatMessage
from claas_ray.config import LoraConfig, load_config
from claas_ray.protocol.generation import GenerationDelta, GenerationRequest
from claas_ray.serving.engine import GenerationInterrupted

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from claas_ray.serving.vllm_engine import VllmEngine

    workdir = tmp_path_factory.mktemp("engine")
    config = load_config({
        "model": {"max_model_len": 1024},
        "lora": {"rank": 8},
        "serving": {"kv_cache_memory_gb": 0.25, "enforce_eager": True, "max_loras": 1, "max_lora_rank": 8,
                    "max_tmpfs_adapters": 2},
        "trainer": {"tmpfs_dir": str(workdir / "tmpfs")},
    })
    loop = asyncio.new_event_loop()  # vLLM's client binds to the loop it is built on: one loop for the module

    async def build():
        return VllmEngine(config, LocalAdapterStore(workdir / "adapters"), replica="bare")

    bare = loop.run_until_complete(build())
    yield bare, loop, config
    bare.shutdown()
    loop.close()


def story(stream: bool = True) -> GenerationRequest:
    return GenerationRequest(request_id=uuid.uuid4().hex, max_tokens=48, temperature=0.0, stream=stream,
                             messages=[ChatMessage(role="user", content="Tell me a long story about a dragon.")])


async def answer(engine, request: GenerationRequest, started: asyncio.Event | None = None) -> list[GenerationDelta]:
    deltas = []
    async for delta in engine.generate(request):
        assert isinstance(delta, GenerationDelta), delta
        deltas.append(delta)
        if started is not None:
            started.set()
    return deltas


def text(deltas: list[GenerationDelta]) -> str:
    return "".join(d.text for d in deltas)


def test_sleep_finishes_answers_in_flight_and_holds_new_ones_until_wake(engine):
    bare, loop, _ = engine

    async def scenario():
        undisturbed = await answer(bare, story())
        started = asyncio.Event()
        in_flight = asyncio.create_task(answer(bare, story(), started))
        await asyncio.wait_for(started.wait(), timeout=120)
        await bare.sleep(0)  # trainer.sleep_mode `wait`: returns once the engine has finished the answer in flight
        try:
            # Its last delta may still be on its way to this client, so it is awaited, asleep: an answer the sleep
            # froze (`keep`) or aborted would never end whole.
            finished = await asyncio.wait_for(in_flight, timeout=30)
            assert text(finished) == text(undisturbed) and finished[-1].finish_reason == undisturbed[-1].finish_reason

            held = asyncio.create_task(answer(bare, story(stream=False)))
            await asyncio.sleep(1.0)
            assert not held.done()  # asleep: queued, not answered, not refused
        finally:
            await bare.wake()  # a failure here must not leave the module's engine asleep for the next tests
        (whole,) = await asyncio.wait_for(held, timeout=120)
        assert whole.text == text(undisturbed) and whole.finish_reason is not None

    loop.run_until_complete(scenario())


def test_an_answer_the_engine_aborts_is_an_error_not_a_stop(engine):
    """vLLM's default sleep mode aborts answers in flight; the engine used to end them with `stop`."""
    bare, loop, _ = engine

    async def scenario():
        started = asyncio.Event()
        in_flight = asyncio.create_task(answer(bare, story(), started))
        await asyncio.wait_for(started.wait(), timeout=120)
        await bare.llm.pause_generation(mode="abort")
        try:
            with pytest.raises(GenerationInterrupted, match="abort"):
                await asyncio.wait_for(in_flight, timeout=60)
        finally:
            await bare.llm.resume_generation()  # never leave the module's engine paused for the next tests
        assert text(await answer(bare, story()))  # serving again

    loop.run_until_complete(scenario())


def test_a_replica_keeps_a_bounded_number_of_broadcast_versions_on_tmpfs(engine, trainer):
    """Two versions each of the `serving.max_tmpfs_adapters` (2) most recently loaded adapters stay in RAM; an adapter
    that fell out is still served, from the store. Versions arrive in bf16, as a bf16 engine's broadcast sends them."""
    bare, loop, config = engine
    state = trainer.init_adapter(LoraConfig(rank=8))
    state.base_model = config.model.base_model

    async def scenario():
        for adapter in ("t/a", "t/b", "t/c"):
            bare.store.create(adapter, state)
            for version in (1, 2, 3):
                bare.store.publish(adapter, state, version - 1, [])
                await bare.load_version(adapter, version, state.peft_files(torch.bfloat16))
        on_tmpfs = {str(path.relative_to(bare.scratch)) for path in bare.scratch.glob("t/*/*")}
        assert on_tmpfs == {"t/b/2", "t/b/3", "t/c/2", "t/c/3"}
        request = story(stream=False).model_copy(update={"adapter_id": "t/a", "adapter_version": 3})
        (whole,) = await answer(bare, request)
        assert whole.adapter_version == 3 and whole.text  # from the store: a zero-effect adapter, the base's answer
        assert whole.text == text(await answer(bare, story()))

    loop.run_until_complete(scenario())
