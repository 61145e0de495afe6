"""Tune SDPO's knobs in-process on the embedded model, with the evaluation harness's preferences.

The served harness (`claas-ray eval`, `benchmarks/eval_full.sh`) is the judge; this is its fast proxy for
sweeping settings: the same preferences, prompts and verifiers, the same trainer code, but generation by
the trainer's own model in batches instead of through vLLM, so one setting costs minutes, not tens.

    python benchmarks/tune_sdpo.py teacher                       # what the hindsight teacher itself does
    python benchmarks/tune_sdpo.py train --set teacher_rollouts=8 --set optimizer_steps=2 --preferences identity
    python benchmarks/tune_sdpo.py sequence --sequence concise,bullets     # A then B on one adapter

Prints one JSON object per setting and preference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from claas_ray.chat import ChatMessage
from claas_ray.config import LoraConfig, ModelConfig, TrainingConfig
from claas_ray.degeneration import is_degenerate
from claas_ray.eval.metrics import distinct_n, mean_words, repetition_rate
from claas_ray.eval.preferences import SHIPPED, load_capability, load_preference
from claas_ray.eval.verifiers import complies, complies_cleanly
from claas_ray.training.example import TrainingExample
from claas_ray.training.step import SDPOTrainer
from claas_ray.training.teacher import hindsight_messages

TRACED = ("divergence", "kl", "kl_to_base_after", "leash_weight_mean", "grad_norm", "loss")


def conversation(preference, prompt: str) -> list[ChatMessage]:
    return [ChatMessage(**message) for message in preference.conversation(prompt)]


def compliance(trainer: SDPOTrainer, state, preference, conversations, max_tokens: int) -> tuple[float, list[str]]:
    """Clean compliance of greedy answers (the verifier accepts them and they are not degenerate)."""
    answers = [text for text, _ in trainer.generate_batch(state, conversations, max_tokens)]
    return sum(complies_cleanly(a, preference.verifier) for a in answers) / len(answers), answers


def raw_compliance(preference, answers: list[str]) -> float:
    return sum(complies(a, preference.verifier) for a in answers) / len(answers)


def text_nll(trainer: SDPOTrainer, state) -> float:
    """Mean per-token NLL of the capability texts, as `/v1/score` with a raw prompt measures it."""
    total, count = 0.0, 0
    for text in load_capability().texts:
        prompt = trainer.tokenizer(text["prompt"])["input_ids"]
        continuation = trainer.tokenizer(text["continuation"], add_special_tokens=False)["input_ids"]
        total -= trainer.continuation_logprob(state, prompt, continuation)
        count += len(continuation)
    return total / count


def teacher_ceiling(trainer: SDPOTrainer, args) -> None:
    config = TrainingConfig()
    for name in args.preferences:
        preference = load_preference(name)
        prompts = preference.heldout_prompts[: args.heldout]
        plain, base_answers = compliance(
            trainer, None, preference, [conversation(preference, p) for p in prompts], args.max_tokens
        )
        hindsight, samples = compliance(
            trainer, None, preference,
            [hindsight_messages(conversation(preference, p), preference.feedback, config.hindsight_template)
             for p in prompts],
            args.max_tokens,
        )
        print(json.dumps({
            "preference": name, "base": plain, "hindsight_teacher": hindsight,
            # The teacher's answer set against the base's, by the capability bound's measures: a student that
            # distils this teacher inherits its variety as well as its compliance.
            "distinct_2": {"base": round(distinct_n(base_answers, 2), 3), "teacher": round(distinct_n(samples, 2), 3)},
            "degenerate": {"base": sum(map(is_degenerate, base_answers)), "teacher": sum(map(is_degenerate, samples))},
            "mean_words": {"base": round(mean_words(base_answers), 1), "teacher": round(mean_words(samples), 1)},
            "samples": samples[:3],
        }, ensure_ascii=False))


def parse_settings(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)  # numbers, true/false/null, lists, "quoted strings"
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def teach(trainer: SDPOTrainer, state, preference, config: TrainingConfig, args, heldout) -> tuple:
    """`args.steps` feedback events of one preference, one at a time; clean compliance every `eval_every`."""
    curve, reasons = [], []
    for step in range(1, args.steps + 1):
        prompts = [preference.training_prompts[(step * args.batch + i) % len(preference.training_prompts)]
                   for i in range(args.batch)]
        conversations = [conversation(preference, p) for p in prompts]
        samples = trainer.generate_batch(state, conversations, args.max_tokens, temperature=0.7, seed=step)
        examples = [
            TrainingExample(messages=c, response_token_ids=ids, feedback=preference.feedback)
            for c, (_, ids) in zip(conversations, samples)
        ]
        result = trainer.step(state, examples, config)
        if args.trace:
            print(json.dumps({
                "event": step, "preference": preference.name, "accepted": result.accepted,
                "sample_complies": [complies_cleanly(text, preference.verifier) for text, _ in samples],
                **{key: round(result.metrics[key], 4) for key in TRACED if key in result.metrics},
            }), flush=True)
        if not result.accepted:
            reasons.append(result.reason[:80])
        state = result.state
        if step % args.eval_every == 0:
            curve.append(compliance(trainer, state, preference, heldout, args.max_tokens)[0])
    return state, curve, reasons


def summary(trainer: SDPOTrainer, state, preference, heldout, args, base_nll: float) -> dict:
    score, answers = compliance(trainer, state, preference, heldout, args.max_tokens)
    return {
        "clean_compliance": round(score, 3), "raw_compliance": round(raw_compliance(preference, answers), 2),
        "degenerate": sum(map(is_degenerate, answers)),
        "nll_ratio": round(text_nll(trainer, state) / base_nll, 4),
        "distinct_2": round(distinct_n(answers, 2), 3), "mean_words": round(mean_words(answers), 1),
        "repetition": round(sum(repetition_rate(a) for a in answers) / len(answers), 3), "samples": answers[:2],
    }


def train(trainer: SDPOTrainer, args) -> None:
    overrides = parse_settings(args.set)
    config = TrainingConfig(**overrides)
    base_nll = text_nll(trainer, None)
    for name in args.preferences:
        preference = load_preference(name)
        heldout = [conversation(preference, p) for p in preference.heldout_prompts[: args.heldout]]
        started = time.time()
        state = trainer.init_adapter(LoraConfig(), seed=0)
        base = compliance(trainer, state, preference, heldout, args.max_tokens)[0]
        state, curve, reasons = teach(trainer, state, preference, config, args, heldout)
        print(json.dumps({
            "preference": name, "settings": overrides, "curve": [base, *curve], "rejected": reasons,
            **summary(trainer, state, preference, heldout, args, base_nll), "seconds": round(time.time() - started),
        }, ensure_ascii=False), flush=True)


def sequence(trainer: SDPOTrainer, args) -> None:
    """Teach A then B to one adapter: does B reach the target while A is kept?"""
    overrides = parse_settings(args.set)
    config = TrainingConfig(**overrides)
    base_nll = text_nll(trainer, None)
    for pair in args.sequence:
        first, second = (load_preference(name) for name in pair.split(","))
        held = {p.name: [conversation(p, q) for q in p.heldout_prompts[: args.heldout]] for p in (first, second)}
        started = time.time()
        state = trainer.init_adapter(LoraConfig(), seed=0)
        state, first_curve, first_reasons = teach(trainer, state, first, config, args, held[first.name])
        state, second_curve, second_reasons = teach(trainer, state, second, config, args, held[second.name])
        print(json.dumps({
            "sequence": pair, "settings": overrides, "first_curve": first_curve, "second_curve": second_curve,
            "first_kept": summary(trainer, state, first, held[first.name], args, base_nll),
            "second": summary(trainer, state, second, held[second.name], args, base_nll),
            "rejected": first_reasons + second_reasons, "seconds": round(time.time() - started),
        }, ensure_ascii=False), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["teacher", "train", "sequence"])
    parser.add_argument("--sequence", action="append", default=[], metavar="A,B", help="with mode sequence")
    parser.add_argument("--preferences", nargs="+", default=list(SHIPPED))
    parser.add_argument("--set", action="append", default=[], help="training.<key>=<value>, repeatable")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="feedback items per step (1: one event per step)")
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=22)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trace", action="store_true", help="print each event's step metrics and whether the "
                        "answer the feedback was given on complied")
    args = parser.parse_args(argv)
    trainer = SDPOTrainer(ModelConfig())
    {"teacher": teacher_ceiling, "train": train, "sequence": sequence}[args.mode](trainer, args)


if __name__ == "__main__":
    sys.exit(main())
