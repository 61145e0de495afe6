"""The inference deployment: one vLLM engine per replica, serving base and adapter versions.

Each replica follows the trainer's adapter feed (`deployments/broadcast.py`), so a new version is
loaded from the object store into vLLM without a restart; versions it has not been sent (it started
later, or the trainer restarted) load on demand from the adapter store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from claas_ray.config import ClaasConfig
from claas_ray.protocol.generation import (
    GenerationDelta,
    GenerationError,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
)
from claas_ray.serving.engine import Engine
from claas_ray.stores import open_store
from deployments.broadcast import AdapterReceiver
from deployments.placement import this_device


def open_engine(config: ClaasConfig, replica: str) -> Engine:
    """The engine `serving.engine` names."""
    store = open_store(config.store)
    if config.serving.engine == "tinker":
        from claas_ray.serving.tinker_engine import TinkerEngine  # needs the `tinker` extra

        return TinkerEngine(config, store, replica=replica)
    from claas_ray.serving.vllm_engine import VllmEngine

    return VllmEngine(config, store, replica=replica)


# A dead engine (`check_health` raises once vLLM's core is gone) must take its replica out of routing within
# seconds: the check is a flag read, so it runs every 2 s.
@serve.deployment(name="inference", max_ongoing_requests=64, health_check_period_s=2, health_check_timeout_s=60)
class InferenceDeployment:
    async def __init__(self, config: dict[str, Any], trainer: DeploymentHandle | None = None):
        self.config = ClaasConfig.model_validate(config)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id if context is not None else "local"
        # Built on the event loop (vLLM's async client binds to it); nothing is served before it exists.
        self.engine: Engine = open_engine(self.config, self.replica)
        self._feed = self._receiver = None
        # On Tinker, versions are sampler paths read from the store on demand: nothing to follow.
        if trainer is not None and self.config.serving.engine != "tinker":
            self._receiver = AdapterReceiver(self.replica, trainer, self.engine, self.config.trainer.sleep_timeout_s,
                                             device=this_device())
            self._feed = asyncio.create_task(self._receiver.run())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta | GenerationError]:
        async for item in self.engine.generate(request):
            yield item

    async def score(self, request: ScoreRequest) -> ScoreResult | GenerationError:
        return await self.engine.score(request)

    async def check_health(self) -> None:
        await self.engine.check_health()
        if self._receiver is not None:
            self._receiver.check()
        if self._feed is not None and self._feed.done():
            raise RuntimeError(f"the adapter feed stopped: {self._feed.exception()!r}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
