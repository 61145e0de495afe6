"""`TinkerEngine`: the inference replica's engine when Tinker samples (`serving.engine: tinker`).

No local model: each (adapter, version) is a Tinker sampling client for the sampler path that
`TinkerAdapterStore` names, so a version the trainer publishes is served as soon as the router names it;
nothing is broadcast or loaded. Streaming requests get the whole answer as one delta (Tinker's sampler
returns finished sequences); presence and frequency penalties are not available on Tinker and are ignored.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from claas_ray.backends.tinker import sdk
from claas_ray.backends.tinker.store import TinkerAdapterStore
from claas_ray.backends.tinker.trainer import connect_service
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
    def __init__(self, config: ClaasConfig, store: TinkerAdapterStore, replica: str = "local", service: Any = None):
        self.config = config
        self.store = store
        self.replica = replica
        self.service = service if service is not None else connect_service(config)
        self._base = sdk.sampling_client(self.service, base_model=config.tinker_base_model())
        self.tokenizer = self._base.get_tokenizer()
        self._samplers: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def _sampler(self, request: GenerationRequest | ScoreRequest) -> Any:
        if request.adapter_id is None or request.adapter_version is None:
            return self._base
        key = (request.adapter_id, request.adapter_version)
        if key not in self._samplers:
            path = self.store.checkpoint(*key).sampler_path
            self._samplers[key] = sdk.sampling_client(self.service, model_path=path)
            while len(self._samplers) > self.config.serving.max_cpu_loras:
                self._samplers.popitem(last=False)
        self._samplers.move_to_end(key)
        return self._samplers[key]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta | GenerationError]:
        admitted = admit_generation(self.tokenizer, request, self.config.model.max_model_len, self._sampler)
        if isinstance(admitted, GenerationError):
            yield admitted
            return
        prompt_ids, max_tokens, sampler = admitted
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
        admitted = admit_score(self.tokenizer, request, self.config.model.max_model_len, self._sampler)
        if isinstance(admitted, GenerationError):
            return admitted
        prompt_ids, completion_ids, sampler = admitted
        logprobs = await asyncio.to_thread(sdk.response_logprobs, sampler, prompt_ids, completion_ids)
        return ScoreResult(
            token_ids=completion_ids, tokens=[self.tokenizer.decode([t]) for t in completion_ids], logprobs=logprobs,
            prompt_tokens=len(prompt_ids), replica=self.replica,
        )

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None
