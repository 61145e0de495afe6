"""Cost of one SDPO step against a plain PEFT cross-entropy step on the same tokens, in one run.

Each variant runs in its own child process so that its peak RSS is its own. Prints JSON. Tracked:
`ratio.step_time` of the SDPO core (no teacher rollouts, no collapse guard; target <= 2.0, issue 2), and
`collapse_guard.share_of_step`, the collapse guard's cost within a step with the shipped defaults (target
<= 0.2, issue 15). The shipped step (rollouts and guard included) is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

PROMPT = "Write a short paragraph about why the sea is salty."
FEEDBACK = "Answer only in French."


def _measure(variant: str, steps: int, response_tokens: int, queue) -> None:
    import torch

    from claas_ray.chat import render_prompt_ids
    from claas_ray.config import LoraConfig, ModelConfig, TrainingConfig
    from claas_ray.models.registry import resolve_model_path
    from claas_ray.training import ChatMessage, SDPOTrainer, TrainingExample

    torch.manual_seed(0)
    trainer = SDPOTrainer(ModelConfig())
    state = trainer.init_adapter(LoraConfig())
    messages = [ChatMessage(role="user", content=PROMPT)]
    # A fixed, generated response of the requested length (no EOS), identical for both variants.
    _, ids = trainer.generate(None, messages, max_new_tokens=response_tokens)
    ids = [i for i in ids if i != trainer.tokenizer.eos_token_id][:response_tokens]
    example = TrainingExample(messages=messages, response_token_ids=ids, feedback=FEEDBACK)
    config = TrainingConfig()
    if variant == "sdpo_core":
        config = config.model_copy(update={
            "teacher_rollouts": 0, "collapse_check_tokens": None, "optimizer_steps": 1, "own_response_tokens": None,
        })
    parts: dict[str, list[float]] = {"collapse_check_seconds": [], "rollout_seconds": []}

    def sdpo_step() -> None:
        result = trainer.step(state, [example], config)
        assert result.accepted, result.reason
        for key, values in parts.items():
            values.append(result.metrics.get(key, 0.0))

    prompt_ids = render_prompt_ids(trainer.tokenizer, messages)
    input_ids = torch.tensor([prompt_ids + ids])
    response = torch.tensor(ids)
    # In the trainer's dtype (bf16 where the CPU has it natively), so both sides of the ratio compute alike.
    plain = plain_peft_model(resolve_model_path(ModelConfig().base_model), LoraConfig(), trainer.dtype) if variant == "plain_ce" else None

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
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "dtype": str(trainer.dtype).removeprefix("torch."),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--skip-shipped", action="store_true", help="only the core and the plain step (no guard share)")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = {}
    for variant in ("sdpo_core", "plain_ce") if args.skip_shipped else ("sdpo", "sdpo_core", "plain_ce"):
        queue = context.Queue()
        process = context.Process(target=_measure, args=(variant, args.steps, args.response_tokens, queue))
        process.start()
        results[variant] = queue.get()
        process.join()
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
        report["meets_target"]["collapse_guard"] = guard_share <= report["target"]["collapse_guard_share_of_step"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
