"""Load: 32 concurrent chat clients for a fixed time, without and then with feedback being applied.

Runs the app (configs/local.yaml with auth on, one inference replica) in a local Ray cluster. Phase
`idle`: N clients chat for `--seconds` against 4 adapters (round robin), nothing trains. Phase
`training`: the same clients for the same time while feedback for those 4 adapters is sent and applied
continuously (each adapter keeps `--pending` items queued). Prints JSON: per phase the request count, the
error count (target 0), p50/p99 latency and throughput; the tracked figures are the training/idle
latency ratios, measured in this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

ADAPTERS = [f"load/user-{index}" for index in range(4)]
PROMPTS = ["Tell me about dogs.", "Describe the sea.", "What is a good breakfast?", "Explain rain.", "Why do cats purr?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def chat_clients(base: str, key: str, clients: int, seconds: float, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    async def one(worker: int) -> None:
        turn = 0
        while time.monotonic() < deadline:
            model = ADAPTERS[(worker + turn) % len(ADAPTERS)]
            messages = [{"role": "user", "content": PROMPTS[(worker + turn) % len(PROMPTS)]}]
            started = time.perf_counter()
            try:
                reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
                assert reply.choices[0].message.content is not None
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # every failure counts: the target is zero
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            turn += 1

    began = time.monotonic()
    await asyncio.gather(*(one(worker) for worker in range(clients)))
    elapsed = time.monotonic() - began
    await client.close()
    return {
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "error_samples": errors[:5],
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p99_s": percentile(latencies, 0.99),
        "requests_per_s": len(latencies) / elapsed,
    }


async def feedback_feeder(base: str, key: str, stop: asyncio.Event, pending: int) -> dict:
    """Keep `pending` items queued per adapter until told to stop; count what was applied."""
    import httpx

    counts = {"sent": 0, "applied": 0, "rejected": 0, "queue_full": 0}
    outstanding: dict[str, list[str]] = {lora_id: [] for lora_id in ADAPTERS}
    async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=300) as http:
        while not stop.is_set():
            for lora_id, ids in outstanding.items():
                for feedback_id in list(ids):
                    status = (await http.get(f"/v1/feedback/{feedback_id}")).json()["status"]
                    if status in ("applied", "rejected"):
                        counts[status] += 1
                        ids.remove(feedback_id)
                while len(ids) < pending:
                    response = await http.post("/v1/feedback", json={
                        "lora_id": lora_id, "prompt": PROMPTS[counts["sent"] % len(PROMPTS)],
                        "response": "Sure!!! 😀😀 Here you go 🎉", "feedback": "No emoji, please.",
                    })
                    if response.status_code == 429:
                        counts["queue_full"] += 1
                        break
                    response.raise_for_status()
                    ids.append(response.json()["items"][0]["id"])
                    counts["sent"] += 1
            await asyncio.sleep(0.5)
    return counts


async def run_phases(base: str, key: str, args: argparse.Namespace) -> dict:
    idle = await chat_clients(base, key, args.clients, args.seconds, args.max_tokens)
    stop = asyncio.Event()
    feeder = asyncio.create_task(feedback_feeder(base, key, stop, args.pending))
    await asyncio.sleep(2)  # the first steps are running when the clients start
    training = await chat_clients(base, key, args.clients, args.seconds, args.max_tokens)
    stop.set()
    return {"idle": idle, "training": training, "feedback": await feeder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--pending", type=int, default=2, help="feedback items kept queued per adapter")
    args = parser.parse_args()

    import httpx
    from local_app import LocalApp

    app = LocalApp(prefix="claas-load-")
    key = f"sk-claas-{secrets.token_urlsafe(24)}"
    app.args["auth"] = {"enabled": True, "keys": [{"key": key, "admin": True}]}
    with app.serving() as base:
        for lora_id in ADAPTERS:
            created = httpx.post(f"{base}/v1/lora/init", json={"lora_id": lora_id},
                                 headers={"authorization": f"Bearer {key}"}, timeout=300)
            created.raise_for_status()
        asyncio.run(chat_clients(base, key, 4, 5, args.max_tokens))  # warm-up
        phases = asyncio.run(run_phases(base, key, args))

    idle, training = phases["idle"], phases["training"]
    report = {
        "benchmark": "load",
        "clients": args.clients,
        "seconds_per_phase": args.seconds,
        "max_tokens": args.max_tokens,
        **phases,
        "errors": idle["errors"] + training["errors"],
        "ratio": {
            "p50_training_vs_idle": training["p50_s"] / idle["p50_s"],
            "p99_training_vs_idle": training["p99_s"] / idle["p99_s"],
            "throughput_training_vs_idle": training["requests_per_s"] / idle["requests_per_s"],
        },
        "target": {"errors": 0},
    }
    report["meets_target"] = report["errors"] == 0 and phases["feedback"]["applied"] > 0
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
