"""Memory of one inference engine with configs/local.yaml's context and LoRA rank, against the earlier
defaults (2,048 tokens, rank 16), in one run (issue 16: "measure the memory this costs").

Each variant builds vLLM's `AsyncLLM` from the app's own engine arguments in a child process, loads an
adapter of the largest rank it accepts, answers one request through it, and reports the resident memory of
the engine-core process (where the weights, the KV cache and the LoRA slots live) and of the front end.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the JSON report

ROOT = Path(__file__).resolve().parents[1]


def config_with(overrides: dict):
    from claas_ray.config import ClaasConfig

    args = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())["applications"][0]["args"]
    for section, values in overrides.items():
        args[section] = {**args.get(section, {}), **values}
    return ClaasConfig.model_validate(args)


def adapter_folder(rank: int) -> Path:
    """An adapter of this rank as the trainer writes it (made here, so no variant's process holds the trainer)."""
    from claas_ray.config import LoraConfig, ModelConfig
    from claas_ray.training import SDPOTrainer

    state = SDPOTrainer(ModelConfig()).init_adapter(LoraConfig(rank=rank, alpha=2 * rank))
    folder = Path(tempfile.mkdtemp(prefix=f"claas-ray-memory-r{rank}-"))
    for name, data in state.peft_files().items():
        (folder / name).write_bytes(data)
    return folder


def _measure(overrides: dict, folder: str, queue) -> None:
    import asyncio

    import psutil

    from claas_ray.serving.vllm_engine import engine_args

    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    config = config_with(overrides)
    rank = config.serving.max_lora_rank

    async def run() -> dict:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(engine_args(config))
        async for _ in llm.generate("Hello, how are you?", SamplingParams(max_tokens=8), "warm",
                                    lora_request=LoRARequest("bench", 1, str(folder))):
            pass
        me = psutil.Process()
        engine = sum(child.memory_info().rss for child in me.children(recursive=True))
        result = {"max_model_len": config.model.max_model_len, "max_lora_rank": rank,
                  "engine_core_rss_mb": engine / 2**20, "front_end_rss_mb": me.memory_info().rss / 2**20}
        llm.shutdown()
        return result

    queue.put(asyncio.run(run()))


def in_child(target, *args, timeout_s: float = 900):
    """`target(*args, queue)` in a fresh (spawned) process; returns what it put on the queue. Each variant gets an
    engine, and a memory footprint, of its own."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get(timeout=timeout_s)
    process.join(timeout=120)
    return result


def measure(overrides: dict) -> dict:
    """One variant in its own process: the largest-rank adapter it accepts, one request, then its memory."""
    folder = adapter_folder(config_with(overrides).serving.max_lora_rank)
    return in_child(_measure, overrides, str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    baseline = measure({"model": {"max_model_len": 2048}, "serving": {"max_lora_rank": 16}})
    shipped = measure({})
    print(json.dumps({
        "baseline_2048_rank16": baseline,
        "local_yaml": shipped,
        "delta_engine_core_mb": shipped["engine_core_rss_mb"] - baseline["engine_core_rss_mb"],
        "delta_front_end_mb": shipped["front_end_rss_mb"] - baseline["front_end_rss_mb"],
    }, indent=2))


if __name__ == "__main__":
    main()
