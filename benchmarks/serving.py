"""Serving throughput and latency: our endpoint against the bare vLLM engine, in one run.

Phases, one after another on the same machine:
  1. bare `AsyncLLM` built from the same engine arguments the app uses;
  2. the app (Ray Serve, one inference replica, configs/local.yaml) through HTTP with the `openai`
     client, base model; 3. the same through an adapter (LoRA path).
Each phase runs 1 stream and 8 concurrent streams of greedy chat requests. Prints JSON; the tracked
figures are `ratio.endpoint_vs_bare_*` (target >= 0.9) and `ratio.adapter_vs_base_*`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the JSON report

PROMPTS = [
    "Describe a rainy afternoon in a small town.",
    "Explain how a bicycle works.",
    "Write a short note to a friend about a trip.",
    "What makes a good breakfast?",
    "Tell me about the moon.",
    "How do plants grow?",
    "Describe your favourite book.",
    "Why do people like music?",
]


def summarise(latencies: list[float], tokens: int, wall: float) -> dict:
    ordered = sorted(latencies)
    p99_index = min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))
    return {
        "requests": len(ordered),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": statistics.median(ordered),
        "p99_latency_s": ordered[p99_index],
    }


async def run_load(call, concurrency: int, requests: int) -> dict:
    """`call(prompt) -> completion tokens`; `concurrency` workers share `requests` calls."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(PROMPTS[index % len(PROMPTS)])
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            started = time.perf_counter()
            produced = await call(prompt)  # not `tokens += await ...`: that reads `tokens` before awaiting
            latencies.append(time.perf_counter() - started)
            tokens += produced

    wall_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarise(latencies, tokens, time.perf_counter() - wall_start)


async def bare_engine_phase(config, max_tokens: int, loads: list[tuple[int, int]]) -> dict:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from claas_ray.chat import ChatMessage, render_prompt_ids
    from claas_ray.serving.vllm_engine import engine_args

    llm = AsyncLLM.from_engine_args(engine_args(config))
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    async def call(prompt: str) -> int:
        ids = render_prompt_ids(tokenizer, [ChatMessage(role="user", content=prompt)])
        final = None
        async for output in llm.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
            final = output
        return len(final.outputs[0].token_ids)

    await call(PROMPTS[0])  # warm-up
    results = {f"c{c}": await run_load(call, c, n) for c, n in loads}
    llm.shutdown()
    return results


async def endpoint_phase(base_url: str, model: str, max_tokens: int, loads: list[tuple[int, int]]) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    async def call(prompt: str) -> int:
        response = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        return response.usage.completion_tokens

    await call(PROMPTS[0])  # warm-up (and, for an adapter, its first load)
    return {f"c{c}": await run_load(call, c, n) for c, n in loads}


def make_adapter(store_root: Path, adapter_id: str) -> None:
    from claas_ray.adapters import LocalAdapterStore
    from claas_ray.config import LoraConfig, ModelConfig
    from claas_ray.training import SDPOTrainer

    trainer = SDPOTrainer(ModelConfig())
    state = trainer.init_adapter(LoraConfig())
    LocalAdapterStore(store_root).create(adapter_id, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--single-requests", type=int, default=8)
    parser.add_argument("--concurrent-requests", type=int, default=32)
    args = parser.parse_args()
    loads = [(1, args.single_requests), (8, args.concurrent_requests)]

    from local_app import LocalApp

    from claas_ray.config import load_config

    app = LocalApp()
    config = load_config(app.args)

    report: dict = {"benchmark": "serving", "model": config.model.base_model, "max_tokens": args.max_tokens}
    report["bare_engine"] = asyncio.run(bare_engine_phase(config, args.max_tokens, loads))

    make_adapter(app.workdir / "adapters", "bench/adapter")
    with app.serving(port_base=18000) as base:
        url = f"{base}/v1"
        report["endpoint"] = asyncio.run(endpoint_phase(url, config.served_model_name(), args.max_tokens, loads))
        report["endpoint_adapter"] = asyncio.run(endpoint_phase(url, "bench/adapter", args.max_tokens, loads))

    ratio = {}
    for load in ("c1", "c8"):
        ratio[f"endpoint_vs_bare_tokens_per_s_{load}"] = (
            report["endpoint"][load]["tokens_per_s"] / report["bare_engine"][load]["tokens_per_s"]
        )
        ratio[f"endpoint_vs_bare_p50_latency_{load}"] = (
            report["endpoint"][load]["p50_latency_s"] / report["bare_engine"][load]["p50_latency_s"]
        )
        ratio[f"adapter_vs_base_tokens_per_s_{load}"] = (
            report["endpoint_adapter"][load]["tokens_per_s"] / report["endpoint"][load]["tokens_per_s"]
        )
    report["ratio"] = ratio
    report["target"] = {"endpoint_vs_bare_tokens_per_s": 0.9}
    report["meets_target"] = all(ratio[f"endpoint_vs_bare_tokens_per_s_{load}"] >= 0.9 for load in ("c1", "c8"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
