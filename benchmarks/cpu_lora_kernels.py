"""Serving through an adapter on vLLM's CPU build: our grouped LoRA kernels against vLLM's own torch ops, in one run.

Each variant builds vLLM's `AsyncLLM` from configs/local.yaml's engine arguments in a child process; the baseline
runs with vLLM's general plugins off (`VLLM_PLUGINS=""`), so vLLM's `torch_ops` serve the adapter. Each measures
the base model and a zero-effect adapter of the largest rank the engine admits on: a long prompt (prefill,
`--prompt-tokens`, as an agent's context) and a short one decoded for `--decode-tokens`. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from engine_memory import adapter_folder, config_with, in_child

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the JSON report


def _measure(plugins: str | None, folder: str, prompt_tokens: int, decode_tokens: int, queue) -> None:
    import asyncio

    if plugins is not None:
        os.environ["VLLM_PLUGINS"] = plugins
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from claas_ray.serving.vllm_engine import engine_args

    config = config_with({})

    async def run() -> dict:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(engine_args(config))
        adapter = LoRARequest("bench", 1, folder)
        long_prompt = " ".join(f"Fact {i}: the sky was clear." for i in range(prompt_tokens // 9))
        counter = iter(range(10**6))

        async def timed(prompt: str, max_tokens: int, lora) -> tuple[float, int, int]:
            started = time.perf_counter()
            async for output in llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                     ignore_eos=True), f"r{next(counter)}",
                                             lora_request=lora):
                pass
            return time.perf_counter() - started, len(output.prompt_token_ids), len(output.outputs[0].token_ids)

        await timed("Hello", 4, adapter)  # warm-up and the adapter's first load
        result = {}
        for name, lora in (("base", None), ("adapter", adapter)):
            # A fresh prefix each time: vLLM's prefix cache must not answer the prefill.
            prefill_s, prompt_len, _ = await timed(f"{name} {time.time()} {long_prompt}", 1, lora)
            decode_s, _, produced = await timed("Tell me about dogs.", decode_tokens, lora)
            result[name] = {"prefill_s": round(prefill_s, 3), "prompt_tokens": prompt_len,
                            "decode_tokens_per_s": round(produced / decode_s, 2)}
        llm.shutdown()
        return result

    queue.put(asyncio.run(run()))


def measure(plugins: str | None, folder: str, prompt_tokens: int, decode_tokens: int) -> dict:
    return in_child(_measure, plugins, folder, prompt_tokens, decode_tokens, timeout_s=1800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=48)
    args = parser.parse_args()
    folder = str(adapter_folder(config_with({}).serving.max_lora_rank))
    report: dict = {"benchmark": "cpu_lora_kernels", "prompt_tokens": args.prompt_tokens,
                    "decode_tokens": args.decode_tokens}
    report["vllm_torch_ops"] = measure("", folder, args.prompt_tokens, args.decode_tokens)  # the baseline
    report["grouped_kernels"] = measure(None, folder, args.prompt_tokens, args.decode_tokens)
    ratio = {}
    for variant in ("vllm_torch_ops", "grouped_kernels"):
        base, adapter = report[variant]["base"], report[variant]["adapter"]
        ratio[f"{variant}_adapter_vs_base_prefill_time"] = round(adapter["prefill_s"] / base["prefill_s"], 2)
        ratio[f"{variant}_adapter_vs_base_decode_tokens_per_s"] = round(
            adapter["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
    ratio["adapter_prefill_speedup"] = round(report["vllm_torch_ops"]["adapter"]["prefill_s"]
                                             / report["grouped_kernels"]["adapter"]["prefill_s"], 2)
    ratio["adapter_decode_speedup"] = round(report["grouped_kernels"]["adapter"]["decode_tokens_per_s"]
                                            / report["vllm_torch_ops"]["adapter"]["decode_tokens_per_s"], 2)
    report["ratio"] = ratio
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
