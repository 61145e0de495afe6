"""The inference deployment: one vLLM engine per replica, serving base and adapter versions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from claas_ray.adapters.store import open_store
from claas_ray.config import ClaasConfig
from claas_ray.protocol.generation import GenerationDelta, GenerationError, GenerationRequest
from claas_ray.serving.engine import InferenceEngine


@serve.deployment(name="inference", max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=60)
class InferenceDeployment:
    def __init__(self, config: dict[str, Any]):
        self.config = ClaasConfig.model_validate(config)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id if context is not None else "local"
        self.engine = InferenceEngine(self.config, open_store(self.config.store), replica=self.replica)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta | GenerationError]:
        async for item in self.engine.generate(request):
            yield item

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
