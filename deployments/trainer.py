"""The trainer deployment: Serve's wiring around `TrainerLoop` (`claas_ray/training/worker.py`).

One replica: a named Ray actor that Serve restarts if it dies. It opens the journal, the store and the step
backend the config names, hands versions to the inference replicas through the broadcast feed
(`deployments/broadcast.py`), and answers the router's lifecycle calls and the replicas' polls.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from ray import serve

from claas_ray.adapters.store import AdapterExistsError, AdapterVersionMeta
from claas_ray.backends import open_step_backend
from claas_ray.config import ClaasConfig, LoraConfig
from claas_ray.cpu_cores import available_cores, pin_process
from claas_ray.feedback.journal import FeedbackJournal
from claas_ray.sql_database import open_database
from claas_ray.stores import open_store
from claas_ray.training.worker import TrainerLoop
from deployments.broadcast import AdapterBroadcaster, BroadcastReplicas, PollResult
from deployments.placement import Device, this_device


@serve.deployment(name="trainer", num_replicas=1, max_ongoing_requests=1000, health_check_period_s=10, health_check_timeout_s=120)
class TrainerDeployment:
    async def __init__(self, config: dict[str, Any]):
        self.config = ClaasConfig.model_validate(config)
        settings = self.config.trainer
        if settings.cpu_cores is not None:
            pin_process(available_cores(settings.cpu_cores, "trainer.cpu_cores"))
        threads = settings.step_threads()
        if threads is not None:
            # Ray gives an actor as many threads as CPUs it reserved. On the CPU build, vLLM spins on
            # the core it binds to, so more threads than free cores make a step slower, not faster.
            torch.set_num_threads(threads)
        if 0 < settings.num_gpus < 1 and torch.cuda.is_available():
            # Its share of a GPU it shares with vLLM, enforced: Ray's fractions are bookkeeping only, and a step
            # that grew past them would take the memory vLLM needs to wake. (Ray shows the actor its GPU as 0.)
            torch.cuda.set_per_process_memory_fraction(settings.num_gpus, 0)
        self.store = open_store(self.config.store)
        self.broadcaster = AdapterBroadcaster(poll_timeout_s=self.config.trainer.poll_timeout_s,
                                              pinned_adapters=self.config.trainer.max_broadcast_adapters)
        backend = await asyncio.to_thread(open_step_backend, self.config, self.store)  # loads the model
        # Replicas that sample on Tinker read versions from the store: nobody follows the feed.
        followers = 0 if self.config.serving.engine == "tinker" else self.config.serving.num_replicas
        self.loop = TrainerLoop(
            self.config, FeedbackJournal(open_database(self.config, "feedback.sqlite", "FULL")), self.store, backend,
            BroadcastReplicas(self.broadcaster, self.config.trainer, followers, device=this_device()),
        )
        await asyncio.to_thread(self.loop.recover)
        self._running = asyncio.create_task(self.loop.run())

    # --- calls from the router ----------------------------------------------------------------------
    async def notify(self) -> None:
        self.loop.notify()

    async def init_adapter(self, adapter_id: str, lora: dict[str, Any]) -> AdapterVersionMeta:
        if await asyncio.to_thread(self.store.exists, adapter_id):
            raise AdapterExistsError(f"adapter {adapter_id!r} already exists")
        return await self.loop.init_adapter(adapter_id, LoraConfig.model_validate(lora))

    async def reset_adapter(self, adapter_id: str, lora: dict[str, Any]) -> AdapterVersionMeta:
        return await self.loop.reset_adapter(adapter_id, LoraConfig.model_validate(lora))

    async def import_adapter(self, adapter_id: str, files: dict[str, bytes]) -> AdapterVersionMeta:
        return await self.loop.import_adapter(adapter_id, files)

    async def forget_adapter(self, adapter_id: str) -> None:
        self.loop.forget_adapter(adapter_id)

    # --- calls from the inference replicas ------------------------------------------------------------
    async def poll(self, replica: str, generation: str | None, cursor: int, device: Device | None = None) -> PollResult:
        return await self.broadcaster.poll(replica, generation, cursor, device)

    async def ack(self, replica: str, seq: int, load_s: float = 0.0) -> None:
        await self.broadcaster.ack(replica, seq, load_s)

    async def check_health(self) -> None:
        if self._running.done():
            raise RuntimeError(f"the training loop stopped: {self._running.exception()!r}")
