"""Cost of one SDPO step against a plain PEFT cross-entropy step on the same tokens, in one run.

Each variant runs in its own child process so that its peak RSS is its own. Prints JSON. Tracked:
`ratio.step_time` of the SDPO core (no teacher rollouts, no collapse guard; target <= 2.0, issue 2), and
`collapse_guard.share_of_step`, the collapse guard's cost within a step with the shipped defaults (target
<= 0.2, issue 15). The shipped step (rollouts, the greedy loop probe and the guard included) is reported beside
them, with `loop_probe.share_of_step`.

`--against-claas` measures issue 18's table instead: the SDPO core on a ~128-token prompt with answers of 64,
256 and 1,024 tokens, in float32 and bfloat16, against the CLaaS DistillationTrainer figures that the issue's
author measured on this machine kind (CLaaS's code is not in this repository). Machines of one kind differ in
speed from day to day, so with `--baseline-code` (a checkout of the code the issue measured, aab8b1d) that
code's step runs in the same run: CLaaS's time is scaled by how much faster or slower that step is today than
in the issue, and our time is compared with the scaled figure. Targets: <= 0.5x CLaaS's time, <= 0.7x its
peak RSS.
    git worktree add /tmp/claas-ray-aab8b1d aab8b1d
    .venv/bin/python benchmarks/sdpo_step.py --against-claas --baseline-code /tmp/claas-ray-aab8b1d
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

from sdpo_scaling import _conversation, _memory_mb

PROMPT = "Write a short paragraph about why the sea is salty."
FEEDBACK = "Answer only in French."
# Issue 18's table (2 threads, the same model, tokens and LoRA): (answer tokens, dtype) -> (seconds, peak RSS MB)
# of CLaaS's DistillationTrainer with its device patched to CPU, and of claas-ray's step at aab8b1d.
CLAAS_ISSUE_18 = {
    (64, "float32"): (3.21, 1470), (256, "float32"): (6.14, 1720), (1024, "float32"): (14.8, 2780),
    (64, "bfloat16"): (2.35, 1130), (256, "bfloat16"): (3.16, 1310), (1024, "bfloat16"): (9.39, 1990),
}
CLAAS_RAY_ISSUE_18 = {
    (64, "float32"): (1.94, 1620), (256, "float32"): (4.45, 2330), (1024, "float32"): (15.2, 4680),
    (64, "bfloat16"): (2.32, 1370), (256, "bfloat16"): (3.30, 1850), (1024, "bfloat16"): (8.59, 3740),
}
CORE_SETTINGS = {"teacher_rollouts": 0, "collapse_check_tokens": None, "optimizer_steps": 1, "own_response_tokens": None}


def _measure(variant: str, steps: int, answer_tokens: int, prompt_tokens: int | None, dtype: str | None,
             code: str | None, queue) -> None:
    if code is not None:  # an older checkout of claas_ray, found before the installed one
        sys.path.insert(0, code)
    import peft  # noqa: F401  (in the floor below, as the trainer imports it)
    import torch

    from claas_ray.chat import render_prompt_ids
    from claas_ray.config import LoraConfig, ModelConfig, TrainingConfig
    from claas_ray.models.registry import resolve_model_path
    from claas_ray.training import ChatMessage, SDPOTrainer, TrainingExample

    imported = _memory_mb("VmRSS")
    torch.manual_seed(0)
    model_config = ModelConfig()
    if dtype is not None:
        model_config = ModelConfig(dtype=dtype, max_model_len=max(1024, 2 * ((prompt_tokens or 0) + answer_tokens)))
    trainer = SDPOTrainer(model_config)
    if prompt_tokens is None:  # a natural answer the model generates (it may stop before answer_tokens)
        messages = [ChatMessage(role="user", content=PROMPT)]
        _, ids = trainer.generate(None, messages, max_new_tokens=answer_tokens)
        ids = [i for i in ids if i != trainer.tokenizer.eos_token_id][:answer_tokens]
    else:  # issue 18's shape: a fixed answer of exactly answer_tokens after a prompt of about prompt_tokens
        messages, ids, _ = _conversation(trainer.tokenizer, prompt_tokens + answer_tokens, answer_tokens)
    example = TrainingExample(messages=messages, response_token_ids=ids, feedback=FEEDBACK)
    config = TrainingConfig()
    if variant == "sdpo_core":
        config = config.model_copy(update={k: v for k, v in CORE_SETTINGS.items() if k in TrainingConfig.model_fields})
    parts: dict[str, list[float]] = {"collapse_check_seconds": [], "rollout_seconds": [], "loop_probe_seconds": []}

    def sdpo_step() -> None:
        result = trainer.step(state, [example], config)
        assert result.accepted, result.reason
        for key, values in parts.items():
            values.append(result.metrics.get(key, 0.0))

    prompt_ids = render_prompt_ids(trainer.tokenizer, messages)
    input_ids = torch.tensor([prompt_ids + ids])
    response = torch.tensor(ids)
    trained_dtype = trainer.dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in trainer.base.parameters())
    if variant == "plain_ce":
        # In the trainer's dtype (bf16 where the CPU has it natively), so both sides of the ratio compute alike.
        del trainer
        plain = plain_peft_model(resolve_model_path(model_config.base_model), LoraConfig(), trained_dtype)
    else:
        state = trainer.init_adapter(LoraConfig())

    def plain_step() -> None:
        """The baseline: a textbook PEFT step (its own PEFT model, AdamW, cross-entropy on the response)."""
        model, optimizer = plain
        optimizer.zero_grad()
        logits = model(input_ids=input_ids, logits_to_keep=response.shape[0] + 1).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits.float(), response).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
        optimizer.step()

    run = plain_step if variant == "plain_ce" else sdpo_step
    run()  # warm-up
    loaded = _memory_mb("VmRSS")
    for values in parts.values():
        values.clear()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    queue.put(
        {
            "median_step_seconds": statistics.median(times),
            "min_step_seconds": min(times),
            "tokens_per_step": len(ids),
            "prompt_tokens": len(prompt_ids),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_warm_up_mb": loaded,
            # What no step can go below: the libraries imported and the model's weights resident.
            "floor_rss_mb": imported + weight_bytes / 2**20,
            "dtype": str(trained_dtype).removeprefix("torch."),
            "steps": steps,
            **({f"median_{key}": statistics.median(values) for key, values in parts.items()} if parts["rollout_seconds"] else {}),
        }
    )


def plain_peft_model(path: str, lora, dtype=None):
    """A textbook PEFT model and AdamW, the baseline step (also of benchmarks/sdpo_scaling.py)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                       target_modules=list(lora.target_modules)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def _run(variant: str, steps: int, answer_tokens: int, prompt_tokens: int | None = None, dtype: str | None = None,
         code: str | None = None) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(variant, steps, answer_tokens, prompt_tokens, dtype, code, queue))
    process.start()
    process.join()
    # A child that failed (or that the kernel killed for memory) leaves nothing in the queue: say so instead.
    return queue.get() if not queue.empty() else {"failed": f"exit code {process.exitcode}"}


def _against_claas(args: argparse.Namespace) -> dict:
    """Issue 18's table: the SDPO core against CLaaS's figures, today's machine speed factored in."""
    rows = []
    for dtype in args.dtypes:
        for answer in args.answer_tokens:
            ours = _run("sdpo_core", args.steps, answer, args.prompt_tokens, dtype)
            before = _run("sdpo_core", args.steps, answer, args.prompt_tokens, dtype, str(args.baseline_code)) if args.baseline_code else None
            claas_seconds, claas_mb = CLAAS_ISSUE_18[(answer, dtype)]
            then_seconds, then_mb = CLAAS_RAY_ISSUE_18[(answer, dtype)]
            row = {
                "answer_tokens": answer, "dtype": dtype, "sdpo_core": ours, "before_code": before,
                "claas_issue_18": {"step_seconds": claas_seconds, "peak_rss_mb": claas_mb},
                "claas_ray_issue_18": {"step_seconds": then_seconds, "peak_rss_mb": then_mb},
            }
            if "failed" not in ours:
                row.update(
                    time_vs_claas_as_measured_in_issue=ours["median_step_seconds"] / claas_seconds,
                    memory_vs_claas=ours["peak_rss_mb"] / claas_mb,
                    memory_floor_vs_claas=ours["floor_rss_mb"] / claas_mb,
                )
            if before is not None and "failed" not in before and "failed" not in ours:
                speed = before["median_step_seconds"] / then_seconds  # > 1: the machine is slower today
                row.update(
                    machine_speed_factor=speed,
                    time_vs_claas=ours["median_step_seconds"] / (claas_seconds * speed),
                    time_vs_before_code=ours["median_step_seconds"] / before["median_step_seconds"],
                    memory_vs_before_code=ours["peak_rss_mb"] / before["peak_rss_mb"],
                )
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), file=sys.stderr, flush=True)
    time_key = "time_vs_claas" if args.baseline_code else "time_vs_claas_as_measured_in_issue"
    return {
        "benchmark": "sdpo_step_against_claas",
        "date": time.strftime("%Y-%m-%d"),
        "model": "smollm2-135m",
        "baseline": "issue 18's table: CLaaS DistillationTrainer (device patched to CPU) and claas-ray at aab8b1d, 2 threads",
        "baseline_code": str(args.baseline_code) if args.baseline_code else None,
        "rows": rows,
        "target": {"time_vs_claas": 0.5, "memory_vs_claas": 0.7},
        "meets_target": {
            f"{row['answer_tokens']}_{row['dtype']}": {"time": row[time_key] <= 0.5, "memory": row["memory_vs_claas"] <= 0.7}
            for row in rows if time_key in row
        },
    }


def _against_plain(args: argparse.Namespace) -> dict:
    answer = args.answer_tokens[0]
    results = {
        variant: _run(variant, args.steps, answer)
        for variant in (("sdpo_core", "plain_ce") if args.skip_shipped else ("sdpo", "sdpo_core", "plain_ce"))
    }
    core, plain = results["sdpo_core"], results["plain_ce"]
    report = {
        "benchmark": "sdpo_step",
        "date": time.strftime("%Y-%m-%d"),
        "model": "smollm2-135m",
        "dtype": core["dtype"],  # the trainer's, which the plain step copies
        **results,
        "ratio": {"step_time": core["median_step_seconds"] / plain["median_step_seconds"]},
        "target": {"step_time": 2.0, "collapse_guard_share_of_step": 0.2},
    }
    report["meets_target"] = {"step_time": report["ratio"]["step_time"] <= report["target"]["step_time"]}
    if "sdpo" in results:
        shipped = results["sdpo"]
        guard_share = shipped["median_collapse_check_seconds"] / shipped["median_step_seconds"]
        report["ratio"].update(shipped_step_time=shipped["median_step_seconds"] / plain["median_step_seconds"],
                               peak_rss=shipped["peak_rss_mb"] / plain["peak_rss_mb"])
        report["collapse_guard"] = {"median_seconds": shipped["median_collapse_check_seconds"], "share_of_step": guard_share}
        report["loop_probe"] = {"median_seconds": shipped["median_loop_probe_seconds"],
                                "share_of_step": shipped["median_loop_probe_seconds"] / shipped["median_step_seconds"]}
        report["meets_target"]["collapse_guard"] = guard_share <= report["target"]["collapse_guard_share_of_step"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--answer-tokens", "--response-tokens", type=int, nargs="+", default=None,
                        help="default 96 (a generated answer), or 64 256 1024 with --against-claas")
    parser.add_argument("--skip-shipped", action="store_true", help="only the core and the plain step (no guard share)")
    parser.add_argument("--against-claas", action="store_true", help="issue 18's table (see above)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="with --against-claas")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="with --against-claas")
    parser.add_argument("--baseline-code", type=Path, help="with --against-claas: a checkout of aab8b1d")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.against_claas:
        args.answer_tokens = args.answer_tokens or [64, 256, 1024]
        report = _against_claas(args)
    else:
        args.answer_tokens = args.answer_tokens or [96]
        report = _against_plain(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
