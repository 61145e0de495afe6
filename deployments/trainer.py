"""The trainer deployment: owns the training model, drains the feedback journal, publishes versions.

A Serve deployment with one replica: a named Ray actor that Serve restarts if it dies. On start it
replays the journal (exactly-once through the versions' feedback ids), then loops: take the oldest
adapter's queued items as one batch, run one guarded SDPO step, publish the version, broadcast it to
every inference replica, and only then mark the items applied. The step runs here or on Modal
(`claas_ray/backends`); on Tinker the step and the weights stay there and a version is a checkpoint path
the replicas read from the store, so nothing is broadcast.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch
from ray import serve

from claas_ray.adapters.state import AdapterState
from claas_ray.adapters.store import AdapterExistsError, AdapterNotFoundError, AdapterVersionMeta, open_store
from claas_ray.backends import open_backend
from claas_ray.config import ClaasConfig, LoraConfig, TrainingConfig
from claas_ray.feedback.journal import FeedbackEntry, FeedbackJournal
from deployments.broadcast import AdapterBroadcaster, PollResult

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Steps started on one item before it is given up: an item that kills the trainer must not crash-loop it."""


@serve.deployment(name="trainer", num_replicas=1, max_ongoing_requests=1000, health_check_period_s=10, health_check_timeout_s=120)
class TrainerDeployment:
    async def __init__(self, config: dict[str, Any]):
        self.config = ClaasConfig.model_validate(config)
        self.store = open_store(self.config.store)
        self.journal = FeedbackJournal(self.config.state_path() / "feedback.sqlite")
        self.broadcaster = AdapterBroadcaster(poll_timeout_s=self.config.trainer.poll_timeout_s)
        if self.config.trainer.torch_threads is not None:
            # Ray gives an actor as many threads as CPUs it reserved. On the CPU build, vLLM spins on
            # the core it binds to, so more threads than reserved cores make a step slower, not faster.
            torch.set_num_threads(self.config.trainer.torch_threads)
        # Tinker keeps adapters on its side: a step there publishes checkpoint paths, not tensors.
        self.tinker = None
        if self.config.trainer.backend == "tinker":
            from claas_ray.backends.tinker.trainer import TinkerSDPO  # needs the `tinker` extra

            self.tinker = TinkerSDPO.from_config(self.config, self.store)
        self.trainer = open_backend(self.config) if self.tinker is None else None
        self._model_lock = asyncio.Lock()  # one model, one user at a time: steps, inits, imports
        self._wake = asyncio.Event()
        self._states: dict[str, tuple[int, AdapterState]] = {}
        self.steps = 0
        self._recover()
        self._loop = asyncio.create_task(self._run())

    # --- recovery ---------------------------------------------------------------------------
    def _recover(self) -> None:
        """Items caught mid-step by a crash: applied if a published version names them, else queued again."""
        named: dict[str, dict[str, AdapterVersionMeta]] = {}
        for entry in self.journal.with_status("training"):
            if entry.adapter_id not in named:
                versions = self.store.list_versions(entry.adapter_id) if self.store.exists(entry.adapter_id) else []
                named[entry.adapter_id] = {fid: meta for meta in versions for fid in meta.feedback_ids}
            meta = named[entry.adapter_id].get(entry.id)
            if meta is not None:
                self.journal.mark([entry.id], "applied", version=meta.version, metrics=meta.metrics)
                logger.info("recovered feedback %s as applied in version %d", entry.id, meta.version)
            elif entry.attempts >= MAX_ATTEMPTS:
                reason = f"the trainer stopped {entry.attempts} times while applying this item (out of memory?); not retried"
                self.journal.mark([entry.id], "rejected", reason=reason)
                logger.warning("feedback %s rejected: %s", entry.id, reason)
            else:
                self.journal.mark([entry.id], "queued")
                logger.info("recovered feedback %s as queued", entry.id)

    # --- the loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        followers = 0 if self.tinker is not None else self.config.serving.num_replicas  # Tinker replicas read the store
        await self.broadcaster.wait_for_replicas(followers, timeout_s=2 * self.config.trainer.poll_timeout_s + 5)
        while True:
            batch = self.journal.next_batch(self.config.trainer.max_batch_items)
            if not batch:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await self._apply(batch)
            except Exception as exc:
                logger.exception("step for %s failed", batch[0].adapter_id)
                self.journal.mark([e.id for e in batch], "rejected", reason=f"internal error: {type(exc).__name__}: {exc}")

    def _state(self, adapter_id: str) -> tuple[AdapterState, int]:
        latest = self.store.latest_version(adapter_id)
        cached = self._states.get(adapter_id)
        if cached is not None and cached[0] == latest:
            return cached[1], latest
        state, meta = self.store.load_state(adapter_id, latest)
        self._states[adapter_id] = (meta.version, state)
        return state, meta.version

    def _training_config(self, batch: list[FeedbackEntry]) -> TrainingConfig:
        """The server's settings, with those the batch's items asked for (validated and allowed by the router)."""
        settings = batch[0].example.training_settings  # one set per batch (FeedbackJournal.next_batch)
        return self.config.training.model_copy(update=settings) if settings else self.config.training

    async def _apply(self, batch: list[FeedbackEntry]) -> None:
        adapter_id = batch[0].adapter_id
        ids = [entry.id for entry in batch]
        started = time.time()
        self.journal.mark(ids, "training")
        if self.tinker is not None:
            return await self._apply_on_tinker(batch, started)
        try:
            state, parent = self._state(adapter_id)
        except AdapterNotFoundError:
            self.journal.mark(ids, "rejected", reason=f"adapter {adapter_id!r} no longer exists")
            return
        async with self._model_lock:
            await self._sleep_inference()
            try:
                result = await asyncio.to_thread(
                    self.trainer.step, state, [entry.example for entry in batch], self._training_config(batch)
                )
            except ValueError as exc:  # e.g. an example longer than the context
                self.journal.mark(ids, "rejected", reason=str(exc))
                return
            finally:
                await self._wake_inference()
        stepped = time.time()
        metrics = dict(result.metrics)
        metrics["queue_s"] = started - min(entry.created_at for entry in batch)
        if not result.accepted:
            self.journal.mark(ids, "rejected", metrics=metrics, reason=result.reason)
            return
        # Persist and broadcast at once: replicas load from the object store while the version is written.
        # The router names a version only once it is in the store, so nobody is served an unpublished one.
        version = self.store.next_version(adapter_id)
        publishing = asyncio.create_task(asyncio.to_thread(
            self.store.publish, adapter_id, result.state, parent, ids, result.metrics, version
        ))
        command = await self.broadcaster.publish(adapter_id, version, result.state.peft_files())
        acked, live = await self.broadcaster.wait_for_acks(command, self.config.trainer.broadcast_timeout_s)
        broadcast_done = time.time()
        try:
            await publishing
        except Exception as exc:
            self.journal.mark(ids, "rejected", metrics=metrics, reason=f"publishing version {version} failed: {exc}")
            return
        self._states[adapter_id] = (version, result.state)
        self.steps += 1
        metrics.update(
            train_s=stepped - started,
            broadcast_s=broadcast_done - stepped,
            publish_s=time.time() - stepped,
            load_s=self.broadcaster.load_seconds(command),
            replicas_acked=float(acked),
            replicas_live=float(live),
        )
        if acked < live:
            logger.warning("version %d of %s reached %d of %d replicas", version, adapter_id, acked, live)
        self.journal.mark(ids, "applied", version=version, metrics=metrics)

    async def _apply_on_tinker(self, batch: list[FeedbackEntry], started: float) -> None:
        """The step and the publish happen on Tinker and in the store; replicas read the new sampler path."""
        ids = [entry.id for entry in batch]
        try:
            async with self._model_lock:
                meta = await asyncio.to_thread(
                    self.tinker.step, batch[0].adapter_id, [entry.example for entry in batch], self._training_config(batch), ids
                )
        except AdapterNotFoundError:
            self.journal.mark(ids, "rejected", reason=f"adapter {batch[0].adapter_id!r} no longer exists")
            return
        except ValueError as exc:
            self.journal.mark(ids, "rejected", reason=str(exc))
            return
        self.steps += 1
        metrics = {**meta.metrics, "queue_s": started - min(entry.created_at for entry in batch)}
        self.journal.mark(ids, "applied", version=meta.version, metrics=metrics)

    async def _sleep_inference(self) -> None:
        if self.config.trainer.colocation == "sleep":
            command = await self.broadcaster.control("sleep", self.config.trainer.sleep_level)
            await self.broadcaster.wait_for_acks(command, self.config.trainer.sleep_timeout_s)

    async def _wake_inference(self) -> None:
        """Always runs after a step, failed or not: a sleeping engine serves nobody."""
        if self.config.trainer.colocation == "sleep":
            command = await self.broadcaster.control("wake")
            await self.broadcaster.wait_for_acks(command, self.config.trainer.sleep_timeout_s)

    # --- calls from the router --------------------------------------------------------------
    async def notify(self) -> None:
        self._wake.set()

    async def init_adapter(self, adapter_id: str, lora: dict[str, Any]) -> AdapterVersionMeta:
        if self.store.exists(adapter_id):
            raise AdapterExistsError(f"adapter {adapter_id!r} already exists")
        async with self._model_lock:
            if self.tinker is not None:
                return await asyncio.to_thread(self.tinker.init_adapter, adapter_id, LoraConfig.model_validate(lora))
            state = await asyncio.to_thread(self.trainer.init_adapter, LoraConfig.model_validate(lora))
        return self.store.create(adapter_id, state)

    async def reset_adapter(self, adapter_id: str, lora: dict[str, Any]) -> AdapterVersionMeta:
        """Re-init of an existing adapter (`router.reinit: reset`): a new zero-effect version, published and
        broadcast like a step's, so the history stays and a rollback can undo it."""
        if self.tinker is not None:
            raise ValueError("resetting an adapter is not supported on Tinker: delete it and init it again")
        async with self._model_lock:
            state = await asyncio.to_thread(self.trainer.init_adapter, LoraConfig.model_validate(lora))
        parent = self.store.latest_version(adapter_id)
        meta = self.store.publish(adapter_id, state, parent, version=self.store.next_version(adapter_id),
                                  note="reset: zero-effect adapter")
        command = await self.broadcaster.publish(adapter_id, meta.version, state.peft_files())
        await self.broadcaster.wait_for_acks(command, self.config.trainer.broadcast_timeout_s)
        self._states[adapter_id] = (meta.version, state)
        return meta

    async def import_adapter(self, adapter_id: str, files: dict[str, bytes]) -> AdapterVersionMeta:
        if self.tinker is not None:
            raise ValueError("adapters trained on Tinker live there: importing weights files is not supported")
        state = AdapterState.from_files(files)
        unserved = sorted(set(state.lora.target_modules) - set(self.config.lora.target_modules))
        if unserved:
            raise ValueError(f"target_modules {unserved}: this server serves LoRA on {self.config.lora.target_modules} only")
        state.base_model = self.config.model.base_model
        state.teacher = {name: tensor.clone() for name, tensor in state.student.items()}
        async with self._model_lock:
            await asyncio.to_thread(self.trainer.check_compatible, state)
        return self.store.create(adapter_id, state, note="imported")

    async def forget_adapter(self, adapter_id: str) -> None:
        """After a delete: drop cached state and the broadcast entry; queued items are rejected at their turn."""
        self._states.pop(adapter_id, None)
        self.broadcaster.forget(adapter_id)

    async def poll(self, replica: str, generation: str | None, cursor: int) -> PollResult:
        return await self.broadcaster.poll(replica, generation, cursor)

    async def ack(self, replica: str, seq: int, load_s: float = 0.0) -> None:
        await self.broadcaster.ack(replica, seq, load_s)

    async def status(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "generation": self.broadcaster.generation,
            "live_replicas": sorted(self.broadcaster.live_replicas()),
        }

    async def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError(f"the training loop stopped: {self._loop.exception()!r}")
