"""How an SDPO step's memory and time grow with the conversation (issue 18), in one run.

For each conversation length (prompt + a fixed answer, default 128 tokens) and variant, a fresh child process
loads the embedded model, warms up on a short example, then runs one step on the long conversation. Peak RSS
is the kernel's high-water mark (reset after loading) minus the RSS of the loaded model. Variants:

- `sdpo`: `SDPOTrainer.step` with the shipped defaults (rollouts and guards included; the rollout budget
  leaves long conversations without rollouts);
- `sdpo_core`: one update on the user's response alone (no rollouts, no collapse guard, every answer token);
- `plain_ce`: the textbook PEFT step on the same tokens (AdamW, cross-entropy on the answer), the time baseline.

Prints JSON (and writes it with --output). With --baseline (an earlier run's JSON, e.g. of the code before a
change, run with the same arguments) the report compares against it and --plot draws both.
Tracked (targets of issue 18): peak memory of an 8,192-token conversation <= 4 GB above the loaded model,
memory slope <= 0.2 MB per conversation token, `sdpo_core` time <= 2.0x `plain_ce` at every length.
    .venv/bin/python benchmarks/sdpo_scaling.py --output reports/sdpo_scaling/after.json \
        --baseline reports/sdpo_scaling/before.json --plot reports/sdpo_scaling/scaling.png
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

ANSWER = (
    "The sea is salty because rivers carry dissolved minerals from rocks on land into the ocean, and when sea "
    "water evaporates the salt stays behind. Over millions of years this has built up to about 35 grams of salt "
    "in every litre. Hydrothermal vents on the sea floor add minerals too, and some salt is locked away again "
    "in sediments, so the saltiness has stayed roughly steady for a very long time. "
)
NOTES = (
    "Note {i}: the user asked the agent to check file src/module_{i}.py, which defines a parser for record "
    "type {i}; the tool returned {n} lines, the tests in tests/test_{i}.py passed, and the agent wrote a short "
    "summary of the change, the open question about field {j}, and the next step for ticket {k}.\n"
)
FEEDBACK = "Be more concise: answer in at most two sentences."


def _memory_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _conversation(tokenizer, length: int, answer_tokens: int):
    """Messages whose rendered prompt plus the answer are `length` tokens (within a few), and the answer ids."""
    from claas_ray.chat import render_prompt_ids
    from claas_ray.training import ChatMessage

    answer = tokenizer(ANSWER * (1 + answer_tokens // 60), add_special_tokens=False)["input_ids"][:answer_tokens]
    notes = "".join(NOTES.format(i=i, n=17 * i % 230, j=i % 13, k=1000 + i) for i in range(length // 40 + 2))
    note_ids = tokenizer(notes, add_special_tokens=False)["input_ids"]
    question = ChatMessage(role="user", content="Summarise what the agent did, and why the sea is salty.")
    overhead = len(render_prompt_ids(tokenizer, [ChatMessage(role="system", content=""), question]))
    system = tokenizer.decode(note_ids[: max(0, length - answer_tokens - overhead)])
    messages = [ChatMessage(role="system", content=system), question]
    return messages, answer, len(render_prompt_ids(tokenizer, messages)) + len(answer)


def _measure(variant: str, length: int, answer_tokens: int, dtype: str, queue) -> None:
    import torch
    from sdpo_step import plain_peft_model

    from claas_ray.chat import render_prompt_ids
    from claas_ray.config import LoraConfig, ModelConfig, TrainingConfig
    from claas_ray.models.registry import resolve_model_path
    from claas_ray.training import SDPOTrainer, TrainingExample

    try:  # the allocator setting the trainer makes (absent in code before issue 18); every variant gets it
        from claas_ray.training.step import return_freed_memory

        return_freed_memory()
    except ImportError:
        pass
    torch.manual_seed(0)
    model_config = ModelConfig(dtype=dtype, max_model_len=max(length + 512, 1024))
    trainer = SDPOTrainer(model_config)
    long_case = _conversation(trainer.tokenizer, length, answer_tokens)
    short_case = _conversation(trainer.tokenizer, 96, 16)
    settings: dict = {"max_step_tokens": None}
    if variant == "sdpo_core":
        settings.update(teacher_rollouts=0, collapse_check_tokens=None, optimizer_steps=1, own_response_tokens=None)
    config = TrainingConfig(**settings)

    if variant == "plain_ce":
        ids = {id(case): render_prompt_ids(trainer.tokenizer, case[0]) for case in (long_case, short_case)}
        del trainer
        model, optimizer = plain_peft_model(resolve_model_path(model_config.base_model), LoraConfig(), getattr(torch, dtype))

        def run(case) -> dict:
            response = torch.tensor(case[1])
            optimizer.zero_grad()
            input_ids = torch.tensor([ids[id(case)] + case[1]])
            logits = model(input_ids=input_ids, logits_to_keep=response.shape[0] + 1).logits[0, :-1]
            torch.nn.functional.cross_entropy(logits.float(), response).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
            optimizer.step()
            return {}
    else:
        state = trainer.init_adapter(LoraConfig())

        def run(case) -> dict:
            example = TrainingExample(messages=case[0], response_token_ids=case[1], feedback=FEEDBACK)
            result = trainer.step(state, [example], config)
            return {"accepted": result.accepted, "reason": result.reason,
                    "teacher_rollouts": result.metrics.get("teacher_rollouts"),
                    "kl_to_base_after": result.metrics.get("kl_to_base_after")}

    run(short_case)  # warm-up: lazy initialisation is not what a long conversation costs
    loaded = _memory_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM)
    started = time.perf_counter()
    extra = run(long_case)
    seconds = time.perf_counter() - started
    queue.put({"conversation_tokens": long_case[2], "answer_tokens": len(long_case[1]), "step_seconds": seconds,
               "peak_above_loaded_mb": _memory_mb("VmHWM") - loaded, "loaded_rss_mb": loaded, **extra})


def _slope_mb_per_token(points: list[dict]) -> float | None:
    """Least-squares slope of peak memory against conversation tokens."""
    if len(points) < 2:
        return None
    xs = [p["conversation_tokens"] for p in points]
    ys = [p["peak_above_loaded_mb"] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def _plot(report: dict, baseline: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, seconds) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, style, label in ((baseline, "--", "before"), (report, "-", "after")):
        if run is None:
            continue
        for variant, points in run["results"].items():
            done = [p for p in points if "peak_above_loaded_mb" in p]
            xs = [p["conversation_tokens"] for p in done]
            color = {"sdpo": "C0", "sdpo_core": "C1", "plain_ce": "C2"}.get(variant)
            memory.plot(xs, [p["peak_above_loaded_mb"] / 1024 for p in done], style, marker="o", color=color,
                        label=f"{variant} ({label})")
            if run.get("times_comparable", True):  # false for a run that shared the machine: its memory still counts
                seconds.plot(xs, [p["step_seconds"] for p in done], style, marker="o", color=color, label=f"{variant} ({label})")
    memory.axhline(4.0, color="grey", linewidth=0.8)
    memory.set(xlabel="conversation tokens (answer 128)", ylabel="peak RSS above the loaded model (GB)", title="Memory")
    seconds.set(xlabel="conversation tokens (answer 128)", ylabel="seconds", title="Step time")
    for axis in (memory, seconds):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"SDPO step on {report['model']}, {report['dtype']}, {report['machine']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    import os
    import platform

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=["sdpo", "sdpo_core", "plain_ce"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output", type=Path)
    parser.add_argument("--baseline", type=Path, help="an earlier run's JSON to compare against")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for length in args.lengths:
        for variant in args.variants:
            queue = context.Queue()
            process = context.Process(target=_measure, args=(variant, length, args.answer_tokens, args.dtype, queue))
            process.start()
            process.join()
            # A child the kernel killed for memory leaves nothing in the queue: say so instead of a number.
            results[variant].append(queue.get() if not queue.empty() else {"conversation_tokens": length, "failed": f"exit code {process.exitcode}"})
            print(json.dumps({"variant": variant, **results[variant][-1]}), flush=True)
    report: dict = {
        "benchmark": "sdpo_scaling",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
        "model": "smollm2-135m",
        "dtype": args.dtype,
        "results": results,
    }
    done = {variant: [p for p in points if "peak_above_loaded_mb" in p] for variant, points in results.items()}
    report["slope_mb_per_token"] = {variant: _slope_mb_per_token(points) for variant, points in done.items()}
    if "plain_ce" in done:
        plain = {p["conversation_tokens"]: p["step_seconds"] for p in done["plain_ce"]}
        report["time_vs_plain_ce"] = {
            variant: {str(p["conversation_tokens"]): p["step_seconds"] / plain[p["conversation_tokens"]]
                      for p in points if p["conversation_tokens"] in plain}
            for variant, points in done.items() if variant != "plain_ce"
        }
    longest = max(args.lengths)
    at_longest = next((p for p in done.get("sdpo", []) if p["conversation_tokens"] >= longest - 16), None)
    report["target"] = {"peak_gb_at_8192": 4.0, "slope_mb_per_token": 0.2, "sdpo_core_vs_plain_ce": 2.0}
    report["meets_target"] = {
        "peak_at_8192": None if at_longest is None or longest < 8192 else at_longest["peak_above_loaded_mb"] / 1024 <= 4.0,
        "slope": None if report["slope_mb_per_token"].get("sdpo") is None else report["slope_mb_per_token"]["sdpo"] <= 0.2,
        "time": None if "sdpo_core" not in report.get("time_vs_plain_ce", {})
        else all(ratio <= 2.0 for ratio in report["time_vs_plain_ce"]["sdpo_core"].values()),
    }
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if baseline is not None:
        report["baseline"] = {"file": str(args.baseline), "date": baseline.get("date"), "slope_mb_per_token": baseline.get("slope_mb_per_token")}
        report["vs_baseline"] = {
            variant: {
                str(p["conversation_tokens"]): {
                    "memory": p["peak_above_loaded_mb"] / before["peak_above_loaded_mb"],
                    "time": p["step_seconds"] / before["step_seconds"],
                }
                for p in points
                for before in baseline["results"].get(variant, [])
                if "peak_above_loaded_mb" in before and abs(before["conversation_tokens"] - p["conversation_tokens"]) <= 16
            }
            for variant, points in done.items()
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    if args.plot:
        _plot(report, baseline, args.plot)


if __name__ == "__main__":
    main()
