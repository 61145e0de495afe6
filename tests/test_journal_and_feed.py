"""The feedback journal's and the completion log's contract, on SQLite and on a real PostgreSQL server, and the replica
feed's bookkeeping, without a cluster.

Recovery and the retry limit are the trainer loop's: tests/test_trainer_loop.py."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from claas_ray.chat import ChatMessage
from claas_ray.config import TrainerConfig
from claas_ray.feedback.journal import FeedbackJournal
from claas_ray.serving.completion_log import CompletionLog, CompletionRecord
from claas_ray.sql_database import DuplicateKey, SqlDatabase
from claas_ray.training.example import TrainingExample
from claas_ray.training.worker import ReplicasUnavailable
from deployments.broadcast import AdapterBroadcaster, AdapterReceiver, BroadcastReplicas
from deployments.placement import shares_device


def example(text: str) -> TrainingExample:
    return TrainingExample(messages=[ChatMessage(role="user", content="hi")], response_text=text, feedback="shorter")


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    """Connections to one fresh database: each call is what another process, or a restarted one, opens."""
    if request.param == "sqlite":
        return lambda: SqlDatabase.sqlite(tmp_path / "state.sqlite")
    dsn = request.getfixturevalue("postgres_server").new_database()
    return lambda: SqlDatabase.postgres(dsn)


def test_batches_follow_the_oldest_adapter_and_keep_order(database):
    journal = FeedbackJournal(database())
    journal.append([("a1", "alice", example("1"), None, "text"), ("b1", "bob", example("2"), "chatcmpl-x", "completion_id")])
    journal.append([("a2", "alice", example("3"), None, "text")])
    batch = journal.next_batch(8)
    assert [e.id for e in batch] == ["a1", "a2"]  # alice waited longest; her items go together, in order
    journal.mark(["a1", "a2"], "training")
    assert [e.id for e in journal.next_batch(8)] == ["b1"]  # adapters interleave
    assert journal.count_pending("alice") == 2 and journal.count_pending("bob") == 1
    journal.mark(["a1"], "applied", version=3, metrics={"loss": 0.5})
    journal.mark(["a2"], "rejected", reason="too long")
    assert journal.next_batch(1)[0].id == "b1"
    journal.close()

    reopened = FeedbackJournal(database())  # what a restarted process sees
    applied = reopened.get("a1")
    assert applied.status == "applied" and applied.version == 3 and applied.metrics == {"loss": 0.5}
    assert reopened.get("a2").reason == "too long"
    assert reopened.get("b1").completion_id == "chatcmpl-x" and reopened.get("b1").example.response_text == "2"
    assert reopened.get("b1").source == "completion_id" and reopened.get("a1").source == "text"
    assert [e.id for e in reopened.with_status("queued")] == ["b1"]
    assert reopened.get("nope") is None


def test_a_batch_has_one_set_of_training_settings(database):
    journal = FeedbackJournal(database())
    tuned = example("3").model_copy(update={"training_settings": {"learning_rate": 1e-4}})
    journal.append([(fid, "alice", ex, None, "text") for fid, ex in (("a", example("1")), ("b", example("2")),
                                                                        ("c", tuned), ("d", example("4")))])
    assert [e.id for e in journal.next_batch(8)] == ["a", "b"]  # c asks for other settings: its own step
    journal.mark(["a", "b"], "applied")
    assert [e.id for e in journal.next_batch(8)] == ["c"]
    journal.mark(["c"], "applied")
    assert [e.id for e in journal.next_batch(8)] == ["d"]


def test_duplicate_ids_are_refused_whole(database):
    journal = FeedbackJournal(database())
    journal.append([("x", "alice", example("1"), None, "text")])
    with pytest.raises(DuplicateKey):
        journal.append([("y", "alice", example("2"), None, "text"), ("x", "alice", example("3"), None, "text")])
    assert journal.get("y") is None  # all or none
    assert journal.count_pending("alice") == 1


def test_two_trainers_claiming_at_once_never_share_an_item(database):
    """A restarted trainer can claim beside one that is not yet gone: each item goes to one of them, once."""
    writer = FeedbackJournal(database())
    ids = [f"{adapter}-{n}" for n in range(6) for adapter in ("a", "b", "c", "d")]
    writer.append([(fid, fid.split("-")[0], example(fid), None, "text") for fid in ids])
    claimed: dict[str, list[str]] = {"one": [], "two": []}

    def trainer(name: str) -> None:
        journal = FeedbackJournal(database())
        while batch := journal.claim(2):
            assert len({entry.adapter_id for entry in batch}) == 1 and all(e.status == "training" for e in batch)
            claimed[name] += [entry.id for entry in batch]

    threads = [threading.Thread(target=trainer, args=(name,)) for name in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed["one"] + claimed["two"]) == sorted(ids)  # every item once, none twice
    assert all(writer.get(fid).status == "training" and writer.get(fid).attempts == 1 for fid in ids)


def test_the_completion_log_is_bounded_and_finds_answers_by_text(database):
    log = CompletionLog(database(), max_records=3)
    for n in range(5):
        log.add(CompletionRecord(completion_id=f"c{n}", model="m", adapter_id="a", response_text=f"answer {n % 2}",
                                 response_token_ids=[n], response_logprobs=[-0.5]))
    assert len(log) == 3 and log.get("c1") is None and log.get("c4").response_token_ids == [4]
    assert [r.completion_id for r in CompletionLog(database()).find("a", " answer 0 ")] == ["c4", "c2"]


def test_feed_acks_and_late_joiners():
    async def scenario() -> None:
        feed = AdapterBroadcaster(poll_timeout_s=0.2, replica_ttl_s=5)
        first = await feed.poll("r1", None, 0)  # r1 joins an empty feed
        assert first.commands == [] and first.generation == feed.generation
        sleep = await feed.control("sleep", level=1)
        seen = await feed.poll("r1", first.generation, first.cursor)
        assert [c.kind for c in seen.commands] == ["sleep"]
        assert await feed.wait_for_acks(sleep, timeout_s=0.3) == (0, 1)  # r1 has not acknowledged
        await feed.ack("r1", sleep.seq, load_s=0.25)
        assert await feed.wait_for_acks(sleep, timeout_s=1) == (1, 1)
        assert feed.load_seconds(sleep) == 0.25
        late = await feed.poll("r2", None, 0)  # a replica that starts while the GPU is lent to a step sleeps too
        assert [c.kind for c in late.commands] == ["sleep"] and late.cursor == sleep.seq
        wake = await feed.control("wake")
        got = await feed.poll("r2", late.generation, late.cursor)
        assert [c.kind for c in got.commands] == ["wake"]
        assert await feed.wait_for_acks(wake, timeout_s=0.3) == (0, 2)
        assert await feed.wait_for_replicas(2, timeout_s=0.1) == 2
        later = await feed.poll("r3", None, 0)  # after the wake: no stale sleep or wake
        assert later.commands == [] and later.cursor == wake.seq

    asyncio.run(scenario())



class TrainerHandle:
    """What a replica's handle to the trainer deployment offers the receiver, over whichever feed is current."""

    def __init__(self, feed: AdapterBroadcaster):
        self.feed = feed

    @property
    def poll(self):
        return SimpleNamespace(remote=self.feed.poll)

    @property
    def ack(self):
        return SimpleNamespace(remote=self.feed.ack)


class RecordingEngine:
    def __init__(self, fail: tuple[str, ...] = ()):
        self.calls: list[str] = []
        self.fail = fail

    async def sleep(self, level: int) -> None:
        self.calls.append("sleep")
        if "sleep" in self.fail:
            raise RuntimeError("out of memory while offloading")

    async def wake(self) -> None:
        self.calls.append("wake")
        if "wake" in self.fail:
            await asyncio.sleep(3600)  # hangs


def test_a_replica_follows_a_restarted_trainers_feed_at_once():
    """The restarted trainer's feed numbers its commands from 1 again. A receiver that kept the old feed's cursor
    skipped them: after the trainer was killed, versions went unacknowledged until the broadcast timed out."""

    async def scenario() -> None:
        old = AdapterBroadcaster(poll_timeout_s=0.2, replica_ttl_s=5)
        handle, engine = TrainerHandle(old), RecordingEngine()
        receiver = asyncio.create_task(AdapterReceiver("r1", handle, engine).run())
        assert await old.wait_for_replicas(1, timeout_s=2) == 1
        await asyncio.sleep(0.5)  # past its first poll, which starts a replica at the feed's current position
        for _ in range(5):
            command = await old.control("wake")
        assert await old.wait_for_acks(command, timeout_s=2) == (1, 1)

        restarted = AdapterBroadcaster(poll_timeout_s=0.2, replica_ttl_s=5)
        handle.feed = restarted
        assert await restarted.wait_for_replicas(1, timeout_s=2) == 1
        await asyncio.sleep(0.5)
        sleep = await restarted.control("sleep")
        assert sleep.seq == 1
        assert await restarted.wait_for_acks(sleep, timeout_s=2) == (1, 1)
        assert engine.calls == ["wake"] * 5 + ["sleep"]
        receiver.cancel()

    asyncio.run(scenario())


def test_a_replica_that_does_not_sleep_stops_the_step_and_one_that_does_not_wake_turns_unhealthy():
    async def scenario() -> None:
        feed = AdapterBroadcaster(poll_timeout_s=0.2, replica_ttl_s=5)
        engine = RecordingEngine(fail=("sleep", "wake"))
        receiver = AdapterReceiver("r1", TrainerHandle(feed), engine, wake_timeout_s=0.5)
        running = asyncio.create_task(receiver.run())
        replicas = BroadcastReplicas(feed, TrainerConfig(sleep_timeout_s=1.5), followers=1)
        await replicas.ready()
        await asyncio.sleep(0.5)  # past its first poll
        with pytest.raises(ReplicasUnavailable, match="1 of 1 inference replicas did not release the shared GPU"):
            await replicas.pause()
        receiver.check()  # a failed sleep leaves the replica serving
        await replicas.resume()  # the wake hangs past its timeout: unacknowledged, and the replica unhealthy
        assert engine.calls == ["sleep", "wake"]
        with pytest.raises(RuntimeError, match="did not wake: TimeoutError"):
            receiver.check()
        running.cancel()

    asyncio.run(scenario())


def test_the_feed_pins_the_newest_versions_of_a_bounded_number_of_adapters(monkeypatch):
    """Each adapter's newest version stays in the object store for replicas that start later; past
    `trainer.max_broadcast_adapters` the least recently published adapter's is let go (it loads from the store)."""
    monkeypatch.setattr("deployments.broadcast.ray.put", lambda files: files)  # bookkeeping only: no cluster

    async def scenario() -> None:
        feed = AdapterBroadcaster(poll_timeout_s=0.1, pinned_adapters=2)
        for round_ in range(3):
            for adapter in ("a", "b", "c", "d"):
                await feed.publish(adapter, round_, {"w": b"x"})
        await feed.publish("c", 9, {"w": b"y"})
        late = await feed.poll("r-late", None, 0)
        assert [(c.adapter_id, c.version) for c in late.commands] == [("d", 2), ("c", 9)]

    asyncio.run(scenario())


def test_the_feed_forgets_replicas_gone_long_ago():
    """A restarted replica polls under a new id; ids not seen for ten liveness windows are dropped, so a trainer
    that runs for months keeps bookkeeping for its live replicas only."""
    async def scenario() -> None:
        feed = AdapterBroadcaster(poll_timeout_s=0.01, replica_ttl_s=0.01)
        for index in range(50):
            await feed.poll(f"replica-{index}", None, 0, device=("node", frozenset({"0"})))
        await asyncio.sleep(0.12)
        await feed.poll("now", None, 0)
        assert feed.live_replicas() == {"now"}
        assert set(feed._seen) == {"now"} and set(feed._devices) == {"now"}  # the bookkeeping itself

    asyncio.run(scenario())


def test_a_step_sleeps_only_the_replicas_on_the_trainers_gpu():
    """Two nodes, three replicas: only the one on the trainer's GPU sleeps; the others keep serving and the step
    waits for none of them."""
    trainer_gpu = ("node-a", frozenset({"0"}))
    devices = {"same": ("node-a", frozenset({"0"})), "other-gpu": ("node-a", frozenset({"1"})),
               "other-node": ("node-b", frozenset({"0"}))}
    assert shares_device(trainer_gpu, devices["same"]) and not shares_device(trainer_gpu, devices["other-node"])
    assert not shares_device(None, None)  # without GPUs nothing is shared

    async def scenario() -> None:
        feed = AdapterBroadcaster(poll_timeout_s=0.1, replica_ttl_s=5)
        cursors = {name: (await feed.poll(name, None, 0, device)).cursor for name, device in devices.items()}
        sleep = await feed.control("sleep", 1, device=trainer_gpu)
        got = {name: await feed.poll(name, feed.generation, cursors[name], devices[name]) for name in devices}
        assert {name: [c.kind for c in result.commands] for name, result in got.items()} == \
            {"same": ["sleep"], "other-gpu": [], "other-node": []}
        await feed.ack("same", sleep.seq)
        assert await feed.wait_for_acks(sleep, timeout_s=0.5) == (1, 1)
        restarted = await feed.poll("other-gpu-2", None, 0, devices["other-gpu"])  # not under the sleep
        assert restarted.commands == []

    asyncio.run(scenario())
