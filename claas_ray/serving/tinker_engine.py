"""`TinkerEngine`: the inference replica's engine when Tinker samples (`serving.engine: tinker`).

No local model: each (adapter, version) is a Tinker sampling client for the sampler path that
`TinkerAdapterStore` names, so a version the trainer publishes is served as soon as the router names it;
nothing is broadcast or loaded. Streaming requests get the whole answer as one delta (Tinker's sampler
returns finished sequences); presence and frequency penalties are not available on Tinker and are ignored.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from claas_ray.backends.tinker import sdk
from claas_ray.backends.tinker.store import TinkerAdapterStore
from claas_ray.config import ClaasConfig
from claas_ray.protocol.generation import (
    GenerationDelta,
    GenerationError,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    TokenLogprob,
)
from claas_ray.serving.engine import admit_generation, admit_score


class TinkerEngine:
    """An `Engine` whose model is on Tinker: there is nothing to load, and nothing to put to sleep."""

    def __init__(self, config: ClaasConfig, store: TinkerAdapterStore, replica: str = "local", service: Any = None):
        self.config = config
        self.store = store
        self.replica = replica
        self.service = service if service is not None else sdk.connect_service(config)
        self._base = sdk.sampling_client(self.service, base_model=config.tinker_base_model())
        self.tokenizer = self._base.get_tokenizer()
        self._samplers: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, adapter_id: str, version: int) -> Any | None:
        with self._lock:
            sampler = self._samplers.get((adapter_id, version))
            if sampler is not None:
                self._samplers.move_to_end((adapter_id, version))
            return sampler

    def _open(self, adapter_id: str, version: int) -> Any:
        """A sampling client for the version's sampler path (reads the store, may call Tinker: in a thread)."""
        sampler = sdk.sampling_client(self.service, model_path=self.store.checkpoint(adapter_id, version).sampler_path)
        with self._lock:
            self._samplers[(adapter_id, version)] = sampler
            while len(self._samplers) > self.config.serving.max_cpu_loras:
                self._samplers.popitem(last=False)
        return sampler

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta | GenerationError]:
        admitted = await admit_generation(self.tokenizer, request, self.config.model.max_model_len, self._cached, self._open)
        if isinstance(admitted, GenerationError):
            yield admitted
            return
        prompt_ids, max_tokens, sampler = admitted
        sampler = sampler or self._base
        params = sdk.sampling_params(max_tokens, request.temperature, request.seed, request.stop, request.top_p)
        tokens, logprobs, reason = await asyncio.to_thread(sdk.sample, sampler, prompt_ids, params)
        yield GenerationDelta(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            token_ids=tokens,
            logprobs=[TokenLogprob(token_id=t, token=self.tokenizer.decode([t]), logprob=lp) for t, lp in zip(tokens, logprobs)],
            finish_reason="length" if reason == "length" else "stop",
            prompt_token_ids=prompt_ids,
            replica=self.replica,
            adapter_version=request.adapter_version,
        )

    async def score(self, request: ScoreRequest) -> ScoreResult | GenerationError:
        admitted = await admit_score(self.tokenizer, request, self.config.model.max_model_len, self._cached, self._open)
        if isinstance(admitted, GenerationError):
            return admitted
        prompt_ids, completion_ids, sampler = admitted
        sampler = sampler or self._base
        logprobs = await asyncio.to_thread(sdk.response_logprobs, sampler, prompt_ids, completion_ids)
        return ScoreResult(
            token_ids=completion_ids, tokens=[self.tokenizer.decode([t]) for t in completion_ids], logprobs=logprobs,
            prompt_tokens=len(prompt_ids), replica=self.replica,
        )

    async def load_version(self, adapter_id: str, version: int, files: dict[str, bytes]) -> None:
        await asyncio.to_thread(self._open, adapter_id, version)  # the sampler is ready before the first request

    async def sleep(self, level: int) -> None:
        return None

    async def wake(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None
