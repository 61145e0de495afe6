"""`VllmEngine`: vLLM's AsyncLLM with per-version LoRA requests, speaking our generation protocol (`Engine`).

No Ray here: the Serve deployment wraps this class, and tests or benchmarks can use it bare.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil

from claas_ray.adapters.store import AdapterStore
from claas_ray.config import ClaasConfig
from claas_ray.cpu_cores import available_cores
from claas_ray.lru_map import LruMap
from claas_ray.models.registry import resolve_model_path
from claas_ray.protocol.generation import (
    GenerationDelta,
    GenerationError,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    TokenLogprob,
)
from claas_ray.serving import orphan_reaper
from claas_ray.serving.engine import GenerationInterrupted, admit_generation, admit_score
from claas_ray.serving.lora_versions import LoraVersions

logger = logging.getLogger(__name__)


def engine_args(config: ClaasConfig):
    """AsyncEngineArgs from our config: the one place our knobs meet vLLM's."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    serving = config.serving
    kwargs = dict(
        model=resolve_model_path(config.model.base_model),
        served_model_name=config.served_model_name(),
        enable_lora=True,
        max_loras=serving.max_loras,
        max_cpu_loras=serving.max_cpu_loras,
        max_lora_rank=serving.max_lora_rank,
        # Only the projections adapters train get LoRA layers. Left open, vLLM also wraps lm_head, and its CPU
        # path then applies the head's LoRA with one index per request to every prompt position when prompt
        # log-probs are asked for: two /v1/score requests in one batch killed the engine (einsum size mismatch).
        lora_target_modules=list(config.lora.target_modules),
        max_model_len=config.model.max_model_len,
        gpu_memory_utilization=serving.gpu_memory_utilization,
        enforce_eager=serving.enforce_eager,
        max_num_seqs=serving.max_num_seqs,
        dtype=serving.dtype,
        disable_log_stats=True,
    )
    if config.trainer.colocation == "sleep":
        kwargs["enable_sleep_mode"] = True  # the trainer puts the engine to sleep while it steps
    if serving.kv_cache_memory_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(serving.kv_cache_memory_gb * 2**30)
    kwargs.update(serving.engine_kwargs)
    return AsyncEngineArgs(**kwargs)


KEEP_BROADCAST_VERSIONS = 2
"""Versions of an adapter kept on tmpfs after a broadcast; older ones are read from the store if asked for."""


class VllmEngine:
    """One vLLM engine plus the adapter versions it can serve."""

    def __init__(self, config: ClaasConfig, store: AdapterStore, replica: str = "local"):
        # vLLM's engine <-> worker queues otherwise bind to the machine's external address.
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        if config.serving.cpu_cores is not None:
            # The engine's worker binds its compute threads to these cores (read by vLLM in the process it starts).
            # The replica and the engine's scheduler are not pinned with it: the worker spins on its cores, and a
            # scheduler sharing them starved (a pinned one-core engine stopped answering).
            available_cores(config.serving.cpu_cores, "serving.cpu_cores")
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = config.serving.cpu_cores
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        self.replica = replica
        self.store = store
        # Broadcast adapter versions are written here (tmpfs: RAM), one folder per replica.
        self.scratch = Path(config.trainer.tmpfs_dir) / replica
        self.llm = AsyncLLM.from_engine_args(engine_args(config))
        engine_pids = [child.pid for child in psutil.Process().children(recursive=True)]
        self._reaper = orphan_reaper.start(os.getpid(), engine_pids, [self.scratch])
        self.tokenizer = self.llm.get_tokenizer()
        self.loras = LoraVersions(store.peft_dir, capacity=max(1024, config.serving.max_cpu_loras))
        self.on_tmpfs: LruMap[str, None] = LruMap(config.serving.max_tmpfs_adapters)  # adapters with versions there

    def _sampling_params(self, request: GenerationRequest, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logprobs=request.top_logprobs,  # 0 still returns the sampled token's log-prob, which feedback needs
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta | GenerationError]:
        """Stream deltas; a request that cannot run yields one GenerationError and nothing else."""
        admitted = await admit_generation(self.tokenizer, request, self.config.model.max_model_len, self.loras.cached,
                                          self.loras.request_for)
        if isinstance(admitted, GenerationError):
            yield admitted
            return
        prompt_ids, max_tokens, lora = admitted
        async for output in self.llm.generate(
            {"prompt_token_ids": prompt_ids},
            self._sampling_params(request, max_tokens),
            request.request_id,
            lora_request=lora,
        ):
            completion = output.outputs[0]
            finish = None
            if output.finished:
                if completion.finish_reason in ("abort", "error"):
                    # Never a `stop`: the answer was cut off, and a client, the completion log and training data
                    # would take it for a whole one.
                    raise GenerationInterrupted(f"the engine ended the answer early ({completion.finish_reason})")
                finish = "length" if completion.finish_reason == "length" else "stop"
            yield GenerationDelta(
                text=completion.text,
                token_ids=list(completion.token_ids),
                logprobs=self._logprobs(completion, request.top_logprobs),
                finish_reason=finish,
                prompt_token_ids=prompt_ids if output.finished else None,
                replica=self.replica,
                adapter_version=request.adapter_version,
            )

    async def score(self, request: ScoreRequest) -> ScoreResult | GenerationError:
        """Teacher-forced log-probs of `completion` (vLLM's prompt log-probs over prompt + completion)."""
        from vllm import SamplingParams

        admitted = await admit_score(self.tokenizer, request, self.config.model.max_model_len, self.loras.cached,
                                     self.loras.request_for)
        if isinstance(admitted, GenerationError):
            return admitted
        prompt_ids, completion_ids, lora = admitted
        final = None
        async for output in self.llm.generate(
            {"prompt_token_ids": prompt_ids + completion_ids},
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
            request.request_id,
            lora_request=lora,
        ):
            final = output
        scored = final.prompt_logprobs[len(prompt_ids):]
        return ScoreResult(
            token_ids=completion_ids,
            tokens=[entries[token].decoded_token or "" for token, entries in zip(completion_ids, scored)],
            logprobs=[entries[token].logprob for token, entries in zip(completion_ids, scored)],
            prompt_tokens=len(prompt_ids),
            replica=self.replica,
        )

    @staticmethod
    def _logprobs(completion, top_k: int) -> list[TokenLogprob]:
        """The sampled token's log-prob always; the top-k alternatives only when asked for."""
        if not completion.logprobs:
            return []
        result = []
        for token_id, entries in zip(completion.token_ids, completion.logprobs):
            chosen = entries[token_id]
            top = sorted(
                ((entry.decoded_token or "", entry.logprob) for entry in entries.values() if entry.rank <= top_k),
                key=lambda item: -item[1],
            )
            result.append(
                TokenLogprob(token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob, top=top)
            )
        return result

    async def load_version(self, adapter_id: str, version: int, files: dict[str, bytes]) -> None:
        """Write the files to tmpfs (RAM) and load them into vLLM; keep the newest few versions of the most recently
        loaded adapters there (`serving.max_tmpfs_adapters`): the others are read from the store if asked for."""
        folder = await asyncio.to_thread(self._materialise, adapter_id, version, files)
        self.loras.register_path(adapter_id, version, folder)
        await self.llm.add_lora(self.loras.request_for(adapter_id, version))
        evicted = [gone for gone, _ in self.on_tmpfs.put(adapter_id, None)]
        await asyncio.to_thread(self._prune_tmpfs, adapter_id, version, evicted)

    def _prune_tmpfs(self, adapter_id: str, version: int, evicted: list[str]) -> None:
        """Remove the adapter's versions older than the newest few, and every version of the evicted adapters
        (forgotten first, so no request resolves a folder being removed)."""
        stale = [(adapter_id, old) for old in self._versions_on_tmpfs(adapter_id)
                 if old <= version - KEEP_BROADCAST_VERSIONS]
        stale += [(gone, old) for gone in evicted for old in self._versions_on_tmpfs(gone)]
        for stale_id, old in stale:
            self.loras.forget(stale_id, old)
        for stale_id, old in stale:
            shutil.rmtree(self.scratch / stale_id / str(old), ignore_errors=True)
        for gone in evicted:
            shutil.rmtree(self.scratch / gone, ignore_errors=True)

    def _versions_on_tmpfs(self, adapter_id: str) -> list[int]:
        folder = self.scratch / adapter_id
        return [int(entry.name) for entry in folder.iterdir() if entry.name.isdigit()] if folder.is_dir() else []

    def _materialise(self, adapter_id: str, version: int, files: dict[str, bytes]) -> Path:
        folder = self.scratch / adapter_id / str(version)
        staging = folder.with_name(f".{version}-{uuid.uuid4().hex}")
        staging.mkdir(parents=True)
        for name, data in files.items():
            (staging / name).write_bytes(data)
        staging.rename(folder) if not folder.exists() else shutil.rmtree(staging)
        return folder

    async def sleep(self, level: int) -> None:
        """Answers in flight finish (`wait`) or are frozen until wake (`keep`); never aborted (vLLM's default)."""
        await self.llm.sleep(level=level, mode=self.config.trainer.sleep_mode)

    async def wake(self) -> None:
        await self.llm.wake_up()

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
        shutil.rmtree(self.scratch, ignore_errors=True)
