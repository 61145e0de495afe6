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
from claas_ray.lru_map import LruMap
from claas_ray.serving.engine import Engine
from claas_ray.training.worker import Delivery, ReplicasUnavailable
from deployments.placement import Device, shares_device

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
    device: Device | None = None  # sleep/wake: only the replicas on this GPU; None: every replica

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

    def __init__(self, poll_timeout_s: float = 10.0, replica_ttl_s: float = 30.0, pinned_adapters: int = 256):
        self.generation = uuid.uuid4().hex  # a restarted trainer starts a new feed; replicas re-read it whole
        self.poll_timeout_s = poll_timeout_s
        self.replica_ttl_s = replica_ttl_s
        self._seq = 0
        # The newest load per adapter, for replicas that join later; each pins its files in the object store, so
        # only the most recently published `pinned_adapters` are kept (`trainer.max_broadcast_adapters`).
        self._loads: LruMap[str, ReplicaCommand] = LruMap(pinned_adapters)
        self._control: list[ReplicaCommand] = []
        self._seen: dict[str, float] = {}
        self._devices: dict[str, Device | None] = {}  # each replica's GPUs, as it reports them
        self._acks: dict[int, set[str]] = {}
        self._load_s: dict[int, float] = {}
        self._changed = asyncio.Condition()

    def live_replicas(self, device: Device | None = None) -> set[str]:
        """Replicas that polled recently; with `device`, only those that share that GPU."""
        horizon = time.monotonic() - self.replica_ttl_s
        return {replica for replica, seen in self._seen.items()
                if seen >= horizon and (device is None or shares_device(device, self._devices.get(replica)))}

    def _addressed(self, command: ReplicaCommand, replica: str) -> bool:
        return command.device is None or shares_device(command.device, self._devices.get(replica))

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
        self._loads.put(adapter_id, command)
        return await self._issue(command)

    async def control(self, kind: Literal["sleep", "wake"], level: int = 1, device: Device | None = None) -> ReplicaCommand:
        """Sleep or wake the replicas on `device` (every replica when None)."""
        self._seq += 1
        command = ReplicaCommand(self._seq, kind, sleep_level=level, device=device)
        self._control = [c for c in self._control if c.seq > self._seq - 16] + [command]
        return await self._issue(command)

    def forget(self, adapter_id: str) -> None:
        self._loads.pop(adapter_id)

    async def wait_for_replicas(self, count: int, timeout_s: float) -> int:
        """After a (re)start, wait (bounded) until `count` replicas follow the new feed; returns how many do."""
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while len(self.live_replicas()) < count and time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(1.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
        return len(self.live_replicas())

    async def wait_for_acks(self, command: ReplicaCommand, timeout_s: float) -> tuple[int, int]:
        """Wait until every live replica the command is for acknowledged; returns (acknowledged, live) at the end."""
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while True:
                live = self.live_replicas(command.device)
                acked = self._acks.get(command.seq, set()) & live
                if live <= acked or time.monotonic() >= deadline:
                    return len(acked), len(live)
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(1.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass

    async def poll(self, replica: str, generation: str | None, cursor: int, device: Device | None = None) -> PollResult:
        """Commands after `cursor`, waiting up to the poll timeout for one to arrive; `device` is the replica's GPU.

        A replica new to this feed (or to this trainer) gets the newest version of every adapter, and no stale
        sleep/wake commands, except a sleep its GPU is still under: a replica that (re)starts while the trainer
        steps on its device must not take that memory.
        """
        now = time.monotonic()
        for gone in [r for r, seen in self._seen.items() if seen < now - 10 * self.replica_ttl_s]:
            del self._seen[gone]  # replaced long ago: Serve gives a restarted replica a new id
            self._devices.pop(gone, None)
        self._seen[replica] = now
        self._devices[replica] = device
        fresh = generation != self.generation
        if fresh:
            cursor = 0
        deadline = time.monotonic() + self.poll_timeout_s
        async with self._changed:
            self._changed.notify_all()  # a new live replica may change what a waiter waits for
            while True:
                pending = [c for c in self._loads.values() if c.seq > cursor]
                if not fresh:
                    pending += [c for c in self._control if c.seq > cursor and self._addressed(c, replica)]
                elif (asleep := self._asleep(replica)) is not None:
                    pending.append(asleep)
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

    def _asleep(self, replica: str) -> ReplicaCommand | None:
        """The sleep the replica's GPU is under (the last sleep or wake addressed to it was a sleep), if any."""
        addressed = [c for c in self._control if self._addressed(c, replica)]
        return addressed[-1] if addressed and addressed[-1].kind == "sleep" else None

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

    def __init__(self, broadcaster: AdapterBroadcaster, settings: TrainerConfig, followers: int,
                 device: Device | None = None):
        self.broadcaster = broadcaster
        self.settings = settings
        self.followers = followers  # replicas expected to follow the feed (0 when they read the store)
        self.device = device  # the trainer's GPU: a step sleeps only the replicas on it; the others keep serving

    async def ready(self) -> None:
        """Steps start once the replicas follow the feed (on a shared GPU, before a step takes its memory while vLLM
        still starts), or after `trainer.replicas_ready_timeout_s`."""
        await self.broadcaster.wait_for_replicas(self.followers, timeout_s=self.settings.replicas_ready_timeout_s)

    async def pause(self) -> None:
        command = await self.broadcaster.control("sleep", self.settings.sleep_level, self.device)
        acked, live = await self.broadcaster.wait_for_acks(command, self.settings.sleep_timeout_s)
        if acked < live:
            raise ReplicasUnavailable(
                f"not applied: {live - acked} of {live} inference replicas did not release the shared GPU within "
                f"{self.settings.sleep_timeout_s:.0f}s, and the step would not fit beside them; send it again"
            )

    async def resume(self) -> None:
        command = await self.broadcaster.control("wake", device=self.device)
        acked, live = await self.broadcaster.wait_for_acks(command, self.settings.sleep_timeout_s)
        if acked < live:  # each of them failed its health check (AdapterReceiver.check) and is being replaced
            logger.error("%d of %d inference replicas did not wake within %.0fs", live - acked, live,
                         self.settings.sleep_timeout_s)

    async def deliver(self, version: PublishedVersion) -> Delivery:
        meta = version.meta
        command = await self.broadcaster.publish(meta.adapter_id, meta.version, version.files or {})
        acked, live = await self.broadcaster.wait_for_acks(command, self.settings.broadcast_timeout_s)
        return Delivery(acked, live, self.broadcaster.load_seconds(command))

    def forget(self, adapter_id: str) -> None:
        self.broadcaster.forget(adapter_id)


class AdapterReceiver:
    """Replica side: follow the trainer's feed and apply each command to the replica's engine."""

    def __init__(self, replica: str, trainer, engine: Engine, wake_timeout_s: float = 60.0,
                 device: Device | None = None):
        self.replica = replica
        self.device = device  # the replica's GPU, so the trainer sleeps only the replicas on its own
        self.trainer = trainer  # DeploymentHandle of the trainer
        self.engine = engine
        self.wake_timeout_s = wake_timeout_s
        self.generation: str | None = None
        self.cursor = 0
        self.loaded: dict[str, int] = {}
        self.failure: str | None = None

    def check(self) -> None:
        """For the replica's health check: a replica that could not wake cannot serve, so Serve replaces it."""
        if self.failure is not None:
            raise RuntimeError(self.failure)

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                result: PollResult = await self.trainer.poll.remote(self.replica, self.generation, self.cursor, self.device)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the trainer is restarting: keep serving, try again
                logger.warning("adapter feed unavailable (%s); retrying in %.1fs", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if result.generation != self.generation:
                # A new feed (the trainer restarted) numbers its commands from 1 again: the old cursor would hide
                # every command until the new feed passed it.
                self.generation, self.cursor = result.generation, 0
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
                await asyncio.wait_for(self.engine.wake(), timeout=self.wake_timeout_s)
        except Exception as exc:
            # Not acknowledged: the trainer counts this replica as lagging (a version is still served through
            # the store, read on demand; a step does not run beside a replica that did not sleep).
            logger.exception("replica %s could not apply %s", self.replica, command.kind)
            if command.kind == "wake":
                self.failure = f"the engine did not wake: {type(exc).__name__}: {exc}"
            return
        await self.trainer.ack.remote(self.replica, command.seq, time.monotonic() - started)

    async def load(self, adapter_id: str, version: int, files_ref) -> None:
        if self.loaded.get(adapter_id, -1) >= version:
            return
        files: dict[str, bytes] = await files_ref
        await self.engine.load_version(adapter_id, version, files)
        self.loaded[adapter_id] = version
