"""Feedback-to-served latency: POST /v1/feedback until the first completion from the new version.

Runs the app (configs/local.yaml, one inference replica) in a local Ray cluster, then for each round:
chat with the adapter, send feedback on that completion, wait until it is applied (every replica has the
new version), and ask once more (a 1-token chat, checked to come from the new version). The split (queue, train, publish, broadcast, load) comes from the feedback's
own metrics. The baseline, in the same run after the app is gone: the bare `SDPOTrainer.step` on the
very same examples, with the thread count the trainer actor gets (Ray gives an actor one thread per
reserved CPU), and for reference with every core. Prints JSON; the tracked figure is `ratio.end_to_end_vs_bare_step` (target <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

PROMPTS = ["Tell me about dogs.", "Describe the sea.", "What is a good breakfast?", "Explain rain.", "Why do cats purr?"]
FEEDBACK = "Answer in one short sentence."  # a preference the embedded model learns cleanly (French trips the collapse guard)
POLL_INTERVAL_S = 0.25
"""Between looks at the feedback's status: the figure's resolution."""


def end_to_end_phase(base: str, rounds: int, max_tokens: int) -> tuple[list[dict], list[str]]:
    import httpx

    client = httpx.Client(base_url=base, timeout=600)
    assert client.post("/v1/lora/init", json={"lora_id": "bench/latency"}).status_code == 201
    results, completion_ids = [], []
    for index in range(rounds):
        messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
        chat = client.post("/v1/chat/completions", json={"model": "bench/latency", "messages": messages, "max_tokens": max_tokens, "temperature": 0}).json()
        completion_ids.append(chat["id"])
        old_version = chat["claas"]["adapter_version"]
        started = time.perf_counter()
        accepted = client.post("/v1/feedback", json={"completion_id": chat["id"], "feedback": FEEDBACK}).json()
        acknowledged = time.perf_counter() - started
        feedback_id = accepted["items"][0]["id"]
        # Wait for the outcome by the feedback's status (the router's journal, not the engine), then ask: an item
        # is `applied` once every replica acknowledged its version, so that first chat is the new version's.
        # Probing the engine meanwhile loaded the CPU it shares with the step it measures.
        while (status := client.get(f"/v1/feedback/{feedback_id}").json())["status"] in ("queued", "training"):
            time.sleep(POLL_INTERVAL_S)
        if status["status"] == "rejected":  # a guard refused the step: nothing new to serve
            results.append({"rejected": status["reason"], "seconds": time.perf_counter() - started})
            continue
        probe = client.post("/v1/chat/completions", json={"model": "bench/latency", "messages": messages, "max_tokens": 1}).json()
        assert probe["claas"]["adapter_version"] > old_version, (probe["claas"], status)
        served = time.perf_counter() - started
        m = status["metrics"]
        results.append({
            "end_to_end_s": served, "ack_s": acknowledged, "queue_s": m["queue_s"], "train_s": m["train_s"],
            "step_s": m["step_seconds"], "publish_s": m["publish_s"], "broadcast_s": m["broadcast_s"], "load_s": m["load_s"],
        })
    return results, completion_ids


def bare_step_phase(state_dir: Path, completion_ids: list[str], repeats: int, threads: int) -> list[float]:
    """`SDPOTrainer.step` alone, with as many threads as the trainer actor gets."""
    import torch

    from claas_ray.config import LoraConfig, ModelConfig, TrainingConfig
    from claas_ray.serving.completion_log import CompletionLog
    from claas_ray.training import SDPOTrainer, TrainingExample

    torch.set_num_threads(threads)
    log = CompletionLog(state_dir / "completions.sqlite")
    trainer = SDPOTrainer(ModelConfig())
    state = trainer.init_adapter(LoraConfig())
    config = TrainingConfig()
    times = []
    for completion_id in completion_ids:
        record = log.get(completion_id)
        example = TrainingExample(messages=record.messages, response_text=record.response_text,
                                  response_token_ids=record.response_token_ids, response_logprobs=record.response_logprobs,
                                  feedback=FEEDBACK)
        for _ in range(repeats):
            started = time.perf_counter()
            result = trainer.step(state, [example], config)
            times.append(time.perf_counter() - started)
        state = result.state
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--serving-cores", help="serving.cpu_cores for the app, e.g. 0 (default: vLLM chooses)")
    parser.add_argument("--trainer-cores", help="trainer.cpu_cores for the app, e.g. 1 (default: any core)")
    args = parser.parse_args()

    from local_app import LocalApp

    from claas_ray.config import load_config

    app = LocalApp()
    if args.serving_cores:
        app.args["serving"]["cpu_cores"] = args.serving_cores
    if args.trainer_cores:
        app.args.setdefault("trainer", {})["cpu_cores"] = args.trainer_cores
    with app.serving() as base:
        rounds, completion_ids = end_to_end_phase(base, args.rounds, args.max_tokens)
    workdir, app_args = app.workdir, app.args
    settings = load_config(app_args).trainer
    trainer_threads = settings.step_threads() or int(max(1, settings.num_cpus))
    bare = bare_step_phase(workdir / "state", completion_ids, repeats=1, threads=trainer_threads)
    bare_all_cores = bare_step_phase(workdir / "state", completion_ids, repeats=1, threads=os.cpu_count() or 1)

    applied = [r for r in rounds if "rejected" not in r]  # a refused step publishes nothing to time
    median = {key: statistics.median(r[key] for r in applied) for key in applied[0]}
    report = {
        "benchmark": "feedback_latency",
        "rounds": rounds,
        "median": median,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs",
        "cores": {"serving": args.serving_cores, "trainer": args.trainer_cores},
        "bare_step_threads": trainer_threads,
        "bare_step_median_s": statistics.median(bare),
        "bare_step_all_cores_median_s": statistics.median(bare_all_cores),
        "ratio": {"end_to_end_vs_bare_step": median["end_to_end_s"] / statistics.median(bare)},
        "target": {"end_to_end_vs_bare_step": 1.3},
    }
    report["meets_target"] = report["ratio"]["end_to_end_vs_bare_step"] <= 1.3
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
