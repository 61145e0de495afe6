"""Tune SDPO's knobs in-process on the embedded model, with the evaluation harness's preferences.

The served harness (`claas-ray eval`, `benchmarks/eval_full.sh`) is the judge; this is its fast proxy for
sweeping settings: the same preferences, prompts and verifiers, the same trainer code, but generation by
the trainer's own model in batches instead of through vLLM, so one setting costs minutes, not tens.

    python benchmarks/tune_sdpo.py teacher                       # what the hindsight teacher itself does
    python benchmarks/tune_sdpo.py train --set alpha=0 --set learning_rate=1e-3 --preferences language

Prints one JSON object per setting and preference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from claas_ray.chat import ChatMessage
from claas_ray.config import LoraConfig, ModelConfig, TrainingConfig
from claas_ray.eval.metrics import distinct_n, mean_words, repetition_rate
from claas_ray.eval.preferences import SHIPPED, load_capability, load_preference
from claas_ray.eval.verifiers import complies
from claas_ray.training.example import TrainingExample
from claas_ray.training.step import SDPOTrainer
from claas_ray.training.teacher import hindsight_messages


def conversation(preference, prompt: str) -> list[ChatMessage]:
    return [ChatMessage(**message) for message in preference.conversation(prompt)]


def compliance(trainer: SDPOTrainer, state, preference, conversations, max_tokens: int) -> tuple[float, list[str]]:
    answers = [text for text, _ in trainer.generate_batch(state, conversations, max_tokens)]
    return sum(complies(a, preference.verifier) for a in answers) / len(answers), answers


@torch.no_grad()
def text_nll(trainer: SDPOTrainer, state) -> float:
    """Mean per-token NLL of the capability texts, as `/v1/score` with a raw prompt measures it."""
    weights = trainer._select(state)
    total, count = 0.0, 0
    for text in load_capability().texts:
        prompt = trainer.tokenizer(text["prompt"])["input_ids"]
        continuation = trainer.tokenizer(text["continuation"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt + continuation)
        with trainer._weights(weights):
            total -= float(trainer._chosen_logprobs(ids, torch.tensor(continuation)).sum())
        count += len(continuation)
    return total / count


def teacher_ceiling(trainer: SDPOTrainer, args) -> None:
    config = TrainingConfig()
    for name in args.preferences:
        preference = load_preference(name)
        prompts = preference.heldout_prompts[: args.heldout]
        plain, _ = compliance(trainer, None, preference, [conversation(preference, p) for p in prompts], args.max_tokens)
        hindsight, samples = compliance(
            trainer, None, preference,
            [hindsight_messages(conversation(preference, p), preference.feedback, config.hindsight_template) for p in prompts], args.max_tokens,
        )
        print(json.dumps({"preference": name, "base": plain, "hindsight_teacher": hindsight, "samples": samples[:2]}))


def train(trainer: SDPOTrainer, args) -> None:
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    steps_per_feedback = overrides.pop("steps_per_feedback", 1)
    config = TrainingConfig(**overrides)
    base_nll = text_nll(trainer, None)
    for name in args.preferences:
        preference = load_preference(name)
        heldout = [conversation(preference, p) for p in preference.heldout_prompts[: args.heldout]]
        state = trainer.init_adapter(LoraConfig(), seed=0)
        started = time.time()
        curve, rejected = [], 0
        score, _ = compliance(trainer, state, preference, heldout, args.max_tokens)
        curve.append(score)
        for step in range(1, args.steps + 1):
            prompts = [preference.training_prompts[(step * args.batch + i) % len(preference.training_prompts)]
                       for i in range(args.batch)]
            conversations = [conversation(preference, p) for p in prompts]
            samples = trainer.generate_batch(state, conversations, args.max_tokens, temperature=0.7, seed=step)
            examples = [
                TrainingExample(messages=c, response_token_ids=ids, feedback=preference.feedback)
                for c, (_, ids) in zip(conversations, samples)
            ]
            for _ in range(steps_per_feedback):
                result = trainer.step(state, examples, config)
                rejected += not result.accepted
                state = result.state
            if step % args.eval_every == 0:
                score, answers = compliance(trainer, state, preference, heldout, args.max_tokens)
                curve.append(score)
        print(json.dumps({
            "preference": name, "settings": {**overrides, "steps_per_feedback": steps_per_feedback, "batch": args.batch},
            "compliance": curve, "rejected": rejected,
            "nll_ratio": round(text_nll(trainer, state) / base_nll, 4),
            "distinct_2": round(distinct_n(answers, 2), 3), "mean_words": round(mean_words(answers), 1),
            "repetition": round(sum(repetition_rate(a) for a in answers) / len(answers), 3),
            "seconds": round(time.time() - started), "samples": answers[:2],
        }, ensure_ascii=False), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["teacher", "train"])
    parser.add_argument("--preferences", nargs="+", default=list(SHIPPED))
    parser.add_argument("--set", action="append", default=[], help="training.<key>=<value>, repeatable")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=22)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    trainer = SDPOTrainer(ModelConfig())
    {"teacher": teacher_ceiling, "train": train}[args.mode](trainer, args)


if __name__ == "__main__":
    sys.exit(main())
