"""The LoRA broadcast: new adapter versions go from the trainer to every inference replica.

Send side (`AdapterBroadcaster`, in the trainer; `BroadcastReplicas` is the trainer loop's view of it): a
new version's PEFT files are put into the Ray object store once (`ray.put`), and a `ReplicaCommand` naming
the object goes on a small ordered feed. Receive side (`AdapterReceiver`, in each inference replica): a
long-poll loop reads the feed, fetches the object (never the disk), hands it to the replica's `Engine`
(`load_version`), and acknowledges. The trainer calls a version applied once every live replica
acknowledged it.

Replicas are addressed by what they report, not by Serve internals: a replica is live while it polls.
The same feed carries `sleep`/`wake` for GPU colocation, where vLLM must release memory while the
trainer steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import ray

from claas_ray.backends.step_backend import PublishedVersion
from claas_ray.config import TrainerConfig
from claas_ray.serving.engine import Engine
from claas_ray.training.worker import Delivery

logger = logging.getLogger(__name__)

CommandKind = Literal["load", "sleep", "wake"]


@dataclass
class ReplicaCommand:
    seq: int
    kind: CommandKind
    adapter_id: str | None = None
    version: int | None = None
    files: Any = None  # ObjectRef of {file name: bytes} for "load"
    sleep_level: int = 1

    def __post_init__(self) -> None:
        if self.kind == "load" and (self.adapter_id is None or self.version is None or self.files is None):
            raise ValueError("a load command needs adapter_id, version and files")


@dataclass
class PollResult:
    generation: str
    cursor: int
    commands: list[ReplicaCommand] = field(default_factory=list)


class AdapterBroadcaster:
    """Trainer side: the command feed, the set of live replicas, and their acknowledgements."""

    def __init__(self, poll_timeout_s: float = 10.0, replica_ttl_s: float = 30.0):
        self.generation = uuid.uuid4().hex  # a restarted trainer starts a new feed; replicas re-read it whole
        self.poll_timeout_s = poll_timeout_s
        self.replica_ttl_s = replica_ttl_s
        self._seq = 0
        self._loads: dict[str, ReplicaCommand] = {}  # newest load per adapter, for replicas that join later
        self._control: list[ReplicaCommand] = []
        self._seen: dict[str, float] = {}
        self._acks: dict[int, set[str]] = {}
        self._load_s: dict[int, float] = {}
        self._changed = asyncio.Condition()

    def live_replicas(self) -> set[str]:
        horizon = time.monotonic() - self.replica_ttl_s
        return {replica for replica, seen in self._seen.items() if seen >= horizon}

    async def _issue(self, command: ReplicaCommand) -> ReplicaCommand:
        async with self._changed:
            for old in [seq for seq in self._acks if seq <= command.seq - 1024]:
                self._acks.pop(old, None)
                self._load_s.pop(old, None)
            self._acks[command.seq] = set()
            self._changed.notify_all()
        return command

    async def publish(self, adapter_id: str, version: int, files: dict[str, bytes]) -> ReplicaCommand:
        """Put a version's files in the object store once and announce it."""
        files_ref = await asyncio.to_thread(ray.put, files)  # a copy of megabytes: not on the event loop
        self._seq += 1
        command = ReplicaCommand(self._seq, "load", adapter_id, version, files_ref)
        self._loads[adapter_id] = command
        return await self._issue(command)

    async def control(self, kind: Literal["sleep", "wake"], level: int = 1) -> ReplicaCommand:
        self._seq += 1
        command = ReplicaCommand(self._seq, kind, sleep_level=level)
        self._control = [c for c in self._control if c.seq > self._seq - 16] + [command]
        return await self._issue(command)

    def forget(self, adapter_id: str) -> None:
        self._loads.pop(adapter_id, None)

    async def wait_for_replicas(self, count: int, timeout_s: float) -> int:
        """After a (re)start, give the replicas one poll period to find the new feed before broadcasting."""
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while len(self.live_replicas()) < count and time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(1.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
        return len(self.live_replicas())

    async def wait_for_acks(self, command: ReplicaCommand, timeout_s: float) -> tuple[int, int]:
        """Wait until every live replica acknowledged; returns (acknowledged, live) at the end."""
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while True:
                live = self.live_replicas()
                acked = self._acks.get(command.seq, set()) & live
                if live <= acked or time.monotonic() >= deadline:
                    return len(acked), len(live)
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(1.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass

    async def poll(self, replica: str, generation: str | None, cursor: int) -> PollResult:
        """Commands after `cursor`, waiting up to the poll timeout for one to arrive.

        A replica new to this feed (or to this trainer) gets the newest version of every adapter, but no
        stale sleep/wake commands: it starts from the current position of the feed.
        """
        self._seen[replica] = time.monotonic()
        fresh = generation != self.generation
        if fresh:
            cursor = 0
        deadline = time.monotonic() + self.poll_timeout_s
        async with self._changed:
            self._changed.notify_all()  # a new live replica may change what a waiter waits for
            while True:
                pending = [c for c in self._loads.values() if c.seq > cursor]
                if not fresh:
                    pending += [c for c in self._control if c.seq > cursor]
                remaining = deadline - time.monotonic()
                if pending or remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    pass
            position = self._seq if fresh else max([cursor] + [c.seq for c in pending])
        self._seen[replica] = time.monotonic()
        return PollResult(self.generation, position, sorted(pending, key=lambda c: c.seq))

    async def ack(self, replica: str, seq: int, load_s: float = 0.0) -> None:
        async with self._changed:
            self._seen[replica] = time.monotonic()
            self._acks.setdefault(seq, set()).add(replica)
            self._load_s[seq] = max(self._load_s.get(seq, 0.0), load_s)
            self._changed.notify_all()

    def load_seconds(self, command: ReplicaCommand) -> float:
        """The slowest replica's fetch + write + engine load time for a command."""
        return self._load_s.get(command.seq, 0.0)


class BroadcastReplicas:
    """The trainer loop's `Replicas`: versions, sleep and wake go out on the feed and are waited for."""

    def __init__(self, broadcaster: AdapterBroadcaster, settings: TrainerConfig, followers: int):
        self.broadcaster = broadcaster
        self.settings = settings
        self.followers = followers  # replicas expected to follow the feed (0 when they read the store)

    async def ready(self) -> None:
        await self.broadcaster.wait_for_replicas(self.followers, timeout_s=2 * self.settings.poll_timeout_s + 5)

    async def pause(self) -> None:
        command = await self.broadcaster.control("sleep", self.settings.sleep_level)
        await self.broadcaster.wait_for_acks(command, self.settings.sleep_timeout_s)

    async def resume(self) -> None:
        command = await self.broadcaster.control("wake")
        await self.broadcaster.wait_for_acks(command, self.settings.sleep_timeout_s)

    async def deliver(self, version: PublishedVersion) -> Delivery:
        meta = version.meta
        command = await self.broadcaster.publish(meta.adapter_id, meta.version, version.files or {})
        acked, live = await self.broadcaster.wait_for_acks(command, self.settings.broadcast_timeout_s)
        return Delivery(acked, live, self.broadcaster.load_seconds(command))

    def forget(self, adapter_id: str) -> None:
        self.broadcaster.forget(adapter_id)


class AdapterReceiver:
    """Replica side: follow the trainer's feed and apply each command to the replica's engine."""

    def __init__(self, replica: str, trainer, engine: Engine):
        self.replica = replica
        self.trainer = trainer  # DeploymentHandle of the trainer
        self.engine = engine
        self.generation: str | None = None
        self.cursor = 0
        self.loaded: dict[str, int] = {}

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                result: PollResult = await self.trainer.poll.remote(self.replica, self.generation, self.cursor)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the trainer is restarting: keep serving, try again
                logger.warning("adapter feed unavailable (%s); retrying in %.1fs", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            self.generation = result.generation
            for command in result.commands:
                await self.apply(command)
                self.cursor = max(self.cursor, command.seq)
            self.cursor = max(self.cursor, result.cursor)

    async def apply(self, command: ReplicaCommand) -> None:
        started = time.monotonic()
        try:
            if command.kind == "load":
                await self.load(command.adapter_id, command.version, command.files)
            elif command.kind == "sleep":
                await self.engine.sleep(command.sleep_level)
            else:
                await self.engine.wake()
        except Exception:
            # Not acknowledged: the trainer will count this replica as lagging, and requests for the
            # version still work through the store (read on demand).
            logger.exception("replica %s could not apply %s", self.replica, command.kind)
            return
        await self.trainer.ack.remote(self.replica, command.seq, time.monotonic() - started)

    async def load(self, adapter_id: str, version: int, files_ref) -> None:
        if self.loaded.get(adapter_id, -1) >= version:
            return
        files: dict[str, bytes] = await files_ref
        await self.engine.load_version(adapter_id, version, files)
        self.loaded[adapter_id] = version
