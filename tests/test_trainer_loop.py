"""The trainer loop without Ray: ordering, batching, exactly-once recovery after a crash at each point of a
step, and the retry limit. A real journal (SQLite) and a real adapter store on disk; the model is a stand-in
that adds one to a tensor, and a crash is an exception no handler catches, as a killed process would be."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import pytest
import torch

from claas_ray.adapters.state import AdapterState
from claas_ray.adapters.store import LocalAdapterStore
from claas_ray.backends.step_backend import PublishedVersion
from claas_ray.backends.weights import WeightsStepBackend
from claas_ray.chat import ChatMessage
from claas_ray.config import ClaasConfig, LoraConfig, TrainingConfig
from claas_ray.feedback.journal import FeedbackJournal
from claas_ray.training.example import TrainingExample
from claas_ray.training.step import StepResult
from claas_ray.training.worker import MAX_ATTEMPTS, Delivery, ReplicasUnavailable, TrainerLoop


class Crash(BaseException):
    """The process dies here: nothing in the loop may handle it."""


class AddingTrainer:
    """A `WeightsTrainer` whose step adds 1 to the weights, records its batches, and can be told to fail."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.crash_on: set[str] = set()  # response texts whose step kills the process
        self.refuse: dict[str, str] = {}  # response text -> guard's reason
        self.raise_on: dict[str, Exception] = {}

    def init_adapter(self, lora: LoraConfig, seed: int = 0) -> AdapterState:
        return AdapterState(lora=lora, base_model="tiny", student={"w": torch.zeros(2)})

    def check_compatible(self, state: AdapterState) -> None:
        if state.student["w"].shape != (2,):
            raise ValueError("wrong shape")

    def step(self, state: AdapterState, examples: Sequence[TrainingExample], config: TrainingConfig) -> StepResult:
        texts = [example.response_text for example in examples]
        self.batches.append(texts)
        self.niceness = os.nice(0)  # of the thread the loop runs steps on
        for text in texts:
            if text in self.crash_on:
                raise Crash(text)
            if text in self.raise_on:
                raise self.raise_on[text]
            if text in self.refuse:
                return StepResult(False, state, {"loss": 1.0}, reason=self.refuse[text])
        new = AdapterState(lora=state.lora, base_model=state.base_model, student={"w": state.student["w"] + 1})
        return StepResult(True, new, {"loss": 0.5, "learning_rate": config.learning_rate})


class RecordingReplicas:
    """`Replicas` that record what reached them, in order; `crash_on_deliver` kills the process there."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.crash_on_deliver = False
        self.refuse_sleep = False
        self.acked = 2

    async def ready(self) -> None:
        self.events.append(("ready",))

    async def pause(self) -> None:
        self.events.append(("pause",))
        if self.refuse_sleep:
            raise ReplicasUnavailable("not applied: 1 of 2 inference replicas did not release the shared GPU")

    async def resume(self) -> None:
        self.events.append(("resume",))

    async def deliver(self, version: PublishedVersion) -> Delivery:
        if self.crash_on_deliver:
            raise Crash("deliver")
        assert version.files is not None and "adapter_model.safetensors" in version.files
        self.events.append(("deliver", version.meta.adapter_id, version.meta.version))
        return Delivery(acked=self.acked, live=2, load_s=0.01)

    def forget(self, adapter_id: str) -> None:
        self.events.append(("forget", adapter_id))


def example(text: str, **settings: float) -> TrainingExample:
    return TrainingExample(messages=[ChatMessage(role="user", content="hi")], response_text=text,
                           feedback="shorter", training_settings=settings)


class Rig:
    """One trainer process over a state folder; `restart()` is a new process on the same folder."""

    def __init__(self, folder, config: ClaasConfig | None = None):
        self.folder = folder
        self.config = config or ClaasConfig()
        self.trainer = AddingTrainer()
        self.replicas = RecordingReplicas()
        self.journal = FeedbackJournal(folder / "feedback.sqlite")
        self.store = LocalAdapterStore(folder / "adapters")
        self.loop = self._new_loop()

    def _new_loop(self) -> TrainerLoop:
        backend = WeightsStepBackend(self.trainer, self.store, "tiny", self.config.lora.target_modules,
                                     cached_states=self.config.trainer.max_cached_states)
        loop = TrainerLoop(self.config, self.journal, self.store, backend, self.replicas)
        loop.recover()
        return loop

    def restart(self) -> None:
        self.journal.close()
        self.journal = FeedbackJournal(self.folder / "feedback.sqlite")
        self.trainer.crash_on.clear()
        self.replicas.crash_on_deliver = False
        self.loop = self._new_loop()

    def create(self, *adapters: str) -> None:
        for adapter in adapters:
            asyncio.run(self.loop.init_adapter(adapter, LoraConfig()))

    def queue(self, *items: tuple[str, str, TrainingExample]) -> None:
        self.journal.append([(fid, adapter, ex, None, "text") for fid, adapter, ex in items])

    def drain(self) -> int:
        async def steps() -> int:
            count = 0
            while await self.loop.run_once():
                count += 1
            return count

        return asyncio.run(steps())

    def status(self, fid: str) -> tuple[str, int | None]:
        entry = self.journal.get(fid)
        return entry.status, entry.version

    def versions_naming(self, adapter: str) -> dict[str, list[int]]:
        named: dict[str, list[int]] = {}
        for meta in self.store.list_versions(adapter):
            for fid in meta.feedback_ids:
                named.setdefault(fid, []).append(meta.version)
        return named


def test_batches_follow_the_oldest_adapter_keep_order_and_one_set_of_settings(tmp_path):
    rig = Rig(tmp_path)
    rig.create("a/one", "b/two")
    rig.queue(("a1", "a/one", example("a1")), ("b1", "b/two", example("b1")), ("a2", "a/one", example("a2")),
              ("a3", "a/one", example("a3", learning_rate=1e-4)), ("a4", "a/one", example("a4")))
    assert rig.drain() == 4
    # a/one waited longest: its first two go together, in order; a3 asks for other settings, so its own step.
    assert rig.trainer.batches == [["a1", "a2"], ["b1"], ["a3"], ["a4"]]
    assert [rig.status(f) for f in ("a1", "a2", "b1", "a3", "a4")] == [
        ("applied", 1), ("applied", 1), ("applied", 1), ("applied", 2), ("applied", 3)]
    assert rig.journal.get("a3").metrics["learning_rate"] == 1e-4  # the item's own setting was used
    assert rig.journal.get("a4").metrics["learning_rate"] == ClaasConfig().training.learning_rate
    # Every version was published before it was handed to the replicas, and the weights moved once per step.
    assert [e for e in rig.replicas.events if e[0] == "deliver"] == [
        ("deliver", "a/one", 1), ("deliver", "b/two", 1), ("deliver", "a/one", 2), ("deliver", "a/one", 3)]
    state, _ = rig.store.load_state("a/one")
    assert state.student["w"].tolist() == [3.0, 3.0]
    metrics = rig.journal.get("a1").metrics
    assert metrics["replicas_acked"] == 2 and metrics["train_s"] >= 0 and metrics["queue_s"] >= 0
    # Steps run at a lower CPU priority than the caller: where they share cores with serving, serving wins.
    assert rig.trainer.niceness == min(19, os.nice(0) + rig.config.trainer.cpu_niceness)


@pytest.mark.parametrize("point", ["before_publish", "after_publish_before_ack", "after_ack"])
def test_a_crash_at_any_point_of_a_step_applies_each_item_exactly_once(tmp_path, point):
    rig = Rig(tmp_path)
    rig.create("a/one")
    rig.queue(("f1", "a/one", example("f1")), ("f2", "a/one", example("f2")))
    if point == "before_publish":
        rig.trainer.crash_on.add("f1")
    elif point == "after_publish_before_ack":
        rig.replicas.crash_on_deliver = True
    if point == "after_ack":
        assert rig.drain() == 1
    else:
        with pytest.raises(Crash):
            rig.drain()
        assert rig.status("f1")[0] == "training"  # what a killed process leaves behind
    published_before = rig.store.version_numbers("a/one")

    rig.restart()
    if point == "after_publish_before_ack":
        # The version was published naming both items: recovery applies them, with no second step.
        assert rig.status("f1") == ("applied", 1) and rig.status("f2") == ("applied", 1)
    rig.drain()
    assert rig.status("f1") == ("applied", 1) and rig.status("f2") == ("applied", 1)
    assert rig.versions_naming("a/one") == {"f1": [1], "f2": [1]}  # exactly once
    assert rig.store.version_numbers("a/one") == [0, 1]
    assert published_before == ([0] if point == "before_publish" else [0, 1])
    state, _ = rig.store.load_state("a/one")
    assert state.student["w"].tolist() == [1.0, 1.0]


def test_an_item_that_keeps_killing_the_trainer_is_rejected_after_the_retry_limit(tmp_path):
    rig = Rig(tmp_path)
    rig.create("a/one")
    rig.queue(("poison", "a/one", example("poison")), ("fine", "b/two", example("fine")))
    rig.create("b/two")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        rig.trainer.crash_on.add("poison")
        with pytest.raises(Crash):
            rig.drain()
        assert rig.journal.get("poison").attempts == attempt
        rig.restart()
    status, _ = rig.status("poison")
    assert status == "rejected" and f"stopped {MAX_ATTEMPTS} times" in rig.journal.get("poison").reason
    rig.drain()
    assert rig.status("fine") == ("applied", 1) and rig.journal.get("fine").attempts == 1
    assert rig.store.version_numbers("a/one") == [0]


def test_refused_steps_are_rejected_with_their_reason_and_the_loop_goes_on(tmp_path):
    rig = Rig(tmp_path)
    rig.create("a/one")
    rig.trainer.refuse["guarded"] = "collapse: 2 of 3 answers degenerate"
    rig.trainer.raise_on["too-long"] = ValueError("example is 9000 tokens; training.max_step_tokens is 4096")
    rig.trainer.raise_on["bug"] = RuntimeError("boom")
    for text in ("guarded", "too-long", "bug", "fine"):
        rig.queue((text, "a/one", example(text)))
        rig.drain()
    rig.queue(("gone", "c/deleted", example("gone")))
    rig.drain()
    assert rig.journal.get("guarded").reason.startswith("collapse") and rig.journal.get("guarded").metrics["loss"] == 1.0
    assert "max_step_tokens" in rig.journal.get("too-long").reason
    assert rig.journal.get("bug").reason == "internal error: RuntimeError: boom"
    assert "no longer exists" in rig.journal.get("gone").reason
    assert [rig.status(t)[0] for t in ("guarded", "too-long", "bug", "gone")] == ["rejected"] * 4
    assert rig.status("fine") == ("applied", 1)  # the previous version kept serving until then
    assert rig.store.version_numbers("a/one") == [0, 1]


def test_on_a_shared_gpu_replicas_sleep_for_each_step_even_a_failed_one(tmp_path):
    config = ClaasConfig(trainer={"colocation": "sleep", "num_gpus": 0.5},
                         serving={"replica_num_gpus": 0.5, "kv_cache_memory_gb": 1})
    rig = Rig(tmp_path, config)
    rig.create("a/one")
    rig.trainer.raise_on["bad"] = ValueError("no")
    rig.queue(("bad", "a/one", example("bad")))
    rig.drain()
    rig.queue(("good", "a/one", example("good")))
    rig.drain()
    assert rig.replicas.events == [("pause",), ("resume",), ("pause",), ("resume",), ("deliver", "a/one", 1)]


def test_a_step_does_not_run_beside_a_replica_that_kept_the_gpu_and_the_others_wake(tmp_path):
    config = ClaasConfig(trainer={"colocation": "sleep", "num_gpus": 0.5},
                         serving={"replica_num_gpus": 0.5, "kv_cache_memory_gb": 1})
    rig = Rig(tmp_path, config)
    rig.create("a/one")
    rig.replicas.refuse_sleep = True
    rig.queue(("f", "a/one", example("f")))
    rig.drain()
    assert rig.status("f")[0] == "rejected" and "did not release the shared GPU" in rig.journal.get("f").reason
    assert rig.replicas.events == [("pause",), ("resume",)]
    assert rig.store.version_numbers("a/one") == [0]


def test_a_version_not_every_replica_acknowledged_is_applied_and_says_so(tmp_path):
    rig = Rig(tmp_path)
    rig.create("a/one")
    rig.replicas.acked = 1
    rig.queue(("f", "a/one", example("f")))
    rig.drain()
    entry = rig.journal.get("f")
    assert rig.status("f") == ("applied", 1) and entry.metrics["replicas_acked"] == 1
    assert entry.reason.startswith("version 1 reached 1 of 2 inference replicas within 60s")


def test_the_trainer_keeps_a_bounded_number_of_training_states(tmp_path):
    """Past `trainer.max_cached_states` an adapter's state is read from the store at its next step: training
    goes on from where it was."""
    rig = Rig(tmp_path, ClaasConfig(trainer={"max_cached_states": 2}))
    adapters = [f"a/{n}" for n in range(4)]
    rig.create(*adapters)
    for round_ in range(2):
        for adapter in adapters:
            rig.queue((f"{adapter}-{round_}", adapter, example("x")))
        rig.drain()
    assert len(rig.loop.backend._latest) == 2
    for adapter in adapters:  # two steps each: +1 twice from the zero-effect start
        assert rig.store.version_numbers(adapter) == [0, 1, 2]
        assert rig.store.load_state(adapter)[0].student["w"].tolist() == [2.0, 2.0]


def test_lifecycle_reset_and_import_publish_versions(tmp_path):
    rig = Rig(tmp_path)
    rig.create("a/one")
    rig.queue(("f1", "a/one", example("f1")))
    rig.drain()
    reset = asyncio.run(rig.loop.reset_adapter("a/one", LoraConfig()))
    assert reset.version == 2 and reset.parent_version == 1 and reset.note.startswith("reset")
    assert rig.replicas.events[-1] == ("deliver", "a/one", 2)
    assert rig.store.load_state("a/one")[0].student["w"].tolist() == [0.0, 0.0]
    files = rig.store.export_files("a/one", 1)
    imported = asyncio.run(rig.loop.import_adapter("b/copy", files))
    assert imported.version == 0 and rig.store.load_state("b/copy")[0].student["w"].tolist() == [1.0, 1.0]
    narrow = WeightsStepBackend(rig.trainer, rig.store, "tiny", ["q_proj"])  # engines serving LoRA on q_proj only
    with pytest.raises(ValueError, match="serves LoRA on"):
        narrow.import_adapter("b/other", files)
    rig.loop.forget_adapter("a/one")
    assert rig.replicas.events[-1] == ("forget", "a/one")
