"""The feedback journal's ordering and durability, and the replica feed's bookkeeping, without a cluster.

Recovery and the retry limit are the trainer loop's: tests/test_trainer_loop.py."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from claas_ray.chat import ChatMessage
from claas_ray.feedback.journal import FeedbackJournal
from claas_ray.training.example import TrainingExample
from deployments.broadcast import AdapterBroadcaster


def example(text: str) -> TrainingExample:
    return TrainingExample(messages=[ChatMessage(role="user", content="hi")], response_text=text, feedback="shorter")


def test_batches_follow_the_oldest_adapter_and_keep_order(tmp_path):
    journal = FeedbackJournal(tmp_path / "j.sqlite")
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

    reopened = FeedbackJournal(tmp_path / "j.sqlite")  # what a restarted process sees
    applied = reopened.get("a1")
    assert applied.status == "applied" and applied.version == 3 and applied.metrics == {"loss": 0.5}
    assert reopened.get("a2").reason == "too long"
    assert reopened.get("b1").completion_id == "chatcmpl-x" and reopened.get("b1").example.response_text == "2"
    assert reopened.get("b1").source == "completion_id" and reopened.get("a1").source == "text"
    assert [e.id for e in reopened.with_status("queued")] == ["b1"]
    assert reopened.get("nope") is None


def test_a_batch_has_one_set_of_training_settings(tmp_path):
    journal = FeedbackJournal(tmp_path / "j.sqlite")
    tuned = example("3").model_copy(update={"training_settings": {"learning_rate": 1e-4}})
    journal.append([(fid, "alice", ex, None, "text") for fid, ex in (("a", example("1")), ("b", example("2")),
                                                                        ("c", tuned), ("d", example("4")))])
    assert [e.id for e in journal.next_batch(8)] == ["a", "b"]  # c asks for other settings: its own step
    journal.mark(["a", "b"], "applied")
    assert [e.id for e in journal.next_batch(8)] == ["c"]
    journal.mark(["c"], "applied")
    assert [e.id for e in journal.next_batch(8)] == ["d"]


def test_duplicate_ids_are_refused_whole(tmp_path):
    journal = FeedbackJournal(tmp_path / "j.sqlite")
    journal.append([("x", "alice", example("1"), None, "text")])
    with pytest.raises(sqlite3.IntegrityError):
        journal.append([("y", "alice", example("2"), None, "text"), ("x", "alice", example("3"), None, "text")])
    assert journal.get("y") is None  # all or none
    assert journal.count_pending("alice") == 1


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
        late = await feed.poll("r2", None, 0)  # a new replica gets no stale sleep command
        assert late.commands == [] and late.cursor == sleep.seq
        wake = await feed.control("wake")
        got = await feed.poll("r2", late.generation, late.cursor)
        assert [c.kind for c in got.commands] == ["wake"]
        assert await feed.wait_for_acks(wake, timeout_s=0.3) == (0, 2)
        assert await feed.wait_for_replicas(2, timeout_s=0.1) == 2

    asyncio.run(scenario())

