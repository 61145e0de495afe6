"""`TrainerLoop`: the feedback journal in, published and broadcast adapter versions out.

The loop that matters most, in the order an item lives it:

1. `recover` (at start): items a crash caught in `training` are applied if a published version names them
   (the step finished, the acknowledgement did not), rejected after `MAX_ATTEMPTS` starts (an item that
   kills the trainer must not crash-loop it), else queued again.
2. claim: the queued items of the adapter whose oldest item waits longest, in order, one set of training
   settings per batch (`FeedbackJournal.claim`), marked `training` (an attempt) in the same transaction.
3. step: the `StepBackend` runs one guarded SDPO step and publishes the version, naming the feedback ids,
   or says why not. On a shared accelerator the replicas sleep meanwhile.
4. hand-off: the published version goes to every inference replica (`Replicas.deliver`).
5. acknowledge: only then are the items marked `applied`, with the step's metrics.

A crash anywhere in between is recovered by 1 with each item applied exactly once. No Ray here: the Serve
deployment (`deployments/trainer.py`) wires a journal, a store, a backend and the broadcast to this class,
and the unit tests wire fakes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from claas_ray.adapters.store import AdapterNotFoundError, AdapterStore, AdapterVersionMeta
from claas_ray.backends.step_backend import PublishedVersion, StepBackend
from claas_ray.config import ClaasConfig, LoraConfig, TrainingConfig
from claas_ray.feedback.journal import FeedbackEntry, FeedbackJournal, Status

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Steps started on one item before it is given up: an item that kills the trainer must not crash-loop it."""


@dataclass
class Delivery:
    """How far a version got: replicas that loaded it of those live, and the slowest one's load time."""

    acked: int
    live: int
    load_s: float = 0.0


class ReplicasUnavailable(RuntimeError):
    """Replicas did not do what a step needs of them in time (release a shared GPU): the step does not run."""


class Replicas(Protocol):
    """The inference replicas, as the trainer loop sees them."""

    async def ready(self) -> None:
        """Wait (bounded) until the replicas follow this trainer, so the first version reaches them."""

    async def pause(self) -> None:
        """Release the shared accelerator for a step (vLLM sleeps); raises `ReplicasUnavailable` when a live
        replica did not."""

    async def resume(self) -> None:
        """Take it back; runs after every paused step, failed or not."""

    async def deliver(self, version: PublishedVersion) -> Delivery:
        """Load a published version on every live replica; returns once they did or the wait timed out."""

    def forget(self, adapter_id: str) -> None:
        """The adapter was deleted: replicas that join later are not sent it."""


class TrainerLoop:
    """Claims batches, steps, publishes, hands off, acknowledges; and the adapter lifecycle that needs the model."""

    def __init__(self, config: ClaasConfig, journal: FeedbackJournal, store: AdapterStore, backend: StepBackend,
                 replicas: Replicas):
        self.config = config
        self.journal = journal
        self.store = store
        self.backend = backend
        self.replicas = replicas
        self.steps = 0
        self._model = asyncio.Lock()  # one model, one user at a time: steps, inits, resets, imports
        # Backend calls run on one thread of their own, at a lower CPU priority (its torch threads inherit it).
        self._thread = ThreadPoolExecutor(1, "sdpo-step", initializer=os.nice, initargs=(config.trainer.cpu_niceness,))
        self._wake = asyncio.Event()

    # --- recovery ---------------------------------------------------------------------------------
    def recover(self) -> None:
        """Items caught mid-step by a crash: applied if a published version names them, rejected after
        `MAX_ATTEMPTS` starts, else queued again."""
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

    # --- the loop ---------------------------------------------------------------------------------
    def notify(self) -> None:
        """New items were queued: look now instead of at the next idle tick."""
        self._wake.set()

    async def run(self) -> None:
        await self.replicas.ready()
        while True:
            self._wake.clear()  # before looking: a notify during the look is not lost
            if not await self.run_once():
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass

    async def run_once(self) -> bool:
        """Claim and apply one batch; False when nothing was queued."""
        batch = await asyncio.to_thread(self.journal.claim, self.config.trainer.max_batch_items)
        if not batch:
            return False
        try:
            await self._apply(batch)
        except Exception as exc:
            logger.exception("step for %s failed", batch[0].adapter_id)
            await self._mark(batch, "rejected", reason=f"internal error: {type(exc).__name__}: {exc}")
        return True

    async def _apply(self, batch: list[FeedbackEntry]) -> None:
        started = time.time()
        try:
            outcome = await self._with_model(
                self.backend.step, batch[0].adapter_id, [entry.example for entry in batch], self._training_config(batch),
                [entry.id for entry in batch], pause=True,
            )
        except AdapterNotFoundError:
            return await self._mark(batch, "rejected", reason=f"adapter {batch[0].adapter_id!r} no longer exists")
        except (ValueError, ReplicasUnavailable) as exc:  # e.g. an example longer than the context
            return await self._mark(batch, "rejected", reason=str(exc))
        stepped = time.time()
        metrics = {**outcome.metrics, "queue_s": started - min(entry.created_at for entry in batch),
                   "train_s": stepped - started}
        if outcome.published is None:
            return await self._mark(batch, "rejected", metrics=metrics, reason=outcome.reason)
        published = outcome.published
        lagging = None
        if published.files is not None:
            delivery = await self.replicas.deliver(published)
            metrics.update(broadcast_s=time.time() - stepped, load_s=delivery.load_s,
                           replicas_acked=float(delivery.acked), replicas_live=float(delivery.live))
            if delivery.acked < delivery.live:
                # Applied (the version is published and is what the router now serves), but said on the item:
                # the replicas that did not acknowledge it load it from the store when it is first asked for.
                lagging = (f"version {published.meta.version} reached {delivery.acked} of {delivery.live} inference "
                           f"replicas within {self.config.trainer.broadcast_timeout_s:.0f}s; the others load it from "
                           "the adapter store on first use")
                logger.warning("%s: %s", published.meta.adapter_id, lagging)
        self.steps += 1
        await self._mark(batch, "applied", version=published.meta.version, metrics=metrics, reason=lagging)

    def _training_config(self, batch: list[FeedbackEntry]) -> TrainingConfig:
        """The server's settings, with those the batch's items asked for (validated and allowed by the router)."""
        settings = batch[0].example.training_settings  # one set per batch (FeedbackJournal.claim)
        return self.config.training.model_copy(update=settings) if settings else self.config.training

    async def _mark(self, batch: list[FeedbackEntry], status: Status, **fields) -> None:
        await asyncio.to_thread(self.journal.mark, [entry.id for entry in batch], status, **fields)

    async def _with_model(self, call, *args, pause: bool = False):
        """Run a blocking backend call on the step thread, alone on the model; on a shared accelerator the replicas
        sleep meanwhile (steps only: a lifecycle call is short)."""
        pause = pause and self.backend.colocated and self.config.trainer.colocation == "sleep"
        async with self._model:
            try:
                if pause:
                    await self.replicas.pause()
                return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)
            finally:
                if pause:  # also after a pause that failed part-way: the replicas that slept must wake
                    await self.replicas.resume()

    # --- the adapter lifecycle ----------------------------------------------------------------------
    async def init_adapter(self, adapter_id: str, lora: LoraConfig) -> AdapterVersionMeta:
        """Version 0; replicas load it from the store when it is first asked for."""
        return (await self._with_model(self.backend.init_adapter, adapter_id, lora)).meta

    async def reset_adapter(self, adapter_id: str, lora: LoraConfig) -> AdapterVersionMeta:
        """A new zero-effect version, published and handed off like a step's, so a rollback can undo it."""
        published = await self._with_model(self.backend.reset_adapter, adapter_id, lora)
        if published.files is not None:
            await self.replicas.deliver(published)
        return published.meta

    async def import_adapter(self, adapter_id: str, files: dict[str, bytes]) -> AdapterVersionMeta:
        return (await self._with_model(self.backend.import_adapter, adapter_id, files)).meta

    def forget_adapter(self, adapter_id: str) -> None:
        """After a delete; its queued items are rejected at their turn (the store no longer has it)."""
        self.backend.forget(adapter_id)
        self.replicas.forget(adapter_id)

