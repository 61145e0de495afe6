"""Nothing blocks the router's event loop: every call into the adapter store, the feedback journal and the
completion log (files, SQLite, S3) is made from a thread. The router's serving logic runs here on a real
store, journal and log, each wrapped so that a call made on a thread that runs an event loop fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from claas_ray.adapters.state import AdapterState
from claas_ray.adapters.store import LocalAdapterStore
from claas_ray.config import ClaasConfig, LoraConfig
from claas_ray.feedback.journal import FeedbackJournal
from claas_ray.protocol.claas import FeedbackRequest, LoraInitRequest
from claas_ray.protocol.generation import GenerationDelta, GenerationRequest
from claas_ray.protocol.openai import ChatCompletionRequest, CompletionRequest
from claas_ray.serving.auth import OPEN_ACCESS
from claas_ray.serving.claas_serving import ClaasServing
from claas_ray.serving.completion_log import CompletionLog
from claas_ray.serving.errors import ApiError
from claas_ray.serving.metrics import ServingMetrics
from claas_ray.serving.openai_serving import OpenAIServing


class OffTheLoop:
    """A real object whose methods refuse to run on an event loop's thread."""

    def __init__(self, inner: Any, calls: list[str]):
        self._inner = inner
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop on this thread: a worker thread
                self._calls.append(name)
                return attribute(*args, **kwargs)
            raise AssertionError(f"{type(self._inner).__name__}.{name} was called on the event loop")

        return call


class _Remote:
    def __init__(self, method):
        self.method = method

    async def remote(self, *args):
        return self.method(*args)


class Trainer:
    """The trainer's handle, answering in-process (the trainer's own store access is its business)."""

    def __init__(self, store: LocalAdapterStore):
        self.store = store

    def __getattr__(self, name: str) -> _Remote:
        def init_adapter(adapter_id: str, lora: dict) -> None:
            self.store.create(adapter_id, AdapterState(LoraConfig.model_validate(lora), "tiny", {"w": torch.zeros(2)}))

        def import_adapter(adapter_id: str, files: dict[str, bytes]) -> None:
            self.store.create(adapter_id, AdapterState.from_files(files), note="imported")

        return _Remote({"init_adapter": init_adapter, "import_adapter": import_adapter}.get(name, lambda *a: None))


async def generate(request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
    for index, word in enumerate(["Hello", " there"]):
        yield GenerationDelta(text=word, token_ids=[index + 5], finish_reason="stop" if index else None,
                              prompt_token_ids=[1, 2, 3] if index else None, replica="r1",
                              adapter_version=request.adapter_version)


def test_serving_logic_touches_files_and_databases_only_from_threads(tmp_path):
    calls: list[str] = []
    config = ClaasConfig(state_dir=str(tmp_path / "state"))
    raw_store = LocalAdapterStore(tmp_path / "adapters")
    store = OffTheLoop(raw_store, calls)
    completions = OffTheLoop(CompletionLog(tmp_path / "completions.sqlite"), calls)
    journal = OffTheLoop(FeedbackJournal(tmp_path / "feedback.sqlite"), calls)
    claas = ClaasServing(config, store, completions, journal, Trainer(raw_store))
    openai = OpenAIServing(config, store, completions, generate, ServingMetrics())

    async def scenario() -> None:
        await claas.init_lora(LoraInitRequest(lora_id="sam/chat"), OPEN_ACCESS)
        assert [a.lora_id for a in (await claas.list_loras("", OPEN_ACCESS)).data] == ["sam/chat"]
        assert (await claas.get_lora("sam/chat", OPEN_ACCESS)).latest_version == 0
        assert [m.id for m in (await openai.list_models(OPEN_ACCESS)).data] == [config.served_model_name(), "sam/chat"]
        assert (await openai.model_card("sam/chat", OPEN_ACCESS)).latest_version == 0

        chat = ChatCompletionRequest(model="sam/chat", messages=[{"role": "user", "content": "hi"}])
        answer = await openai.chat(chat, OPEN_ACCESS)
        assert answer.body.choices[0].message.content == "Hello there"
        streamed = await openai.completion(CompletionRequest(model="sam/chat", prompt="hi", stream=True), OPEN_ACCESS)
        chunks = [chunk async for chunk in streamed.body]
        assert chunks[-1] == "data: [DONE]\n\n" and '"text":" there"' in chunks[-2]

        feedback = FeedbackRequest.model_validate({"completion_id": answer.body.id, "feedback": "shorter"})
        response, status = await claas.submit_feedback(feedback, OPEN_ACCESS)
        assert status == 202 and response.items[0].source == "completion_id"
        assert (await claas.feedback_status(response.items[0].id, OPEN_ACCESS)).status == "queued"

        exported = await claas.export_zip("sam/chat", None, OPEN_ACCESS)
        await claas.import_zip("sam/copy", exported, OPEN_ACCESS)
        with pytest.raises(ApiError) as caught:
            await claas.rollback("sam/copy", 7, OPEN_ACCESS)
        assert caught.value.status_code == 404
        assert (await claas.delete_lora("sam/copy", OPEN_ACCESS)).deleted

    asyncio.run(scenario())
    # Each of them was used, and never on the loop (a call there raised above).
    assert {"exists", "list_adapters", "latest_version", "export_files", "delete"} <= set(calls)
    assert {"add", "get", "append", "get_many", "count_pending"} <= set(calls)
